"""`fastresp data triples` and `fastresp data build` (adapters.dataset).

Expected values come from the inputs the tests write (counts, texts, shares), from the
real data files' known sizes (Bridge validation 71 items, Uptake 2,246 rows; see
tests/test_sources.py), and from the hand-checked export example
(tests/test_export_source.py), never from the code under test.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapters.dataset import (
    BuildConfig,
    DatasetError,
    build_dataset,
    opener_words,
    write_jsonl_atomic,
)
from adapters.labels import LabeledRow
from service.cli import app
from service.personalities import load_personalities
from service.prompts import system_text

EXAMPLE = Path(__file__).resolve().parent / "data" / "conversations.jsonl"
MANIFEST = Path(__file__).resolve().parents[1] / "adapters" / "personalities.yaml"
SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")


def _row(
    n: int,
    *,
    personality: str = "calm",
    lesson: str | None = "L0",
    pika: str | None = "What colour is it?",
    user: str = "red",
    main: str | None = "Yes, it is red. What else is red?",
    fast: str = "Red, lovely.",
    status: str = "accepted",
    labeler: str = "tutor-openers",
    teacher: dict[str, Any] | None = None,
) -> LabeledRow:
    triple_id = f"bridge:t{n}"
    accepted = status == "accepted"
    return LabeledRow(
        id=f"{triple_id}|{personality}",
        triple_id=triple_id,
        source="bridge",
        lesson_id=lesson,
        pika_turn=pika,
        user_turn=user,
        main_response=main,
        personality=personality,
        labeler=labeler,  # type: ignore[arg-type]
        prompt_version=f"{labeler}-v1",
        status=status,  # type: ignore[arg-type]
        fast_response=fast if accepted else None,
        reason=None if accepted else "no_opener",
        teacher=teacher,
    )


def _write(path: Path, rows: list[LabeledRow]) -> Path:
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _splits(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: _read(out / name) for name in SPLIT_FILES}


# 50 different opening words: no opener covers more than 2% of rows.
VARIED = [
    "Ahh",
    "Aha",
    "Alright",
    "Amazing",
    "Awesome",
    "Bravo",
    "Brilliant",
    "Cool",
    "Dear",
    "Excellent",
    "Fantastic",
    "Fine",
    "Gosh",
    "Golly",
    "Hmm",
    "Hooray",
    "Indeed",
    "Interesting",
    "Lovely",
    "Marvellous",
    "Mm",
    "Neat",
    "Nice",
    "Now",
    "Oh",
    "Okay",
    "Ooh",
    "Oops",
    "Perfect",
    "Right",
    "Sure",
    "Splendid",
    "Super",
    "Sweet",
    "Terrific",
    "Thanks",
    "Thank",
    "True",
    "Very",
    "Well",
    "Whoa",
    "Wonderful",
    "Wow",
    "Yay",
    "Yeah",
    "Yes",
    "Yum",
    "Hey",
    "Hello",
    "Lots",
]


def _big_input(rows: int = 4000, lessons: int = 200) -> list[LabeledRow]:
    return [
        _row(
            i,
            personality=("calm", "cheerful")[i % 2],
            lesson=f"L{i % lessons}",
            user=f"answer {i}",
            fast=f"{VARIED[i % len(VARIED)]}, number {i}.",
        )
        for i in range(rows)
    ]


@pytest.fixture(scope="module")
def big_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("labels") / "big.jsonl", _big_input())


def _build(labels: list[Path], out: Path, **changes: Any) -> Any:
    return build_dataset(BuildConfig(labels=labels, out=out, **changes))


# --- build ------------------------------------------------------------------------------


def test_no_lesson_is_in_two_splits(big_labels: Path, tmp_path: Path) -> None:
    card = _build([big_labels], tmp_path / "ds")
    splits = _splits(tmp_path / "ds")
    lessons = {name: {r["lesson_id"] for r in rows} for name, rows in splits.items()}
    assert all(lessons.values()), "with 200 lessons every split gets some"
    assert not lessons["train.jsonl"] & lessons["validation.jsonl"]
    assert not lessons["train.jsonl"] & lessons["test.jsonl"]
    assert not lessons["validation.jsonl"] & lessons["test.jsonl"]
    assert sum(len(v) for v in lessons.values()) == 200
    assert sum(len(rows) for rows in splits.values()) == 4000 == card.total.rows
    # 10% / 10% of 200 lessons, on average: a loose band that a broken split misses.
    assert 8 <= len(lessons["test.jsonl"]) <= 32
    assert 8 <= len(lessons["validation.jsonl"]) <= 32


def test_split_of_a_lesson_does_not_depend_on_the_rest_of_the_data(
    big_labels: Path, tmp_path: Path
) -> None:
    _build([big_labels], tmp_path / "all")
    half = _write(tmp_path / "half.jsonl", _big_input()[::2][:1000])
    _build([half], tmp_path / "half", seed=7)
    where: dict[str, str] = {}
    for name, rows in _splits(tmp_path / "all").items():
        where.update({r["lesson_id"]: name for r in rows})
    for name, rows in _splits(tmp_path / "half").items():
        assert {where[r["lesson_id"]] for r in rows} <= {name}


def test_rows_without_lesson_stay_together_by_triple(tmp_path: Path) -> None:
    rows = [
        _row(i, personality=p, lesson=None, user=f"u{i}", fast=f"{VARIED[i % 50]} {p}")
        for i in range(300)
        for p in ("calm", "cheerful")
    ]
    _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds")
    seen: dict[str, str] = {}
    for name, split_rows in _splits(tmp_path / "ds").items():
        for r in split_rows:
            assert r["lesson_id"] is None
            assert seen.setdefault(r["triple_id"], name) == name
    assert len(seen) == 300
    assert len(set(seen.values())) == 3


def test_dropout_rate_and_reproducibility(big_labels: Path, tmp_path: Path) -> None:
    card = _build([big_labels], tmp_path / "a", dropout=0.2, seed=3)
    rows = [r for rows in _splits(tmp_path / "a").values() for r in rows]
    dropped = [r for r in rows if r["main_response_dropped"]]
    assert all(r["main_response"] is None for r in dropped)
    assert all(
        r["main_response"] == "Yes, it is red. What else is red?"
        for r in rows
        if not r["main_response_dropped"]
    )
    assert 0.175 <= len(dropped) / 4000 <= 0.225
    assert card.total.main_response_dropped == len(dropped)

    _build([big_labels], tmp_path / "b", dropout=0.2, seed=3)
    _build([big_labels], tmp_path / "c", dropout=0.2, seed=4)
    for name in SPLIT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = {
        r["id"]
        for rows in _splits(tmp_path / "c").values()
        for r in rows
        if r["main_response_dropped"]
    }
    assert other != {r["id"] for r in dropped}
    assert 0.175 <= len(other) / 4000 <= 0.225


@pytest.mark.parametrize(("rate", "expected"), [(0.0, 0), (1.0, 4000)])
def test_dropout_extremes(big_labels: Path, tmp_path: Path, rate: float, expected: int) -> None:
    card = _build([big_labels], tmp_path / "ds", dropout=rate)
    assert card.total.main_response_dropped == expected


def test_deduplicated(tmp_path: Path) -> None:
    rows = [
        _row(1),
        _row(2, user="  red ", fast="red,  LOVELY."),  # same texts up to spaces and case
        _row(3, personality="cheerful"),  # another personality: kept
        _row(4, fast="Ooh, red!"),  # another fast response: kept
        _row(5, main=None),  # another main response (none): kept
        _row(6, status="rejected"),  # not accepted: never written
    ]
    labels = _write(tmp_path / "l.jsonl", rows)
    # The same file twice adds nothing new.
    card = _build([labels, labels], tmp_path / "ds", dropout=0.0)
    written = [r for rows in _splits(tmp_path / "ds").values() for r in rows]
    assert sorted(r["id"] for r in written) == sorted(
        ["bridge:t1|calm", "bridge:t3|cheerful", "bridge:t4|calm", "bridge:t5|calm"]
    )
    # Row 2 in the first copy, all five accepted rows in the second.
    assert card.skipped == {"duplicate": 1 + 5}
    assert card.label_rejections == {"no_opener": 2}
    assert card.label_yield == {"bridge": {"rows": 12, "accepted": 10}}


def test_unknown_personality_is_left_out_and_named(tmp_path: Path) -> None:
    rows = [_row(1), _row(2, personality="robot", user="beep")]
    card = _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds")
    assert card.total.rows == 1
    assert card.skipped == {"unknown_personality": 1}
    assert any("robot" in w for w in card.warnings)


def test_seed_format(tmp_path: Path) -> None:
    teacher = {"model": "big-model", "base_url": "http://x/v1", "prompt_tokens": 10}
    rows = [
        _row(1, personality="calm", teacher=teacher, labeler="teacher"),
        _row(2, personality="cheerful", pika=None, main=None, fast="Ooh, hello!"),
    ]
    _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds", dropout=0.0)
    by_id = {r["id"]: r for rows in _splits(tmp_path / "ds").values() for r in rows}
    personalities = load_personalities(MANIFEST)

    calm = by_id["bridge:t1|calm"]
    assert set(calm) == {
        "previous_conversation",
        "main_response",
        "assistant_fast_response",
        "personality",
        "lesson_id",
        "source",
        "labeler",
        "prompt_version",
        "main_response_dropped",
        "id",
        "triple_id",
        "teacher",
    }
    assert calm["previous_conversation"] == [
        {"role": "system", "content": system_text(personalities["calm"])},
        {"role": "assistant", "content": "What colour is it?"},
        {"role": "user", "content": "red"},
    ]
    assert calm["previous_conversation"][0]["content"].startswith("You are Pika")
    assert "Gentle and patient" in calm["previous_conversation"][0]["content"]
    assert calm["main_response"] == "Yes, it is red. What else is red?"
    assert calm["assistant_fast_response"] == "Red, lovely."
    assert (calm["personality"], calm["lesson_id"], calm["source"]) == ("calm", "L0", "bridge")
    assert (calm["labeler"], calm["prompt_version"]) == ("teacher", "teacher-v1")
    assert calm["teacher"] == teacher
    assert calm["main_response_dropped"] is False

    cheerful = by_id["bridge:t2|cheerful"]
    assert "teacher" not in cheerful
    assert cheerful["previous_conversation"] == [
        {"role": "system", "content": system_text(personalities["cheerful"])},
        {"role": "user", "content": "red"},
    ]
    assert "Bubbly and playful" in cheerful["previous_conversation"][0]["content"]
    assert cheerful["main_response"] is None
    assert cheerful["main_response_dropped"] is False


def test_card_flags_a_repetitive_opener(tmp_path: Path) -> None:
    # 30 of 100 rows open with "Good job": 30% > 15%.
    rows = [
        _row(
            i,
            lesson=f"L{i}",
            user=f"answer {i}",
            fast="Good job!" if i < 30 else f"{VARIED[i % 50]} there.",
        )
        for i in range(100)
    ]
    card = _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds")
    assert card.repetitive_openers is True
    top = card.openers["first_two_words"][0]
    assert (top.text, top.rows, top.share) == ("good job", 30, 0.3)
    assert any("'good job'" in w and "30.0%" in w for w in card.warnings)
    readme = (tmp_path / "ds" / "README.md").read_text(encoding="utf-8")
    assert "Repetitive openers" in readme
    assert json.loads((tmp_path / "ds" / "card.json").read_text())["repetitive_openers"] is True


def test_card_does_not_flag_varied_openers(tmp_path: Path) -> None:
    rows = [
        _row(i, lesson=f"L{i}", user=f"answer {i}", fast=f"{VARIED[i % 50]}, thank you.")
        for i in range(100)
    ]
    card = _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds")
    assert card.repetitive_openers is False
    assert not [w for w in card.warnings if "canned" in w]
    assert card.openers["first_word"][0].share == 0.02


def test_card_counts_and_histogram(tmp_path: Path) -> None:
    fasts = ["Wow!", "Oh, nice.", "Oh, nice one.", "That is a very good try, well done."]
    rows = [
        _row(i, lesson=f"L{i}", personality=("calm", "cheerful")[i % 2], fast=f)
        for i, f in enumerate(fasts)
    ]
    card = _build([_write(tmp_path / "l.jsonl", rows)], tmp_path / "ds")
    hist = card.fast_response_words
    assert (hist["1"], hist["2"], hist["3"], hist["8"], hist["13+"]) == (1, 1, 1, 1, 0)
    assert sum(hist.values()) == 4
    assert card.total.personalities == {"calm": 2, "cheerful": 2}
    assert card.total.labelers == {"tutor-openers": 4}
    assert sum(s.rows for s in card.splits.values()) == 4
    assert card.inputs[str(tmp_path / "l.jsonl")] == {
        "lines": 4,
        "rows": 4,
        "accepted": 4,
        "rejected": 0,
    }


def test_opener_words() -> None:
    assert opener_words("Ooh, nice try!", 1) == "ooh"
    assert opener_words("Ooh, nice try!", 2) == "ooh nice"
    assert opener_words("That\u2019s it!", 2) == "that\u2019s it"
    assert opener_words("Wow!", 2) == "wow"


def test_no_accepted_rows_writes_nothing(tmp_path: Path) -> None:
    labels = _write(tmp_path / "l.jsonl", [_row(1, status="rejected")])
    with pytest.raises(DatasetError):
        _build([labels], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_config_refuses_fractions_without_a_train_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train split"):
        BuildConfig(labels=[tmp_path], out=tmp_path, val_fraction=0.5, test_fraction=0.5)


# --- CLI --------------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["data", *args])


def test_triples_cli_mixes_sources(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "triples.jsonl"
    result = _cli(
        "triples",
        "--source",
        "bridge",
        str(shared_data / "bridge" / "validation.json"),
        "--source",
        "uptake",
        str(shared_data / "uptake" / "uptake_data.csv"),
        "--source",
        "export",
        str(EXAMPLE),
        "--source",
        "bridge",
        str(shared_data / "bridge" / "validation.json"),  # again: all duplicates
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    rows = _read(out)
    assert Counter(r["source"] for r in rows) == {"bridge": 71, "uptake": 2246, "export": 6}
    assert len({r["id"] for r in rows}) == len(rows) == 71 + 2246 + 6
    assert set(rows[0]) == {"id", "source", "lesson_id", "pika_turn", "user_turn", "main_response"}
    assert "uptake_data.csv: 2246 triple(s); skipped: none" in result.output
    assert "conversations.jsonl: 6 triple(s); skipped: duplicate_id 2, empty_turn 1" in (
        result.output
    )
    assert "validation.json: 0 triple(s); skipped: duplicate_id 71" in result.output
    assert f"total: 2323 triple(s) written to {out}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["triples.jsonl"]


def test_triples_cli_bad_arguments(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    result = _cli("triples", "--source", "csv", str(EXAMPLE), "--out", str(out))
    assert result.exit_code == 2
    assert "--source: unknown source 'csv'" in result.output
    result = _cli(
        "triples", "--source", "export", "--source", "bridge", str(EXAMPLE), "--out", str(out)
    )
    assert result.exit_code == 2
    assert "2 source kind(s) but 1 PATH(s)" in result.output
    result = _cli("triples", "--source", "export", str(tmp_path / "nope"), "--out", str(out))
    assert result.exit_code == 2
    assert "--source export: no such file" in result.output
    result = _cli(
        "triples", "--source", "export", str(EXAMPLE), "--out", str(tmp_path / "no" / "t")
    )
    assert result.exit_code == 2
    assert "--out: no such directory" in result.output
    assert not out.exists()


def test_triples_cli_failed_run_leaves_the_old_file(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    out.write_text("old\n", encoding="utf-8")
    # The uptake CSV read as Bridge JSON: the whole file is unusable.
    result = _cli(
        "triples",
        "--source",
        "export",
        str(EXAMPLE),
        "--source",
        "bridge",
        str(shared_data / "uptake" / "uptake_data.csv"),
        "--out",
        str(out),
    )
    assert result.exit_code == 2
    assert "not a usable source file" in result.output
    assert out.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_build_cli(tmp_path: Path) -> None:
    labels = _write(
        tmp_path / "l.jsonl", [_row(i, lesson=f"L{i}", fast=f"{VARIED[i]}!") for i in range(40)]
    )
    out = tmp_path / "ds"
    result = _cli(
        "build", "--labels", str(labels), "--out", str(out), "--dropout", "0.5", "--seed", "1"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLIT_FILES, "README.md", "card.json"])
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert card["total"]["rows"] == 40
    assert card["config"]["dropout"] == 0.5
    assert card["command"].startswith("fastresp")
    assert "rows: 40 (train" in result.output


def test_build_cli_errors_name_the_option(tmp_path: Path) -> None:
    labels = _write(tmp_path / "l.jsonl", [_row(1)])
    out = tmp_path / "ds"
    result = _cli("build", "--labels", str(tmp_path / "missing.jsonl"), "--out", str(out))
    assert result.exit_code == 2
    assert "--labels: no such file" in result.output
    result = _cli("build", "--labels", str(labels), "--out", str(out), "--dropout", "1.5")
    assert result.exit_code == 2
    assert "--dropout" in result.output
    result = _cli(
        "build",
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--val-fraction",
        "0.6",
        "--test-fraction",
        "0.5",
    )
    assert result.exit_code == 2
    assert "train split" in result.output
    rejected = _write(tmp_path / "r.jsonl", [_row(1, status="rejected")])
    result = _cli("build", "--labels", str(rejected), "--out", str(out))
    assert result.exit_code == 1
    assert "no accepted rows" in result.output
    assert not out.exists()


def test_only_unknown_personalities_say_so(tmp_path: Path) -> None:
    # Review of issue 4: the error said "no accepted rows" while every row was accepted
    # but of a personality missing from the manifest.
    labels = _write(tmp_path / "l.jsonl", [_row(1, personality="robot")])
    with pytest.raises(DatasetError, match=r"personalities not in .*: robot"):
        _build([labels], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_written_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    # Review of issue 4: the atomic writer's temporary file is 0600, so the triples and
    # the dataset were unreadable for any other user (a training job, a container).
    previous = os.umask(0o022)
    try:
        labels = _write(tmp_path / "l.jsonl", [_row(i, lesson=f"L{i}") for i in range(5)])
        _build([labels], tmp_path / "ds")
        written = write_jsonl_atomic(["{}"], tmp_path / "t.jsonl")
    finally:
        os.umask(previous)
    assert written == 1
    for path in [tmp_path / "t.jsonl", *(tmp_path / "ds").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_cli_write_failures_name_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review of issue 4: an unwritable --out (read-only folder, full disk) ended in an
    # OSError traceback for `triples` and `build`, and a non-UTF-8 labels file in a
    # UnicodeDecodeError traceback.
    import adapters.dataset

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(adapters.dataset, "write_jsonl_atomic", refuse)
    out = tmp_path / "t.jsonl"
    result = _cli("triples", "--source", "export", str(EXAMPLE), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "--out: cannot write" in result.output and "Permission denied" in result.output
    labels = _write(tmp_path / "l.jsonl", [_row(1)])
    result = _cli("build", "--labels", str(labels), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 2, result.output
    assert "--out: cannot write the dataset" in result.output

    monkeypatch.undo()
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\n")
    result = _cli("build", "--labels", str(binary), "--out", str(tmp_path / "ds2"))
    assert result.exit_code == 2, result.output
    assert "--labels" in result.output and "not UTF-8" in result.output
    assert not (tmp_path / "ds2").exists()
