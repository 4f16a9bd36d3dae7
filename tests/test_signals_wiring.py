"""The no-judge quality signals wired into the data filters, the GRPO rewards and the
evaluation report (issue 9, part 4): at each wiring point a bad candidate is rejected or
penalised under the right name.

The bad candidates are the issue's own examples, judged by reading them, not by running
the code: "Okay." does not build on "I saw a big red fire truck!" (low uptake); "Yay, how
fun!" to a child whose dog is sick is exuberant to a sad child (tone mismatch); "Great
job!" before "Not quite! 7 plus 6 is 13." praises an answer the main response corrects
(contradiction, the ``no_contradiction`` filter). The uptake model is the real one
(all-MiniLM-L6-v2 from its PyPI package, loaded once per process), on a few rows only.
The report's figures are counted by hand from checks written out below.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from adapters.auto_metrics import (
    ServedResponse,
    check_rows,
    compute_metrics,
    markdown_table,
    metrics_of_rows,
)
from adapters.eval_report import per_personality, write_report
from adapters.eval_rows import RowChecks, RunInfo, ScoredRow, row_id
from adapters.labels import (
    SIGNAL_FILTERS,
    SignalFilters,
    SignalsUnavailable,
    load_uptake_scorer,
    read_rows,
    select_with_signals,
)
from adapters.rewards import (
    REWARDS,
    build_reward_funcs,
    reward_no_praise_before_correction,
    reward_tone_fit,
    reward_uptake,
)
from adapters.sources import Triple
from adapters.teacher import TeacherConfig, TeacherReply, build_row, load_prompt
from adapters.tutor_openers import label_with_tutor_openers
from service.cli import app
from service.text_checks import FilterLimits

FIRE = "I saw a big red fire truck!"
FIRE_MAIN = "Fire trucks are red so everyone can see them coming. What else is red?"
LOW = "Okay."
"""Says nothing about the fire truck: low uptake."""
GOOD = "A big red fire truck, wow!"
"""Picks up the child's words: high uptake."""
LONG = "Wow, a big red fire truck, I love big red fire trucks so very much!"
"""15 words: fails the text filter length (12 at most)."""

SAD = "I'm sad. My dog is sick."
SAD_MAIN = "I'm sorry your dog is sick. Vets help sick animals get better."
EXUBERANT = "Yay, how fun!"
"""Exuberant to a sad child: a tone mismatch."""
KIND = "Oh no, your poor dog."
"""Sympathy for the sick dog: fits, and picks up "dog"."""

SUM = "7 plus 6 is 12"
SUM_MAIN = "Not quite! 7 plus 6 is 13. Let's count on from 7."
PRAISE = "Great job!"
"""Praise of an answer the main response corrects: a contradiction."""
EFFORT = "Good try, 7 plus 6!"
"""Effort praise: fine before a correction."""

LIMITS = FilterLimits()


@pytest.fixture(scope="module")
def signals() -> SignalFilters:
    return SignalFilters.load()


@pytest.fixture(scope="module")
def low_uptake(signals: SignalFilters) -> float:
    return signals.low_uptake


# --- the data pipeline ------------------------------------------------------------------


def test_signal_filter_names() -> None:
    assert SIGNAL_FILTERS == ("low_uptake", "tone_mismatch")


def test_low_uptake_candidate_is_rejected_as_low_uptake(signals: SignalFilters) -> None:
    selection = select_with_signals(
        [LOW, GOOD], user_turn=FIRE, main_response=FIRE_MAIN, limits=LIMITS, signals=signals
    )
    assert selection.best == GOOD
    assert selection.alternatives == []
    assert selection.rejected == [(LOW, ["low_uptake"])]


def test_exuberant_reply_to_a_sad_child_is_rejected_as_tone_mismatch(
    signals: SignalFilters,
) -> None:
    selection = select_with_signals(
        [EXUBERANT, KIND], user_turn=SAD, main_response=SAD_MAIN, limits=LIMITS, signals=signals
    )
    assert selection.best == KIND
    [(text, reasons)] = selection.rejected
    assert text == EXUBERANT and "tone_mismatch" in reasons


def test_praise_before_a_correction_is_rejected_as_no_contradiction(
    signals: SignalFilters,
) -> None:
    selection = select_with_signals(
        [PRAISE, EFFORT], user_turn=SUM, main_response=SUM_MAIN, limits=LIMITS, signals=signals
    )
    # A text-filter failure is not scored by the signals: its reasons are the text filter's.
    assert selection.rejected == [(PRAISE, ["no_contradiction"])]
    assert selection.best == EFFORT


