"""End to end on the real default model: `fastresp serve` with gemma-3-270m.

Starts the service exactly as the README does (the console script, on a free port)
with the model `fastresp model prepare` built, then sends real Bridge triples and
runs `fastresp replay` against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.sources import load_triples
from service.guard import clean_fast_response
from service.model_prep import is_prepared
from service.personalities import load_personalities
from service.settings import Settings, default_personalities_file
from tests.conftest import free_port

pytestmark = pytest.mark.realmodel

#: gemma-3-270m's engine started in about 50 s and warmed up in 11-13 s on this 2-core
#: machine; a CI run that shared the cores with other jobs needed over 300 s.
START_TIMEOUT_S = 600


def _fastresp() -> str:
    path = shutil.which("fastresp", path=str(Path(sys.executable).parent))
    assert path, "the fastresp console script is not installed next to this Python"
    return path


@pytest.fixture(scope="module")
def gemma_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`fastresp serve` on the prepared gemma-3-270m; yields its base URL."""
    model_dir = Settings().default_model_dir()
    assert is_prepared(model_dir), f"run `fastresp model prepare` first ({model_dir})"
    port = free_port()
    log_path = tmp_path_factory.mktemp("gemma") / "serve.log"
    # A generous deadline: this checks that the real model answers, not how fast (the
    # deadline path is tested on the tiny model; speed is measured by the replay).
    env = {
        **os.environ,
        "FASTRESP_CPU_KV_CACHE_GIB": "0.5",
        "FASTRESP_MAX_NUM_SEQS": "16",
        "FASTRESP_DEADLINE_MS": "30000",
    }
    with log_path.open("wb") as log:
        command = [_fastresp(), "serve", "--port", str(port)]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"service exited:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S} s"
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_issue_example_gets_a_model_answer(gemma_service: str) -> None:
    personality = next(iter(load_personalities(default_personalities_file())))
    response = httpx.post(
        f"{gemma_service}/fast-response",
        json={
            "personality": personality,
            "pika_turn": "What did you eat for breakfast?",
            "user_turn": "I ate pho with my dad",
            "main_response": "Pho is a noodle soup. Can you say noodle soup?",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    print("gemma-3-270m:", body)
    assert body["source"] == "model"
    assert body["fast_response"].strip()


def test_five_bridge_triples_get_guard_clean_model_answers(
    gemma_service: str, shared_data: Path
) -> None:
    triples = load_triples("bridge", shared_data / "bridge" / "validation.json", limit=5)
    personalities = load_personalities(default_personalities_file())
    with httpx.Client(base_url=gemma_service, timeout=30) as client:
        for index, triple in enumerate(triples):
            name = list(personalities)[index % len(personalities)]
            body = {
                "personality": name,
                "pika_turn": triple.pika_turn,
                "user_turn": triple.user_turn,
                "main_response": triple.main_response,
            }
            response = client.post("/fast-response", json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            print(f"{triple.user_turn!r} -> {answer['fast_response']!r}, {answer['latency_ms']} ms")
            assert answer["source"] == "model"
            text = answer["fast_response"]
            assert clean_fast_response(text, personalities[name].max_words).text == text


def test_replay_cli_against_the_service(
    gemma_service: str, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "replay.jsonl"
    result = subprocess.run(
        [
            _fastresp(),
            "replay",
            "--source",
            "bridge",
            "--path",
            str(shared_data / "bridge" / "validation.json"),
            "--url",
            gemma_service,
            "--limit",
            "6",
            "--concurrency",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "P95" in result.stdout
    assert len(out.read_text().splitlines()) == 6
