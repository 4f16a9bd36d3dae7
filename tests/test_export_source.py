"""The product's conversation export reader (adapters.sources.read_export).

The expected triples and skip counts were written by reading
tests/data/conversations.jsonl by hand against the rules in `read_export`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from adapters.sources import SOURCE_KINDS, Triple, load_triples, read_export

EXAMPLE = Path(__file__).resolve().parent / "data" / "conversations.jsonl"


def _t(id_: str, lesson: str | None, pika: str, user: str, main: str) -> Triple:
    return Triple(
        id=id_,
        source="export",
        lesson_id=lesson,
        pika_turn=pika,
        user_turn=user,
        main_response=main,
    )


EXPECTED = [
    # c-001: two clean exchanges; the second Pika line is the main response of the first
    # triple and the Pika turn of the second.
    _t(
        "export:c-001:1",
        "colours-1",
        "What colour is the sun?",
        "Yellow!",
        "Yes, the sun is yellow. What colour is the grass?",
    ),
    _t(
        "export:c-001:3",
        "colours-1",
        "Yes, the sun is yellow. What colour is the grass?",
        "green",
        "Right, green grass. Well done!",
    ),
    # c-002: two Pika lines, two user lines (joined), two Pika lines (joined); the last
    # user turn ends the conversation (wrong_role_order).
    _t(
        "export:c-002:2",
        "animals-1",
        "What animal do you like?",
        "I like dogs",
        "Dogs are great! What sound does a dog make?",
    ),
    # c-003: lesson_id null; the opening "hello" has no Pika turn before it.
    _t("export:c-003:2", None, "Hello! What is your name?", "Mia", "Nice to meet you, Mia!"),
    # c-004 gives nothing: an empty user turn, a user turn without text, and "three"
    # followed by a "teacher" turn (unknown role).
    # c-005: "  circle  " is stripped; the string turn and the role-less turn are walls,
    # so "sphere" after them makes no triple.
    _t(
        "export:c-005:1",
        "shapes-1",
        "What shape is a ball?",
        "circle",
        "A ball is round like a circle, but it is a sphere!",
    ),
    # A conversation id with spaces and a slash is replaced by its hash in the id.
    _t(
        "export:" + hashlib.sha256(b"lesson 7 / Mia's chat").hexdigest()[:16] + ":1",
        "phonics-3",
        "Can you say 'cat'?",
        "cat",
        "Lovely! C-a-t, cat.",
    ),
]

EXPECTED_SKIPS = Counter(
    {
        "wrong_role_order": 2,  # c-002's last "woof woof", c-003's opening "hello"
        "empty_turn": 1,  # c-004's "   "
        "missing_text": 1,  # c-004's user turn with only a ts
        "unknown_role": 1,  # c-004's "teacher"
        "wrong_type": 2,  # c-005's string turn; the line whose conversation_id is 9
        "missing_field": 3,  # c-005's turn without role; c-008 (no turns); c-010 (turns [])
        "invalid_json": 1,  # c-006, a cut line
        "not_an_object": 1,  # the JSON list line
        "duplicate_id": 2,  # c-001 again at the end: its two triples
    }
)


def test_example_file_gives_the_expected_triples_and_skips() -> None:
    skipped: Counter[str] = Counter()
    assert list(read_export(EXAMPLE, skipped)) == EXPECTED
    assert skipped == EXPECTED_SKIPS


def test_ids_are_stable_across_reads() -> None:
    first = [t.id for t in read_export(EXAMPLE)]
    second = [t.id for t in load_triples("export", EXAMPLE)]
    assert first == second == [t.id for t in EXPECTED]
    assert len(set(first)) == len(first)


def test_export_is_a_source_kind() -> None:
    assert "export" in SOURCE_KINDS
    assert load_triples("export", EXAMPLE, limit=2) == EXPECTED[:2]


def _write(path: Path, *conversations: Any) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    return path


def _conv(cid: str, *turns: tuple[str, str]) -> dict[str, Any]:
    return {
        "conversation_id": cid,
        "lesson_id": "L1",
        "turns": [{"role": role, "text": text} for role, text in turns],
    }


def test_a_bad_pika_turn_never_joins_the_child_turns_around_it(tmp_path: Path) -> None:
    conv = _conv("c1", ("pika", "Say cat."), ("user", "cat"), ("pika", " "), ("user", "dog"))
    conv["turns"].append({"role": "pika", "text": "Cat and dog!"})
    skipped: Counter[str] = Counter()
    triples = list(read_export(_write(tmp_path / "x.jsonl", conv), skipped))
    # "cat" has an empty Pika turn after it, "dog" one before it: no triple, and never
    # a joined "cat dog".
    assert triples == []
    assert skipped == Counter({"empty_turn": 1})


def test_growing_conversation_keeps_its_earlier_ids(tmp_path: Path) -> None:
    short = _conv("c1", ("pika", "Hi!"), ("user", "hello"), ("pika", "How are you?"))
    longer = _conv(
        "c1",
        ("pika", "Hi!"),
        ("user", "hello"),
        ("pika", "How are you?"),
        ("user", "good"),
        ("pika", "Great!"),
    )
    before = list(read_export(_write(tmp_path / "a.jsonl", short)))
    after = list(read_export(_write(tmp_path / "b.jsonl", longer)))
    assert [t.id for t in before] == ["export:c1:1"]
    assert [t.id for t in after] == ["export:c1:1", "export:c1:3"]
    assert after[0] == before[0]


def test_lesson_id_of_the_wrong_type_skips_the_line(tmp_path: Path) -> None:
    conv = _conv("c1", ("pika", "Hi!"), ("user", "hello"), ("pika", "How are you?"))
    conv["lesson_id"] = 12
    skipped: Counter[str] = Counter()
    assert list(read_export(_write(tmp_path / "x.jsonl", conv), skipped)) == []
    assert skipped == Counter({"wrong_type": 1})
