"""Two evaluation runs side by side, each difference with a bootstrap 95% confidence interval.

`fastresp eval compare A B` reads two run folders (``rows.jsonl`` + ``run.json``,
`adapters.eval_rows`), typically the few-shot base model against an SFT adapter, or
adapter v1 against v2. A difference of a few points between two runs of ~100 triples is
often noise (a judged accuracy of 80 % over 100 rows has a standard error of 4 points),
so every difference comes with an interval and is called significant only when that
interval excludes 0; issue 6: "so noise is not read as progress".

Method: the percentile bootstrap (Efron & Tibshirani, 1993, "An Introduction to the
Bootstrap", chapter 13) with `scipy.stats.bootstrap`, resampling ROW INDICES and
computing each metric on the resampled rows, with exactly the definitions of the report
(`adapters.eval_report` for the judged figures, `adapters.auto_metrics.metrics_of_rows`
for the rest). One resample computes every metric at once (a vector statistic).

- Paired, when both runs hold the same set of row ids (same triples and personalities,
  e.g. base vs adapter on one triples file): the ids are resampled jointly and the
  statistic is ``metric(B rows of the ids) - metric(A rows of the ids)``, which removes
  the variation between triples from the difference.
- Otherwise two independent samples: A's and B's rows are resampled separately and the
  statistic is ``metric(B resample) - metric(A resample)``.

A metric undefined in either full run (no judge, no correction rows) has no difference
and no interval. A resample can leave a metric undefined although the run defines it
(a rate over 2 rows, none drawn); the interval is then taken over the resamples that
define it, if at least `MIN_DEFINED_SHARE` of them do, and is None otherwise.

Caveat: distinct-2 is not a mean over rows; a resample repeats some rows, which repeats
their bigrams, so each run's resampled distinct-2 sits below its full-run value. Both runs
are biased alike, so the interval of the difference is still usable, but read it as
rough.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.auto_metrics import AutoMetrics, metrics_of_rows
from adapters.eval_report import accuracy_rate, judged_accuracy, judged_scores, mean_score
from adapters.eval_rows import RunInfo, ScoredRow

MIN_DEFINED_SHARE = 0.9
"""The interval of a metric is computed only when at least this share of the resamples
define it (the others drew no row of its denominator); below it the run holds too few
such rows for an interval to mean anything, and it is None."""

Unit = Literal["share", "score", "words", "ratio", "ms"]


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    unit: Unit
    value: Callable[[Sequence[ScoredRow], AutoMetrics], float | None]
    count: Callable[[Sequence[ScoredRow], AutoMetrics], int]
    """The rows the metric is computed over (its denominator)."""


METRICS: tuple[_Metric, ...] = (
    _Metric(
        "judged accuracy",
        "share",
        lambda r, m: accuracy_rate(r),
        lambda r, m: judged_accuracy(r)[1],
    ),
    _Metric(
        "mean intent score",
        "score",
        lambda r, m: mean_score(r, "intent"),
        lambda r, m: len(judged_scores(r, "intent")),
    ),
    _Metric(
        "mean bridging score",
        "score",
        lambda r, m: mean_score(r, "bridging"),
        lambda r, m: len(judged_scores(r, "bridging")),
    ),
    _Metric("pass rate", "share", lambda r, m: m.pass_rate, lambda r, m: m.ok),
    _Metric("fallback rate", "share", lambda r, m: m.fallback_rate, lambda r, m: m.ok),
    _Metric("leak rate", "share", lambda r, m: m.leak_rate, lambda r, m: m.leak_denominator),
    _Metric(
        "praise-before-correction rate",
        "share",
        lambda r, m: m.praise_before_correction,
        lambda r, m: m.correction_rows,
    ),
    _Metric(
        "repetition rate",
        "share",
        lambda r, m: m.repetition_rate,
        lambda r, m: m.repetition_denominator,
    ),
    _Metric("mean words", "words", lambda r, m: m.mean_words, lambda r, m: m.model),
    _Metric("distinct-2", "ratio", lambda r, m: m.distinct_2, lambda r, m: m.model),
    _Metric("P95 latency", "ms", lambda r, m: m.latency_p95_ms, lambda r, m: m.ok),
)
"""The compared metrics, in table order (definitions: `adapters.eval_report`,
`adapters.auto_metrics`)."""

UNITS: dict[str, Unit] = {metric.name: metric.unit for metric in METRICS}


class Difference(BaseModel):
    """One metric in both runs and the difference B - A."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    a: float | None
    b: float | None
    diff: float | None
    """b - a; None when either is undefined."""
    ci_low: float | None
    """Lower end of the bootstrap confidence interval of b - a (None: no interval)."""
    ci_high: float | None
    paired: bool
    n_a: int
    """Rows the metric is computed over in A (its denominator: scored rows, answered
    rows, rows with a main response...)."""
    n_b: int
    significant: bool | None
    """The interval excludes 0; None without an interval."""


