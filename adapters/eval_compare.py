"""Two evaluation runs side by side, each difference with a bootstrap 95% confidence interval.

`fastresp eval compare A B` reads two run folders (``rows.jsonl`` + ``run.json``,
`adapters.eval_rows`), typically the few-shot base model against an SFT adapter, or
adapter v1 against v2. A difference of a few points between two runs of ~100 triples is
often noise (a judged accuracy of 80 % over 100 rows has a standard error of 4 points),
so every difference comes with an interval and is called significant only when that
interval excludes 0; issue 6: "so noise is not read as progress".

Method: the percentile bootstrap (Efron & Tibshirani, 1993, "An Introduction to the
Bootstrap", chapter 13) with `scipy.stats.bootstrap`, resampling ROW INDICES and
computing each metric on the resampled rows. The full-run figures are those of the
report (`adapters.eval_report` for the judged figures,
`adapters.auto_metrics.metrics_of_rows` for the rest). Recomputing those from the rows
for each of 2,000 resamples took minutes on 600-row runs, so `RowArrays` turns each run
into numbers once (per row: its intent score, accurate or not, bridging score, passes,
fallback, leak, praise before a correction, repeat, words; latencies; bigram ids) and a
resample is a vector of multiplicities (how often each row was drawn): every metric of
all resamples at once is then a few matrix products. A row outside a metric's
denominator (no score, no main response, a fallback for the text metrics...) is NaN in
that metric's column and drawn rows are weighted by multiplicity, so a resample's value
is exactly what the report's definition gives on the resampled rows (the tests check
this against `metrics_of_rows` on a resample written out as rows).

- Paired, when both runs hold each row id once and share at least `PAIRED_MIN_SHARE` of
  each run's ids (same triples and personalities, e.g. base vs adapter on one triples
  file, perhaps with a failed pair dropped): the comparison is over the common ids only,
  which are resampled jointly, and the statistic is ``metric(B rows of the ids) -
  metric(A rows of the ids)``; this removes the variation between triples from the
  difference. Rows outside the common ids are left out of every figure (the Markdown
  says how many).
- Otherwise two independent samples: A's and B's rows are resampled separately and the
  statistic is ``metric(B resample) - metric(A resample)``.

Judged figures are compared only between runs judged alike: when the runs' judges
differ (model or prompt file, `RunInfo.judge`), a judged difference measures the judges
as much as the responses, so it gets no significance.

A metric undefined in either full run (no judge, no correction rows) has no difference
and no interval. A resample can leave a metric undefined although the run defines it
(a rate over 2 rows, none drawn); the interval is then taken over the resamples that
define it, if at least `MIN_DEFINED_SHARE` of them do, and is None otherwise.

Distinct-2 gets its difference but no interval: it is not a mean over rows, and a
resample repeats rows and so their bigrams, which pulls each run's resampled distinct-2
below its full-run value by an amount that depends on the run (on two real runs the
percentile interval did not even contain the observed difference). A difference of
distinct-2 is reported, never called significant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.auto_metrics import AutoMetrics, metrics_of_rows
from adapters.eval_report import (
    TrustLevel,
    accuracy_rate,
    judge_trust,
    judged_accuracy,
    judged_scores,
    mean_score,
)
from adapters.eval_rows import ACCURATE_MIN_SCORE, JudgementKind, RunInfo, ScoredRow
from service.text_checks import word_tokens

MIN_DEFINED_SHARE = 0.9
"""The interval of a metric is computed only when at least this share of the resamples
define it (the others drew no row of its denominator); below it the run holds too few
such rows for an interval to mean anything, and it is None."""

PAIRED_MIN_SHARE = 0.9
"""Two runs are compared paired when the ids they share are at least this share of each
run's ids (a failed pair dropped from one run still leaves the rest paired); below it
they are two independent samples."""

BATCH = 500
"""Resamples computed per batch (bounds memory: a batch holds a resamples x rows matrix)."""

Unit = Literal["share", "score", "words", "ratio", "ms"]

Array = np.ndarray[Any, Any]


# --- per-row values ---------------------------------------------------------------------


def _score(row: ScoredRow, kind: JudgementKind) -> int | None:
    verdict = row.verdict(kind)
    return None if verdict is None else verdict.score


def _model_row(row: ScoredRow) -> bool:
    """An answered row whose text is the model's (`auto_metrics`: ok, not a fallback)."""
    return row.ok and row.source != "fallback"


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(value)


