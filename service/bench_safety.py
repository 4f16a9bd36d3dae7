"""Benchmark: the time the child-safety checks (`service.child_safety`) add per request.

They run on the hot path, so the budget is about 1 ms at P95. This times, per call and
warm, on realistic input: every Bridge validation turn (Pika's turn, the child's turn)
with each candidate of (a) the first sentence of its main response and (b) the shipped
personalities' fallback phrases and few-shot fast responses. A second, "with details"
set gives every child turn a personal detail and a rude word (the worst case: every
library runs), cycling through `DETAIL_SUFFIXES`.

Timed, in ms (P50/P95/P99, `time.perf_counter_ns` around each call):

- ``inspect_turn``: once per request (the child's unsafe words and personal details),
  and its two parts;
- ``check``: once per candidate (`TurnSafety.check`);
- ``output_safety``: both, as one call;
- parts of ``check``, to show where the time goes: the profanity filter
  (``unsafe_words``), ``echoes_personal_details``, ``contains_contact``;
- for comparison, libphonenumber's matcher (US, GB, "+") run on every child turn
  without the digit-count gate that `service.child_safety` puts before it
  (``phone_matcher_ungated``).

The first call (glin-profanity's word list and libphonenumber's metadata load) is
reported as ``first_call_ms``. Pure Python, no model, no engine.

Run:  python -m service.bench_safety [--repeats 10] [--json docs/benchmarks/child_safety.json]
      [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.benchmarks import BRIDGE_VALIDATION, machine, percentile, today, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = BRIDGE_VALIDATION
DEFAULT_JSON = REPO_ROOT / "docs" / "benchmarks" / "child_safety.json"
_FIRST_SENTENCE = re.compile(r"^.*?[.!?](?=\s|$)")

DETAIL_SUFFIXES: tuple[str, ...] = (
    " my name is Anna Lopez, damn",
    " my email is tom dot smith at gmail dot com, this is stupid",
    " call my mum on 07700 900123, crap",
    " I'm called Sam Lee and my number is 555 123 4567, shit",
)
"""Appended to the Bridge child turns for the "with details" set."""

Sample = tuple[str | None, str, list[str]]
"""(Pika's turn, the child's turn, candidate fast responses)."""


def samples(data: Path, manifest: Path) -> list[Sample]:
    """One sample per Bridge validation triple.

    Args:
        data: Bridge `validation.json`.
        manifest: the personalities manifest (fallback phrases, few-shot responses).

    Raises:
        FileNotFoundError: `data` or `manifest` is missing.
    """
    from adapters.sources import load_triples
    from service.personalities import load_personalities

    personalities = load_personalities(manifest)
    canned = [
        phrase
        for p in personalities.values()
        for phrase in (*p.fallback_phrases, *(ex.fast_response for ex in p.few_shot))
    ]
    result: list[Sample] = []
    for triple in load_triples("bridge", data):
        match = _FIRST_SENTENCE.match(triple.main_response or "")
        candidates = [match.group(0)] if match else []
        result.append((triple.pika_turn, triple.user_turn, [*candidates, *canned]))
    return result


def with_details(plain: list[Sample]) -> list[Sample]:
    """`plain` with a personal detail and a rude word appended to every child turn."""
    return [
        (pika, user + DETAIL_SUFFIXES[i % len(DETAIL_SUFFIXES)], candidates)
        for i, (pika, user, candidates) in enumerate(plain)
    ]


def _stats(values: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(percentile(values, q) / 1e6, 4) for q in (50, 95, 99)}


def measure(data: list[Sample], repeats: int) -> dict[str, Any]:
    """Time each stage per call over `data`, `repeats` timed passes after one warm-up.

    Returns:
        `requests`, `checks` (calls of `check`), and for each stage the P50/P95/P99 in ms.
    """
    import phonenumbers

    from service import child_safety as cs
    from service.text_checks import unsafe_words

    def ungated_phones(text: str) -> object:
        return [
            m
            for region in ("US", "GB", "ZZ")
            for m in phonenumbers.PhoneNumberMatcher(
                text, region, leniency=phonenumbers.Leniency.POSSIBLE
            )
        ]

    times: dict[str, list[float]] = {
        "inspect_turn": [],
        "turn_unsafe_words": [],
        "turn_personal_details": [],
        "check": [],
        "output_safety": [],
        "unsafe_words": [],
        "echoes_personal_details": [],
        "contains_contact": [],
        "phone_matcher_ungated": [],
    }

    def timed(name: str, record: bool, call: Callable[..., object], *args: Any) -> object:
        t0 = time.perf_counter_ns()
        out = call(*args)
        if record:
            times[name].append(time.perf_counter_ns() - t0)
        return out

    for rep in range(repeats + 1):
        record = rep > 0  # the first pass is the untimed warm-up
        for pika, user, candidates in data:
            turn = timed("inspect_turn", record, cs.inspect_turn, pika, user)
            assert isinstance(turn, cs.TurnSafety)
            timed("turn_unsafe_words", record, unsafe_words, user)
            timed("turn_personal_details", record, cs.personal_details, pika, user)
            timed("phone_matcher_ungated", record, ungated_phones, user)
            for cand in candidates:
                timed("check", record, turn.check, cand)
                timed("output_safety", record, cs.output_safety, cand, pika, user)
                timed("unsafe_words", record, unsafe_words, cand)
                timed(
                    "echoes_personal_details",
                    record,
                    cs.echoes_personal_details,
                    cand,
                    turn.details,
                )
                timed("contains_contact", record, cs.contains_contact, cand)
    return {
        "requests": len(times["inspect_turn"]),
        "checks": len(times["check"]),
        **{name: _stats(values) for name, values in times.items()},
    }


def first_call_ms() -> float:
    """The first call in this process, libraries loading included, in ms."""
    from service.child_safety import warm_up

    started = time.perf_counter_ns()
    warm_up()
    return round((time.perf_counter_ns() - started) / 1e6, 1)


_ROWS = (
    ("inspect_turn (once per request)", "inspect_turn"),
    ("part: profanity filter on the child's turn", "turn_unsafe_words"),
    ("part: personal_details of the child's turn", "turn_personal_details"),
    ("(libphonenumber on the child's turn, no digit gate)", "phone_matcher_ungated"),
    ("check (per candidate)", "check"),
    ("output_safety (both)", "output_safety"),
    ("part: profanity filter on the candidate", "unsafe_words"),
    ("part: echoes_personal_details", "echoes_personal_details"),
    ("part: contains_contact (gated)", "contains_contact"),
)


def render(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        "## Child-safety checks",
        "",
        f"Command: `{result['command']}`; machine: {result['machine']}; date: {result['date']}. "
        "Per call, warm. Bridge validation turns "
        f"({result['bridge']['requests']} requests, {result['bridge']['checks']} candidate "
        "checks: first sentence of the main response and the shipped personalities' "
        'fallback and few-shot phrases); "with details" appends a name, e-mail or phone '
        f"number and a rude word to every child turn. First call (libraries load): "
        f"{result['first_call_ms']} ms. Budget: about 1 ms at P95.",
        "",
        "| | bridge P50 ms | P95 ms | P99 ms | with details P50 ms | P95 ms | P99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in _ROWS:
        a, b = result["bridge"][key], result["with_details"][key]
        lines.append(
            f"| {label} | {a['p50_ms']} | {a['p95_ms']} | {a['p99_ms']} "
            f"| {b['p50_ms']} | {b['p95_ms']} | {b['p99_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure, print the section, write `--json`, and `--markdown` when given."""
    parser = argparse.ArgumentParser(
        prog="python -m service.bench_safety",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Bridge validation.json")
    parser.add_argument(
        "--manifest",
        type=Path,
        default=REPO_ROOT / "adapters" / "personalities.yaml",
        help="personalities manifest (candidate phrases)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed passes over all turns")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="result file")
    parser.add_argument("--markdown", type=Path, default=None, help="e.g. BENCHMARKS.md")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    plain = samples(args.data, args.manifest)
    first = first_call_ms()
    print(f"timing {len(plain)} turns x {args.repeats} passes, two sets ...", file=sys.stderr)
    result: dict[str, Any] = {
        "command": ("python -m service.bench_safety " + shlex.join(sys.argv[1:])).rstrip(),
        "machine": machine(),
        "date": today(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "first_call_ms": first,
        "bridge": measure(plain, args.repeats),
        "with_details": measure(with_details(plain), args.repeats),
    }
    section = render(result)
    print(section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown is not None:
        write_section(args.markdown, section)


if __name__ == "__main__":
    main()