class Comparison(BaseModel):
    """`compare_runs`'s result: run A against run B."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    a_name: str
    b_name: str
    paired: bool
    common_rows: int
    """Row ids present in both runs."""
    n_resamples: int
    seed: int
    confidence: float = Field(default=0.95)
    differences: list[Difference]


def _vector(rows: Sequence[ScoredRow]) -> tuple[np.ndarray[Any, Any], list[int]]:
    """Every metric of `rows` (NaN where undefined), and their denominators."""
    metrics = metrics_of_rows(rows)
    values = [metric.value(rows, metrics) for metric in METRICS]
    counts = [metric.count(rows, metrics) for metric in METRICS]
    return np.array([np.nan if v is None else float(v) for v in values]), counts


def _values(rows: Sequence[ScoredRow]) -> np.ndarray[Any, Any]:
    return _vector(rows)[0]


def _unique_ids(rows: Sequence[ScoredRow]) -> set[str] | None:
    ids = {row.id for row in rows}
    return ids if len(ids) == len(rows) else None


def compare_runs(
    a_rows: Sequence[ScoredRow],
    a_info: RunInfo,
    b_rows: Sequence[ScoredRow],
    b_info: RunInfo,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Compare run B with run A, metric by metric (`METRICS`), with bootstrap intervals.

    Args:
        a_rows, a_info: run A (the baseline).
        b_rows, b_info: run B.
        n_resamples: bootstrap resamples (at least 2).
        seed: seeds the numpy Generator of the resampling (same inputs and seed, same
            intervals).
        confidence: the intervals' confidence level, in (0, 1).

    Returns:
        The comparison; paired when both runs hold the same set of row ids (each id
        once), else two independent samples.

    Raises:
        ValueError: `n_resamples` < 2 or `confidence` outside (0, 1).
    """
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be at least 2, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ids_a, ids_b = _unique_ids(a_rows), _unique_ids(b_rows)
    paired = bool(ids_a) and ids_a == ids_b
    common = len({r.id for r in a_rows} & {r.id for r in b_rows})
    if paired:
        by_b = {row.id: row for row in b_rows}
        a_seq = list(a_rows)
        b_seq = [by_b[row.id] for row in a_seq]  # aligned on A's order
    else:
        a_seq, b_seq = list(a_rows), list(b_rows)
    a_values, n_a = _vector(a_seq)
    b_values, n_b = _vector(b_seq)
    diffs = b_values - a_values
    intervals = _intervals(a_seq, b_seq, diffs, paired, n_resamples, seed, confidence)
    differences: list[Difference] = []
    for index, metric in enumerate(METRICS):
        a, b, diff = (_opt(v[index]) for v in (a_values, b_values, diffs))
        low, high = intervals[index] if intervals is not None else (None, None)
        differences.append(
            Difference(
                metric=metric.name,
                a=a,
                b=b,
                diff=diff,
                ci_low=low,
                ci_high=high,
                paired=paired,
                n_a=n_a[index],
                n_b=n_b[index],
                significant=None if low is None or high is None else (low > 0 or high < 0),
            )
        )
    return Comparison(
        a_name=a_info.name,
        b_name=b_info.name,
        paired=paired,
        common_rows=common,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        differences=differences,
    )


