"""Comparing two evaluation runs (adapters/eval_compare.py): the bootstrap intervals.

Rows are built here with known scores and checks. Samples drawn from one seeded
distribution must give an interval covering 0; a clear difference (intent scores mostly
2 against mostly 5) must give one excluding it. The fast resample statistic
(`RowArrays`) is checked against the report's own code (`metrics_of_rows`,
`eval_report`) on the full run and on a resample written out as rows.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from adapters.auto_metrics import distinct_n, metrics_of_rows
from adapters.eval_compare import (
    METRICS,
    Comparison,
    Difference,
    RowArrays,
    compare_runs,
    comparison_markdown,
    metric_values,
    multiplicities,
)
from adapters.eval_report import accuracy_rate, judge_trust, mean_score
from adapters.eval_rows import (
    Agreement,
    Calibration,
    JudgeInfo,
    RowChecks,
    RunInfo,
    ScoredRow,
    Verdict,
    row_id,
)
from adapters.sources import Triple

N_RESAMPLES = 500


def _judge(model: str = "judge-model", intent_sha: str = "0" * 64) -> JudgeInfo:
    return JudgeInfo(
        model=model,
        base_url="http://127.0.0.1:9/v1",
        prompt_versions={"intent": "judge-intent-v1", "bridging": "judge-bridging-v1"},
        prompt_sha256={"intent": intent_sha, "bridging": "1" * 64},
        structured_output=True,
    )


def _info(
    name: str, judge: JudgeInfo | None = None, calibration: Calibration | None = None
) -> RunInfo:
    return RunInfo(
        name=name,
        created="2025-01-01T00:00:00Z",
        command="fastresp eval run",
        machine="testhost, no GPU",
        target="in-process",
        triples="t.jsonl",
        judge=judge,
        calibration=calibration,
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


METRICS_INDEX = {metric.name: index for index, metric in enumerate(METRICS)}


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
    # 10 ids more in B: the 60 common ids are under 90% of B's 70, so two independent
    # samples, and the interval is wide again
    extra = [_row(f"extra{i}", 5) for i in range(10)]
    c = compare_runs(a, _info("A"), [*b, *extra], _info("B"), n_resamples=N_RESAMPLES)
    assert c.paired is False and (c.common_rows, c.only_a, c.only_b) == (60, 0, 10)
    wide = _by_metric(c)["mean intent score"]
    assert wide.ci_low is not None and wide.ci_high is not None
    assert wide.ci_high - wide.ci_low > 0.2
    assert "Not paired" in comparison_markdown(c) and "10 only in B" in comparison_markdown(c)


def test_runs_sharing_most_ids_are_paired_on_the_common_ids() -> None:
    # A lost 2 pairs (t3, t7: failed), B lost t11 and holds 1 id of its own: 57 common
    # ids, at least 90% of A's 58 and B's 60 ids, so paired on those 57
    rng = np.random.default_rng(6)
    scores = [int(s) for s in rng.choice([1, 2, 3, 4], size=60)]
    a = [_row(f"t{i}", s) for i, s in enumerate(scores) if i not in (3, 7)]
    b = [_row(f"t{i}", s + 1) for i, s in enumerate(scores) if i != 11]
    b.append(_row("b-only", 1))
    c = compare_runs(a, _info("A"), b, _info("B"), n_resamples=N_RESAMPLES)
    assert c.paired is True and (c.common_rows, c.only_a, c.only_b) == (57, 1, 3)
    common = [s for i, s in enumerate(scores) if i not in (3, 7, 11)]
    mean = _by_metric(c)["mean intent score"]
    # the figures are over the common ids only (B's own row, scored 1, is left out)
    assert mean.a == pytest.approx(sum(common) / 57)
    assert mean.b == pytest.approx(sum(s + 1 for s in common) / 57)
    assert (mean.n_a, mean.n_b) == (57, 57)
    for end in (mean.diff, mean.ci_low, mean.ci_high):  # paired: every pair differs by 1
        assert end == pytest.approx(1.0)
    text = comparison_markdown(c)
    assert "Paired on the 57 ids" in text
    assert "A had 1 and B 3 rows outside them, left out of every figure below" in text
    # one id of A repeated: ids are not unique, so two independent samples
    c = compare_runs([*a, a[0]], _info("A"), b, _info("B"), n_resamples=N_RESAMPLES)
    assert c.paired is False


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


def _mixed_rows(seed: int, n: int) -> list[ScoredRow]:
    """Rows of every kind: failed requests, fallbacks, cache and model answers, rows with
    and without a main response, latency or session history, rejected judgements."""
    rng = np.random.default_rng(seed)
    words = ["ooh", "nice", "red", "blue", "you", "got", "it", "great", "job", "let", "wow"]
    rows: list[ScoredRow] = []
    for i in range(n):
        main = None if rng.random() < 0.3 else "Not quite, it is blue."
        kind = str(rng.choice(["error", "fallback", "model", "cache"], p=[0.05, 0.1, 0.75, 0.1]))
        intent = Verdict(kind="intent", score=int(rng.integers(1, 6)))
        if rng.random() < 0.1:
            intent = Verdict(kind="intent", error="no score in the reply")
        base = ScoredRow(
            id=row_id(f"t{i}", "calm"),
            triple=Triple(id=f"t{i}", source="jsonl", user_turn="red", main_response=main),
            personality="calm",
            session_id=f"s{i % 7}",
            intent=None if rng.random() < 0.05 else intent,
            bridging=Verdict(kind="bridging", score=int(rng.integers(1, 6))),
        )
        if kind == "error":
            rows.append(base.model_copy(update={"error": "HTTP 503: busy"}))
            continue
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 7)))) + "!"
        repeats = None if rng.random() < 0.3 else bool(rng.random() < 0.3)
        checks = RowChecks(passes=False, repeats_in_session=repeats)
        if kind != "fallback":
            checks = RowChecks(
                passes=bool(rng.random() < 0.7),
                leak=None if main is None else bool(rng.random() < 0.3),
                praise_before_correction=None if main is None else bool(rng.random() < 0.3),
                safety_flag=False,
                repeats_in_session=repeats,
                words=len(text.split()),
                chars=len(text),
            )
        latency = None if rng.random() < 0.1 else float(np.round(rng.gamma(2.0, 30.0), 3))
        rows.append(
            base.model_copy(
                update={
                    "fast_response": text,
                    "source": kind,
                    "latency_ms": latency,
                    "checks": checks,
                }
            )
        )
    return rows


def _report_figures(rows: list[ScoredRow]) -> dict[str, float | None]:
    """Each compared metric as the report and `metrics_of_rows` give it."""
    m = metrics_of_rows(rows)
    return {
        "judged accuracy": accuracy_rate(rows),
        "mean intent score": mean_score(rows, "intent"),
        "mean bridging score": mean_score(rows, "bridging"),
        "pass rate": m.pass_rate,
        "fallback rate": m.fallback_rate,
        "leak rate": m.leak_rate,
        "praise-before-correction rate": m.praise_before_correction,
        "repetition rate": m.repetition_rate,
        "mean words": m.mean_words,
        "distinct-2": m.distinct_2,
        "P95 latency": m.latency_p95_ms,
    }


def _as_list(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def test_the_resample_statistic_is_the_report_on_the_resampled_rows() -> None:
    rows = _mixed_rows(11, 80)
    assert {r.source for r in rows} == {None, "fallback", "model", "cache"}
    arrays = RowArrays.of_rows(rows)
    names = [metric.name for metric in METRICS]
    # the full run: every metric exactly as the report computes it
    report = _report_figures(rows)
    assert list(report) == names
    assert None not in report.values()
    full = arrays.metrics(np.ones((1, len(rows))))[:, 0]
    assert _as_list(full) == list(report.values())
    assert _as_list(metric_values(rows)[0]) == list(report.values())
    # resamples: each equals the report on the drawn rows written out (repeats included)
    rng = np.random.default_rng(12)
    draws = multiplicities(rng.integers(0, len(rows), size=(5, len(rows))), len(rows))
    resampled = arrays.metrics(draws)
    for column, counts in enumerate(draws):
        written = [row for row, k in zip(rows, counts, strict=True) for _ in range(k)]
        assert _as_list(resampled[:, column]) == list(_report_figures(written).values())
    # the two ends by hand: distinct-2 counts a drawn row's bigrams once per draw, and
    # P95 is type 7 over the repeated latencies (statistics.quantiles, "inclusive")
    model = [i for i, r in enumerate(rows) if r.ok and r.source != "fallback"][:3]
    texts = [rows[i].fast_response or "" for i in model]
    timed = [i for i, r in enumerate(rows) if r.ok and r.latency_ms is not None][:3]
    latencies = [rows[i].latency_ms or 0.0 for i in timed]
    one = np.zeros((1, len(rows)))
    one[0, model] = [2, 1, 0]
    assert arrays.metrics(one)[METRICS_INDEX["distinct-2"], 0] == distinct_n(
        [texts[0], texts[0], texts[1]], 2
    )
    one = np.zeros((1, len(rows)))
    one[0, timed] = [0, 2, 1]
    data = [latencies[1], latencies[1], latencies[2]]
    expected = statistics.quantiles(data, n=100, method="inclusive")[94]
    assert arrays.metrics(one)[METRICS_INDEX["P95 latency"], 0] == expected
    # a resample of failed requests only: every metric but the judged ones undefined
    failed = [i for i, r in enumerate(rows) if not r.ok]
    one = np.zeros((1, len(rows)))
    one[0, failed] = 1
    undefined = _as_list(arrays.metrics(one)[:, 0])
    assert undefined[3:] == [None] * (len(METRICS) - 3)


def test_multiplicities_count_the_draws_of_each_row() -> None:
    counts = multiplicities(np.array([[0, 0, 2, 3], [3, 3, 3, 3]]), 5)
    assert counts.tolist() == [[2, 0, 1, 1, 0], [0, 0, 0, 4, 0]]


def test_different_judges_give_no_significance_to_the_judged_differences() -> None:
    a = _draw("a", 3, [0.05, 0.8, 0.1, 0.05, 0.0], n=60)  # mostly 2
    b = _draw("b", 4, [0.0, 0.0, 0.05, 0.15, 0.8], n=60)  # mostly 5
    b = [r.model_copy(update={"latency_ms": 500.0}) for r in b]  # B is clearly slower
    same = compare_runs(a, _info("A", _judge()), b, _info("B", _judge()), n_resamples=200)
    assert same.same_judge is True
    assert _by_metric(same)["mean intent score"].significant is True
    assert "judges differ" not in comparison_markdown(same)
    weak = Calibration(
        judge_model="judge-model",
        judge_base_url="http://127.0.0.1:9/v1",
        set_path="tests/data/judge_calibration.jsonl",
        set_sha256="a" * 64,
        created="2025-01-01T00:00:00Z",
        agreements=[
            Agreement(
                kind="intent", examples=30, scored=30, exact=0.2, within_one=0.5, spearman=0.1
            )
        ],
    )
    a_info = _info("A", _judge(), calibration=weak)
    assert judge_trust(a_info)[0] == "weak"
    for b_judge in (_judge(model="other-model"), _judge(intent_sha="2" * 64)):
        c = compare_runs(a, a_info, b, _info("B", b_judge), n_resamples=200)
        assert c.same_judge is False
        for name in ("judged accuracy", "mean intent score", "mean bridging score"):
            d = _by_metric(c)[name]
            assert d.diff is not None and d.ci_low is not None and d.significant is None
        assert _by_metric(c)["P95 latency"].significant is True  # no judge in it
        assert c.judge_a == "judge-model (bridging judge-bridging-v1, intent judge-intent-v1)"
        assert (c.judge_a_trust, c.judge_b_trust) == ("weak", None)
        text = comparison_markdown(c)
        assert (
            "Judge of A: judge-model (bridging judge-bridging-v1, intent judge-intent-v1), "
            "calibration trust: weak. Judge of B: " + c.judge_b + "."
        ) in text
        assert (
            "The judges differ (model or prompt files), so the judged differences (judged "
            "accuracy, mean intent score, mean bridging score) are not comparable"
        ) in text
        mean_line = next(line for line in text.splitlines() if line.startswith("| mean intent"))
        assert mean_line.endswith("| — |")
    assert (
        "other-model ("
        in compare_runs(
            a, a_info, b, _info("B", _judge(model="other-model")), n_resamples=200
        ).judge_b
    )
    # no judge in either run: the same (no) judge
    c = compare_runs(a, _info("A"), b, _info("B"), n_resamples=200)
    assert c.same_judge is True and (c.judge_a, c.judge_b) == ("none", "none")
    assert "Judge of A: none. Judge of B: none." in comparison_markdown(c)
