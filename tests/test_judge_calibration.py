"""Agreement of the judge with hand scores: golden figures, the calibration set, a run.

Every expected figure is computed by hand in a comment next to it, from the small
pairs written out in the test; `agreement` must reproduce it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adapters.eval_rows import JUDGEMENT_KINDS
from adapters.judge import (
    DEFAULT_CALIBRATION_SET,
    CalibrationSetError,
    JudgeConfig,
    agreement,
    calibrate,
    read_calibration_set,
)
from tests.fake_judge import fake_judge


def test_agreement_without_ties() -> None:
    # hand 1 2 3 4 5, judge 1 2 4 3 5: equal in 3 of 5 -> exact 0.6; every |d| <= 1 ->
    # within-one 1.0. No ties, so rho = 1 - 6 sum(d^2) / (n (n^2 - 1)), rank
    # differences 0 0 -1 1 0 -> sum d^2 = 2 -> 1 - 12 / 120 = 0.9.
    result = agreement("intent", [(1, 1), (2, 2), (3, 4), (4, 3), (5, 5)])
    assert result.kind == "intent"
    assert (result.examples, result.scored) == (5, 5)
    assert result.exact == pytest.approx(0.6)
    assert result.within_one == pytest.approx(1.0)
    assert result.spearman == pytest.approx(0.9)


def test_agreement_with_ties_uses_average_ranks() -> None:
    # hand 1 2 3 4, judge 2 2 3 5. exact: (2,2) and (3,3) -> 2/4 = 0.5; |d| = 1 0 0 1 ->
    # within-one 4/4 = 1.0. Ranks: hand 1 2 3 4, judge 1.5 1.5 3 4 (the tie shares
    # ranks 1 and 2). Pearson of the ranks: deviations from 2.5 are
    # hand -1.5 -0.5 0.5 1.5 and judge -1 -1 0.5 1.5; sum of products 1.5 + 0.5 + 0.25 +
    # 2.25 = 4.5; sums of squares 5 and 4.5 -> rho = 4.5 / sqrt(5 * 4.5) = sqrt(0.9).
    result = agreement("bridging", [(1, 2), (2, 2), (3, 3), (4, 5)])
    assert result.exact == pytest.approx(0.5)
    assert result.within_one == pytest.approx(1.0)
    assert result.spearman == pytest.approx(0.9**0.5)


def test_agreement_leaves_out_failed_judgements() -> None:
    # the (3, None) pair is counted in examples, not in scored; the other four are
    # exactly reversed: exact 0/4, |d| = 4 2 2 4 -> within-one 0/4, rho -1.
    result = agreement("intent", [(5, 1), (4, 2), (3, None), (2, 4), (1, 5)])
    assert (result.examples, result.scored) == (5, 4)
    assert result.exact == 0.0
    assert result.within_one == 0.0
    assert result.spearman == pytest.approx(-1.0)


def test_agreement_is_none_where_undefined() -> None:
    nothing = agreement("intent", [(3, None), (4, None)])
    assert (nothing.examples, nothing.scored) == (2, 0)
    assert nothing.exact is None and nothing.within_one is None and nothing.spearman is None
    empty = agreement("intent", [])
    assert (empty.examples, empty.scored, empty.exact, empty.spearman) == (0, 0, None, None)
    # one scored pair: exact 1/1, no correlation from one point
    one = agreement("intent", [(4, 4), (2, None)])
    assert (one.scored, one.exact, one.within_one, one.spearman) == (1, 1.0, 1.0, None)
    # the judge gives 3 to everything: hand 1 2 5 vs 3 3 3, |d| = 2 1 2 -> exact 0/3,
    # within-one 1/3; a constant side has no ranks to correlate -> None
    constant = agreement("bridging", [(1, 3), (2, 3), (5, 3)])
    assert constant.exact == 0.0
    assert constant.within_one == pytest.approx(1 / 3)
    assert constant.spearman is None
    # constant hand scores: the same
    assert agreement("bridging", [(4, 3), (4, 5)]).spearman is None


# --- the calibration set file -------------------------------------------------------

EXAMPLE: dict[str, Any] = {
    "id": "c1",
    "personality": "calm",
    "pika_turn": "What is three plus three?",
    "user_turn": "Seven?",
    "main_response": "Close! Three plus three is six.",
    "fast_response": "Ooh, you had a go!",
    "intent_score": 5,
    "intent_reason": "Hears a guess and reacts to the try.",
    "bridging_score": 5,
    "bridging_reason": "Commits to nothing before the correction.",
}


def write_set(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_read_calibration_set(tmp_path: Path) -> None:
    second = EXAMPLE | {"id": "c2", "pika_turn": None, "main_response": None, "intent_score": 2}
    examples = read_calibration_set(write_set(tmp_path / "set.jsonl", [EXAMPLE, second]))
    assert [example.id for example in examples] == ["c1", "c2"]
    assert examples[1].main_response is None and examples[1].intent_score == 2
    assert examples[1].item().main_response is None
    assert examples[0].hand_score("bridging") == 5


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([EXAMPLE, EXAMPLE | {"id": "c2", "intent_score": 6}], ":2: intent_score: "),
        ([EXAMPLE | {"bridging_score": 0}], ":1: bridging_score: "),
        ([EXAMPLE | {"intent_score": "4"}], ":1: intent_score: "),
        ([EXAMPLE | {"intent_score": True}], ":1: intent_score: "),
        ([{k: v for k, v in EXAMPLE.items() if k != "bridging_reason"}], ":1: bridging_reason: "),
        ([EXAMPLE | {"intent_reason": ""}], ":1: intent_reason: "),
        ([EXAMPLE | {"colour": "red"}], ":1: colour: "),
        ([EXAMPLE, EXAMPLE], ":2: id: 'c1' is used twice"),
        ([], ": no examples"),
    ],
)
def test_read_calibration_set_errors_name_line_and_field(
    tmp_path: Path, rows: list[dict[str, Any]], message: str
) -> None:
    path = write_set(tmp_path / "set.jsonl", rows)
    with pytest.raises(CalibrationSetError) as caught:
        read_calibration_set(path)
    assert str(caught.value).startswith(f"{path}{message}")


def test_read_calibration_set_refuses_broken_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(EXAMPLE) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(CalibrationSetError, match=r"broken\.jsonl:2: not JSON"):
        read_calibration_set(broken)
    with pytest.raises(CalibrationSetError, match="cannot read calibration set"):
        read_calibration_set(tmp_path / "missing.jsonl")


def test_the_real_calibration_set_covers_every_score() -> None:
    examples = read_calibration_set(DEFAULT_CALIBRATION_SET)
    assert len(examples) >= 30
    intent = Counter(example.intent_score for example in examples)
    bridging = Counter(example.bridging_score for example in examples)
    for score in range(1, 6):
        assert intent[score] >= 5, f"intent score {score}: {intent[score]} examples"
        assert bridging[score] >= 3, f"bridging score {score}: {bridging[score]} examples"
    for example in examples:
        assert example.intent_reason.strip() and example.bridging_reason.strip(), example.id
    assert any(example.main_response is None for example in examples)


# --- a calibration run against a scripted judge -------------------------------------


@pytest.mark.asyncio
async def test_calibrate_judges_both_kinds_and_resumes(tmp_path: Path) -> None:
    # hand intent 5 4 2 1, bridging 5 3 1 1 (ids c1..c4)
    hands = {"c1": (5, 5), "c2": (4, 3), "c3": (2, 1), "c4": (1, 1)}
    rows = [
        EXAMPLE
        | {"id": cid, "fast_response": f"Ooh, number {cid}!", "intent_score": i}
        | {"bridging_score": b}
        for cid, (i, b) in hands.items()
    ]
    set_path = write_set(tmp_path / "set.jsonl", rows)
    examples = read_calibration_set(set_path)
    # scripted judge: intent 5 3 2 <unparsable>; bridging 4 3 2 1
    intent = {"c1": "5", "c2": "3", "c3": "2", "c4": None}
    bridging = {"c1": 4, "c2": 3, "c3": 2, "c4": 1}

    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        user = body["messages"][1]["content"]
        cid = next(cid for cid in hands if f"number {cid}!" in user)
        if "intent_score" in body["messages"][0]["content"]:
            score = intent[cid]
            return 200, "no idea" if score is None else f'{{"intent_score": {score}}}'
        return 200, f'{{"bridging_score": {bridging[cid]}, "reasoning": "r"}}'

    config = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="judge")
    with fake_judge(reply) as server:
        config = config.model_copy(update={"base_url": server.url})
        result = await calibrate(examples, config, tmp_path / "work", set_path=set_path)
        assert len(server.requests) == 8
        again = await calibrate(examples, config, tmp_path / "work", set_path=set_path)
        assert len(server.requests) == 8  # resumed: nothing asked twice
    assert again.agreements == result.agreements
    assert result.judge_model == "judge"
    assert result.set_path == str(set_path)
    assert result.set_sha256 == hashlib.sha256(set_path.read_bytes()).hexdigest()
    by_kind = {a.kind: a for a in result.agreements}
    assert list(by_kind) == list(JUDGEMENT_KINDS)
    # intent: pairs (5,5) (4,3) (2,2) (1,None): 3 scored, exact 2/3, within-one 3/3;
    # no ties and the judge keeps the hand order 5>4>2 -> rho 1
    assert (by_kind["intent"].examples, by_kind["intent"].scored) == (4, 3)
    assert by_kind["intent"].exact == pytest.approx(2 / 3)
    assert by_kind["intent"].within_one == pytest.approx(1.0)
    assert by_kind["intent"].spearman == pytest.approx(1.0)
    # bridging: (5,4) (3,3) (1,2) (1,1): exact 2/4, within-one 4/4. Ranks: hand 4 3 1.5
    # 1.5, judge 4 3 2 1; deviations from 2.5: hand 1.5 0.5 -1 -1, judge 1.5 0.5 -0.5
    # -1.5; products 2.25 + 0.25 + 0.5 + 1.5 = 4.5; squares 4.5 and 5 -> sqrt(0.9)
    assert by_kind["bridging"].scored == 4
    assert by_kind["bridging"].exact == pytest.approx(0.5)
    assert by_kind["bridging"].within_one == pytest.approx(1.0)
    assert by_kind["bridging"].spearman == pytest.approx(0.9**0.5)


@pytest.mark.asyncio
async def test_an_edited_set_is_judged_again_for_the_changed_examples_only(
    tmp_path: Path,
) -> None:
    # hand intent 5 and 1 (c1, c2); the scripted judge gives intent 5 to an answer with
    # "number" in it and 1 otherwise, bridging 3 to everything
    rows = [
        EXAMPLE | {"id": "c1", "fast_response": "Ooh, number c1!", "intent_score": 5},
        EXAMPLE | {"id": "c2", "fast_response": "Ooh, number c2!", "intent_score": 1},
    ]

    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        if "intent_score" in body["messages"][0]["content"]:
            score = 5 if "number" in body["messages"][1]["content"] else 1
            return 200, f'{{"intent_score": {score}}}'
        return 200, '{"bridging_score": 3, "reasoning": "r"}'

    work = tmp_path / "work"
    first_set = write_set(tmp_path / "set.jsonl", rows)
    config = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="judge")
    with fake_judge(reply) as server:
        config = config.model_copy(update={"base_url": server.url})
        first = await calibrate(read_calibration_set(first_set), config, work, set_path=first_set)
        assert len(server.requests) == 4
        # c2's answer is rewritten (same id): its old verdict (5) must not be reused
        rows[1] = rows[1] | {"fast_response": "Ooh, a try!"}
        edited_set = write_set(tmp_path / "edited.jsonl", rows)
        edited = await calibrate(
            read_calibration_set(edited_set), config, work, set_path=edited_set
        )
        assert len(server.requests) == 6  # c2's two judgements only
        assert all("Ooh, a try!" in body["messages"][1]["content"] for body in server.requests[4:])
    intent_before = next(a for a in first.agreements if a.kind == "intent")
    intent_after = next(a for a in edited.agreements if a.kind == "intent")
    # before: (5,5) (1,5): exact 1/2. After: (5,5) (1,1): exact 2/2
    assert intent_before.exact == pytest.approx(0.5)
    assert intent_after.exact == pytest.approx(1.0) and intent_after.scored == 2
    assert len((work / "judgements.jsonl").read_text(encoding="utf-8").splitlines()) == 6
