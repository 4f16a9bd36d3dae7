"""The evaluation report (adapters/eval_report.py) against figures worked out by hand below.

The rows are written out here, checks and verdicts included, so every headline figure
can be counted on paper: the intent scores are 5, 4, 2, 4, 4 (one more judgement was
rejected), so judged accuracy is 4 of 5.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import pytest

from adapters.eval_report import (
    TRUST_MIN_SPEARMAN,
    TRUST_MIN_WITHIN_ONE,
    gpu_machine,
    headline,
    headline_markdown,
    judge_trust,
    worst_rows,
    write_report,
)
from adapters.eval_rows import (
    Agreement,
    Calibration,
    JudgeInfo,
    JudgementKind,
    RowChecks,
    RunInfo,
    ScoredRow,
    Verdict,
    row_id,
)
from adapters.sources import Triple

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert('x')</script> Ooh!"

JUDGE = JudgeInfo(
    model="judge-model",
    base_url="http://127.0.0.1:9/v1",
    prompt_versions={"intent": "judge-intent-v1", "bridging": "judge-bridging-v1"},
    prompt_sha256={"intent": "0" * 64, "bridging": "1" * 64},
    structured_output=True,
)


def _info(
    judge: JudgeInfo | None = JUDGE, calibration: Calibration | None = None, **kw: str
) -> RunInfo:
    fields = {
        "name": "hand-run",
        "created": "2025-01-01T00:00:00Z",
        "command": "fastresp eval run --triples t.jsonl",
        "machine": "testhost, 2 CPUs, no GPU",
        "target": "in-process",
        "triples": "t.jsonl (7 pairs)",
    }
    fields.update(kw)
    return RunInfo(judge=judge, calibration=calibration, **fields)


def _verdict(kind: JudgementKind, score: int | None, reasoning: str = "") -> Verdict:
    return Verdict(
        kind=kind,
        score=score,
        reasoning=reasoning or f"{kind} reasoning {score}",
        error=None if score is not None else "no usable score",
    )


def _row(
    triple_id: str,
    personality: str,
    *,
    text: str | None = "Ooh, nice!",
    source: str | None = "model",
    latency: float | None = 40.0,
    error: str | None = None,
    intent: int | str | None = "skip",
    bridging: int | str | None = "skip",
    failed: tuple[str, ...] = (),
    main: str | None = "Let's count the apples.",
) -> ScoredRow:
    checks = (
        RowChecks()
        if text is None
        else RowChecks(
            failed_filters=list(failed),
            passes=source != "fallback" and not failed,
            leak=None if source == "fallback" else "no_leak" in failed,
            words=len(text.split()),
            chars=len(text),
        )
    )
    return ScoredRow(
        id=row_id(triple_id, personality),
        triple=Triple(
            id=triple_id,
            source="jsonl",
            pika_turn="What colour is it?",
            user_turn=f"child says {triple_id}",
            main_response=main,
        ),
        personality=personality,
        session_id=f"s-{triple_id}",
        fast_response=text,
        source=source if text is not None else None,
        latency_ms=latency if text is not None else None,
        error=error,
        checks=checks,
        intent=None if intent == "skip" else _verdict("intent", intent),  # type: ignore[arg-type]
        bridging=None if bridging == "skip" else _verdict("bridging", bridging),  # type: ignore[arg-type]
    )


def _rows() -> list[ScoredRow]:
    return [
        _row("t1", "calm", intent=5, bridging=4, latency=30.0),
        _row("t2", "calm", intent=4, bridging=2, latency=60.0),
        _row("t3", "calm", text=SCRIPT, intent=2, bridging=3, latency=90.0, failed=("kid_safe",)),
        _row("t4", "calm", intent=4, bridging=2, latency=120.0, failed=("no_leak",)),
        _row("t1", "playful", intent=4, bridging=5, latency=50.0),
        # a fallback phrase whose intent judgement was rejected, bridging not judged
        _row("t2", "playful", text="Mm, let me think.", source="fallback", intent=None),
        # a failed request: no answer, no verdicts
        _row("t3", "playful", text=None, error="HTTP 503: engine unavailable"),
    ]


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927): (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_headline_figures_match_the_hand_count() -> None:
    lines = {h.name: h for h in headline(_rows(), _info())}
    accuracy = lines["judged accuracy"]
    assert accuracy.value == pytest.approx(4 / 5)  # 5, 4, 4, 4 of 5, 4, 2, 4, 4
    low, high = _wilson(4, 5)
    assert (round(low, 4), round(high, 4)) == (0.3755, 0.9638)  # the formula, worked out once
    assert f"{low * 100:.1f}% to {high * 100:.1f}%" in accuracy.display
    assert "4 of 5 scored, of 6 answered" in accuracy.display
    # 5 of 6 answers scored (83%) is below MIN_JUDGED_SHARE: the target is not decided
    assert accuracy.met is None and accuracy.target == "above 95%"
    assert "unverified" in accuracy.note and "scored only 5 of 6" in accuracy.note
    intent = lines["mean intent score"]
    assert intent.value == pytest.approx((5 + 4 + 2 + 4 + 4) / 5)
    assert intent.met is None
    bridging = lines["mean bridging score"]
    assert bridging.value == pytest.approx((4 + 2 + 3 + 2 + 5) / 5)
    assert (bridging.target, bridging.met) == ("—", None)
    # latencies of the 6 answered rows (fallback 40 ms): 30 40 50 60 90 120; type 7 P95:
    # position 0.95 * 5 = 4.75 -> 90 + 0.75 * (120 - 90) = 112.5
    latency = lines["P95 latency"]
    assert latency.value == pytest.approx(112.5)
    assert latency.met is None  # measured without a GPU: the GPU target is not decided
    assert "no GPU found" in latency.note
    assert lines["fallback rate"].value == pytest.approx(1 / 6)
    assert lines["pass rate"].value == pytest.approx(3 / 6)  # t1, t2 calm; t1 playful


def test_fully_judged_rows_decide_the_targets() -> None:
    judged = [row for row in _rows() if row.intent is not None and row.intent.score]
    lines = {h.name: h for h in headline(judged, _info())}
    # 5 answers, all scored: 4 of 5 >= 4 is 80%, mean (5 + 4 + 2 + 4 + 4) / 5 = 3.8
    assert lines["judged accuracy"].met is False
    assert lines["mean intent score"].met is False
    slow_gpu = {h.name: h for h in headline(judged, _info(machine="gpu01, NVIDIA RTX 3090"))}
    # latencies 30 60 90 120 50 -> sorted 30 50 60 90 120; P95 = 90 + 0.8 * 30 = 114
    assert slow_gpu["P95 latency"].value == pytest.approx(114.0)
    assert slow_gpu["P95 latency"].met is False


def test_latency_target_is_met_literally_and_a_gpu_run_gets_no_cpu_note() -> None:
    fast = [_row(f"t{i}", "calm", latency=float(10 * i)) for i in range(1, 6)]
    line = {h.name: h for h in headline(fast, _info(machine="gpu01, NVIDIA RTX 3090"))}
    assert line["P95 latency"].value == pytest.approx(48.0)  # 40 + 0.8 * 10
    assert line["P95 latency"].met is True
    assert "no GPU" not in line["P95 latency"].note
    assert gpu_machine("h1, 16 CPUs, NVIDIA H200") is True
    assert gpu_machine("laptop, 2 CPUs, no GPU") is False
    assert gpu_machine("laptop, 8 CPUs") is False


def test_without_a_judge_the_judged_figures_are_not_measured() -> None:
    rows = [_row("t1", "calm"), _row("t2", "calm", failed=("no_leak",))]
    lines = {h.name: h for h in headline(rows, _info(judge=None))}
    for name in ("judged accuracy", "mean intent score", "mean bridging score"):
        assert (lines[name].value, lines[name].met, lines[name].display) == (
            None,
            None,
            "not measured",
        )
        assert "none" in lines[name].note
    assert lines["pass rate"].value == pytest.approx(1 / 2)  # automatic metrics still run


def _calibration(
    within_one: float | None, spearman: float | None, model: str = "judge-model"
) -> Calibration:
    return Calibration(
        judge_model=model,
        judge_base_url="http://127.0.0.1:9/v1",
        set_path="tests/data/judge_calibration.jsonl",
        set_sha256="a" * 64,
        created="2025-01-01T00:00:00Z",
        agreements=[
            Agreement(
                kind="intent",
                examples=30,
                scored=30,
                exact=0.5,
                within_one=within_one,
                spearman=spearman,
            )
        ],
    )


def test_judge_trust_levels_at_their_edges() -> None:
    assert (TRUST_MIN_WITHIN_ONE, TRUST_MIN_SPEARMAN) == (0.8, 0.5)
    level, note = judge_trust(_info(judge=None))
    assert level == "none" and "No judge was set" in note and "still ran" in note
    level, note = judge_trust(_info())
    assert level == "unverified" and "fastresp eval calibrate" in note and "judge-model" in note
    level, _ = judge_trust(_info(calibration=_calibration(0.9, 0.9, model="other-model")))
    assert level == "unverified"  # a calibration of another model says nothing of this one
    level, note = judge_trust(_info(calibration=_calibration(0.8, 0.5)))  # exactly at the bar
    assert level == "calibrated" and "80.0%" in note and "0.50" in note
    for within_one, spearman in ((0.79, 0.9), (0.95, 0.49), (0.95, None), (None, 0.9)):
        level, note = judge_trust(_info(calibration=_calibration(within_one, spearman)))
        assert level == "weak", (within_one, spearman)
        assert "too weak to trust" in note and "noise" in note
    _, note = judge_trust(_info(calibration=_calibration(0.7, 0.3)))
    assert "exact 50.0%" in note and "within-1 70.0%" in note and "Spearman 0.30" in note
    # scored 26 of 30 calibration examples (87%, under 90%): agreement over too few
    few = _calibration(0.95, 0.9).model_copy(
        update={
            "agreements": [_calibration(0.95, 0.9).agreements[0].model_copy(update={"scored": 26})]
        }
    )
    assert judge_trust(_info(calibration=few))[0] == "weak"
    # a calibration of other prompt files vouches for none of this run's
    info = _info(calibration=_calibration(0.9, 0.9))
    assert info.judge is not None
    other = {kind: "f" * 64 for kind in info.judge.prompt_sha256} or {"intent": "f" * 64}
    moved = _info(calibration=_calibration(0.9, 0.9).model_copy(update={"prompt_sha256": other}))
    level, note = judge_trust(moved)
    assert level == "unverified" and "other judge prompts" in note
    same = _calibration(0.9, 0.9).model_copy(update={"prompt_sha256": info.judge.prompt_sha256})
    assert judge_trust(_info(calibration=same))[0] == "calibrated"


def test_worst_ranking_by_scores_then_bridging_then_failed_filters() -> None:
    worst, how = worst_rows(_rows())
    # intent 2 first; the three 4s by bridging (2, 2, 5), the two with bridging 2 by
    # failed filters (t4 fails no_leak, t2 none); the 5 last; unscored rows are left out
    assert [r.id for r in worst] == [
        "t3|calm",
        "t4|calm",
        "t2|calm",
        "t1|playful",
        "t1|calm",
    ]
    assert "intent score" in how
    many = [_row(f"x{i:02d}", "calm", intent=1 + i % 5, bridging=3) for i in range(25)]
    assert len(worst_rows(many)[0]) == 10
    unjudged = [
        _row("a", "calm"),
        _row("b", "calm", failed=("no_leak",)),
        _row("c", "calm", failed=("kid_safe", "no_leak")),
    ]
    worst, how = worst_rows(unjudged)
    assert [r.id for r in worst] == ["c|calm", "b|calm"]
    assert "failed filters" in how and "no judge" in how


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_write_report_writes_every_file_self_contained_and_escaped(tmp_path: Path) -> None:
    out = tmp_path / "report"
    summary = write_report(_rows(), _info(calibration=_calibration(0.5, 0.2)), out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "plots/bridging_scores.png",
        "plots/intent_scores.png",
        "plots/latency.png",
        "plots/uptake.png",
        "report.html",
        "report.md",
        "summary.json",
    ]  # no temporary file left behind
    for name in ("intent_scores", "bridging_scores", "latency", "uptake"):
        _check_png(out / "plots" / f"{name}.png")

    saved = json.loads((out / "summary.json").read_text())
    assert saved["judge_trust"] == "weak" == summary.judge_trust
    # a weak judge's scores decide no target: shown, but neither met nor missed
    judged = {h.name: h for h in summary.headline}
    assert judged["judged accuracy"].value == pytest.approx(4 / 5)
    assert judged["judged accuracy"].met is None
    assert judged["mean intent score"].met is None
    assert "too weak to decide" in judged["mean intent score"].note
    assert judged["P95 latency"].met is None  # a CPU run decides no GPU target
    assert saved["judge"]["intent"] == {
        "scored": 5,
        "rejected": 1,
        "failed": 0,
        "mean": pytest.approx(19 / 5),
        "histogram": {"1": 0, "2": 1, "3": 0, "4": 3, "5": 1},
    }
    assert saved["failed_requests"] == {"HTTP 503": 1}
    calm = saved["per_personality"]["calm"]
    assert calm["n"] == 4 and calm["judged_accuracy"] == pytest.approx(3 / 4)
    assert calm["leak_rate"] == pytest.approx(1 / 4)
    playful = saved["per_personality"]["playful"]
    assert playful["n"] == 3 and playful["fallback_rate"] == pytest.approx(1 / 2)
    assert saved["worst"][:2] == ["t3|calm", "t4|calm"]

    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Evaluation report: hand-run\n")
    printed = headline_markdown(summary)
    assert printed.startswith("**The judge model judge-model is too weak to trust")
    assert printed.count("\n| ") == 1 + 6  # header and the six headline figures
    assert printed.split("\n\n", 1)[1] in markdown
    assert markdown.index("too weak to trust") < markdown.index("## Headline")
    for link in (
        "plots/intent_scores.png",
        "plots/bridging_scores.png",
        "plots/latency.png",
        "plots/uptake.png",
    ):
        assert f"]({link})" in markdown
    assert "## Failed requests" in markdown and "| HTTP 503 | 1 |" in markdown
    assert "<script>" not in markdown
    assert "judge trust: weak" in markdown

    page = (out / "report.html").read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    references = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert len(references) == 4
    assert all(ref.startswith("data:image/png;base64,") for ref in references)
    assert "too weak to trust" in page and "per personality" in page.lower()
    assert "The 10 worst responses" in page and "intent reasoning 2" in page


def test_report_without_a_judge_says_so_and_keeps_the_metrics(tmp_path: Path) -> None:
    rows = [
        _row("t1", "calm", latency=800.0),
        _row("t2", "calm", failed=("no_leak",), latency=2500.0),
    ]
    summary = write_report(rows, _info(judge=None), tmp_path)
    assert summary.judge_trust == "none" and summary.judge == {}
    for name in ("intent_scores", "bridging_scores", "latency"):
        _check_png(tmp_path / "plots" / f"{name}.png")  # "no judge set" figures, log latency
    markdown = (tmp_path / "report.md").read_text()
    assert "No judge was set" in markdown.split("## Run")[0]
    assert "not measured" in markdown
    assert "passes guard and filters | 50.0% (of 2)" in markdown
    assert "Ranked by the number of failed filters" in markdown
    assert summary.worst == ["t2|calm"]
    assert "Failed requests" not in markdown
