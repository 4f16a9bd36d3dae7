"""`fastresp eval run|compare|calibrate` through the CLI, fast: answers come from a replay
file (`--responses`) and the judge is a scripted OpenAI-compatible server
(`tests/fake_judge.py`). The real gateway and a real vLLM judge are in
`tests/test_eval_e2e.py`; here: exit codes and messages for bad input, nothing
half-written, the judge asked exactly once per (answer, judgement), and again only for
an answer whose text changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapters.eval_rows import read_scored_rows
from adapters.sources import Triple
from service.cli import app
from service.replay import ReplayRow
from tests.fake_judge import fake_judge

INTENT = '{"intent_score": 5, "reasoning": "r", "intent_detected": "answer", "alignment_quality": "perfect"}'  # noqa: E501
BRIDGING = (
    '{"bridging_score": 2, "reasoning": "r", "leaks": false, "repeats": true, "contradicts": false}'
)


def _replay_row(n: int, text: str | None, personality: str = "calm") -> ReplayRow:
    triple = Triple(
        id=f"t{n}",
        source="test",
        lesson_id="lesson",
        pika_turn="What colour is the sky?",
        user_turn=f"blue {n}",
        main_response="Yes, blue! What colour is grass?",
    )
    common: dict[str, Any] = {
        "triple": triple,
        "personality": personality,
        "session_id": "s1",
        "request_id": f"t{n}",
        "client_ms": 12.0,
    }
    if text is None:
        return ReplayRow(**common, status=503, error="HTTP 503: engine down", error_kind="HTTP 503")
    return ReplayRow(**common, status=200, fast_response=text, source="model", latency_ms=10.0 * n)


def _write(path: Path, rows: list[ReplayRow]) -> Path:
    path.write_text("".join(row.model_dump_json() + "\n" for row in rows), encoding="utf-8")
    return path


def _reply(body: dict[str, Any], number: int) -> tuple[int, str]:
    system = body["messages"][0]["content"]
    return (
        200,
        BRIDGING if "bridging" in system.lower() and "intent_score" not in system else INTENT,
    )


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["eval", *args])


@pytest.fixture
def responses(tmp_path: Path) -> Path:
    rows = [_replay_row(1, "Ooh, blue!"), _replay_row(2, "Mm, the sky!"), _replay_row(3, None)]
    return _write(tmp_path / "replay.jsonl", rows)


def test_a_run_judges_each_answer_once_and_again_only_when_its_text_changed(
    tmp_path: Path, responses: Path
) -> None:
    out = tmp_path / "run"
    with fake_judge(_reply) as judge:
        args = ("run", "--responses", str(responses), "--out", str(out))
        args += ("--judge-url", judge.url)  # the one model it lists is taken
        first = invoke(*args)
        # the failed request makes the exit 1; the report is written anyway
        assert first.exit_code == 1, first.output
        assert len(judge.requests) == 4  # 2 answered rows x 2 judgements
        rows = read_scored_rows(out / "rows.jsonl")
        assert [row.id for row in rows] == ["t1|calm", "t2|calm", "t3|calm"]
        assert [
            (r.intent.score, r.bridging.score) for r in rows[:2] if r.intent and r.bridging
        ] == [
            (5, 2),
            (5, 2),
        ]
        assert rows[2].intent is None and rows[2].error == "HTTP 503: engine down"
        for name in ("report.md", "report.html", "summary.json", "run.json"):
            assert (out / name).is_file(), name

        again = invoke(*args)
        assert again.exit_code == 1, again.output
        assert len(judge.requests) == 4  # nothing asked twice
        assert "0 asked now" in again.output

        # one answer's text changes: only its two judgements are asked again
        _write(
            responses, [_replay_row(1, "Ooh, blue!"), _replay_row(2, "Brr!"), _replay_row(3, None)]
        )
        changed = invoke(*args)
        assert changed.exit_code == 1, changed.output
        assert len(judge.requests) == 6
        assert judge.requests[-1]["messages"][1]["content"].count("Brr!") == 1
    rows = read_scored_rows(out / "rows.jsonl")
    assert rows[1].fast_response == "Brr!" and rows[1].intent is not None


def test_no_judge_still_reports_and_compare_pairs_the_same_answers(
    tmp_path: Path, responses: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        done = invoke("run", "--responses", str(responses), "--out", str(out))
        assert done.exit_code == 1, done.output  # the failed request
        assert "no judge was set" in (out / "report.md").read_text(encoding="utf-8").lower()
    compared = invoke("compare", str(a), str(b), "--resamples", "200")
    assert compared.exit_code == 0, compared.output
    assert "paired" in compared.output.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --url, --in-process, --responses"),
        (("--url", "http://127.0.0.1:9", "--in-process"), "exactly one of"),
        (("--responses", "nope.jsonl"), "--responses: no such file"),
        (("--responses", "corrupt.jsonl"), "--responses: "),
        (("--responses", "empty.jsonl"), "--responses: "),
        (("--responses", "replay.jsonl", "--calibration", "corrupt.jsonl"), "--calibration: "),
        (("--responses", "replay.jsonl", "--judge-model", "x"), "--judge-model: "),
        (("--responses", "replay.jsonl", "--limit", "5"), "--limit: not used with --responses"),
        (
            ("--responses", "replay.jsonl", "--calibration", "empty.jsonl"),
            "--calibration: given without a judge",
        ),
        (
            ("--responses", "replay.jsonl", "--judge-url", "ftp://x", "--judge-model", "x"),
            "--judge-url: ",
        ),
    ],
)
def test_bad_run_input_exits_2_naming_the_option_and_writes_nothing(
    tmp_path: Path,
    responses: Path,
    args: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.jsonl").write_text('{"triple": 3}\n', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    result = invoke("run", *args, "--out", "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_out_under_a_file_and_compare_of_a_non_run_folder_exit_2(
    tmp_path: Path, responses: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    result = invoke("run", "--responses", str(responses), "--out", str(blocker / "sub"))
    assert result.exit_code == 2 and "--out: " in result.output, result.output
    compared = invoke("compare", str(tmp_path), str(tmp_path))
    assert compared.exit_code == 2 and "RUN_A: " in compared.output, compared.output


def test_a_folder_is_not_overwritten_by_other_answers_or_a_run_without_its_judge(
    tmp_path: Path, responses: Path
) -> None:
    out = tmp_path / "run"
    assert invoke("run", "--responses", str(responses), "--out", str(out)).exit_code == 1
    before = (out / "responses.jsonl").read_bytes()
    other = _write(tmp_path / "other.jsonl", [_replay_row(1, "Hello!")])
    refused = invoke("run", "--responses", str(other), "--out", str(out))
    assert refused.exit_code == 2 and "--out: " in refused.output, refused.output
    assert (out / "responses.jsonl").read_bytes() == before
    judged = tmp_path / "judged"
    with fake_judge(_reply) as judge:
        args = ("run", "--responses", str(responses), "--out", str(judged))
        assert invoke(*args, "--judge-url", judge.url).exit_code == 1
    rows = (judged / "rows.jsonl").read_bytes()
    unjudged = invoke(*args)  # the same folder, no judge this time
    assert unjudged.exit_code == 2 and "--judge-url: " in unjudged.output, unjudged.output
    assert (judged / "rows.jsonl").read_bytes() == rows
    missing = invoke("compare", str(out), str(out), "--out", str(tmp_path / "no" / "c.md"))
    assert missing.exit_code == 2 and "--out: no such folder" in missing.output


def test_calibrate_refuses_a_bad_set_naming_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "set.jsonl"
    row = json.loads(
        (Path(__file__).parent / "data" / "judge_calibration.jsonl").read_text().splitlines()[0]
    )
    row["intent_score"] = 6
    bad.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with fake_judge(_reply) as judge:
        result = invoke(
            "calibrate", "--judge-url", judge.url, "--judge-model", "judge", "--set", str(bad)
        )
        assert judge.requests == []
    assert result.exit_code == 2, result.output
    assert re.search(r"--set: .*set\.jsonl:1: .*intent_score", result.output), result.output


def test_a_judge_that_is_down_or_lacks_the_model_is_refused_before_any_work(
    tmp_path: Path, responses: Path
) -> None:
    out = tmp_path / "run"
    down = invoke(
        "run", "--responses", str(responses), "--out", str(out),
        "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge",
    )  # fmt: skip
    assert down.exit_code == 1, down.output
    assert "--judge-url: " in down.output and "Traceback" not in down.output
    assert not out.exists()
    with fake_judge(_reply, models=("a", "b")) as judge:
        unlisted = invoke(
            "run", "--responses", str(responses), "--out", str(out),
            "--judge-url", judge.url, "--judge-model", "c",
        )  # fmt: skip
        several = invoke(
            "run", "--responses", str(responses), "--out", str(out), "--judge-url", judge.url
        )
        assert judge.requests == []  # no judgement was asked
    assert unlisted.exit_code == 1 and "'a', 'b'" in unlisted.output, unlisted.output
    assert several.exit_code == 2 and "--judge-model: " in several.output, several.output
    assert not out.exists()