def _accurate(row: ScoredRow) -> float | None:
    score = _score(row, "intent")
    return None if score is None else float(score >= ACCURATE_MIN_SCORE)


def _intent(row: ScoredRow) -> float | None:
    score = _score(row, "intent")
    return None if score is None else float(score)


def _bridging(row: ScoredRow) -> float | None:
    score = _score(row, "bridging")
    return None if score is None else float(score)


def _passes(row: ScoredRow) -> float | None:
    return float(row.checks.passes is True) if row.ok else None


def _fallback(row: ScoredRow) -> float | None:
    return float(row.source == "fallback") if row.ok else None


def _leak(row: ScoredRow) -> float | None:
    return _flag(row.checks.leak) if _model_row(row) else None


def _praise(row: ScoredRow) -> float | None:
    return _flag(row.checks.praise_before_correction) if _model_row(row) else None


def _repeats(row: ScoredRow) -> float | None:
    return _flag(row.checks.repeats_in_session) if row.ok else None


def _words(row: ScoredRow) -> float | None:
    words = row.checks.words
    return None if words is None or not _model_row(row) else float(words)


# --- the metrics ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    unit: Unit
    value: Callable[[Sequence[ScoredRow], AutoMetrics], float | None]
    """The full-run figure, as the report computes it."""
    count: Callable[[Sequence[ScoredRow], AutoMetrics], int]
    """The rows the metric is computed over (its denominator)."""
    row_value: Callable[[ScoredRow], float | None] | None = None
    """For a mean over rows: one row's value, None when the row is outside the
    denominator; None for distinct-2 and P95 latency (`RowArrays` computes those)."""
    judged: bool = False
    """Measured by the LLM judge (compared only between runs with the same judge)."""


METRICS: tuple[_Metric, ...] = (
    _Metric(
        "judged accuracy",
        "share",
        lambda r, m: accuracy_rate(r),
        lambda r, m: judged_accuracy(r)[1],
        _accurate,
        judged=True,
    ),
    _Metric(
        "mean intent score",
        "score",
        lambda r, m: mean_score(r, "intent"),
        lambda r, m: len(judged_scores(r, "intent")),
        _intent,
        judged=True,
    ),
    _Metric(
        "mean bridging score",
        "score",
        lambda r, m: mean_score(r, "bridging"),
        lambda r, m: len(judged_scores(r, "bridging")),
        _bridging,
        judged=True,
    ),
    _Metric("pass rate", "share", lambda r, m: m.pass_rate, lambda r, m: m.ok, _passes),
    _Metric("fallback rate", "share", lambda r, m: m.fallback_rate, lambda r, m: m.ok, _fallback),
    _Metric("leak rate", "share", lambda r, m: m.leak_rate, lambda r, m: m.leak_denominator, _leak),
    _Metric(
        "praise-before-correction rate",
        "share",
        lambda r, m: m.praise_before_correction,
        lambda r, m: m.correction_rows,
        _praise,
    ),
    _Metric(
        "repetition rate",
        "share",
        lambda r, m: m.repetition_rate,
        lambda r, m: m.repetition_denominator,
        _repeats,
    ),
    _Metric("mean words", "words", lambda r, m: m.mean_words, lambda r, m: m.model, _words),
    _Metric("distinct-2", "ratio", lambda r, m: m.distinct_2, lambda r, m: m.model),
    _Metric("P95 latency", "ms", lambda r, m: m.latency_p95_ms, lambda r, m: m.ok),
)
"""The compared metrics, in table order (definitions: `adapters.eval_report`,
`adapters.auto_metrics`)."""

UNITS: dict[str, Unit] = {metric.name: metric.unit for metric in METRICS}

_MEANS = [index for index, metric in enumerate(METRICS) if metric.row_value is not None]
_DISTINCT_2 = next(i for i, metric in enumerate(METRICS) if metric.name == "distinct-2")
_P95 = next(i for i, metric in enumerate(METRICS) if metric.name == "P95 latency")


