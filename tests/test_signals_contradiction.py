"""The contradiction signal (issue 9, part 3): praise before a correction.

The golden labels are `tests/data/contradiction_labels.jsonl`: 59 Bridge items whose
texts are copied verbatim from ``../shared/data/bridge``, labelled by an agent (not by
human raters) from reading each main response: does it correct the child, and does each
sample fast response praise the answer before that correction? The thresholds sit a
little below what the cues measure on them (reported for BENCHMARKS.md):
``corrects`` and ``praise_before_correction`` both precision 0.96 (26/27), recall 0.87
(26/30). The cues before this issue (no child's turn, no number or negation cues)
measured precision 0.94 (16/17), recall 0.53 (16/30) on the same items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.signals.contradiction import (
    CONTRADICTION_LABELS,
    evaluate_contradiction,
    praise_before_correction,
)
from adapters.sources import read_bridge
from service.text_checks import corrects_child, failed_filters, praises_answer

BRIDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bridge"

MIN_PRECISION = 0.90
MIN_RECALL = 0.80


def _items() -> list[dict[str, Any]]:
    lines = CONTRADICTION_LABELS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# --- the labelled set -------------------------------------------------------------------


def test_labelled_set_shape() -> None:
    items = _items()
    assert len(items) >= 40
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    corrects = [item["corrects"] for item in items]
    assert all(isinstance(c, bool) for c in corrects)
    assert 0.3 <= sum(corrects) / len(corrects) <= 0.7  # both classes, about half each
    for item in items:
        assert set(item) >= {"id", "user_turn", "main_response", "corrects", "why", "responses"}
        assert 2 <= len(item["responses"]) <= 3
        flags = [r["praise_before_correction"] for r in item["responses"]]
        assert all(isinstance(f, bool) for f in flags)
        if item["corrects"]:  # one response praises the answer, one does not
            assert True in flags and False in flags, item["id"]
        else:  # nothing to contradict
            assert not any(flags), item["id"]


def test_labelled_items_are_bridge_triples() -> None:
    """Each id is ``<split>:<c_id>`` of a Bridge triple with exactly these texts."""
    if not BRIDGE.is_dir():
        pytest.skip(f"{BRIDGE} is not here")
    triples: dict[str, list[tuple[str | None, str, str | None]]] = {}
    for split in ("train", "validation"):
        for triple in read_bridge(BRIDGE / f"{split}.json"):
            c_id = triple.id.split(":")[1]
            texts = (triple.pika_turn, triple.user_turn, triple.main_response)
            triples.setdefault(f"{split}:{c_id}", []).append(texts)
    for item in _items():
        assert item["id"] in triples, item["id"]
        texts = (item["pika_turn"], item["user_turn"], item["main_response"])
        assert texts in triples[item["id"]], item["id"]


# --- precision and recall against the labels --------------------------------------------


@pytest.mark.parametrize("signal", ["corrects", "praise_before_correction"])
def test_precision_and_recall_on_the_labelled_bridge_items(signal: str) -> None:
    scores = evaluate_contradiction()[signal]
    assert scores.n == (59 if signal == "corrects" else 122)
    assert scores.precision is not None and scores.precision >= MIN_PRECISION, scores.describe()
    assert scores.recall is not None and scores.recall >= MIN_RECALL, scores.describe()


def test_evaluate_counts_a_small_file(tmp_path: Path) -> None:
    rows = [
        {
            "user_turn": "44",
            "main_response": "There are 60 minutes in an hour.",
            "corrects": True,
            "responses": [
                {"text": "Great job!", "praise_before_correction": True},
                {"text": "Good try!", "praise_before_correction": False},
            ],
        },
        {
            "user_turn": "0.8",
            "main_response": "Correct! How would we write 0.8 in standard form?",
            "corrects": False,
            "responses": [{"text": "You got it!", "praise_before_correction": False}],
        },
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    scores = evaluate_contradiction(path)
    assert (scores["corrects"].true_positives, scores["corrects"].true_negatives) == (1, 1)
    flag = scores["praise_before_correction"]
    assert (flag.true_positives, flag.true_negatives, flag.n) == (1, 2, 3)


# --- the number cue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("main", "user_turn", "corrects"),
    [
        # a different number than the child's, stated as the answer
        ("There are 60 minutes in an hour.", "44", True),
        ("Let's do it together. There are 3 groups of 15 in 45.", "1", True),
        ("The length is 4 and the width is 6. What is the area?", "50 and 124", True),
        ("Close! 1/4 of 200 is 50, not 5.", "5", True),
        ("We counted them: it is ten, not six.", "six", True),
        # not a correction: the child's number is repeated
        ("30? Let's count: 10, 20, 30.", "30", False),
        ("Five is a great age! I like that number.", "I am 5", False),
        ("Can you tell me your first step to get 22 as the answer?", "no it is 22", False),
        # not a correction: praise, numbers only in a question, no number in an answer
        ("Yes! Now what is 3 plus 4?", "12", False),
        ("Great job! The next one is 7 times 5.", "35", False),
        ("What is 7 x 5?", "12", False),
        ("I have 2 cats at home!", "I have 3 dogs", False),
        ("There are 3 groups of 15 in 45.", "How many groups are there?", False),
        ("It's not one whole shape.", "It's not one shape.", False),
    ],
)
def test_number_cue(main: str, user_turn: str, corrects: bool) -> None:
    assert corrects_child(main, user_turn) is corrects


def test_number_cue_needs_the_childs_turn() -> None:
    assert corrects_child("There are 60 minutes in an hour.") is False
    assert corrects_child("There are 60 minutes in an hour.", "44") is True


# --- negation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("main", "user_turn", "corrects"),
    [
        ("No, that's 12 plus 2. Could you try 12 plus 12?", "14", True),
        ("Hmm, no that's not it. Each pair is one point.", "9", True),
        ("Oh, no that's not it. Ten times five is fifty.", "50", True),
        ("I don't think so. Let's count the legs together.", "six legs", True),
        ("A pentagon has five sides so that would not be the correct answer.", "pentagon", True),
        ("2 times 12 is 24 but we're looking for 3 times what is 24.", "12", True),
        ("These shapes do not have rotational symmetry.", "yes", True),
        # not a correction
        ("No, that's right! Well done.", "yes", False),
        ("Oh no, that's sad! Was your fish orange?", "my fish died", False),
        ("These shapes do not have rotational symmetry.", "they are pretty", False),
        ("Yes! It isn't hard, is it?", "yes", False),
        ("Me too! Let's read another book.", "yes", False),
        ("Ok, take your time", "no mam", False),
    ],
)
def test_negation_cue(main: str, user_turn: str, corrects: bool) -> None:
    assert corrects_child(main, user_turn) is corrects


def test_great_first_try_is_effort_praise_and_a_correction() -> None:
    assert praises_answer("Great first try!") is False
    assert corrects_child("Great first try! 4 is the percent.", "4") is True


# --- the flag and its wiring ------------------------------------------------------------


def test_praise_before_correction() -> None:
    main = "There are 60 minutes in an hour."
    assert praise_before_correction("Great job!", user_turn="44", main_response=main)
    assert praise_before_correction("You got it!", user_turn="44", main_response=main)
    assert not praise_before_correction("Good try!", user_turn="44", main_response=main)
    assert not praise_before_correction("Hmm, let's see.", user_turn="44", main_response=main)
    assert not praise_before_correction("Great job!", user_turn="60", main_response=main)


def test_no_contradiction_filter_uses_the_childs_turn() -> None:
    main = "There are 60 minutes in an hour."
    assert "no_contradiction" in failed_filters("Great job!", user_turn="44", main_response=main)
    assert "no_contradiction" not in failed_filters(
        "Great job!", user_turn="60", main_response=main
    )
    assert "no_contradiction" not in failed_filters("Good try!", user_turn="44", main_response=main)


@pytest.mark.parametrize(
    ("main_response", "user_turn"),
    [
        ("No doubt about it, 10 is right!", "10"),
        ("No kidding, you got it!", "5"),
        ("No, no, you're right!", "5"),
        ("No! Yes, that's correct!", "5"),
        ("The answer is 120.", "120"),
    ],
)
def test_a_leading_no_or_the_childs_own_number_is_no_correction(
    main_response: str, user_turn: str
) -> None:
    assert not corrects_child(main_response, user_turn)


def test_the_answer_is_another_number_still_corrects() -> None:
    assert corrects_child("The answer is 12.", "120")
    assert corrects_child("No, it is 7.", "5")


def test_a_weak_cue_without_a_number_still_corrects() -> None:
    """ "Actually, let's count again." names no number: the child's own number cannot
    excuse it (a bug of the first version of the number rule)."""
    assert corrects_child("Actually, let's count again.", "12")
