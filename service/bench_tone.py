"""Benchmark: the time the optional tone guard adds to the output guard, per answer.

Issue 9 allows the tone guard in the service only if it adds under 5 ms at P95. This
times, per call and warm, the existing guard alone (`clean_fast_response`) and the tone
check after it (`check_tone_fit`, two VADER ratings), on realistic pairs: every Bridge
validation child turn with (a) the first sentence of its main response and (b) each
fallback phrase and few-shot fast response of the shipped personalities. Each pair is
timed `--repeats` times after one untimed warm-up pass (which also pays the one-off
lexicon load, reported separately as `first_call_ms`). Times are `time.perf_counter_ns`
around each call, so the figures include the timer's own ~0.1 us.

Reported, in ms: P50/P95/P99 of the guard alone, of the added tone check, and of both;
and the ratio (guard + tone) / guard at P50 and P95. Pure Python, no model, no engine.

Run:  python -m service.bench_tone [--repeats 20] [--json docs/benchmarks/tone_guard.json]
      [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from service.benchmarks import BRIDGE_VALIDATION, machine, percentile, today, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = BRIDGE_VALIDATION
DEFAULT_JSON = REPO_ROOT / "docs" / "benchmarks" / "tone_guard.json"
_FIRST_SENTENCE = re.compile(r"^.*?[.!?](?=\s|$)")


def pairs(data: Path, manifest: Path) -> list[tuple[str, str, int]]:
    """(child turn, raw response, max_words) pairs to time.

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
        (phrase, p.max_words)
        for p in personalities.values()
        for phrase in (*p.fallback_phrases, *(ex.fast_response for ex in p.few_shot))
    ]
    max_words = min(p.max_words for p in personalities.values())
    result: list[tuple[str, str, int]] = []
    for triple in load_triples("bridge", data):
        match = _FIRST_SENTENCE.match(triple.main_response or "")
        if match:
            result.append((triple.user_turn, match.group(0), max_words))
        result.extend((triple.user_turn, text, words) for text, words in canned)
    return result


def measure(samples: list[tuple[str, str, int]], repeats: int) -> dict[str, Any]:
    """Time the guard alone and the tone check after it, per call, in ms.

    Returns:
        `first_call_ms`, `calls`, and for `guard`, `tone_added` and `guard_plus_tone`
        the P50/P95/P99 in ms; `ratio_p50`/`ratio_p95` of guard + tone over guard.
    """
    from service.guard import check_tone_fit, clean_fast_response

    started = time.perf_counter_ns()
    check_tone_fit("Hello.", "Hi!")  # loads VADER's lexicon once
    first_call_ms = (time.perf_counter_ns() - started) / 1e6
    guard_ns: list[float] = []
    tone_ns: list[float] = []
    for rep in range(repeats + 1):
        for user_turn, raw, max_words in samples:
            t0 = time.perf_counter_ns()
            text = clean_fast_response(raw, max_words).text
            t1 = time.perf_counter_ns()
            if text is not None:
                check_tone_fit(text, user_turn)
            t2 = time.perf_counter_ns()
            if rep:  # the first pass is the untimed warm-up
                guard_ns.append(t1 - t0)
                tone_ns.append(t2 - t1)
    total_ns = [g + t for g, t in zip(guard_ns, tone_ns, strict=True)]

    def stats(values: list[float]) -> dict[str, float]:
        return {f"p{q}_ms": round(percentile(values, q) / 1e6, 4) for q in (50, 95, 99)}

    guard, tone, total = stats(guard_ns), stats(tone_ns), stats(total_ns)
    return {
        "first_call_ms": round(first_call_ms, 1),
        "calls": len(guard_ns),
        "guard": guard,
        "tone_added": tone,
        "guard_plus_tone": total,
        "ratio_p50": round(total["p50_ms"] / guard["p50_ms"], 1),
        "ratio_p95": round(total["p95_ms"] / guard["p95_ms"], 1),
    }


def render(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    rows = [("guard alone", "guard"), ("tone check added", "tone_added")]
    rows.append(("guard + tone", "guard_plus_tone"))
    lines = [
        "## Tone guard",
        "",
        f"Command: `{result['command']}`; machine: {result['machine']}; date: {result['date']}. "
        f"Per call, warm, {result['calls']} calls: {result['pairs']} (child turn, response) "
        "pairs from the Bridge validation turns (first sentence of the main response, and "
        f"the shipped personalities' fallback and few-shot phrases) x {result['repeats']}. "
        f"The first call loads VADER's lexicon: {result['first_call_ms']} ms. "
        "Issue 9 allows the guard if it adds under 5 ms at P95.",
        "",
        "| | P50 ms | P95 ms | P99 ms |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        s = result[key]
        lines.append(f"| {label} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} |")
    lines.append(
        f"| ratio (guard + tone) / guard | {result['ratio_p50']} | {result['ratio_p95']} | |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure, print the section, write `--json`, and `--markdown` when given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Bridge validation.json")
    parser.add_argument(
        "--manifest", type=Path, default=REPO_ROOT / "adapters" / "personalities.yaml"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed passes over all pairs")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="result file")
    parser.add_argument("--markdown", type=Path, default=None, help="e.g. BENCHMARKS.md")
    args = parser.parse_args()
    samples = pairs(args.data, args.manifest)
    result: dict[str, Any] = {
        "command": "python -m service.bench_tone " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "date": today(),
        "python": sys.version.split()[0],
        "pairs": len(samples),
        "repeats": args.repeats,
        **measure(samples, args.repeats),
    }
    result["command"] = result["command"].rstrip()
    section = render(result)
    print(section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown is not None:
        write_section(args.markdown, section)


if __name__ == "__main__":
    main()