def metric_values(rows: Sequence[ScoredRow]) -> tuple[Array, list[int]]:
    """Every metric of `rows` as the report computes it (NaN where undefined), in
    `METRICS` order, and each metric's denominator."""
    metrics = metrics_of_rows(rows)
    values = [metric.value(rows, metrics) for metric in METRICS]
    counts = [metric.count(rows, metrics) for metric in METRICS]
    return np.array([np.nan if v is None else float(v) for v in values]), counts


@dataclass(frozen=True, slots=True)
class RowArrays:
    """One run's rows as numbers, to compute every metric of many resamples at once.

    A resample is given as multiplicities: a (resamples, rows) array whose entry says how
    many times the resample drew that row (0, 1, 2...). `metrics` gives, for each
    resample, what `metric_values` gives for the rows written out with those
    multiplicities.
    """

    weighted: Array
    """(rows, mean metrics): the row's value, 0 where the row is outside the denominator."""
    defined: Array
    """(rows, mean metrics): 1.0 where the row is in the metric's denominator, else 0."""
    latency_rows: Array
    """Indices of the answered rows that report a latency, in increasing latency order."""
    latency_sorted: Array
    """Their latencies (ms), increasing."""
    bigram_counts: Array
    """(rows,): bigrams in the row's model text (0 for a row that is not a model row)."""
    bigram_incidence: Any
    """(distinct bigrams, rows) sparse matrix, nonzero where the row's text holds the
    bigram (`scipy.sparse.csr_array`)."""

    @classmethod
    def of_rows(cls, rows: Sequence[ScoredRow]) -> RowArrays:
        """The arrays of `rows` (each row read once; the resamples refer to rows by index)."""
        from scipy.sparse import csr_array

        columns = [metric.row_value for metric in METRICS if metric.row_value is not None]
        raw = np.array(
            [[np.nan if (v := f(row)) is None else v for f in columns] for row in rows],
            dtype=np.float64,
        ).reshape(len(rows), len(columns))
        defined = ~np.isnan(raw)
        latencies = np.array(
            [np.nan if row.latency_ms is None or not row.ok else row.latency_ms for row in rows],
            dtype=np.float64,
        )
        with_latency = np.flatnonzero(~np.isnan(latencies))
        order = with_latency[np.argsort(latencies[with_latency], kind="stable")]
        ids: dict[tuple[str, str], int] = {}
        counts = np.zeros(len(rows), dtype=np.float64)
        cells: set[tuple[int, int]] = set()
        for index, row in enumerate(rows):
            if not _model_row(row) or row.fast_response is None:
                continue
            tokens = word_tokens(row.fast_response)
            grams = list(pairwise(tokens))
            counts[index] = len(grams)
            cells.update((ids.setdefault(gram, len(ids)), index) for gram in grams)
        pairs = np.array(sorted(cells), dtype=np.int64).reshape(-1, 2)
        incidence = csr_array(
            (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(ids), len(rows))
        )
        return cls(
            weighted=np.where(defined, raw, 0.0),
            defined=defined.astype(np.float64),
            latency_rows=order,
            latency_sorted=latencies[order],
            bigram_counts=counts,
            bigram_incidence=incidence,
        )

    def metrics(self, multiplicity: Array) -> Array:
        """Every metric (`METRICS` order) of each resample: shape (metrics, resamples).

        Args:
            multiplicity: (resamples, rows), how many times each resample drew each row.

        Means and rates are weighted sums over the drawn rows (exact: the values are
        small integers); distinct-2 is distinct bigrams of the drawn rows / bigrams
        counted with multiplicity; P95 latency is type 7 of `service.replay`
        (``statistics.quantiles(method="inclusive")``'s own arithmetic) over the drawn
        latencies, each repeated by its multiplicity. NaN where the resample draws no
        row of the denominator.
        """
        draws = np.asarray(multiplicity, dtype=np.float64)
        out = np.full((len(METRICS), draws.shape[0]), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[_MEANS] = ((draws @ self.weighted) / (draws @ self.defined)).T
            total = draws @ self.bigram_counts
            seen = np.count_nonzero(self.bigram_incidence @ (draws > 0).T, axis=0)
            out[_DISTINCT_2] = np.where(total > 0, seen / total, np.nan)
        out[_P95] = self._p95(draws)
        return out

    def _p95(self, draws: Array) -> Array:
        """P95 of the drawn latencies per resample, NaN where none is drawn.

        ``statistics.quantiles(data, n=100, method="inclusive")[94]``: with the k
        sorted values, j, delta = divmod(95 (k - 1), 100) and the result is
        (x[j] (100 - delta) + x[j + 1] delta) / 100; one value is itself
        (`service.replay.latency_percentiles`). The sorted resample is the sorted run
        with each value repeated, so x[i] is the first value whose cumulative
        multiplicity exceeds i.
        """
        result = np.full(draws.shape[0], np.nan)
        if len(self.latency_rows) == 0:
            return result
        cumulative = np.cumsum(draws[:, self.latency_rows].astype(np.int64), axis=1)
        k = cumulative[:, -1]
        j, delta = np.divmod(95 * (k - 1), 100)

        def at(position: Array) -> Array:
            index = np.count_nonzero(cumulative <= position[:, None], axis=1)
            values: Array = self.latency_sorted[np.minimum(index, len(self.latency_rows) - 1)]
            return values

        low, high = at(j), at(j + 1)
        interpolated = (low * (100 - delta) + high * delta) / 100
        result[k == 1] = low[k == 1]
        result[k > 1] = interpolated[k > 1]
        return result


def multiplicities(indices: Array, rows: int) -> Array:
    """(resamples, rows) draw counts from a (resamples, draws) array of row indices."""
    indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
    offsets = indices + rows * np.arange(indices.shape[0])[:, None]
    counts = np.bincount(offsets.ravel(), minlength=indices.shape[0] * rows)
    return counts.reshape(indices.shape[0], rows)


# --- the comparison ---------------------------------------------------------------------


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
    """The interval excludes 0; None without an interval, and for a judged metric when
    the runs' judges differ (`Comparison.same_judge`)."""


class Comparison(BaseModel):
    """`compare_runs`'s result: run A against run B."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    a_name: str
    b_name: str
    paired: bool
    common_rows: int
    """Row ids present in both runs; when paired, the rows every figure is computed over."""
    only_a: int
    """Rows of A whose id B does not hold (left out of every figure when paired)."""
    only_b: int
    """Rows of B whose id A does not hold."""
    judge_a: str
    """A's judge: model and prompt versions (`judge_description`), "none" without one."""
    judge_b: str
    judge_a_trust: TrustLevel | None
    """`adapters.eval_report.judge_trust` of A's judge when A records a calibration."""
    judge_b_trust: TrustLevel | None
    same_judge: bool
    """Both runs had the same judge model and prompt files (or both none); when False
    the judged differences get no significance."""
    n_resamples: int
    seed: int
    confidence: float = Field(default=0.95)
    differences: list[Difference]


def judge_description(info: RunInfo) -> str:
    """The run's judge in a few words: model and prompt versions; "none" without one."""
    judge = info.judge
    if judge is None:
        return "none"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(judge.prompt_versions.items()))
    return f"{judge.model} ({versions})" if versions else judge.model


