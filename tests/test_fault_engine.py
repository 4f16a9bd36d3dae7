"""The engine killed in remote mode (issue 8, faults): fallbacks, 503 on `/readyz`, and
the same upstream used again once a new vLLM server listens on its port.

A real gateway (uvicorn, `create_app` with its own lifespan, so it builds its own
`RemoteEngine`) is configured the way an operator does it, with one upstream in
`FASTRESP_ENGINE_URLS`: a real `fastresp engine serve` vLLM server on the tiny model.
The oracle for a model answer is a signature adapter (tests/signature_adapters.py):
under greedy decoding the `alpha` adapter makes the tiny model say "alpha alpha", so
`source: "model"` with that text can only come from the upstream, and the new server
only has it after the gateway re-loaded it there by itself.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tests.vllm_servers as vllm_servers
from service.app import create_app
from service.settings import Settings
from tests.conftest import engine_settings, free_port, live_app
from tests.vllm_servers import SERVER_START_TIMEOUT_S, Server, wait_healthy

pytestmark = pytest.mark.engine

TURN = {"pika_turn": "What did you eat today?", "user_turn": "I ate pho with my dad"}
DEADLINE_MS = 2000
"""The gateway's deadline here: short enough that a request stuck on the dead upstream
(a connect or read timeout: 5 s and 60 s) would overrun it, long enough for the tiny
model's 12 tokens on a busy CI machine."""
MARGIN_MS = 500
"""What a fallback's `latency_ms` may exceed the deadline by. A correctness bound, not
a speed target: after the deadline fires only the fallback pick and the response object
remain (well under 1 ms), so the margin only absorbs event-loop lag on a loaded 2-core
machine. What it must catch, a request that waits on a dead upstream past the deadline,
takes seconds."""
BACK_WITHIN_S = 60.0
"""How long the restarted upstream may take to serve the gateway's requests again: the
first ones re-load the adapter there (vLLM answered 404 for it), each under the deadline."""


def launch_on_port(model: Path, port: int, log: Path) -> Server:
    """`tests.vllm_servers.launch_engine_server` (LoRA rank 8, core 0) on `port`, so
    that a restarted upstream comes back at the URL the gateway was configured with."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_servers, "free_port", lambda: port)
        return vllm_servers.launch_engine_server(model, 8, log, core=0)


def stop(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL after 20 s; wait for it."""
    server.kill(signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill(signal.SIGKILL)
        server.process.wait(timeout=20)


@pytest.fixture
def upstream_port() -> int:
    return free_port()


@pytest.fixture
def servers(upstream_port: int) -> Iterator[list[Server]]:
    """The upstreams the test starts (appended); every one still running is stopped."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            stop(server)


def remote_gateway_settings(
    model: Path, adapter: Path, url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings for a remote-mode gateway with one upstream, set as in production:
    `FASTRESP_ENGINE_URLS` and `FASTRESP_ENGINE_DEVICE` in the environment. One
    personality, `sig`, answers "alpha alpha" through the adapter, or "Hm." as fallback."""
    manifest = root / "personalities.yaml"
    manifest.write_text(
        "personalities:\n"
        "  sig:\n    description: d\n    style: s\n    max_words: 12\n"
        "    sampling: {max_tokens: 12, temperature: 0.0, top_p: 1.0, stop: []}\n"
        f"    fallback_phrases: [Hm.]\n    adapter: {adapter}\n"
    )
    monkeypatch.setenv("FASTRESP_ENGINE_URLS", url)
    monkeypatch.setenv("FASTRESP_ENGINE_DEVICE", "cpu")
    settings = engine_settings(
        model,
        personalities_file=manifest,
        deadline_ms=DEADLINE_MS,
        warm_up=False,
        engine_connect_timeout_s=30.0,
        cache_dir=root / "cache",
    )
    assert settings.engine_urls == [url]
    return settings


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called exactly `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def ask(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.post("/fast-response", json={"personality": "sig", **TURN})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def ask_until_model(http: httpx.AsyncClient, within_s: float) -> list[dict[str, Any]]:
    """Ask until the model answers (at most `within_s`); every answer, the last first."""
    answers: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    while loop.time() < give_up:
        answers.insert(0, await ask(http))
        if answers[0]["source"] == "model":
            break
        await asyncio.sleep(0.5)
    return answers


@pytest.mark.asyncio(loop_scope="session")
async def test_killed_engine_gives_fallbacks_then_is_used_again_when_back(
    tiny_model_dir: Path,
    signature_adapters: dict[str, Path],
    servers: list[Server],
    upstream_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers.append(launch_on_port(tiny_model_dir, upstream_port, tmp_path / "vllm-1.log"))
    await asyncio.to_thread(wait_healthy, servers[-1:], SERVER_START_TIMEOUT_S)
    url = servers[0].url
    settings = remote_gateway_settings(
        tiny_model_dir, signature_adapters["alpha"], url, tmp_path, monkeypatch
    )
    async with (
        live_app(create_app(settings)) as gateway,
        httpx.AsyncClient(base_url=gateway, timeout=60) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        up = await ask_until_model(http, BACK_WITHIN_S)
        assert (up[0]["source"], up[0]["fast_response"]) == ("model", "alpha alpha"), up

        # SIGKILL during traffic, as a crash or the OOM killer would (the whole process
        # group: API server, engine core and worker). Requests in flight then fail
        # mid-stream; later ones find nothing listening.
        stopping = asyncio.Event()

        async def traffic() -> list[dict[str, Any]]:
            answers = []
            while not stopping.is_set():
                answers.append(await ask(http))
            return answers

        clients = [asyncio.create_task(traffic()) for _ in range(4)]
        await asyncio.sleep(0.5)
        servers[0].kill(signal.SIGKILL)
        servers[0].process.wait(timeout=20)
        down = [await ask(http) for _ in range(5)]
        stopping.set()
        during = [answer for answers in await asyncio.gather(*clients) for answer in answers]
        for answer in during + down:
            assert answer["source"] in ("model", "fallback"), answer
            if answer["source"] == "fallback":
                assert answer["fast_response"] == "Hm.", answer
                assert answer["latency_ms"] <= DEADLINE_MS + MARGIN_MS, answer
        assert all(answer["source"] == "fallback" for answer in down), down
        print(
            f"{len(during)} answers during the kill, "
            f"{sum(a['source'] == 'fallback' for a in during)} fallbacks; after it, "
            f"fallback latency_ms: {[a['latency_ms'] for a in down]}"
        )
        ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        assert url in ready.json()["checks"]["engine"], ready.json()
        # Liveness stays up: restarting the gateway would not bring the engine back.
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        fallbacks = metric(metrics, "fastresp_fallbacks_total", personality="sig")
        engine_errors = metric(
            metrics, "fastresp_fallbacks_total", personality="sig", reason="engine_error"
        )
        assert engine_errors >= len(down) and fallbacks == engine_errors, metrics

        # A new vLLM server on the same port: used again, with no gateway restart.
        servers.append(launch_on_port(tiny_model_dir, upstream_port, tmp_path / "vllm-2.log"))
        assert servers[-1].url == url
        await asyncio.to_thread(wait_healthy, servers[-1:], SERVER_START_TIMEOUT_S)
        back = await ask_until_model(http, BACK_WITHIN_S)
        assert (back[0]["source"], back[0]["fast_response"]) == ("model", "alpha alpha"), back
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()["checks"]["engine"]) == (200, "ok"), ready.text
