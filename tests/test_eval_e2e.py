"""`fastresp eval run|calibrate|compare` end to end with real servers.

One vLLM server on the tiny random-weight model (`tests.vllm_servers.tiny_chat_server`)
is both the engine behind a real `fastresp serve` gateway (remote-engine mode) and the
judge. The tiny model's text is noise, so these tests check mechanics, not quality:
every answered pair has both verdicts, each a 1-5 score or a reason; the report files
are written and the plots are valid PNGs; a re-run resumes without asking again; the
calibration and the comparison run on the results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.eval_rows import RunInfo, read_scored_rows
from adapters.judge import read_calibration_set
from tests.conftest import REPO_ROOT, free_port
from tests.vllm_servers import ChatServer, tiny_chat_server, wait_ready

FASTRESP = str(Path(sys.executable).parent / "fastresp")
TRIPLES = 5
"""Bridge validation triples sent (x 2 personalities = 10 answers, 20 verdicts)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chat_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatServer]:
    """The tiny model as engine and judge. Guided decoding without free whitespace, so
    its random text still fills the judge's JSON schema with a 1-5 score first (with
    whitespace allowed it spends ``max_tokens`` on blanks before the first key)."""
    compact_json = (
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    )
    root = tmp_path_factory.mktemp("judge")
    with tiny_chat_server(tiny_model_dir, root, extra_vllm_args=compact_json) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(chat_server: ChatServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `fastresp serve` whose engine is the chat server (remote-engine mode)."""
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "FASTRESP_MODEL": str(chat_server.model_dir),
        "FASTRESP_ENGINE_URLS": chat_server.url,
        "FASTRESP_ADAPTER_STORE": str(log.parent / "store"),
        "FASTRESP_DEADLINE_MS": "20000",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [FASTRESP, "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", process, log, 180, "fastresp serve")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def fastresp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FASTRESP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )


def eval_run(
    out: Path, gateway: str, server: ChatServer, shared: Path
) -> subprocess.CompletedProcess[str]:
    return fastresp(
        "eval", "run",
        "--url", gateway,
        "--source", "bridge",
        "--path", str(shared / "bridge" / "validation.json"),
        "--limit", str(TRIPLES),
        "--concurrency", "2",
        "--judge-url", server.api_url,
        "--judge-model", server.model,
        "--judge-max-tokens", "96",
        "--out", str(out),
    )  # fmt: skip


def test_run_scores_every_answer_writes_the_report_and_resumes(
    gateway: str, chat_server: ChatServer, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = eval_run(out, gateway, chat_server, shared_data)
    assert first.returncode == 0, first.stderr  # every pair answered and judged
    rows = read_scored_rows(out / "rows.jsonl")
    assert len(rows) == TRIPLES * 2
    assert {row.personality for row in rows} == {"cheerful", "calm"}
    answered = [row for row in rows if row.ok]
    assert answered, first.stderr
    judgements = [
        json.loads(line)
        for line in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    for row in answered:
        for verdict in (row.intent, row.bridging):
            assert verdict is not None
            # scored 1-5, or rejected with a reason: never silently empty
            assert (verdict.score is not None and 1 <= verdict.score <= 5) or verdict.error
    stored = {(j["item_id"], j["kind"]) for j in judgements}
    assert stored == {(row.id, kind) for row in answered for kind in ("intent", "bridging")}
    # the schema was sent and taken, so scores come through, even from random weights
    scored = [v for row in answered for v in (row.intent, row.bridging) if v and v.score]
    assert scored, [(row.intent, row.bridging) for row in answered]
    assert all(j["judge"]["structured_output"] for j in judgements)
    info = RunInfo.model_validate_json((out / "run.json").read_text(encoding="utf-8"))
    assert info.judge is not None and info.judge.model == chat_server.model
    assert info.judge.structured_output is True
    assert info.judge.prompt_versions == {
        "intent": "judge-intent-v1",
        "bridging": "judge-bridging-v1",
    }
    for name in ("report.md", "report.html", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"intent_scores.png", "bridging_scores.png", "latency.png"}
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        assert matplotlib.image.imread(png).ndim == 3, png
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "judged accuracy" in report.lower()
    assert "unverified" in report.lower()  # no calibration was given: the report says so
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html

    # A re-run resumes: the answers are reused and no judgement is asked twice.
    second = eval_run(out, gateway, chat_server, shared_data)
    assert second.returncode == 0, second.stderr
    assert "reusing the 10 answers" in second.stderr
    assert "judge: 0 asked now" in second.stderr  # nothing asked twice
    lines_after = (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines_after]
    assert len(ids) == len(set(ids))
    assert len(lines_after) == len(judgements)
    assert [r.id for r in read_scored_rows(out / "rows.jsonl")] == [r.id for r in rows]
    resumed = RunInfo.model_validate_json((out / "run.json").read_text(encoding="utf-8"))
    assert resumed.judge is not None and resumed.judge.structured_output is True

    # A personality the service does not serve is refused before anything is asked.
    typo = fastresp(
        "eval", "run", "--url", gateway, "--personality", "grumpy", "--limit", "1",
        "--path", str(shared_data / "bridge" / "validation.json"), "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert typo.returncode == 2, typo.stderr
    assert "--personality: grumpy not served" in typo.stderr and "calm" in typo.stderr
    assert not (tmp_path / "t").exists()  # nothing written

    # The same answers scored without a judge: automatic metrics only, and the report
    # says no judge was set; the two runs compare paired (same pairs).
    plain = tmp_path / "plain"
    no_judge = fastresp(
        "eval", "run", "--responses", str(out / "responses.jsonl"), "--out", str(plain)
    )
    assert no_judge.returncode in (0, 1), no_judge.stderr
    assert "no judge was set" in (plain / "report.md").read_text(encoding="utf-8").lower()
    assert all(row.intent is None for row in read_scored_rows(plain / "rows.jsonl"))
    compared = fastresp("eval", "compare", str(plain), str(out), "--resamples", "200")
    assert compared.returncode == 0, compared.stderr
    assert "paired" in compared.stdout.lower()
    assert "pass rate" in compared.stdout.lower()


def test_calibrate_reports_agreement_for_both_judgements(
    chat_server: ChatServer, tmp_path: Path
) -> None:
    examples = read_calibration_set(REPO_ROOT / "tests" / "data" / "judge_calibration.jsonl")
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(e.model_dump_json() + "\n" for e in examples[:4]), encoding="utf-8")
    result_file = tmp_path / "calibration.json"
    done = fastresp(
        "eval", "calibrate",
        "--judge-url", chat_server.api_url,
        "--set", str(subset),
        "--judge-max-tokens", "96",
        "--json", str(result_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert result["judge_model"] == chat_server.model  # found at /v1/models
    assert [a["kind"] for a in result["agreements"]] == ["intent", "bridging"]
    for agreement in result["agreements"]:
        assert agreement["examples"] == 4
        assert 0 <= agreement["scored"] <= 4
    assert "| intent | 4 |" in done.stdout