def same_judge(a: RunInfo, b: RunInfo) -> bool:
    """Both runs were judged by the same model with the same prompt files (by their
    SHA-256), or neither was judged."""
    if a.judge is None or b.judge is None:
        return a.judge is None and b.judge is None
    return a.judge.model == b.judge.model and a.judge.prompt_sha256 == b.judge.prompt_sha256


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
        The comparison; paired over the common ids when each run holds each id once and
        the common ids are at least `PAIRED_MIN_SHARE` of each run's ids, else two
        independent samples.

    Raises:
        ValueError: `n_resamples` < 2 or `confidence` outside (0, 1).
    """
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be at least 2, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ids_a, ids_b = _unique_ids(a_rows), _unique_ids(b_rows)
    common = {r.id for r in a_rows} & {r.id for r in b_rows}
    paired = (
        ids_a is not None
        and ids_b is not None
        and bool(common)
        and len(common) >= PAIRED_MIN_SHARE * len(ids_a)
        and len(common) >= PAIRED_MIN_SHARE * len(ids_b)
    )
    if paired:
        by_b = {row.id: row for row in b_rows}
        a_seq = [row for row in a_rows if row.id in common]
        b_seq = [by_b[row.id] for row in a_seq]  # aligned on A's order
    else:
        a_seq, b_seq = list(a_rows), list(b_rows)
    a_values, n_a = metric_values(a_seq)
    b_values, n_b = metric_values(b_seq)
    diffs = b_values - a_values
    intervals = _intervals(a_seq, b_seq, diffs, paired, n_resamples, seed, confidence)
    judges_agree = same_judge(a_info, b_info)
    differences: list[Difference] = []
    for index, metric in enumerate(METRICS):
        a, b, diff = (_opt(v[index]) for v in (a_values, b_values, diffs))
        low, high = intervals[index] if intervals is not None else (None, None)
        if index == _DISTINCT_2:  # biased under resampling: no interval (module docstring)
            low, high = None, None
        comparable = judges_agree or not metric.judged
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
                significant=(
                    None if low is None or high is None or not comparable else (low > 0 or high < 0)
                ),
            )
        )
    return Comparison(
        a_name=a_info.name,
        b_name=b_info.name,
        paired=paired,
        common_rows=len(common),
        only_a=sum(row.id not in common for row in a_rows),
        only_b=sum(row.id not in common for row in b_rows),
        judge_a=judge_description(a_info),
        judge_b=judge_description(b_info),
        judge_a_trust=judge_trust(a_info)[0] if a_info.calibration is not None else None,
        judge_b_trust=judge_trust(b_info)[0] if b_info.calibration is not None else None,
        same_judge=judges_agree,
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
    diffs: Array,
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

    a_arrays, b_arrays = RowArrays.of_rows(a_seq), RowArrays.of_rows(b_seq)
    n_a, n_b = len(a_seq), len(b_seq)
    data: tuple[Array, ...]
    if paired:
        data = (np.arange(n_a),)

        def statistic(*samples: Array, axis: int = -1) -> Array:
            draws = multiplicities(samples[0], n_a)
            diff: Array = b_arrays.metrics(draws) - a_arrays.metrics(draws)
            return diff

    else:
        data = (np.arange(n_a), np.arange(n_b))

        def statistic(*samples: Array, axis: int = -1) -> Array:
            index_a, index_b = samples
            diff: Array = b_arrays.metrics(multiplicities(index_b, n_b)) - a_arrays.metrics(
                multiplicities(index_a, n_a)
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
            batch=BATCH,
            vectorized=True,  # index arrays (resamples, rows) in, (metrics, resamples) out
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


def _judge_text(description: str, trust: TrustLevel | None) -> str:
    return description if trust is None else f"{description}, calibration trust: {trust}"


def comparison_markdown(c: Comparison) -> str:
    """The comparison as Markdown: lines on the runs' judges and the method, then one
    table row per metric (metric | A | B | B - A | CI | significant); shares in percent,
    their differences in percentage points (pp)."""
    if c.paired and not (c.only_a or c.only_b):
        how = (
            f"Paired: both runs hold the same {c.common_rows} rows (triple and personality), "
            "resampled jointly."
        )
    elif c.paired:
        how = (
            f"Paired on the {c.common_rows} ids (triple and personality) both runs hold, "
            f"resampled jointly; A had {c.only_a} and B {c.only_b} rows outside them, left "
            "out of every figure below."
        )
    else:
        how = (
            "Not paired: the runs hold different rows "
            f"({c.common_rows} ids in common, {c.only_a} only in A, {c.only_b} only in B), "
            "so they are resampled as two independent samples."
        )
    level = f"{c.confidence * 100:g}%"
    judged = ", ".join(metric.name for metric in METRICS if metric.judged)
    lines = [
        f"Run A: {c.a_name}; run B: {c.b_name}.",
        "",
        f"Judge of A: {_judge_text(c.judge_a, c.judge_a_trust)}. "
        f"Judge of B: {_judge_text(c.judge_b, c.judge_b_trust)}.",
        "",
    ]
    if not c.same_judge:
        lines += [
            "The judges differ (model or prompt files), so the judged differences "
            f"({judged}) are not comparable: no significance is given for them.",
            "",
        ]
    lines += [
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