def _opt(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _intervals(
    a_seq: Sequence[ScoredRow],
    b_seq: Sequence[ScoredRow],
    diffs: np.ndarray[Any, Any],
    paired: bool,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> list[tuple[float | None, float | None]] | None:
    """The interval of each metric's difference (None, None where there is none); None
    when a sample has fewer than 2 rows (the bootstrap needs 2) or no difference is
    defined."""
    if len(a_seq) < 2 or len(b_seq) < 2 or np.isnan(diffs).all():
        return None
    from scipy.stats import DegenerateDataWarning, bootstrap

    data: tuple[np.ndarray[Any, Any], ...]
    if paired:
        data = (np.arange(len(a_seq)),)

        def statistic(*samples: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            (ids,) = samples
            diff: np.ndarray[Any, Any] = _values([b_seq[i] for i in ids]) - _values(
                [a_seq[i] for i in ids]
            )
            return diff

    else:
        data = (np.arange(len(a_seq)), np.arange(len(b_seq)))

        def statistic(*samples: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            index_a, index_b = samples
            diff: np.ndarray[Any, Any] = _values([b_seq[i] for i in index_b]) - _values(
                [a_seq[i] for i in index_a]
            )
            return diff

    with warnings.catch_warnings():
        # scipy warns when an interval end is NaN (a metric some resamples leave
        # undefined); those metrics are handled below from the distribution itself.
        warnings.filterwarnings("ignore", category=DegenerateDataWarning)
        result = bootstrap(
            data,
            statistic,
            n_resamples=n_resamples,
            vectorized=False,
            paired=False,  # the paired case resamples one array of ids
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    distribution = np.asarray(result.bootstrap_distribution).reshape(len(METRICS), -1)
    lows = np.atleast_1d(result.confidence_interval.low)
    highs = np.atleast_1d(result.confidence_interval.high)
    alpha = (1.0 - confidence) / 2.0
    intervals: list[tuple[float | None, float | None]] = []
    for index in range(len(METRICS)):
        diff = diffs[index]
        column = distribution[index]
        defined = column[~np.isnan(column)]
        if np.isnan(diff) or len(defined) < MIN_DEFINED_SHARE * len(column):
            intervals.append((None, None))
        elif np.ptp(defined) == 0:  # a constant distribution: no variation to show
            intervals.append((float(diff), float(diff)))
        elif len(defined) == len(column):
            intervals.append((float(lows[index]), float(highs[index])))
        else:
            low, high = np.quantile(defined, [alpha, 1.0 - alpha])
            intervals.append((float(low), float(high)))
    return intervals


# --- Markdown ---------------------------------------------------------------------------


def _value(unit: Unit, value: float | None) -> str:
    if value is None:
        return "n/a"
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "score":
        return f"{value:.2f}"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.1f}"


def _delta(unit: Unit, value: float) -> str:
    if unit == "share":
        return f"{value * 100:+.1f} pp"
    if unit == "score":
        return f"{value:+.2f}"
    if unit == "ratio":
        return f"{value:+.3f}"
    if unit == "ms":
        return f"{value:+.1f} ms"
    return f"{value:+.1f}"


def comparison_markdown(c: Comparison) -> str:
    """The comparison as Markdown: a line on the method, then one table row per metric
    (metric | A | B | B - A | CI | significant); shares in percent, their differences in
    percentage points (pp)."""
    if c.paired:
        how = (
            f"Paired: both runs hold the same {c.common_rows} rows (triple and personality), "
            "resampled jointly."
        )
    else:
        how = (
            "Not paired: the runs hold different rows "
            f"({c.common_rows} ids in common), so they are resampled as two independent "
            "samples."
        )
    level = f"{c.confidence * 100:g}%"
    lines = [
        f"Run A: {c.a_name}; run B: {c.b_name}.",
        "",
        f"{how} Percentile bootstrap over rows, {c.n_resamples} resamples, seed {c.seed}. "
        f"A {level} CI that covers 0 means no evidence of a difference.",
        "",
        f"| metric | A | B | B - A | {level} CI | significant |",
        "|---|---|---|---|---|---|",
    ]
    for d in c.differences:
        unit = UNITS.get(d.metric, "score")
        diff = "n/a" if d.diff is None else _delta(unit, d.diff)
        if d.ci_low is None or d.ci_high is None:
            ci = "n/a"
        else:
            ci = f"[{_delta(unit, d.ci_low)}, {_delta(unit, d.ci_high)}]"
        significant = "—" if d.significant is None else ("yes" if d.significant else "no")
        lines.append(
            f"| {d.metric} | {_value(unit, d.a)} (n={d.n_a}) | {_value(unit, d.b)} "
            f"(n={d.n_b}) | {diff} | {ci} | {significant} |"
        )
    return "\n".join(lines) + "\n"
