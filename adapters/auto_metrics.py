"""Automatic quality metrics of served fast responses: no LLM, the same text rules as serving.

Input: the rows `fastresp replay` writes (`service.replay.ReplayRow`: the triple sent and
the gateway's answer). Every rule comes from `service.text_checks`, the one module the
guard, the data filters and the GRPO rewards use, so a metric counts exactly what those
reject. Definitions (``model`` rows are the ok rows whose ``source`` is not
``fallback``; a fallback phrase is not the model's text):

==========================  ==============================================================
metric                      definition
==========================  ==============================================================
fallback_rate               fallback rows / ok rows (deadline, engine error or a guard
                            rejection, `service.fast_response.FallbackReason`)
pass_rate                   rows whose model text passes every filter
                            (`text_checks.failed_filters` returns []) / ok rows; a
                            fallback row counts as not passing: the guard and filters
                            were not passed by the model
leak_rate                   model rows failing ``no_leak`` / model rows sent with a main
                            response (the only rows where a leak is possible)
praise_before_correction    model rows failing ``no_contradiction`` (praise such as
                            "Great job!" while the main response corrects the child) /
                            model rows whose main response corrects the child
                            (`text_checks.corrects_child`)
distinct_1, distinct_2      distinct n-grams / all n-grams over the model texts, word
                            tokens from `text_checks.word_tokens`, n-grams not crossing
                            responses (Li et al., 2016, "A Diversity-Promoting Objective
                            Function for Neural Conversation Models", NAACL, section 4.2)
mean_words, mean_chars      mean whitespace-separated words / characters of model texts
top_opener, top_opener_     the most common `text_checks.opener` (first two words) of the
share                       model texts and the share of model rows that start with it
filter_failures             per filter name: model rows failing it
==========================  ==============================================================

A rate whose denominator is 0 is None ("n/a"), never 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.text_checks import corrects_child, failed_filters, opener, word_tokens


@dataclass(frozen=True, slots=True)
class ServedResponse:
    """One answered request: what the child said, Pika's main response, the answer."""

    user_turn: str
    main_response: str | None
    fast_response: str
    source: str
    """``model``, ``cache`` or ``fallback`` (the gateway's ``source``)."""


@dataclass(frozen=True, slots=True)
class AutoMetrics:
    """The metrics of one run (see the module docstring for each definition)."""

    rows: int
    ok: int
    model: int
    fallback_rate: float | None
    pass_rate: float | None
    leak_rate: float | None
    leak_denominator: int
    praise_before_correction: float | None
    correction_rows: int
    distinct_1: float | None
    distinct_2: float | None
    mean_words: float | None
    mean_chars: float | None
    top_opener: str | None
    top_opener_share: float | None
    filter_failures: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over `texts` (n-grams stay within one text).

    Returns None when the texts hold no n-gram at all. Source: Li et al. (2016), section 4.2.
    """
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = word_tokens(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def compute_metrics(responses: Sequence[ServedResponse], rows: int | None = None) -> AutoMetrics:
    """The metrics of `responses` (the ok rows of a run).

    Args:
        responses: one per answered request.
        rows: all rows of the run, errors included (default: ``len(responses)``).
    """
    model = [r for r in responses if r.source != "fallback"]
    failures: Counter[str] = Counter()
    passed = 0
    leak_rows = 0
    correction_rows = 0
    praise = 0
    leaks = 0
    for response in model:
        failed = failed_filters(
            response.fast_response,
            user_turn=response.user_turn,
            main_response=response.main_response,
        )
        failures.update(failed)
        passed += not failed
        if response.main_response is not None:
            leak_rows += 1
            leaks += "no_leak" in failed
            if corrects_child(response.main_response):
                correction_rows += 1
                praise += "no_contradiction" in failed
    texts = [r.fast_response for r in model]
    openers = Counter(o for o in (opener(t) for t in texts) if o)
    top = openers.most_common(1)
    return AutoMetrics(
        rows=len(responses) if rows is None else rows,
        ok=len(responses),
        model=len(model),
        fallback_rate=_rate(len(responses) - len(model), len(responses)),
        pass_rate=_rate(passed, len(responses)),
        leak_rate=_rate(leaks, leak_rows),
        leak_denominator=leak_rows,
        praise_before_correction=_rate(praise, correction_rows),
        correction_rows=correction_rows,
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        mean_words=sum(len(t.split()) for t in texts) / len(texts) if texts else None,
        mean_chars=sum(len(t) for t in texts) / len(texts) if texts else None,
        top_opener=top[0][0] if top else None,
        top_opener_share=_rate(top[0][1], len(model)) if top else None,
        filter_failures=dict(sorted(failures.items())),
    )


class ReplayFileError(ValueError):
    """A replay file is unreadable or a row lacks a field; the message names both."""


def read_replay(path: Path) -> tuple[list[ServedResponse], int]:
    """The ok rows of a `fastresp replay --out` file, and the count of all its rows.

    Raises:
        ReplayFileError: the file is missing, or a line is not a replay row (line named).
    """
    responses: list[ServedResponse] = []
    rows = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayFileError(f"cannot read replay file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
            if row.get("error") is not None or row.get("fast_response") is None:
                continue
            triple = row["triple"]
            responses.append(
                ServedResponse(
                    user_turn=str(triple["user_turn"]),
                    main_response=triple.get("main_response"),
                    fast_response=str(row["fast_response"]),
                    source=str(row["source"]),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReplayFileError(
                f"{path}:{number}: not a replay row ({type(exc).__name__}: {exc})"
            ) from exc
    return responses, rows


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.2f}"


def markdown_table(runs: Sequence[tuple[str, AutoMetrics]]) -> str:
    """A Markdown table with one column per run and one row per metric."""
    header = "| metric | " + " | ".join(name for name, _ in runs) + " |"
    rule = "|---|" + "---|" * len(runs)
    lines = [header, rule]

    def row(label: str, cells: Iterable[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("rows answered (ok / all)", (f"{m.ok} / {m.rows}" for _, m in runs))
    row("fallback rate", (_fmt(m.fallback_rate, True) for _, m in runs))
    row("passes guard and filters", (_fmt(m.pass_rate, True) for _, m in runs))
    row(
        "leak rate",
        (f"{_fmt(m.leak_rate, True)} (of {m.leak_denominator})" for _, m in runs),
    )
    row(
        "praise before a correction",
        (f"{_fmt(m.praise_before_correction, True)} (of {m.correction_rows})" for _, m in runs),
    )
    row("distinct-1", (_fmt(m.distinct_1) for _, m in runs))
    row("distinct-2", (_fmt(m.distinct_2) for _, m in runs))
    row("mean length (words)", (_fmt(m.mean_words) for _, m in runs))
    row("mean length (characters)", (_fmt(m.mean_chars) for _, m in runs))
    row(
        "most common opener",
        (
            f'"{m.top_opener}" {_fmt(m.top_opener_share, True)}' if m.top_opener else "n/a"
            for _, m in runs
        ),
    )
    names = sorted({name for _, m in runs for name in m.filter_failures})
    for name in names:
        row(f"fails `{name}`", (str(m.filter_failures.get(name, 0)) for _, m in runs))
    return "\n".join(lines)
