"""Comparing two evaluation runs (adapters/eval_compare.py): the bootstrap intervals.

Rows are built here with known scores and checks. Samples drawn from one seeded
distribution must give an interval covering 0; a clear difference (intent scores mostly
2 against mostly 5) must give one excluding it.
"""

from __future__ import annotations

import numpy as np
import pytest

from adapters.eval_compare import (
    METRICS,
    Comparison,
    Difference,
    compare_runs,
    comparison_markdown,
)
from adapters.eval_rows import RowChecks, RunInfo, ScoredRow, Verdict, row_id
from adapters.sources import Triple

N_RESAMPLES = 500


def _info(name: str) -> RunInfo:
    return RunInfo(
        name=name,
        created="2025-01-01T00:00:00Z",
        command="fastresp eval run",
        machine="testhost, no GPU",
        target="in-process",
        triples="t.jsonl",
    )


def _row(
    triple_id: str,
    intent: int | None,
    *,
    personality: str = "calm",
    passes: bool = True,
    text: str = "Ooh, nice!",
    latency: float = 50.0,
) -> ScoredRow:
    return ScoredRow(
        id=row_id(triple_id, personality),
        triple=Triple(id=triple_id, source="jsonl", user_turn="red", main_response=None),
        personality=personality,
        session_id=f"s-{triple_id}",
        fast_response=text,
        source="model",
        latency_ms=latency,
        checks=RowChecks(passes=passes, words=len(text.split()), chars=len(text)),
        intent=None if intent is None else Verdict(kind="intent", score=intent),
        bridging=None if intent is None else Verdict(kind="bridging", score=intent),
    )


def _intents(rows: list[ScoredRow]) -> list[int]:
    """The intent scores the test rows were built with (every row has one)."""
    return [r.intent.score for r in rows if r.intent is not None and r.intent.score is not None]


def _draw(prefix: str, seed: int, probabilities: list[float], n: int = 200) -> list[ScoredRow]:
    rng = np.random.default_rng(seed)
    scores = rng.choice([1, 2, 3, 4, 5], size=n, p=probabilities)
    return [_row(f"{prefix}{i}", int(score)) for i, score in enumerate(scores)]


def _by_metric(c: Comparison) -> dict[str, Difference]:
    return {d.metric: d for d in c.differences}


SAME = [0.05, 0.1, 0.15, 0.3, 0.4]


def test_two_draws_of_one_distribution_give_an_interval_covering_zero() -> None:
    a, b = _draw("a", 1, SAME), _draw("b", 2, SAME)
    c = compare_runs(a, _info("A"), b, _info("B"), n_resamples=N_RESAMPLES, seed=0)
    assert c.paired is False and c.common_rows == 0
    for name in ("judged accuracy", "mean intent score", "mean bridging score"):
        d = _by_metric(c)[name]
        assert d.ci_low is not None and d.ci_high is not None
        assert d.ci_low < 0 < d.ci_high, name
        assert d.significant is False
        assert d.paired is False and (d.n_a, d.n_b) == (200, 200)


def test_a_clear_difference_gives_an_interval_excluding_zero() -> None:
    a = _draw("a", 3, [0.05, 0.8, 0.1, 0.05, 0.0])  # mostly 2
    b = _draw("b", 4, [0.0, 0.0, 0.05, 0.15, 0.8])  # mostly 5
    c = compare_runs(a, _info("A"), b, _info("B"), n_resamples=N_RESAMPLES, seed=0)
    mean = _by_metric(c)["mean intent score"]
    a_mean = float(np.mean(_intents(a)))
    b_mean = float(np.mean(_intents(b)))
    assert mean.a == pytest.approx(a_mean) and mean.b == pytest.approx(b_mean)
    assert mean.diff == pytest.approx(b_mean - a_mean)
    assert mean.ci_low is not None and mean.ci_high is not None and mean.diff is not None
    assert 0 < mean.ci_low < mean.diff < mean.ci_high
    assert mean.significant is True
    accuracy = _by_metric(c)["judged accuracy"]
    a_acc = sum(score >= 4 for score in _intents(a)) / 200
    b_acc = sum(score >= 4 for score in _intents(b)) / 200
    assert accuracy.diff == pytest.approx(b_acc - a_acc)
    assert accuracy.significant is True
    assert accuracy.ci_low is not None and accuracy.ci_low > 0


