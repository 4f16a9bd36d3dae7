"""`fastresp data label`: argument errors (exit 2, nothing written) and the exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.labels import LabeledRow, LabelWriter
from adapters.sources import Triple
from service.cli import app
from tests.conftest import free_port

runner = CliRunner()
NO_ENV: dict[str, str | None] = {
    "FASTRESP_TEACHER_BASE_URL": None,
    "FASTRESP_TEACHER_MODEL": None,
    "FASTRESP_TEACHER_API_KEY": None,
    "OPENAI_API_KEY": None,
}


@pytest.fixture
def triples_file(tmp_path: Path) -> Path:
    path = tmp_path / "triples.jsonl"
    rows = [
        Triple(id="a", source="test", pika_turn="Which animal says moo?", user_turn="Cow."),
        Triple(id="b", source="test", user_turn="I don't know."),
    ]
    path.write_text("".join(row.model_dump_json() + "\n" for row in rows), encoding="utf-8")
    return path


def _label(*args: str) -> list[str]:
    return ["data", "label", *args]


def _teacher(triples: Path, out: Path, *extra: str) -> list[str]:
    return _label(
        "--labeler",
        "teacher",
        "--triples",
        str(triples),
        "--out",
        str(out),
        "--base-url",
        f"http://127.0.0.1:{free_port()}/v1",
        "--model",
        "m",
        *extra,
    )


def test_help_explains_the_command() -> None:
    result = runner.invoke(app, _label("--help"), env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--labeler", "tutor-openers", "--base-url", "--structured-output", "resume"):
        assert text in result.output


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"--triples": "no-such-triples.jsonl"}, "--triples"),
        ({"--labeler": "robot"}, "--labeler"),
        ({"--personality": "grumpy"}, "--personality"),
        ({"--structured-output": "maybe"}, "--structured-output"),
        ({"--personalities-file": "no-such-manifest.yaml"}, "--personalities-file"),
        ({"--base-url": None}, "--base-url"),
        ({"--model": None}, "--model"),
        ({"--base-url": "127.0.0.1:8100/v1"}, "--base-url"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(
    triples_file: Path, tmp_path: Path, change: dict[str, str | None], option: str
) -> None:
    out = tmp_path / "labels.jsonl"
    values: dict[str, str | None] = {
        "--labeler": "teacher",
        "--triples": str(triples_file),
        "--out": str(out),
        "--base-url": "http://127.0.0.1:9/v1",
        "--model": "m",
    }
    values.update(change)  # the missing files are relative names that do not exist
    args = [part for k, v in values.items() if v is not None for part in (k, v)]
    result = runner.invoke(app, _label(*args), env=NO_ENV)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert not out.exists()


def test_tutor_openers_takes_one_personality(triples_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    args = ["--labeler", "tutor-openers", "--triples", str(triples_file), "--out", str(out)]
    args += ["--personality", "calm", "--personality", "cheerful"]
    result = runner.invoke(app, _label(*args), env=NO_ENV)
    assert result.exit_code == 2
    assert "--personality" in result.output
    assert not out.exists()


def test_out_with_rows_of_another_labeler_is_refused(triples_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    row = LabeledRow(
        id="a|calm",
        triple_id="a",
        source="test",
        lesson_id=None,
        pika_turn=None,
        user_turn="Cow.",
        main_response=None,
        personality="calm",
        labeler="tutor-openers",
        prompt_version="tutor-openers-v1",
        status="rejected",
        fast_response=None,
        reason="no_opener",
    )
    with LabelWriter(out) as writer:
        writer.write(row)
    before = out.read_bytes()
    result = runner.invoke(app, _teacher(triples_file, out), env=NO_ENV)
    assert result.exit_code == 2
    assert "--out" in result.output and "tutor-openers" in result.output
    assert out.read_bytes() == before


def test_unreachable_teacher_exits_1_and_writes_no_rows(triples_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    args = _teacher(triples_file, out, "--max-retries", "0", "--personality", "calm")
    result = runner.invoke(app, args, env=NO_ENV)
    assert result.exit_code == 1, result.output
    assert "teacher_error" in result.output
    assert "re-run" in result.output
    assert out.read_text(encoding="utf-8") == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"id": "a", "source": "test", "user_turn": "Cow."}\n', "not a file of labelled rows"),
        (b"\xff\xfe not text\n", "not UTF-8"),
    ],
    ids=["a-triples-file", "not-utf-8"],
)
def test_out_that_is_not_a_labels_file_is_refused(
    triples_file: Path, tmp_path: Path, content: bytes, message: str
) -> None:
    # Review of issue 4: a triples file given as --out got labelled rows appended to it,
    # and a non-UTF-8 --out ended in a UnicodeDecodeError traceback.
    out = tmp_path / "labels.jsonl"
    out.write_bytes(content)
    args = ["--labeler", "tutor-openers", "--triples", str(triples_file), "--out", str(out)]
    result = runner.invoke(app, _label(*args), env=NO_ENV)
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and message in result.output
    assert out.read_bytes() == content


def test_unwritable_out_exits_2_with_the_option(
    triples_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review of issue 4: a read-only --out ended in a PermissionError traceback. (The
    # tests may run as root, where file modes do not bite, so the open is refused here.)
    out = tmp_path / "labels.jsonl"
    real_open = Path.open

    def refusing_open(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if self == out and "a" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refusing_open)
    args = ["--labeler", "tutor-openers", "--triples", str(triples_file), "--out", str(out)]
    result = runner.invoke(app, _label(*args), env=NO_ENV)
    assert result.exit_code == 2, result.output
    assert "--out: cannot write" in result.output and "Permission denied" in result.output
    assert not out.exists()


def test_a_labels_file_given_as_triples_is_refused(triples_file: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    first = runner.invoke(
        app,
        _label("--labeler", "tutor-openers", "--triples", str(triples_file), "--out", str(labels)),
        env=NO_ENV,
    )
    assert first.exit_code == 0, first.output
    out = tmp_path / "again.jsonl"
    args = _label("--labeler", "tutor-openers", "--triples", str(labels), "--out", str(out))
    result = runner.invoke(app, args, env=NO_ENV)
    assert result.exit_code == 2, result.output
    assert "--triples" in result.output and "labelled rows" in result.output
    assert not out.exists()
