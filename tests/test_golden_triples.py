"""Golden triples: hand-checked items of the real Bridge and Uptake files.

Each expected triple below was written down by reading the source file itself (not by
running the reader): Bridge items of ``bridge/validation.json`` (the ``c_id``, the last
tutor line of ``c_h`` before the final student line, that student line, and the
``c_r_`` text) and rows of ``uptake/uptake_data.csv`` (``obs_id``, ``exchange_idx``,
``student_text``, ``teacher_text``, quoted as in the CSV: the double spaces between
sentences and the typographic apostrophes are in the file). The mapping is the one in
``shared/data/README.md``. The files are read at the ``shared_data`` fixture path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.sources import Triple, read_bridge, read_uptake

# (c_id, lesson_topic, pika_turn, user_turn, main_response), from bridge/validation.json.
BRIDGE_GOLDEN = [
    # Item 4 of the list; two earlier tutor lines ("...has 6 sides.", "That's the way!")
    # come before the question and must not be taken.
    (
        "6165060_89",
        "4.6D.Classifying 2D Figures",
        "What is the number of sides in group 2?",
        "2",
        "Good try! Let's try to count the number of sides and points in each of the shape",
    ),
    # Item 11: c_r has two tutor lines, but c_r_ (the expert's) wins.
    (
        "2939758_51",
        "4.6B.Symmetry",
        "Where is the line of symmetry in drawing #2?",
        "like a kite.",
        "You're correct that the shape is a kite! Where would it's line of symmetry be?",
    ),
    # Item 21: an earlier student line ("ok") sits between two tutor questions. The
    # same c_id is item 42 too, with another expert's reply ("I see your thinking...").
    (
        "2915969_42",
        "5.3C.Multi-Digit Division with Two-Digit Divisors",
        "What is the value of 13 times 3?",
        "19",
        "Great try! Remember that with multiplication you cannot just multiply the tens "
        "digit and the ones digit.",
    ),
    # Item 34: the student's earlier "no\\\\" line is not part of the final turn.
    (
        "4055603_103",
        "3.2B.Multiples of Ten",
        "What is the final answer?",
        "nhw",
        "Can you give me a number that is a multiple of 10?",
    ),
    # Item 65: c_r has six tutor lines; c_r_ has one.
    (
        "6165981_43",
        "4.6D.Classifying 2D Figures",
        "Did they three follow the right angle's rule?",
        "no",
        "Ah, let's take a closer look. Do they all have 90 degree angles?",
    ),
]

# c_ids of the list above that are in validation.json more than once (the same moment
# remediated by two experts); the others are there once.
BRIDGE_ITEMS_PER_C_ID = {"2915969_42": 2}

# (obs_id, exchange_idx, student_text, teacher_text), from uptake/uptake_data.csv
# (lines 12, 102, 502, 1502 and 1802 of the file).
UPTAKE_GOLDEN = [
    (
        "9",
        "726",
        "Teacher R, when you asked for mine.  I told you that I had trouble with the "
        "homework.  You know?",
        "Yes.",
    ),
    (
        "159",
        "170",
        "We wrote it down underneath, how long Carrie is from the park and then we subtract them.",
        "Okay.  Does this give you times two or would it be half of that- -Susan Jones\u2019 "
        "house, 87/100 times two.",
    ),
    (
        "754",
        "74",
        "If you don\u2019t check your work in a different strategy, you might get the same.  "
        "You might do the same mistake with the same strategy.",
        "That\u2019s right.  That\u2019s what I think I see happening.",
    ),
    (
        "4093",
        "98",
        "It\u2019s in simplest form.",
        "The fraction bar is in simplest form?  I don\u2019t remember saying that.  Student R?",
    ),
    (
        "4258",
        "222",
        "It\u2019s kind of hard to read his handwriting.",
        "Good.",
    ),
]


@pytest.fixture(scope="module")
def bridge_validation(shared_data: Path) -> list[Triple]:
    return list(read_bridge(shared_data / "bridge" / "validation.json"))


@pytest.fixture(scope="module")
def uptake_rows(shared_data: Path) -> dict[str, Triple]:
    return {t.id: t for t in read_uptake(shared_data / "uptake" / "uptake_data.csv")}


@pytest.mark.parametrize(
    ("c_id", "lesson", "pika_turn", "user_turn", "main_response"),
    BRIDGE_GOLDEN,
    ids=[g[0] for g in BRIDGE_GOLDEN],
)
def test_bridge_golden_triple(
    bridge_validation: list[Triple],
    c_id: str,
    lesson: str,
    pika_turn: str,
    user_turn: str,
    main_response: str,
) -> None:
    found = [t for t in bridge_validation if t.id.startswith(f"bridge:{c_id}:")]
    assert len(found) == BRIDGE_ITEMS_PER_C_ID.get(c_id, 1)
    assert {(t.source, t.lesson_id) for t in found} == {("bridge", lesson)}
    assert (pika_turn, user_turn, main_response) in {
        (t.pika_turn, t.user_turn, t.main_response) for t in found
    }


@pytest.mark.parametrize(
    ("obs_id", "exchange", "student", "teacher"),
    UPTAKE_GOLDEN,
    ids=[f"{g[0]}:{g[1]}" for g in UPTAKE_GOLDEN],
)
def test_uptake_golden_triple(
    uptake_rows: dict[str, Triple], obs_id: str, exchange: str, student: str, teacher: str
) -> None:
    assert uptake_rows[f"uptake:{obs_id}:{exchange}"] == Triple(
        id=f"uptake:{obs_id}:{exchange}",
        source="uptake",
        lesson_id=obs_id,
        pika_turn=None,
        user_turn=student,
        main_response=teacher,
    )
