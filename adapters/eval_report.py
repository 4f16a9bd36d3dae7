"""The report of one evaluation run: headline figures against the targets, read by people.

`fastresp eval run` writes ``rows.jsonl`` and ``run.json`` (`adapters.eval_rows`); this
module turns them into a folder people open:

- ``summary.json``: `ReportSummary`, every figure of the report, machine-readable;
- ``report.md`` and ``report.html``: the same content, the HTML self-contained (inline
  CSS, the plots embedded as ``data:`` URIs, every text HTML-escaped) so it can be mailed
  or attached to a ticket and still show everything;
- ``plots/intent_scores.png``, ``plots/bridging_scores.png``: score histograms per
  personality (always written: without a judge or without a single score, the figure
  says so), ``plots/latency.png``: the service's latency with the 100 ms line,
  ``plots/uptake.png``: the uptake scores per personality with the ``low_uptake``
  threshold (the figure says so when no row has a score).

The quality signals of issue 9, which need no judge (uptake, tone fit, contradiction =
praise before a correction), are reported for the run (automatic metrics) and per
personality (their own table): uptake mean, quartiles and share below the
``low_uptake`` threshold, tone-mismatch rate and contradiction rate.

Why the report says how far its judge can be trusted: the project's targets (issue 6:
judged accuracy above 95 %, mean intent score above 4.5) are measured by an LLM judge,
and a weak judge model (the only one a CPU machine can run) scores close to noise. The
issue's honesty rule is "when a strong judge model is unavailable, say so in the report
rather than hiding it": `judge_trust` grades the judge from its calibration
(`fastresp eval calibrate`, hand-scored examples), the sentence opens the report, and
every judged headline row repeats the level. The automatic metrics
(`adapters.auto_metrics.metrics_of_rows`) need no judge and always run.

Every file is written atomically (temporary file beside it, fsync, rename), so a reader
sees the previous report or the complete new one, never half of one.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from adapters.auto_metrics import AutoMetrics, metrics_of_rows
from adapters.eval_rows import (
    ACCURATE_MIN_SCORE,
    JUDGE_ERROR_PREFIX,
    JUDGEMENT_KINDS,
    Agreement,
    JudgementKind,
    RunInfo,
    ScoredRow,
)
from service.atomic_files import fsync_dir, write_atomic

TrustLevel = Literal["none", "unverified", "weak", "calibrated"]

TRUST_MIN_WITHIN_ONE = 0.8
"""A calibrated judge agrees within one point with at least this share of the hand
scores of the calibration set (intent judgement); below it the judge is "weak".

A judge that guesses from a fixed skewed distribution already lands within one point of
a 1-5 hand score well over half the time, so agreement worth reading starts higher; 0.8
is this project's choice for issue 6, not a published standard."""

TRUST_MIN_SCORED_SHARE = 0.9
"""A calibrated judge gave a usable score to at least this share of the calibration
examples (intent); agreement over the few it did score says little about the rest."""

MIN_JUDGED_SHARE = 0.9
"""The judged headline figures decide their targets only when the judge scored at least
this share of the answered rows; below it the rows it failed on could change the answer."""

TRUST_MIN_SPEARMAN = 0.5
"""A calibrated judge's scores rank the calibration examples like the hand scores with at
least this Spearman correlation (intent judgement); below it, or when undefined (too few
scored examples, a constant judge), the judge is "weak". 0.5 is the conventional
"large" correlation (Cohen, 1988, "Statistical Power Analysis for the Behavioral
Sciences", chapter 3)."""

ACCURACY_TARGET = 0.95
"""Judged accuracy must be above this (issue 6: "judged accuracy above 95%")."""

MEAN_INTENT_TARGET = 4.5
"""The mean intent score must be above this (issue 6: "satisfaction above 4.5 out of 5")."""

LATENCY_TARGET_MS = 100.0
"""P95 latency must be under this on a GPU (RTX 3090), milliseconds (issue 6, DESIGN.md)."""

WORST_COUNT = 10
"""How many of the worst responses the report lists (issue 6: "the 10 worst")."""

PLOT_DPI = 110
PLOT_FILES = {
    "intent": "plots/intent_scores.png",
    "bridging": "plots/bridging_scores.png",
    "latency": "plots/latency.png",
    "uptake": "plots/uptake.png",
}
"""The plot files, relative to the report folder (the report links them so)."""

_GPU_WORDS = re.compile(r"\b(gpu|cuda|nvidia|rtx|geforce|tesla|a100|h100|h200|l4|l40s?)\b", re.I)
_NO_GPU = re.compile(r"\b(no gpu|gpu:\s*(none|no|-|n/a)|without (a )?gpu|cpu[- ]only)\b", re.I)


# --- judged figures ---------------------------------------------------------------------


def judged_scores(rows: Iterable[ScoredRow], kind: JudgementKind) -> list[int]:
    """The usable scores (1-5) of one judgement over `rows`, in row order.

    A row counts when the judge answered it with a score; rows without that verdict
    (no judge, failed request) or whose verdict was rejected (`Verdict.error`) do not.
    """
    scores: list[int] = []
    for row in rows:
        verdict = row.verdict(kind)
        if verdict is not None and verdict.score is not None:
            scores.append(verdict.score)
    return scores