def test_signals_rank_the_passing_candidates_by_uptake(signals: SignalFilters) -> None:
    # Both pass every filter; the one building on the child's turn comes first although
    # the labeller listed it second.
    tepid = "Ooh, tell me more!"
    selection = select_with_signals(
        [tepid, GOOD], user_turn=FIRE, main_response=None, limits=LIMITS, signals=signals
    )
    assert (selection.best, selection.alternatives) == (GOOD, [tepid])
    # Without signals, the text checks alone decide (nothing rejected for uptake).
    plain = select_with_signals(
        [LOW, GOOD], user_turn=FIRE, main_response=FIRE_MAIN, limits=LIMITS, signals=None
    )
    assert plain.rejected == [] and plain.best == GOOD and plain.alternatives == [LOW]


def _triple(n: int, user_turn: str, main: str | None) -> Triple:
    return Triple(
        id=f"s{n}",
        source="test",
        lesson_id="L1",
        pika_turn=None,
        user_turn=user_turn,
        main_response=main,
    )


def test_teacher_rows_record_the_signal_reasons(signals: SignalFilters) -> None:
    config = TeacherConfig(base_url="http://127.0.0.1:1/v1", model="teacher-model", k=3)
    reply = TeacherReply(
        content=json.dumps({"candidates": [LOW, LONG, GOOD]}),
        prompt_tokens=1,
        completion_tokens=1,
        structured_output=True,
        finish_reason="stop",
    )
    row = build_row(
        _triple(1, FIRE, FIRE_MAIN),
        "calm",
        reply,
        prompt=load_prompt(),
        config=config,
        base_url=config.base_url,
        limits=LIMITS,
        signals=signals,
    )
    assert row.status == "accepted" and row.fast_response == GOOD
    # rejected in the teacher's order, each with its own kind of reason
    assert [(c.text, c.reasons) for c in row.rejected] == [
        (LOW, ["low_uptake"]),
        (LONG, ["length"]),
    ]


def test_tutor_openers_reject_by_signal_name(tmp_path: Path, signals: SignalFilters) -> None:
    triples = [
        # "Awesome!" to a sad child: exuberant
        _triple(1, SAD, "Awesome! Let's count the dogs in the picture."),
        # "Great job!" before "Actually, ...": praise before a correction
        _triple(2, SUM, "Great job! Actually, 7 plus 6 is 13."),
    ]
    out = tmp_path / "labels.jsonl"
    summary = label_with_tutor_openers(triples, out, signals=signals)
    rows = {row.triple_id: row for row in read_rows(out)}
    assert rows["s1"].status == "rejected" and rows["s1"].reason == "no_candidate_passed"
    assert "tone_mismatch" in rows["s1"].rejected[0].reasons
    assert rows["s2"].rejected[0].reasons == ["no_contradiction"]
    assert summary.rejections["tone_mismatch"] == 1
    assert summary.rejections["no_contradiction"] == 1


