"""Graceful shutdown of the real `fastresp serve` (a subprocess on the tiny model): SIGTERM
during long requests lets them finish, refuses new ones, and exits 0.

Long requests: the test manifest's `longwinded` personality generates up to 256 tokens
with no stop string, under a 10 s deadline, so each takes seconds on the CPU. That the
signal came while they ran is checked by uvicorn's log line and the in-flight gauge,
never by timing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_DATA, free_port
from tests.vllm_servers import log_tail, wait_ready

pytestmark = pytest.mark.engine

#: Start-up limit of `fastresp serve` on the tiny model (as in tests/test_loadtest.py).
START_TIMEOUT_S = 420.0
GRACE_S = 30
IN_FLIGHT = 4
LONG = {
    "personality": "longwinded",
    "pika_turn": "Tell me a long story about a dragon.",
    "user_turn": "Once upon a time there was a dragon",
}


def _fastresp() -> str:
    path = shutil.which("fastresp", path=str(Path(sys.executable).parent))
    assert path, "the fastresp console script is not installed next to this Python"
    return path


def _in_flight(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fastresp_in_flight_requests":
                return sample.value
    raise AssertionError("no fastresp_in_flight_requests in /metrics")


async def _sigterm_during_requests(url: str, process: subprocess.Popen[bytes]) -> list[object]:
    """Send IN_FLIGHT long requests, SIGTERM once all are in flight, then one more request.
    Returns the long requests' responses, then the late request's response or error."""
    async with httpx.AsyncClient(base_url=url, timeout=GRACE_S * 2) as client:
        tasks = [
            asyncio.create_task(client.post("/fast-response", json=LONG)) for _ in range(IN_FLIGHT)
        ]
        while _in_flight((await client.get("/metrics")).text) < IN_FLIGHT:
            assert not any(task.done() for task in tasks), "a long request ended too soon"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        late: object
        try:
            async with httpx.AsyncClient(base_url=url, timeout=GRACE_S * 2) as fresh:
                late = await fresh.post("/fast-response", json=LONG)
        except httpx.TransportError as exc:  # the listening socket closed: refused
            late = exc
        answers: list[object] = list(await asyncio.gather(*tasks))
    return [*answers, late]


def test_sigterm_finishes_in_flight_requests_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "FASTRESP_CPU_KV_CACHE_GIB": "0.5",
        "FASTRESP_MAX_MODEL_LEN": "2048",
        "FASTRESP_ENFORCE_EAGER": "true",
        "FASTRESP_DEADLINE_MS": "10000",
        "FASTRESP_SHUTDOWN_GRACE_S": str(GRACE_S),
        "FASTRESP_CACHE_DIR": str(tmp_path / "cache"),
        "FASTRESP_ADAPTER_STORE": str(TEST_DATA / "no-published-adapters"),
        "FASTRESP_LOG_LEVEL": "info",
    }
    command = [_fastresp(), "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    command += ["--personalities-file", str(TEST_DATA / "personalities.yaml")]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", process, log, START_TIMEOUT_S, "fastresp serve")
        *answers, late = asyncio.run(_sigterm_during_requests(url, process))
        # The grace period plus the engine's own shutdown; a hang fails here.
        returncode = process.wait(timeout=GRACE_S + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_tail(log, 20_000)
    assert returncode == 0, text
    for answer in answers:
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 200, answer.text
        assert answer.json()["source"] in {"model", "fallback"}
    if isinstance(late, httpx.Response):
        assert late.status_code == 503, late.text
        assert late.headers["retry-after"] == "1"
        assert late.json()["detail"][0]["type"] == "draining"
    else:
        assert isinstance(late, httpx.TransportError), late
    # uvicorn waited for the requests in flight, and cancelled none.
    assert "Waiting for connections to close" in text, text
    assert "timeout graceful shutdown exceeded" not in text, text
