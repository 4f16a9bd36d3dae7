"""The labelled-row file: append-only, torn-line repair, no duplicate ids, summary counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.labels import (
    LabeledRow,
    LabelSummary,
    LabelWriter,
    RejectedCandidate,
    done_ids,
    read_rows,
)


def _row(row_id: str, *, accepted: bool = True) -> LabeledRow:
    return LabeledRow(
        id=row_id,
        triple_id=row_id.split("|")[0],
        source="bridge",
        lesson_id="fractions",
        pika_turn="What is 1/2 + 1/4?",
        user_turn="3/4",
        main_response="Yes! 1/2 is 2/4, so 2/4 + 1/4 = 3/4.",
        personality="calm",
        labeler="tutor-openers",
        prompt_version="tutor-openers-v1",
        status="accepted" if accepted else "rejected",
        fast_response="Oh, nice." if accepted else None,
        alternatives=["Good thinking."] if accepted else [],
        rejected=[RejectedCandidate(text="Correct, 3/4!", reasons=["no_leak"])],
        reason=None if accepted else "no_candidate_passed",
    )


def test_rows_round_trip_and_a_second_writer_refuses_done_ids(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    with LabelWriter(out) as writer:
        writer.write(_row("bridge:1|calm"))
        writer.write(_row("bridge:2|calm", accepted=False))
    assert [row.id for row in read_rows(out)] == ["bridge:1|calm", "bridge:2|calm"]
    with LabelWriter(out) as writer, pytest.raises(ValueError, match="already"):
        writer.write(_row("bridge:1|calm"))
    assert len(out.read_text().splitlines()) == 2


def test_a_torn_last_line_is_cut_and_the_next_row_starts_clean(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    with LabelWriter(out) as writer:
        writer.write(_row("bridge:1|calm"))
    whole = out.read_text()
    torn = _row("bridge:2|calm").model_dump_json()[:40]
    out.write_text(whole + torn)  # a run killed mid-write
    assert done_ids(out) == {"bridge:1|calm"}
    with LabelWriter(out) as writer:
        writer.write(_row("bridge:2|calm"))
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["bridge:1|calm", "bridge:2|calm"]


def test_a_complete_last_row_without_newline_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    out.write_text(_row("bridge:1|calm").model_dump_json())  # no trailing newline
    with LabelWriter(out) as writer:
        writer.write(_row("bridge:2|calm"))
    assert [row.id for row in read_rows(out)] == ["bridge:1|calm", "bridge:2|calm"]


def test_summary_counts_rows_candidates_and_reasons() -> None:
    summary = LabelSummary()
    summary.count(_row("a|calm"))
    summary.count(_row("b|calm", accepted=False))
    # accepted row: best + 1 alternative passed, 1 rejected; rejected row: 1 rejected
    assert (summary.rows, summary.accepted, summary.rejected) == (2, 1, 1)
    assert (summary.candidates, summary.candidates_passed) == (4, 2)
    assert summary.rejections == {"no_leak": 2, "no_candidate_passed": 1}
    assert summary.acceptance_rate == 0.5
