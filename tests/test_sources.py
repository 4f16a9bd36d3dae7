"""Tests of adapters.sources on the real shared data and on small broken files.

The golden strings below were read by eye from the data files in ../shared/data
(see shared/data/README.md), not produced by the code under test.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adapters.sources import (
    SourceFormatError,
    Triple,
    load_triples,
    read_bridge,
    read_triples_jsonl,
    read_uptake,
)

# The wire `Identifier` pattern of service/schemas.py: replay sends triple ids as request ids.
WIRE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """../shared/data next to the repository, or $FASTRESP_SHARED_DATA."""
    override = os.environ.get("FASTRESP_SHARED_DATA")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"
    assert (path / "bridge" / "validation.json").is_file(), (
        f"shared data not found at {path} (expected bridge/ and uptake/ there); "
        "set FASTRESP_SHARED_DATA to its location"
    )
    return path


def _by_cid(triples: list[Triple], c_id: str) -> list[Triple]:
    return [t for t in triples if t.id.startswith(f"bridge:{c_id}:")]


# --- real data: Bridge ------------------------------------------------------------------


def test_bridge_validation_count_and_golden_item(shared_data: Path) -> None:
    skipped: Counter[str] = Counter()
    triples = list(read_bridge(shared_data / "bridge" / "validation.json", skipped))
    assert len(triples) == 71
    assert skipped == Counter()

    # First item of validation.json.
    (first,) = _by_cid(triples, "6315993_39")
    assert first == triples[0]
    assert first.source == "bridge"
    assert first.lesson_id == "3.8B.Pictographs"
    assert first.pika_turn == "What is your final answer?"
    assert first.user_turn == "30"
    assert first.main_response == "That is so close! Can you double-check your work?"
    # Stability pin: changing the id scheme changes every id downstream.
    assert first.id == "bridge:6315993_39:22ca97f37c"


def test_bridge_multi_line_expert_reply_is_joined(shared_data: Path) -> None:
    triples = list(read_bridge(shared_data / "bridge" / "validation.json"))
    (item,) = _by_cid(triples, "4110653_70")
    assert item.lesson_id == "3.6D.Decomposing Figures"
    # The last tutor line before the final student line, not the one before it.
    assert item.pika_turn == "Do you need any help with it?"
    assert item.user_turn == "'es 37"
    assert item.main_response == (
        "Hm, not quite. We need to break up the this shape into two smaller shapes "
        "This is because this shape is kind of weird and we can't easily get the area "
        "of it right away "
        "Can you think of how we can divide this shape up into two rectangles?"
    )


def test_bridge_repeated_c_id_gets_distinct_ids(shared_data: Path) -> None:
    triples = list(read_bridge(shared_data / "bridge" / "validation.json"))
    pair = _by_cid(triples, "4294755_60")
    assert len(pair) == 2
    assert pair[0].id != pair[1].id
    assert {t.pika_turn for t in pair} == {"What is the length of this rectangle?"}
    assert {t.user_turn for t in pair} == {"24"}
    assert {t.main_response for t in pair} == {
        "Great job! What is the width?",
        "Usually for length we choose the longer side. 24 would be the width.",
    }


def test_bridge_train_skips_the_empty_student_turn(shared_data: Path) -> None:
    skipped: Counter[str] = Counter()
    triples = list(read_bridge(shared_data / "bridge" / "train.json", skipped))
    # 419 items; 4017173_67 ends with an empty student line.
    assert len(triples) == 418
    assert skipped == Counter({"empty_user_turn": 1})
    assert _by_cid(triples, "4017173_67") == []
    # 2856167_175 (first of two): the empty middle line of c_r_ is dropped.
    first = _by_cid(triples, "2856167_175")[0]
    assert first.pika_turn == "Is that your answer?"
    assert first.user_turn == "yes"
    assert first.main_response == (
        "That is a good try, let's work this problem together. What is a shape with four sides?"
    )
    # 2879242_61: the student wrote "done " with a trailing space.
    (done,) = _by_cid(triples, "2879242_61")
    assert done.user_turn == "done"


def test_bridge_ids_stable_unique_and_wire_safe(shared_data: Path) -> None:
    paths = [shared_data / "bridge" / name for name in ("train.json", "validation.json")]
    first = [t.id for p in paths for t in read_bridge(p)]
    second = [t.id for p in paths for t in read_bridge(p)]
    assert first == second
    # c_id repeats within and across the two files; the ids must not.
    assert len(first) == 418 + 71 == len(set(first))
    assert all(WIRE_ID.fullmatch(i) for i in first)


# --- real data: uptake ------------------------------------------------------------------


def test_uptake_count_and_golden_rows(shared_data: Path) -> None:
    skipped: Counter[str] = Counter()
    triples = list(read_uptake(shared_data / "uptake" / "uptake_data.csv", skipped))
    assert len(triples) == 2246
    assert skipped == Counter()
    by_id = {t.id: t for t in triples}
    assert len(by_id) == 2246

    row = by_id["uptake:7:69"]
    assert row == Triple(
        id="uptake:7:69",
        source="uptake",
        lesson_id="7",
        pika_turn=None,
        user_turn="They are different, the denominator are different.",
        main_response="Different or what word did I use?",
    )
    assert triples[0].id == "uptake:4:65"
    assert triples[0].user_turn == "And then when I was doing the problems \u2013"
    assert triples[0].main_response == "Yeah."
    assert triples[-1].id == "uptake:4758:7"
    assert triples[-1].user_turn == "The multiples of 12 and 8."


def test_uptake_ids_stable_and_wire_safe(shared_data: Path) -> None:
    path = shared_data / "uptake" / "uptake_data.csv"
    first = [t.id for t in read_uptake(path)]
    assert first == [t.id for t in read_uptake(path)]
    assert all(WIRE_ID.fullmatch(i) for i in first)


def test_load_triples_limit(shared_data: Path) -> None:
    path = shared_data / "bridge" / "validation.json"
    everything = load_triples("bridge", path)
    assert load_triples("bridge", path, limit=5) == everything[:5]
    assert load_triples("bridge", path, limit=0) == []
    assert load_triples("bridge", path, limit=1000) == everything
    uptake = load_triples("uptake", shared_data / "uptake" / "uptake_data.csv", limit=3)
    assert [t.id for t in uptake] == ["uptake:4:65", "uptake:4:296", "uptake:7:69"]


# --- bad rows ---------------------------------------------------------------------------


def _turn(user: str, text: Any) -> dict[str, Any]:
    return {"id": 1, "text": text, "time": "00:00", "user": user}


def _bridge_item(c_id: Any = "1_1", **changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "c_id": c_id,
        "lesson_topic": "Colours",
        "c_h": [_turn("tutor", "What colour is it?"), _turn("student", "red")],
        "c_r": [_turn("tutor", "Original reply.")],
        "c_r_": [{"user": "tutor", "text": "Yes, red!", "is_revised": True}],
    }
    item.update(changes)
    return item


def test_bridge_bad_rows_are_skipped_by_reason(tmp_path: Path) -> None:
    items: list[Any] = [
        _bridge_item("good"),
        "not an object",
        {k: v for k, v in _bridge_item("no_history").items() if k != "c_h"},
        _bridge_item(42),  # c_id is a number
        _bridge_item("ends_with_tutor", c_h=[_turn("student", "hi"), _turn("tutor", "Hello!")]),
        _bridge_item("blank_student", c_h=[_turn("tutor", "Say it?"), _turn("student", " \t ")]),
        _bridge_item("text_is_int", c_h=[_turn("tutor", "How many?"), _turn("student", 3)]),
        _bridge_item("reply_not_list", c_r_="Yes!"),
        _bridge_item(
            "joined",
            c_h=[
                _turn("tutor", "What is 2 + 2?"),
                _turn("tutor", "   "),
                _turn("student", " I think "),
                _turn("student", ""),
                _turn("student", "it is 4"),
            ],
            c_r_=[{"user": "tutor", "text": "  ", "is_revised": True}],
            c_r=[_turn("tutor", "Right."), _turn("student", "yay"), _turn("tutor", "Well done!")],
        ),
        _bridge_item("good"),  # the very same item again
        _bridge_item("no_tutor_yet", c_h=[_turn("student", "hello")], c_r_=[], c_r=[]),
    ]
    path = tmp_path / "bridge.json"
    path.write_text(json.dumps(items), encoding="utf-8")

    skipped: Counter[str] = Counter()
    triples = list(read_bridge(path, skipped))
    assert skipped == Counter(
        {
            "not_an_object": 1,
            "missing_field": 1,
            "wrong_type": 3,
            "missing_user_turn": 1,
            "empty_user_turn": 1,
            "duplicate_id": 1,
        }
    )
    assert [t.id.split(":")[1] for t in triples] == ["good", "joined", "no_tutor_yet"]
    joined = triples[1]
    assert joined.pika_turn == "What is 2 + 2?"
    assert joined.user_turn == "I think it is 4"
    assert joined.main_response == "Right. Well done!"
    lonely = triples[2]
    assert lonely.pika_turn is None
    assert lonely.main_response is None


def test_bridge_whole_file_problems(tmp_path: Path) -> None:
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"c_id": "1"}', encoding="utf-8")
    with pytest.raises(SourceFormatError, match="list"):
        list(read_bridge(not_a_list))
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(SourceFormatError, match="not JSON"):
        list(read_bridge(broken))
    with pytest.raises(FileNotFoundError):
        load_triples("bridge", tmp_path / "missing.json")


def test_uptake_bad_rows_are_skipped_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "uptake.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["obs_id", "exchange_idx", "student_text", "teacher_text", "uptake"])
        writer.writerow(["1", "10", "It is blue.", "Blue, yes.", "2.0"])
        writer.writerow(["1", "11", "   ", "Hm?", "0.0"])  # whitespace-only student
        writer.writerow(["1"])  # short row: no student_text cell at all
        writer.writerow(["", "12", "Seven.", "Why seven?", "1.0"])  # no obs_id
        writer.writerow(["1", "10", "Again.", "Again!", "1.0"])  # same obs_id + exchange_idx
        writer.writerow(["2", "3", " Is it five? ", "  ", ""])  # empty teacher text
    skipped: Counter[str] = Counter()
    triples = list(read_uptake(path, skipped))
    assert skipped == Counter(
        {"empty_user_turn": 1, "missing_user_turn": 1, "missing_field": 1, "duplicate_id": 1}
    )
    assert [t.id for t in triples] == ["uptake:1:10", "uptake:2:3"]
    assert triples[1].user_turn == "Is it five?"
    assert triples[1].main_response is None

    no_column = tmp_path / "no_column.csv"
    no_column.write_text("obs_id,exchange_idx,teacher_text\n1,2,Hi\n", encoding="utf-8")
    with pytest.raises(SourceFormatError, match="student_text"):
        list(read_uptake(no_column))


def _triple_json(**fields: Any) -> str:
    base: dict[str, Any] = {
        "id": "t1",
        "source": "bridge",
        "lesson_id": "L",
        "pika_turn": "What colour?",
        "user_turn": "red",
        "main_response": "Yes, red!",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def test_jsonl_bad_rows_are_skipped_by_reason(tmp_path: Path) -> None:
    lines = [
        _triple_json(id="ok1", extra_key="ignored"),
        "",
        "{not json",
        "[1, 2]",
        _triple_json(id="no_user", user_turn=...),
        _triple_json(id="blank_user", user_turn="  \t "),
        _triple_json(id="int_user", user_turn=5),
        _triple_json(id="int_pika", pika_turn=7),
        _triple_json(id=...),
        _triple_json(id="   "),
        _triple_json(id="ok2", pika_turn="", main_response="   ", lesson_id=None),
        _triple_json(id="ok1", user_turn="a different turn"),
    ]
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    skipped: Counter[str] = Counter()
    triples = list(read_triples_jsonl(path, skipped))
    assert skipped == Counter(
        {
            "invalid_json": 1,
            "not_an_object": 1,
            "missing_user_turn": 1,
            "empty_user_turn": 1,
            "wrong_type": 2,
            "missing_field": 2,
            "duplicate_id": 1,
        }
    )
    assert [t.id for t in triples] == ["ok1", "ok2"]
    assert triples[1].pika_turn is None
    assert triples[1].main_response is None
    assert triples[1].lesson_id is None


def test_jsonl_round_trip_and_limit_stops_reading(tmp_path: Path) -> None:
    triples = [
        Triple(id=f"t{i}", source="test", lesson_id=None, pika_turn=None, user_turn=f"turn {i}")
        for i in range(3)
    ]
    path = tmp_path / "triples.jsonl"
    path.write_text(
        "".join(t.model_dump_json() + "\n" for t in triples) + "{broken\n", encoding="utf-8"
    )
    skipped: Counter[str] = Counter()
    assert load_triples("jsonl", path, limit=2, skipped=skipped) == triples[:2]
    assert skipped == Counter()  # the broken line after the limit is never read
    assert load_triples("jsonl", path, skipped=skipped) == triples
    assert skipped == Counter({"invalid_json": 1})


def test_load_triples_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown source"):
        load_triples("csv", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        load_triples("jsonl", tmp_path / "x", limit=-1)


def test_sources_module_stays_light() -> None:
    """The gateway-side CLI imports this module: no training or model stack."""
    code = (
        "import sys, adapters.sources, service.replay\n"
        "heavy = {'torch', 'trl', 'datasets', 'peft', 'transformers', 'vllm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_absurd_inputs_are_skips_or_a_format_error_never_a_crash(tmp_path: Path) -> None:
    # Review of issue 4: a deeply nested JSON value raised RecursionError (a traceback,
    # and for JSON Lines the whole run stopped on one bad line), and an uptake cell
    # over the csv module's 128 KiB field limit raised _csv.Error.
    deep = "[" * 100_000 + "]" * 100_000
    lines = tmp_path / "triples.jsonl"
    lines.write_text(deep + "\n" + _triple_json(id="ok") + "\n", encoding="utf-8")
    skipped: Counter[str] = Counter()
    assert [t.id for t in read_triples_jsonl(lines, skipped)] == ["ok"]
    assert skipped == Counter({"invalid_json": 1})

    export = tmp_path / "export.jsonl"
    conversation = {
        "conversation_id": "c1",
        "turns": [
            {"role": "pika", "text": "Hi?"},
            {"role": "user", "text": "hi"},
            {"role": "pika", "text": "Hello!"},
        ],
    }
    export.write_text(deep + "\n" + json.dumps(conversation) + "\n", encoding="utf-8")
    skipped = Counter()
    assert [t.id for t in load_triples("export", export, skipped=skipped)] == ["export:c1:1"]
    assert skipped == Counter({"invalid_json": 1})

    bridge = tmp_path / "deep.json"
    bridge.write_text(deep, encoding="utf-8")
    with pytest.raises(SourceFormatError, match="nested too deeply"):
        list(read_bridge(bridge))

    uptake = tmp_path / "huge.csv"
    uptake.write_text(
        'obs_id,exchange_idx,student_text,teacher_text\n1,1,ok,fine\n1,2,"'
        + "x" * 200_000
        + '",hi\n',
        encoding="utf-8",
    )
    with pytest.raises(SourceFormatError, match="after line 2: field larger"):
        list(read_uptake(uptake))