def test_cli_filters_by_default_and_the_flag_turns_the_signals_off(tmp_path: Path) -> None:
    triples = tmp_path / "triples.jsonl"
    triples.write_text(
        _triple(1, SAD, "Awesome! Let's count the dogs in the picture.").model_dump_json() + "\n"
    )
    runner = CliRunner()
    help_text = runner.invoke(app, ["data", "label", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-signal-filters" in help_text and "tone_mismatch" in help_text
    on = tmp_path / "on.jsonl"
    base = ["data", "label", "--labeler", "tutor-openers", "--triples", str(triples)]
    result = runner.invoke(app, [*base, "--out", str(on)])
    assert result.exit_code == 0, result.output
    [row] = read_rows(on)
    assert row.status == "rejected" and "tone_mismatch" in row.rejected[0].reasons
    assert "tone_mismatch" in result.output  # the rejections table
    off = tmp_path / "off.jsonl"
    result = runner.invoke(app, [*base, "--out", str(off), "--no-signal-filters"])
    assert result.exit_code == 0, result.output
    [row] = read_rows(off)
    assert row.status == "accepted" and row.fast_response == "Awesome!"


def test_missing_signals_extra_fails_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An uptake module that cannot be imported, as without sentence-transformers.
    monkeypatch.setitem(sys.modules, "adapters.signals.uptake", None)
    with pytest.raises(SignalsUnavailable, match=r"pip install -e '\.\[signals\]'"):
        load_uptake_scorer()
    triples = tmp_path / "triples.jsonl"
    triples.write_text(_triple(1, FIRE, FIRE_MAIN).model_dump_json() + "\n")
    out = tmp_path / "out.jsonl"
    args = ["data", "label", "--labeler", "teacher", "--triples", str(triples)]
    teacher = ["--base-url", "http://127.0.0.1:9/v1", "--model", "teacher-model"]
    result = CliRunner().invoke(app, [*args, *teacher, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "'signals' extra" in result.output and "--no-signal-filters" in result.output
    assert not out.exists()


# --- the GRPO rewards -------------------------------------------------------------------


def _score(fn: Any, completions: list[str], user_turn: str, main: str | None) -> list[float]:
    n = len(completions)
    return list(
        fn(
            prompts=["<prompt>"] * n,
            completions=completions,
            user_turn=[user_turn] * n,
            main_response=[main] * n,
            completion_ids=[[1]] * n,
            trainer_state=None,
            log_metric=lambda *a, **k: None,
        )
    )


def test_reward_uptake_is_low_for_a_reply_that_ignores_the_child(low_uptake: float) -> None:
    low, good = _score(reward_uptake, [LOW, GOOD], FIRE, FIRE_MAIN)
    assert 0.0 <= low < low_uptake <= good <= 1.0


def test_reward_tone_fit_is_zero_for_an_exuberant_reply_to_a_sad_child() -> None:
    assert _score(reward_tone_fit, [EXUBERANT, KIND], SAD, SAD_MAIN) == [0.0, 1.0]


def test_praise_before_a_correction_is_penalised() -> None:
    assert _score(reward_no_praise_before_correction, [PRAISE, EFFORT], SUM, SUM_MAIN) == [
        0.0,
        1.0,
    ]


def test_signal_rewards_are_registered_and_weighted() -> None:
    assert {"reward_uptake", "reward_tone_fit", "reward_no_praise_before_correction"} <= set(
        REWARDS
    )
    funcs, weights = build_reward_funcs(
        {"reward_uptake": 2.0, "reward_tone_fit": 0.5}, num_generations=2
    )
    names = [(f.func if isinstance(f, functools.partial) else f).__name__ for f in funcs]
    weight_of = dict(zip(names, weights, strict=True))
    assert (weight_of["reward_uptake"], weight_of["reward_tone_fit"]) == (2.0, 0.5)
    uptake = funcs[names.index("reward_uptake")]
    low, good = _score(uptake, [LOW, GOOD], FIRE, None)
    assert low < good
    config = yaml.safe_load(Path("adapters/configs/grpo-gemma-calm.yaml").read_text())
    assert {"reward_uptake", "reward_tone_fit"} <= set(config["reward_weights"])
    assert set(config["reward_weights"]) <= set(REWARDS)


# --- the evaluation metrics and report --------------------------------------------------


def test_check_rows_scores_uptake_tone_and_contradiction(low_uptake: float) -> None:
    responses = [
        ServedResponse(FIRE, FIRE_MAIN, LOW, "model"),
        ServedResponse(FIRE, FIRE_MAIN, GOOD, "model"),
        ServedResponse(SAD, SAD_MAIN, EXUBERANT, "model"),
        ServedResponse(SUM, SUM_MAIN, PRAISE, "model"),
        ServedResponse(SAD, SAD_MAIN, "Hmm, let me think.", "fallback"),
    ]
    low, good, exuberant, praise, fallback = check_rows(responses)
    assert low.uptake is not None and low.uptake < low_uptake
    assert good.uptake is not None and good.uptake >= low_uptake
    assert (good.tone_fit, good.tone_mismatch) == (True, None)
    assert exuberant.tone_fit is False and exuberant.tone_mismatch == "exuberant_to_upset_child"
    assert praise.praise_before_correction is True and "no_contradiction" in praise.failed_filters
    assert fallback == RowChecks(passes=False)  # a fallback phrase is not the model's text
    metrics = compute_metrics(responses)
    assert metrics.uptake_rows == 4 and metrics.low_uptake_rows >= 1  # at least "Okay."
    assert metrics.tone_mismatch_rate == pytest.approx(1 / 4)
    assert metrics.tone_mismatches == {"exuberant_to_upset_child": 1}
    table = markdown_table([("run", metrics)])
    assert "| tone mismatch rate | 25.0% (of 4) |" in table
    assert "| contradiction: praise before a correction | 100.0% (of 1) |" in table
    assert "| uptake mean (0-1) |" in table


UPTAKE = {"calm": [0.02, 0.02, 0.98, 0.98], "playful": [0.9, 0.95]}
"""Uptake scores written out by hand. calm: mean 0.5; type-7 quartiles of the sorted
scores at positions 0.75, 1.5, 2.25: 0.02, 0.5, 0.98; two of four below the threshold.
playful: mean 0.925, none below."""


def _hand_rows() -> list[ScoredRow]:
    rows = []
    flags: dict[str, list[tuple[bool, bool | None]]] = {
        # (tone fits, praise before correction) per row; None: the check does not apply
        "calm": [(False, True), (True, False), (True, None), (True, None)],
        "playful": [(True, None), (True, None)],
    }
    for personality, scores in UPTAKE.items():
        for i, (uptake, (fits, praise)) in enumerate(zip(scores, flags[personality], strict=True)):
            triple = Triple(
                id=f"{personality}-{i}",
                source="jsonl",
                lesson_id=None,
                pika_turn=None,
                user_turn=FIRE,
                main_response=SUM_MAIN,
            )
            rows.append(
                ScoredRow(
                    id=row_id(triple.id, personality),
                    triple=triple,
                    personality=personality,
                    session_id=f"session-{personality}-{i}",
                    fast_response="Ooh!",
                    source="model",
                    latency_ms=50.0,
                    checks=RowChecks(
                        passes=True,
                        failed_filters=[],
                        praise_before_correction=praise,
                        uptake=uptake,
                        tone_fit=fits,
                        tone_mismatch=None if fits else "exuberant_to_upset_child",
                        words=1,
                        chars=4,
                    ),
                )
            )
    # A row scored before the signals existed: no uptake or tone check; left out of both.
    old = RowChecks.model_validate_json('{"failed_filters": [], "passes": true, "words": 1}')
    triple = Triple(
        id="old",
        source="jsonl",
        lesson_id=None,
        pika_turn=None,
        user_turn=FIRE,
        main_response=None,
    )
    rows.append(
        ScoredRow(
            id=row_id("old", "playful"),
            triple=triple,
            personality="playful",
            session_id="old",
            fast_response="Ooh!",
            source="model",
            checks=old,
        )
    )
    return rows


def test_report_shows_the_signals_per_personality(tmp_path: Path, low_uptake: float) -> None:
    assert 0.02 < low_uptake < 0.9  # the hand-counted shares below assume this
    rows = _hand_rows()
    table = per_personality(rows)
    calm, playful = table["calm"], table["playful"]
    assert calm["uptake_mean"] == pytest.approx(0.5)
    assert (calm["uptake_q1"], calm["uptake_median"], calm["uptake_q3"]) == pytest.approx(
        (0.02, 0.5, 0.98)
    )
    assert calm["low_uptake_rate"] == pytest.approx(0.5)
    assert calm["tone_mismatch_rate"] == pytest.approx(1 / 4)
    assert (calm["contradiction_rate"], calm["correction_rows"]) == (pytest.approx(0.5), 2)
    assert playful["uptake_mean"] == pytest.approx(0.925) and playful["uptake_rows"] == 2
    assert (playful["low_uptake_rate"], playful["tone_mismatch_rate"]) == (0.0, 0.0)
    assert playful["tone_rows"] == 2  # the old row is not counted
    assert playful["contradiction_rate"] is None  # no main response corrects the child

    run = metrics_of_rows(rows)
    assert run.uptake_mean == pytest.approx((0.02 * 2 + 0.98 * 2 + 0.9 + 0.95) / 6)
    assert (run.low_uptake_rows, run.uptake_rows) == (2, 6)
    assert run.tone_mismatch_rate == pytest.approx(1 / 6)
    assert run.praise_before_correction == pytest.approx(1 / 2)

    info = RunInfo(
        name="signals",
        created="2025-01-01T00:00:00Z",
        command="fastresp eval run",
        machine="testhost, 2 CPUs, no GPU",
        target="in-process",
        triples="7 pairs",
    )
    write_report(rows, info, tmp_path)
    assert (tmp_path / "plots" / "uptake.png").read_bytes().startswith(b"\x89PNG")
    markdown = (tmp_path / "report.md").read_text()
    assert "## Quality signals per personality" in markdown
    assert "| calm | 0.50 | 0.02 / 0.50 / 0.98 | 50.0% (of 4) | 25.0% (of 4) | 50.0% (of 2) |" in (
        markdown
    )
    assert "| playful | 0.93 | " in markdown and "| n/a (of 0) |" in markdown
    assert "](plots/uptake.png)" in markdown
    assert "| tone mismatch rate | 16.7% (of 6) |" in markdown
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["per_personality"]["calm"]["tone_mismatch_rate"] == pytest.approx(0.25)
    assert saved["metrics"]["tone_mismatches"] == {"exuberant_to_upset_child": 1}
    assert "Quality signals per personality" in (tmp_path / "report.html").read_text()