def judged_accuracy(rows: Iterable[ScoredRow]) -> tuple[int, int]:
    """(accurate, scored): rows whose intent score is >= `ACCURATE_MIN_SCORE`, and rows
    with an intent score. Judged accuracy is their ratio (issue 6)."""
    scores = judged_scores(rows, "intent")
    return sum(score >= ACCURATE_MIN_SCORE for score in scores), len(scores)


def accuracy_rate(rows: Iterable[ScoredRow]) -> float | None:
    """Judged accuracy: accurate / scored (`judged_accuracy`); None when nothing scored."""
    accurate, scored = judged_accuracy(rows)
    return accurate / scored if scored else None


def mean_score(rows: Iterable[ScoredRow], kind: JudgementKind) -> float | None:
    """The mean usable score of one judgement; None when no row has one."""
    scores = judged_scores(rows, kind)
    return sum(scores) / len(scores) if scores else None


def wilson_interval(accurate: int, scored: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of accurate / scored; None when nothing scored.

    `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")` (Wilson, 1927, "Probable
    inference, the law of succession, and statistical inference", JASA 22(158)).
    """
    if scored <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(accurate, scored).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def judge_summary(rows: Sequence[ScoredRow], kind: JudgementKind) -> dict[str, Any]:
    """One judgement's counts: ``scored`` (usable score), ``rejected`` (the judge
    answered without a usable score: `Verdict.error`), ``failed`` (the request failed
    after its retries: `adapters.eval_run.JUDGE_ERROR`; a re-run asks again), ``mean``
    (None when nothing scored) and ``histogram`` (score 1..5 -> rows, every score
    present)."""
    scores = judged_scores(rows, kind)
    rejected = failed = 0
    for row in rows:
        verdict = row.verdict(kind)
        if verdict is None or verdict.score is not None:
            continue
        if (verdict.error or "").startswith(JUDGE_ERROR_PREFIX):
            failed += 1
        else:
            rejected += 1
    counts = Counter(scores)
    return {
        "scored": len(scores),
        "rejected": rejected,
        "failed": failed,
        "mean": sum(scores) / len(scores) if scores else None,
        "histogram": {score: counts.get(score, 0) for score in range(1, 6)},
    }


# --- how far the judge can be trusted ---------------------------------------------------


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 100:.{digits}f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _agreement_text(agreement: Agreement) -> str:
    return (
        f"{agreement.kind}: exact {_pct(agreement.exact)}, within-1 "
        f"{_pct(agreement.within_one)}, Spearman {_num(agreement.spearman)} over "
        f"{agreement.scored} of {agreement.examples} scored examples"
    )


def judge_trust(info: RunInfo) -> tuple[TrustLevel, str]:
    """How far the run's judge can be trusted, and the sentence the report opens with.

    Levels:
        ``none``: no judge was set; the judged figures are not measured.
        ``unverified``: a judge, but no calibration of that judge model (none given, one
            of another model or of other prompt files, or one without the intent
            judgement).
        ``weak``: the calibration's intent agreement is below `TRUST_MIN_WITHIN_ONE`
            within-1 or `TRUST_MIN_SPEARMAN` Spearman, either is None, or the judge
            scored fewer than `TRUST_MIN_SCORED_SHARE` of the examples.
        ``calibrated``: both at or above their thresholds.

    Returns:
        (level, sentence); the sentence names the judge model and, when calibrated or
        weak, its exact / within-1 / Spearman agreement.
    """
    judge = info.judge
    if judge is None:
        return "none", (
            "No judge was set: judged accuracy and the intent and bridging scores are not "
            "measured. The automatic metrics below still ran."
        )
    calibration = info.calibration
    how = "`fastresp eval calibrate`"
    if calibration is None:
        return "unverified", (
            f"The judge model {judge.model} was not checked against the hand-scored "
            f"calibration set ({how}), so its scores are unverified: read them as the "
            "opinion of an unchecked model, not as measured quality."
        )
    if calibration.judge_model != judge.model:
        return "unverified", (
            f"The calibration given is of another model ({calibration.judge_model}), not "
            f"of the judge model {judge.model}, so this judge's scores are unverified "
            f"({how} it to check them)."
        )
    if calibration.prompt_sha256 and calibration.prompt_sha256 != judge.prompt_sha256:
        return "unverified", (
            f"The calibration given checked the judge model {judge.model} with other judge "
            f"prompts than this run's, so this run's scores are unverified ({how} again)."
        )
    by_kind = {agreement.kind: agreement for agreement in calibration.agreements}
    intent = by_kind.get("intent")
    if intent is None:
        return "unverified", (
            f"The calibration of the judge model {judge.model} holds no intent judgement, "
            f"so its intent scores are unverified ({how})."
        )
    figures = "; ".join(_agreement_text(by_kind[k]) for k in JUDGEMENT_KINDS if k in by_kind)
    bar = (
        f"The bar is within-1 >= {_pct(TRUST_MIN_WITHIN_ONE, 0)} and Spearman >= "
        f"{TRUST_MIN_SPEARMAN:.1f} on intent, with at least "
        f"{_pct(TRUST_MIN_SCORED_SHARE, 0)} of the examples scored."
    )
    strong = (
        intent.within_one is not None
        and intent.spearman is not None
        and intent.within_one >= TRUST_MIN_WITHIN_ONE
        and intent.spearman >= TRUST_MIN_SPEARMAN
        and intent.scored >= TRUST_MIN_SCORED_SHARE * intent.examples
    )
    if not strong:
        return "weak", (
            f"The judge model {judge.model} is too weak to trust: against the hand-scored "
            f"calibration set it agrees {figures}. {bar} Its scores are close to noise "
            "and must not be read as quality; the automatic metrics below still hold."
        )
    return "calibrated", (
        f"The judge model {judge.model} was checked against the hand-scored calibration "
        f"set ({calibration.created}): {figures}. {bar} Its scores can be read as a "
        "measure of quality, within that agreement."
    )


# --- headline ---------------------------------------------------------------------------


class Headline(BaseModel):
    """One headline figure checked against its project target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: float | None
    """The figure (a share in 0-1, a score, or milliseconds); None when not measured."""
    display: str
    """How the report shows it (with n and the interval where there is one)."""
    target: str
    """The project target, or "—" when there is none."""
    met: bool | None
    """Whether `value` meets the target, taken literally; None without a value or target."""
    note: str


def gpu_machine(machine: str) -> bool:
    """Whether the run's machine description mentions a GPU (and not as "no GPU")."""
    return bool(_GPU_WORDS.search(machine)) and not _NO_GPU.search(machine)


def _headline(
    rows: Sequence[ScoredRow], info: RunInfo, metrics: AutoMetrics, trust: TrustLevel
) -> list[Headline]:
    judge_note = f"judge trust: {trust}"
    # A weak judge's scores are noise: a target is neither met nor missed on them.
    decided = trust != "weak"
    if not decided:
        judge_note += " (too weak to decide the target)"
    lines: list[Headline] = []
    accurate, scored = judged_accuracy(rows)
    answered = sum(1 for row in rows if row.ok)
    if info.judge is not None and answered and scored < MIN_JUDGED_SHARE * answered:
        decided = False
        judge_note += (
            f"; the judge scored only {scored} of {answered} answers, too few to decide the target"
        )
    accuracy_target = f"above {ACCURACY_TARGET * 100:.0f}%"
    mean_target = f"above {MEAN_INTENT_TARGET}"
    if info.judge is None:
        for name, target in (
            ("judged accuracy", accuracy_target),
            ("mean intent score", mean_target),
            ("mean bridging score", "—"),
        ):
            lines.append(
                Headline(
                    name=name,
                    value=None,
                    display="not measured",
                    target=target,
                    met=None,
                    note=f"{judge_note}: no judge was set",
                )
            )
    else:
        interval = wilson_interval(accurate, scored)
        if interval is None:
            lines.append(
                Headline(
                    name="judged accuracy",
                    value=None,
                    display="n/a (no row has an intent score)",
                    target=accuracy_target,
                    met=None,
                    note=judge_note,
                )
            )
        else:
            accuracy = accurate / scored
            lines.append(
                Headline(
                    name="judged accuracy",
                    value=accuracy,
                    display=(
                        f"{_pct(accuracy)} ({accurate} of {scored} scored, of {answered} "
                        f"answered; 95% Wilson interval {_pct(interval[0])} to "
                        f"{_pct(interval[1])})"
                    ),
                    target=accuracy_target,
                    met=accuracy > ACCURACY_TARGET if decided else None,
                    note=f"{judge_note}; share of intent scores >= {ACCURATE_MIN_SCORE}",
                )
            )
        means: list[tuple[JudgementKind, str, str, float | None]] = [
            ("intent", "mean intent score", mean_target, MEAN_INTENT_TARGET),
            ("bridging", "mean bridging score", "—", None),
        ]
        for kind, name, target, threshold in means:
            scores = judged_scores(rows, kind)
            mean = sum(scores) / len(scores) if scores else None
            lines.append(
                Headline(
                    name=name,
                    value=mean,
                    display=f"{mean:.2f} (n={len(scores)})" if mean is not None else "n/a",
                    target=target,
                    met=(
                        None
                        if mean is None or threshold is None or not decided
                        else mean > threshold
                    ),
                    note=judge_note,
                )
            )
    p95 = metrics.latency_p95_ms
    on_gpu = gpu_machine(info.machine)
    latency_note = (
        "the service's own latency_ms of the answered rows"
        if on_gpu
        else (
            f"no GPU found where the run was measured ({info.machine}): the GPU target "
            "is not decided by this run"
        )
    )
    lines.append(
        Headline(
            name="P95 latency",
            value=p95,
            display="n/a (no answered row)" if p95 is None else f"{p95:.1f} ms",
            target=f"under {LATENCY_TARGET_MS:.0f} ms on a GPU (RTX 3090)",
            met=None if p95 is None or not on_gpu else p95 < LATENCY_TARGET_MS,
            note=latency_note,
        )
    )
    lines.append(
        Headline(
            name="fallback rate",
            value=metrics.fallback_rate,
            display=f"{_pct(metrics.fallback_rate)} (of {metrics.ok} answered)",
            target="—",
            met=None,
            note="context: answers replaced by a fallback phrase",
        )
    )
    lines.append(
        Headline(
            name="pass rate",
            value=metrics.pass_rate,
            display=f"{_pct(metrics.pass_rate)} (of {metrics.ok} answered)",
            target="—",
            met=None,
            note="context: model text passing the guard and every filter",
        )
    )
    return lines


def headline(rows: Sequence[ScoredRow], info: RunInfo) -> list[Headline]:
    """The headline figures of a run, checked against the project targets (issue 6).

    Judged accuracy (share of intent scores >= `ACCURATE_MIN_SCORE`, with n and the 95%
    Wilson interval, target > 95%), mean intent score (> 4.5), mean bridging score (no
    target), P95 latency (`metrics_of_rows`, < 100 ms on a GPU; the note says when the
    run was on the CPU), and the fallback and pass rates as context. Judged figures are
    "not measured" (value and met None) when the run had no judge; with a weak judge
    (`judge_trust`) their values are shown but met is None: noise decides no target.
    """
    level, _ = judge_trust(info)
    return _headline(rows, info, metrics_of_rows(rows), level)


# --- the summary ------------------------------------------------------------------------


class ReportSummary(BaseModel):
    """What ``summary.json`` holds: every figure of the report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    info: RunInfo
    headline: list[Headline]
    metrics: dict[str, Any]
    """`AutoMetrics.as_dict()` of all rows."""
    per_personality: dict[str, dict[str, Any]]
    """Personality -> n, pass_rate, leak_rate, fallback_rate, judged_accuracy,
    mean_intent, mean_bridging, latency_p95_ms, and the signals: uptake_mean,
    uptake_q1, uptake_median, uptake_q3, uptake_rows, low_uptake_rate,
    tone_mismatch_rate, tone_rows, contradiction_rate (`AutoMetrics`'
    praise_before_correction) and correction_rows (None when undefined)."""
    judge: dict[str, dict[str, Any]]
    """Judgement kind -> `judge_summary` (empty without a judge)."""
    judge_trust: TrustLevel
    judge_note: str
    failed_requests: dict[str, int]
    """Kind of failure (the error's text before its first ":") -> rows."""
    worst_ranking: str
    """How the worst responses were ranked (by intent score, or by failed filters)."""
    worst: list[str]
    """The ids of the worst responses, worst first (at most `WORST_COUNT`)."""


def per_personality(rows: Sequence[ScoredRow]) -> dict[str, dict[str, Any]]:
    """The per-personality figures (sorted by name); see `ReportSummary.per_personality`."""
    groups: dict[str, list[ScoredRow]] = {}
    for row in rows:
        groups.setdefault(row.personality, []).append(row)
    table: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        group = groups[name]
        metrics = metrics_of_rows(group)
        table[name] = {
            "n": len(group),
            "pass_rate": metrics.pass_rate,
            "leak_rate": metrics.leak_rate,
            "fallback_rate": metrics.fallback_rate,
            "judged_accuracy": accuracy_rate(group),
            "mean_intent": mean_score(group, "intent"),
            "mean_bridging": mean_score(group, "bridging"),
            "latency_p95_ms": metrics.latency_p95_ms,
            "uptake_mean": metrics.uptake_mean,
            "uptake_q1": metrics.uptake_q1,
            "uptake_median": metrics.uptake_median,
            "uptake_q3": metrics.uptake_q3,
            "uptake_rows": metrics.uptake_rows,
            "low_uptake_rate": metrics.low_uptake_rate,
            "tone_mismatch_rate": metrics.tone_mismatch_rate,
            "tone_rows": metrics.tone_rows,
            "contradiction_rate": metrics.praise_before_correction,
            "correction_rows": metrics.correction_rows,
        }
    return table


def failure_kinds(rows: Iterable[ScoredRow]) -> dict[str, int]:
    """Failed requests by kind (the error's text before its first ":", e.g. ``HTTP 503``
    or ``ConnectError``), most frequent first."""
    kinds = Counter(
        (row.error or "no answer").split(":", 1)[0].strip() or "error" for row in rows if not row.ok
    )
    return dict(kinds.most_common())


def worst_rows(rows: Sequence[ScoredRow], count: int = WORST_COUNT) -> tuple[list[ScoredRow], str]:
    """The worst responses, worst first, and a sentence saying how they were ranked.

    With intent scores: the rows that have one, lowest intent score first; ties go to
    the lower bridging score (a row without one after those with one), then to more
    failed filters, then to the row id. Without any intent score: the answered rows
    that fail at least one filter, most failed filters first (then the row id).
    """
    scored = [row for row in rows if row.intent is not None and row.intent.score is not None]
    if scored:

        def by_scores(row: ScoredRow) -> tuple[int, int, int, str]:
            assert row.intent is not None and row.intent.score is not None
            bridging = row.bridging.score if row.bridging is not None else None
            return (
                row.intent.score,
                6 if bridging is None else bridging,
                -len(row.checks.failed_filters),
                row.id,
            )

        ranked = sorted(scored, key=by_scores)[:count]
        return ranked, (
            "Lowest intent score first; ties: lower bridging score, then more failed "
            "filters. Only rows the judge scored are ranked."
        )
    failing = [row for row in rows if row.ok and row.checks.failed_filters]
    ranked = sorted(failing, key=lambda row: (-len(row.checks.failed_filters), row.id))[:count]
    why = "no judge was set" if all(row.intent is None for row in rows) else "no row was scored"
    return ranked, (
        f"Ranked by the number of failed filters, most first, because {why}; "
        f"{len(failing)} answered rows fail at least one filter."
    )


# --- document blocks, rendered to Markdown and to HTML ----------------------------------


@dataclass(frozen=True, slots=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class _Para:
    text: str
    strong: bool = False


@dataclass(frozen=True, slots=True)
class _Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True, slots=True)
class _Items:
    items: Sequence[tuple[str, str]]
    """(label, text) pairs; an empty label gives a plain item."""


@dataclass(frozen=True, slots=True)
class _Image:
    key: str
    """`PLOT_FILES` key."""
    alt: str


_Block = _Heading | _Para | _Table | _Items | _Image


_ENTITY_START = re.compile(r"&(?=#?\w+;)")


def _md_text(text: str) -> str:
    """Text for Markdown: one line, ``<`` and an ``&`` that would start an entity
    written as entities, so no text (a model's ``<script>``) becomes raw HTML in a
    Markdown viewer, and ``>`` stays readable."""
    one_line = " ".join(text.split())
    return _ENTITY_START.sub("&amp;", one_line).replace("<", "&lt;")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def _render_markdown(blocks: Sequence[_Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            out.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, _Para):
            text = _md_text(block.text)
            out.append(f"**{text}**" if block.strong else text)
        elif isinstance(block, _Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |"]
            lines.append("|" + "---|" * len(block.headers))
            lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
            out.append("\n".join(lines))
        elif isinstance(block, _Items):
            out.append(
                "\n".join(
                    f"- **{_md_text(label)}:** {_md_text(text)}" if label else f"- {_md_text(text)}"
                    for label, text in block.items
                )
            )
        else:
            out.append(f"![{_md_text(block.alt)}]({PLOT_FILES[block.key]})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem;
  margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
p.strong { background: #fff6d6; border-left: 4px solid #e0a800; padding: .6rem .8rem; }
img { max-width: 100%; border: 1px solid #eee; margin: .5rem 0; }
ul { padding-left: 1.3rem; }
"""


def _render_html(title: str, blocks: Sequence[_Block], images: Mapping[str, bytes]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, _Para):
            css = ' class="strong"' if block.strong else ""
            out.append(f"<p{css}>{esc(block.text)}</p>")
        elif isinstance(block, _Table):
            out.append("<table><thead><tr>")
            out.extend(f"<th>{esc(h)}</th>" for h in block.headers)
            out.append("</tr></thead><tbody>")
            for row in block.rows:
                out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, _Items):
            out.append("<ul>")
            for label, text in block.items:
                head = f"<strong>{esc(label)}:</strong> " if label else ""
                out.append(f"<li>{head}{esc(text)}</li>")
            out.append("</ul>")
        else:
            data = base64.b64encode(images[block.key]).decode("ascii")
            out.append(f'<p><img alt="{esc(block.alt)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- the report's content ---------------------------------------------------------------


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "no")


def _rate_of(value: float | None, denominator: int) -> str:
    return f"{_pct(value)} (of {denominator})"


def _metrics_table(m: AutoMetrics) -> _Table:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    rows: list[list[str]] = [
        ["rows (answered / all)", f"{m.ok} / {m.rows}"],
        ["model answers (not fallback)", str(m.model)],
        ["fallback rate", _rate_of(m.fallback_rate, m.ok)],
        ["cache rate", _rate_of(m.cache_rate, m.ok)],
        ["passes guard and filters", _rate_of(m.pass_rate, m.ok)],
        ["main-response leak rate", _rate_of(m.leak_rate, m.leak_denominator)],
        [
            "contradiction: praise before a correction",
            _rate_of(m.praise_before_correction, m.correction_rows),
        ],
        ["uptake mean (0-1)", _num(m.uptake_mean)],
        [
            "uptake Q1 / median / Q3",
            f"{_num(m.uptake_q1)} / {_num(m.uptake_median)} / {_num(m.uptake_q3)}",
        ],
        [
            "low uptake"
            + ("" if m.low_uptake_threshold is None else f" (< {m.low_uptake_threshold:g})"),
            _rate_of(m.low_uptake_rate, m.uptake_rows),
        ],
        ["tone mismatch rate", _rate_of(m.tone_mismatch_rate, m.tone_rows)],
        [
            "repeats within the session (last 5 turns)",
            _rate_of(m.repetition_rate, m.repetition_denominator),
        ],
        [
            "safety flags (fails kid_safe)",
            f"{_pct(m.safety_flag_rate)} ({m.safety_flags} rows)",
        ],
        ["latency P50", ms(m.latency_p50_ms)],
        ["latency P95", ms(m.latency_p95_ms)],
        ["latency P99", ms(m.latency_p99_ms)],
        ["mean length (words)", _num(m.mean_words)],
        ["mean length (characters)", _num(m.mean_chars, 1)],
        ["distinct-1", _num(m.distinct_1, 3)],
        ["distinct-2", _num(m.distinct_2, 3)],
        [
            "most common opener",
            f'"{m.top_opener}" {_pct(m.top_opener_share)}' if m.top_opener else "n/a",
        ],
    ]
    rows.extend([f"fails {name}", str(count)] for name, count in sorted(m.filter_failures.items()))
    rows.extend(
        [f"tone mismatch: {name}", str(count)] for name, count in sorted(m.tone_mismatches.items())
    )
    return _Table(["metric", "value"], rows)


def _facts(info: RunInfo) -> _Items:
    items: list[tuple[str, str]] = [
        ("created", info.created),
        ("command", info.command),
        ("machine", info.machine),
        ("target", info.target),
        ("triples", info.triples),
    ]
    judge = info.judge
    if judge is None:
        items.append(("judge", "none set"))
    else:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(judge.prompt_versions.items()))
        structured = {None: "unknown", True: "yes", False: "no (validated and repaired)"}
        items.append(("judge", f"{judge.model} at {judge.base_url}"))
        items.append(("judge prompts", versions or "n/a"))
        items.append(("structured output", structured[judge.structured_output]))
    calibration = info.calibration
    if calibration is None:
        items.append(("calibration", "none"))
    else:
        agreements = "; ".join(_agreement_text(a) for a in calibration.agreements)
        items.append(
            (
                "calibration",
                f"{calibration.judge_model}, {calibration.created}, set {calibration.set_path} "
                f"(sha256 {calibration.set_sha256[:12]}): {agreements or 'no agreement'}",
            )
        )
    return _Items(items)


def _worst_block(row: ScoredRow, rank: int) -> list[_Block]:
    def verdict_text(kind: JudgementKind) -> str:
        verdict = row.verdict(kind)
        if verdict is None:
            return "not judged"
        if verdict.score is None:
            return f"rejected ({verdict.error or 'no score'})"
        return f"{verdict.score}: {verdict.reasoning or '(no reasoning)'}"

    title = f"{rank}. {row.id}"
    scores = []
    for kind in JUDGEMENT_KINDS:
        verdict = row.verdict(kind)
        if verdict is not None and verdict.score is not None:
            scores.append(f"{kind} {verdict.score}")
    if scores:
        title += " — " + ", ".join(scores)
    items: list[tuple[str, str]] = []
    if row.triple.pika_turn:
        items.append(("Pika said", row.triple.pika_turn))
    items.append(("child", row.triple.user_turn))
    items.append(("main response", row.triple.main_response or "(none sent)"))
    items.append(("fast response", f"{row.fast_response} (source: {row.source})"))
    items.append(("failed filters", ", ".join(row.checks.failed_filters) or "none"))
    if row.checks.uptake is not None:
        items.append(("uptake", f"{row.checks.uptake:.2f}"))
    if row.checks.tone_fit is not None:
        items.append(("tone", "fits" if row.checks.tone_fit else str(row.checks.tone_mismatch)))
    items.append(("intent", verdict_text("intent")))
    items.append(("bridging", verdict_text("bridging")))
    return [_Heading(3, title), _Items(items)]


def _headline_table(lines: Sequence[Headline]) -> _Table:
    return _Table(
        ["figure", "value", "target", "met", "note"],
        [[h.name, h.display, h.target, _met(h.met), h.note] for h in lines],
    )


def headline_markdown(summary: ReportSummary) -> str:
    """The judge-trust sentence and the headline table, as Markdown (what `fastresp eval
    run` prints, and what goes into BENCHMARKS.md)."""
    return _render_markdown(
        [_Para(summary.judge_note, strong=True), _headline_table(summary.headline)]
    )


def _blocks(
    rows: Sequence[ScoredRow],
    info: RunInfo,
    summary: ReportSummary,
    metrics: AutoMetrics,
    worst: Sequence[ScoredRow],
) -> list[_Block]:
    blocks: list[_Block] = [
        _Heading(1, f"Evaluation report: {info.name}"),
        _Para(summary.judge_note, strong=True),
        _Heading(2, "Run"),
        _facts(info),
        _Heading(2, "Headline"),
        _headline_table(summary.headline),
        _Heading(2, "Automatic metrics"),
        _Para(
            "No LLM: the same text rules as serving (service.text_checks); definitions in "
            "adapters/auto_metrics.py. A rate with nothing to count is n/a."
        ),
        _metrics_table(metrics),
    ]
    if summary.judge:
        blocks.append(_Heading(2, "Judge"))
        blocks.append(
            _Table(
                [
                    "judgement",
                    "scored",
                    "rejected (no usable score)",
                    "failed (re-run asks again)",
                    "mean",
                    "1",
                    "2",
                    "3",
                    "4",
                    "5",
                ],
                [
                    [
                        kind,
                        str(figures["scored"]),
                        str(figures["rejected"]),
                        str(figures["failed"]),
                        _num(figures["mean"]),
                        *(str(figures["histogram"][score]) for score in range(1, 6)),
                    ]
                    for kind, figures in summary.judge.items()
                ],
            )
        )
    blocks.append(_Heading(2, "Per personality"))
    blocks.append(
        _Table(
            [
                "personality",
                "n",
                "pass rate",
                "leak rate",
                "fallback rate",
                "judged accuracy",
                "mean intent",
                "mean bridging",
                "P95 latency",
            ],
            [
                [
                    name,
                    str(p["n"]),
                    _pct(p["pass_rate"]),
                    _pct(p["leak_rate"]),
                    _pct(p["fallback_rate"]),
                    _pct(p["judged_accuracy"]),
                    _num(p["mean_intent"]),
                    _num(p["mean_bridging"]),
                    "n/a" if p["latency_p95_ms"] is None else f"{p['latency_p95_ms']:.1f} ms",
                ]
                for name, p in summary.per_personality.items()
            ],
        )
    )
    blocks.append(_Heading(2, "Quality signals per personality"))
    blocks.append(
        _Para(
            "No judge: uptake (adapters/signals/uptake.py, 0-1: how much the answer builds "
            "on what the child said), tone fit (adapters/signals/tone.py) and contradiction "
            "(praise such as 'Great job!' while the main response corrects the child, over "
            "the rows whose main response corrects). Model answers only; fallbacks are left "
            "out."
        )
    )
    blocks.append(
        _Table(
            [
                "personality",
                "uptake mean",
                "uptake Q1 / median / Q3",
                "low uptake",
                "tone mismatch rate",
                "contradiction rate",
            ],
            [
                [
                    name,
                    _num(p["uptake_mean"]),
                    f"{_num(p['uptake_q1'])} / {_num(p['uptake_median'])} / {_num(p['uptake_q3'])}",
                    _rate_of(p["low_uptake_rate"], p["uptake_rows"]),
                    _rate_of(p["tone_mismatch_rate"], p["tone_rows"]),
                    _rate_of(p["contradiction_rate"], p["correction_rows"]),
                ]
                for name, p in summary.per_personality.items()
            ],
        )
    )
    blocks.append(_Heading(2, "Plots"))
    if info.judge is None:
        blocks.append(_Para("No judge was set: the score plots say so and show no bars."))
    blocks.append(_Image("intent", "Intent scores per personality"))
    blocks.append(_Image("bridging", "Bridging scores per personality"))
    blocks.append(_Image("latency", "Service latency with the 100 ms target"))
    blocks.append(_Image("uptake", "Uptake scores per personality"))
    blocks.append(_Heading(2, f"The {WORST_COUNT} worst responses"))
    blocks.append(_Para(summary.worst_ranking))
    if not worst:
        blocks.append(_Para("No row to list."))
    for rank, row in enumerate(worst, start=1):
        blocks.extend(_worst_block(row, rank))
    if summary.failed_requests:
        total = sum(summary.failed_requests.values())
        blocks.append(_Heading(2, "Failed requests"))
        blocks.append(
            _Para(
                f"{total} of {len(rows)} requests got no answer; they are left out of every "
                "figure except the row count."
            )
        )
        blocks.append(
            _Table(["kind", "rows"], [[k, str(n)] for k, n in summary.failed_requests.items()])
        )
    return blocks


# --- plots ------------------------------------------------------------------------------


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float] = (8.0, 4.8)) -> bytes:
    """Draw on a fresh figure's axes and return the PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=PLOT_DPI)
    axes = figure.add_subplot()
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def _message(axes: Any, title: str, text: str) -> None:
    axes.set_title(title)
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, transform=axes.transAxes)
    axes.set_axis_off()


_SCORE_AXIS = {
    "intent": "intent score (1 = no understanding ... 5 = perfect, directly addresses it)",
    "bridging": "bridging score (1 = leaks, repeats or contradicts ... 5 = leads in cleanly)",
}


def score_plot(rows: Sequence[ScoredRow], kind: JudgementKind, info: RunInfo) -> bytes:
    """Grouped bars of one judgement's scores 1..5 (all five shown), one colour per
    personality, rows on the y axis; without a judge (or without one score) a figure
    that says so. Returns PNG bytes."""
    title = f"{kind.capitalize()} scores — {info.name}"
    personalities = sorted({row.personality for row in rows})
    counts = {
        name: Counter(judged_scores((r for r in rows if r.personality == name), kind))
        for name in personalities
    }
    scored = sum(sum(c.values()) for c in counts.values())

    def draw(axes: Any) -> None:
        if info.judge is None:
            _message(axes, title, "no judge set: scores not measured")
            return
        if not scored:
            _message(axes, title, f"no {kind} scores: every judgement was rejected")
            return
        from matplotlib.ticker import MaxNLocator

        width = 0.8 / max(len(personalities), 1)
        for index, name in enumerate(personalities):
            xs = [score - 0.4 + width * (index + 0.5) for score in range(1, 6)]
            heights = [counts[name].get(score, 0) for score in range(1, 6)]
            bars = axes.bar(xs, heights, width=width, label=f"{name} (n={sum(heights)})")
            axes.bar_label(bars, fontsize=8)
        axes.set_xticks(range(1, 6))
        axes.set_xlim(0.5, 5.5)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel(_SCORE_AXIS[kind])
        axes.set_ylabel("responses")
        axes.set_title(f"{title} (n={scored})")
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(title="personality", fontsize="small")

    return _figure_png(draw)


def latency_plot(rows: Sequence[ScoredRow], info: RunInfo, p95_ms: float | None) -> bytes:
    """Histogram of the service's latency_ms of the answered rows, a dashed line at the
    100 ms target and a dotted one at the P95; a log x axis when the latencies span more
    than 20x around 100 ms, so the target and the bulk both show. Returns PNG bytes."""
    latencies = [r.latency_ms for r in rows if r.ok and r.latency_ms is not None]
    title = f"Service latency — {info.name}"

    def draw(axes: Any) -> None:
        if not latencies:
            _message(axes, title, "no answered row: no latency to show")
            return
        import numpy as np

        values = np.asarray(latencies, dtype=float)
        floor = float(values[values > 0].min()) if (values > 0).any() else 1.0
        low = min(floor, LATENCY_TARGET_MS)
        high = max(float(values.max()), LATENCY_TARGET_MS)
        log = high / low > 20
        if log:
            values = np.clip(values, floor, None)
            bins: Any = np.geomspace(low * 0.9, high * 1.1, 40)
            axes.set_xscale("log")
            from matplotlib.ticker import FuncFormatter

            axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        else:
            bins = np.linspace(0.0, high * 1.05, 40)
        axes.hist(values, bins=bins, color="#4c72b0", alpha=0.85, label=f"rows (n={len(values)})")
        axes.axvline(LATENCY_TARGET_MS, color="#c44e52", ls="--", lw=2, label="100 ms target (GPU)")
        if p95_ms is not None:
            axes.axvline(p95_ms, color="black", ls=":", lw=2, label=f"P95 = {p95_ms:.0f} ms")
        axes.set_xlabel("latency_ms measured by the service" + (" (log scale)" if log else ""))
        axes.set_ylabel("responses")
        where = "GPU" if gpu_machine(info.machine) else "CPU: the GPU target does not apply"
        axes.set_title(f"{title} ({where})")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")

    return _figure_png(draw)


def uptake_plot(rows: Sequence[ScoredRow], info: RunInfo, threshold: float | None) -> bytes:
    """Histogram of the model answers' uptake scores (0-1, bins of 0.05), one step line
    per personality, with a dashed line at the ``low_uptake`` threshold; a figure that
    says so when no row has a score (a run scored before the signals). Returns PNG
    bytes."""
    title = f"Uptake — {info.name}"
    by_personality: dict[str, list[float]] = {}
    for row in rows:
        if row.checks.uptake is not None:
            by_personality.setdefault(row.personality, []).append(row.checks.uptake)
    scored = sum(len(v) for v in by_personality.values())

    def draw(axes: Any) -> None:
        if not scored:
            _message(axes, title, "no uptake scores in these rows")
            return
        import numpy as np
        from matplotlib.ticker import MaxNLocator

        bins = np.linspace(0.0, 1.0, 21)
        for name in sorted(by_personality):
            values = by_personality[name]
            axes.hist(values, bins=bins, histtype="step", lw=2, label=f"{name} (n={len(values)})")
        if threshold is not None:
            axes.axvline(
                threshold, color="#c44e52", ls="--", lw=2, label=f"low_uptake < {threshold:g}"
            )
        axes.set_xlim(0.0, 1.0)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("uptake score (0 = ignores the child's turn ... 1 = builds on it)")
        axes.set_ylabel("responses")
        axes.set_title(f"{title} (n={scored})")
        axes.grid(True, alpha=0.3)
        axes.legend(title="personality", fontsize="small")

    return _figure_png(draw)


# --- writing ----------------------------------------------------------------------------


def write_report(rows: Sequence[ScoredRow], info: RunInfo, out_dir: Path) -> ReportSummary:
    """Write the report of one run into `out_dir` (created if missing).

    Files: ``plots/intent_scores.png``, ``plots/bridging_scores.png``,
    ``plots/latency.png``, ``plots/uptake.png`` (always all four), ``report.md``, ``report.html``
    (self-contained) and, last, ``summary.json``; each written atomically.

    Args:
        rows: the run's rows (`adapters.eval_rows.read_scored_rows`).
        info: the run's ``run.json``.
        out_dir: the report folder.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        OSError: `out_dir` cannot be created or written; a file is then either the old
            one or absent, never half-written.
    """
    metrics = metrics_of_rows(rows)
    level, note = judge_trust(info)
    worst, how = worst_rows(rows)
    summary = ReportSummary(
        info=info,
        headline=_headline(rows, info, metrics, level),
        metrics=metrics.as_dict(),
        per_personality=per_personality(rows),
        judge={} if info.judge is None else {k: judge_summary(rows, k) for k in JUDGEMENT_KINDS},
        judge_trust=level,
        judge_note=note,
        failed_requests=failure_kinds(rows),
        worst_ranking=how,
        worst=[row.id for row in worst],
    )
    images = {
        "intent": score_plot(rows, "intent", info),
        "bridging": score_plot(rows, "bridging", info),
        "latency": latency_plot(rows, info, metrics.latency_p95_ms),
        "uptake": uptake_plot(rows, info, metrics.low_uptake_threshold),
    }
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for key, data in images.items():
        write_atomic(out_dir / PLOT_FILES[key], data)
    blocks = _blocks(rows, info, summary, metrics, worst)
    write_atomic(out_dir / "report.md", [_render_markdown(blocks)])
    title = f"Evaluation report: {info.name}"
    write_atomic(out_dir / "report.html", [_render_html(title, blocks, images)])
    write_atomic(out_dir / "summary.json", [summary.model_dump_json(indent=2), "\n"])
    fsync_dir(out_dir / "plots")
    fsync_dir(out_dir)
    return summary