def test_same_row_ids_are_paired_and_the_pairing_narrows_the_interval() -> None:
    # the same 60 triples: B scores each triple one point above A (capped at 5)
    rng = np.random.default_rng(5)
    scores = rng.choice([1, 2, 3, 4], size=60)
    a = [_row(f"t{i}", int(s)) for i, s in enumerate(scores)]
    b = [_row(f"t{i}", int(s) + 1) for i, s in enumerate(scores)]
    c = compare_runs(a, _info("A"), list(reversed(b)), _info("B"), n_resamples=N_RESAMPLES)
    assert c.paired is True and c.common_rows == 60
    mean = _by_metric(c)["mean intent score"]
    # every resampled pair differs by exactly 1: the paired distribution is constant
    for end in (mean.diff, mean.ci_low, mean.ci_high):
        assert end == pytest.approx(1.0)
    assert mean.significant is True
    # one id more in B: no longer the same set, so two independent samples
    c = compare_runs(a, _info("A"), [*b, _row("extra", 5)], _info("B"), n_resamples=N_RESAMPLES)
    assert c.paired is False and c.common_rows == 60
    wide = _by_metric(c)["mean intent score"]
    assert wide.ci_low is not None and wide.ci_high is not None
    assert wide.ci_high - wide.ci_low > 0.2


def test_an_undefined_metric_has_no_difference_and_a_constant_one_does_not_crash() -> None:
    a = [_row(f"t{i}", None) for i in range(10)]  # no judge in A
    b = [_row(f"t{i}", 4) for i in range(10)]
    c = compare_runs(a, _info("A"), b, _info("B"), n_resamples=N_RESAMPLES)
    accuracy = _by_metric(c)["judged accuracy"]
    assert (accuracy.a, accuracy.b, accuracy.n_a) == (None, 1.0, 0)
    assert accuracy.diff is None and accuracy.significant is None
    assert accuracy.ci_low is None and accuracy.ci_high is None
    leak = _by_metric(c)["leak rate"]  # no row has a main response: undefined in both
    assert leak.a is None and leak.diff is None and leak.ci_low is None
    # both pass every row: a constant bootstrap distribution, CI [0, 0], not significant
    passing = _by_metric(c)["pass rate"]
    assert (passing.a, passing.b, passing.diff) == (1.0, 1.0, 0.0)
    assert (passing.ci_low, passing.ci_high, passing.significant) == (0.0, 0.0, False)


def test_a_single_row_per_run_gives_differences_without_intervals() -> None:
    c = compare_runs(
        [_row("t1", 3)], _info("A"), [_row("t2", 5)], _info("B"), n_resamples=N_RESAMPLES
    )
    mean = _by_metric(c)["mean intent score"]
    assert mean.diff == pytest.approx(2.0) and mean.ci_low is None and mean.significant is None


def test_same_seed_same_intervals_and_bad_arguments_are_refused() -> None:
    a, b = _draw("a", 1, SAME, n=40), _draw("b", 2, SAME, n=40)
    first = compare_runs(a, _info("A"), b, _info("B"), n_resamples=200, seed=7)
    again = compare_runs(a, _info("A"), b, _info("B"), n_resamples=200, seed=7)
    assert first == again
    with pytest.raises(ValueError, match="n_resamples"):
        compare_runs(a, _info("A"), b, _info("B"), n_resamples=1)
    with pytest.raises(ValueError, match="confidence"):
        compare_runs(a, _info("A"), b, _info("B"), confidence=1.0)


def test_markdown_has_one_table_line_per_metric() -> None:
    a = _draw("a", 3, [0.05, 0.8, 0.1, 0.05, 0.0], n=50)
    b = _draw("b", 4, [0.0, 0.0, 0.05, 0.15, 0.8], n=50)
    text = comparison_markdown(compare_runs(a, _info("base"), b, _info("sft"), n_resamples=200))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| metric | A | B | B - A | 95% CI | significant |"
    body = table[1:]
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == [m.name for m in METRICS]
    assert "Run A: base; run B: sft." in text
    assert "Not paired" in text and "200 resamples, seed 0" in text
    assert "covers 0 means no evidence of a difference" in text
    accuracy = body[0]
    assert " pp" in accuracy and accuracy.endswith("| yes |")
    leak = next(line for line in body if line.startswith("| leak rate"))
    assert leak.endswith("| n/a | n/a | — |")
