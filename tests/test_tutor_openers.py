"""Tests of adapters.tutor_openers: the opener rule on real tutor replies, resume, yield.

The split_opener cases quote real main responses from ../shared/data (Bridge and
uptake; the triple id is given with each). The expected splits were decided by reading
each reply against the rule (a short acknowledgement of at most 6 words, not a
question, no answer content, something left after it), not by running the code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.labels import read_rows
from adapters.sources import Triple, read_bridge
from adapters.tutor_openers import PROMPT_VERSION, label_with_tutor_openers, split_opener
from service.text_checks import failed_filters


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """../shared/data next to the repository, or $FASTRESP_SHARED_DATA."""
    override = os.environ.get("FASTRESP_SHARED_DATA")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"
    assert (path / "bridge" / "validation.json").is_file(), f"shared data not found at {path}"
    return path


@pytest.mark.parametrize(
    ("main_response", "expected"),
    [
        # bridge:6315993_39:22ca97f37c (validation)
        (
            "That is so close! Can you double-check your work?",
            ("That is so close!", "Can you double-check your work?"),
        ),
        # bridge:2879167_39:ce73bfe226
        (
            "Hmm, not quite. Do you know when we're supposed to round up and when we're "
            "supposed to round down?",
            (
                "Hmm, not quite.",
                "Do you know when we're supposed to round up and when we're supposed to "
                "round down?",
            ),
        ),
        # bridge:4290454_38:1311a7b64e
        (
            "Great start! Can you explain how you got 28?",
            ("Great start!", "Can you explain how you got 28?"),
        ),
        # bridge:4145096_55:54e543f730: a dash ends the clause
        (
            "Great - would you mind explaining so I can make sure you understand?",
            ("Great.", "Would you mind explaining so I can make sure you understand?"),
        ),
        # bridge:4247191_37:c0d7bf72d8: a comma clause
        ("Ok great, let's try another problem!", ("Ok great.", "Let's try another problem!")),
        # bridge:4055603_31:c38a26197d (train)
        (
            "Oh, you're pretty close. We want the 8th multiple of 10. Could you type the "
            "multiples of 10 up to 100?",
            (
                "Oh, you're pretty close.",
                "We want the 8th multiple of 10. Could you type the multiples of 10 up to 100?",
            ),
        ),
        # bridge:4110653_19:0f3e80050c (train): the tutor left out the full stop
        (
            "Hm, not quite To get the area of a rectangle, we need to multiply the length and "
            "the width together. 4m is the length, could you tell me what the width is?",
            (
                "Hm, not quite.",
                "To get the area of a rectangle, we need to multiply the length and the width "
                "together. 4m is the length, could you tell me what the width is?",
            ),
        ),
        # uptake:620:433 (its start): "Yes, 1000." holds the answer; "Yes" is the reaction
        (
            "Yes, 1000. I just wrote it a different way",
            ("Yes.", "1000. I just wrote it a different way"),
        ),
        # bridge:4106600_32:1a93aa6112: the whole reply is the opener, nothing remains
        ("Great job that is correct!", None),
        # bridge:2963654_50:e1a65c0be6: a question
        ("Why do you think it's division?", None),
        # bridge:2939758_51:8e8a6dbfcd: content that answers, and over 6 words
        ("You're correct that the shape is a kite! Where would it's line of symmetry be?", None),
        # bridge:4294755_60:db0bb6129e: content
        ("Usually for length we choose the longer side. 24 would be the width.", None),
        # bridge:4251976_20:56ddbd4560: a cold verdict, not a warm reaction
        ("That is incorrect. What operation would you use to solve this problem?", None),
        # uptake:58:413: the sentence holds the answer, the comma clause is a filler
        ("All right, 48. Okay. Anyone different? Different?", None),
        # uptake:248:83: a filler
        ("Okay.  What else?  Student B?", None),
    ],
)
def test_split_opener_on_real_replies(main_response: str, expected: tuple[str, str] | None) -> None:
    assert split_opener(main_response) == expected


def test_split_opener_issue_examples() -> None:
    assert split_opener("Close! The answer is 12.") == ("Close!", "The answer is 12.")
    assert split_opener("Good thinking. What did you do?") == ("Good thinking.", "What did you do?")
    assert split_opener("That is okay! Let's look at it.") == ("That is okay!", "Let's look at it.")
    assert split_opener("Oh, nice. Tell me more.") == ("Oh, nice.", "Tell me more.")
    assert split_opener("12 is right. Good.") is None
    assert split_opener("Oh, nice.") is None  # nothing would remain


def test_split_opener_max_words() -> None:
    reply = "You are on the right track! Keep going."
    assert split_opener(reply) == ("You are on the right track!", "Keep going.")
    assert split_opener(reply, max_words=5) is None


def _triple(n: int, main: str | None) -> Triple:
    return Triple(
        id=f"t{n}",
        source="test",
        lesson_id="L1",
        pika_turn="What is 7 plus 5?",
        user_turn="11",
        main_response=main,
    )


TRIPLES = [
    _triple(1, "Close! Let's count together."),
    _triple(2, "Great job! Actually, let's count again."),  # praise before a correction
    _triple(3, "What makes you say 11?"),
    _triple(4, None),
    _triple(5, "Good try! Can you count on your fingers?"),
]


def test_rows_of_each_kind(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    summary = label_with_tutor_openers(TRIPLES, out, personality="calm")
    rows = {row.triple_id: row for row in read_rows(out)}
    assert list(rows) == ["t1", "t2", "t3", "t4", "t5"]
    assert (summary.rows, summary.accepted, summary.rejected) == (5, 2, 3)

    t1 = rows["t1"]
    assert (t1.status, t1.fast_response, t1.main_response) == (
        "accepted",
        "Close!",
        "Let's count together.",
    )
    assert (t1.labeler, t1.prompt_version, t1.personality, t1.id) == (
        "tutor-openers",
        PROMPT_VERSION,
        "calm",
        "t1|calm",
    )
    t2 = rows["t2"]
    assert (t2.status, t2.reason, t2.fast_response) == ("rejected", "no_candidate_passed", None)
    assert [(c.text, c.reasons) for c in t2.rejected] == [("Great job!", ["no_contradiction"])]
    assert t2.main_response == "Great job! Actually, let's count again."
    assert (rows["t3"].reason, rows["t4"].reason) == ("no_opener", "no_opener")
    assert rows["t5"].fast_response == "Good try!"
    assert summary.rejections == {"no_candidate_passed": 1, "no_contradiction": 1, "no_opener": 2}


def test_resume_skips_done_rows_and_never_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    first = label_with_tutor_openers(TRIPLES[:2], out)
    assert first.rows == 2
    ticks: list[int] = []
    second = label_with_tutor_openers(TRIPLES, out, progress=lambda: ticks.append(1))
    assert (second.rows, second.skipped_done) == (3, 2)
    assert len(ticks) == 5
    third = label_with_tutor_openers(TRIPLES, out)
    assert (third.rows, third.skipped_done) == (0, 5)
    ids = [row.id for row in read_rows(out)]
    assert sorted(ids) == sorted(f"t{n}|calm" for n in range(1, 6))
    assert len(out.read_text().splitlines()) == 5


def test_resume_after_a_torn_last_line(tmp_path: Path) -> None:
    """A run killed mid-write leaves half a row; the re-run repairs it and finishes."""
    out = tmp_path / "labels.jsonl"
    label_with_tutor_openers(TRIPLES[:3], out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # row t3 torn
    summary = label_with_tutor_openers(TRIPLES, out)
    assert (summary.rows, summary.skipped_done) == (3, 2)
    ids = [row.id for row in read_rows(out)]
    assert ids == [f"t{n}|calm" for n in (1, 2, 3, 4, 5)]
    assert len(out.read_text().splitlines()) == 5  # no half line left behind


def test_yield_on_bridge_validation(shared_data: Path, tmp_path: Path) -> None:
    triples = list(read_bridge(shared_data / "bridge" / "validation.json"))
    out = tmp_path / "bridge-validation.jsonl"
    summary = label_with_tutor_openers(triples, out)
    assert summary.rows == len(triples) == 71
    assert summary.accepted > 0
    by_id = {t.id: t for t in triples}
    accepted = [row for row in read_rows(out) if row.status == "accepted"]
    assert len(accepted) == summary.accepted
    for row in accepted:
        assert row.fast_response is not None and row.main_response is not None
        triple = by_id[row.triple_id]
        assert (
            failed_filters(
                row.fast_response, user_turn=triple.user_turn, main_response=row.main_response
            )
            == []
        )
        # opener + rest is the tutor's reply (up to the punctuation the cut added)
        original = " ".join((triple.main_response or "").split())
        assert original.startswith(row.fast_response.rstrip(".!"))
        assert original.endswith(row.main_response[1:])
