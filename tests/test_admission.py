"""Admission control (service/admission.py) on a real gateway: real uvicorn, real HTTP,
the shared in-process vLLM engine on the tiny model.

The cap is checked through the middleware's own counters (`Admission.peak_in_flight`)
and the Prometheus counters, never through timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.admission import Admission
from service.app import create_app
from service.engine import Engine
from service.settings import Settings
from tests.conftest import engine_settings, live_app

GOOD = {
    "personality": "cheerful",
    "pika_turn": "What did you eat for breakfast?",
    "user_turn": "I ate pho with my dad",
}
CAP = 2
BURST = 40


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label items: value} of every sample called `name` in an exposition."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@asynccontextmanager
async def gateway(settings: Settings, engine: Engine) -> AsyncIterator[tuple[str, FastAPI]]:
    """`create_app(settings, engine)` behind a real uvicorn server (`live_app`); yields
    the base URL and the app (for its admission counters)."""
    app = create_app(settings, engine=engine)
    async with live_app(app, backlog=256) as url:
        yield url, app


def test_admission_counts_and_refuses() -> None:
    admission = Admission(max_in_flight=2, retry_after_s=3)
    assert admission.try_enter() is None
    assert admission.try_enter() is None
    assert admission.try_enter() == "overloaded"
    admission.leave()
    assert admission.try_enter() is None
    assert (admission.in_flight, admission.peak_in_flight, admission.admitted) == (2, 2, 3)
    admission.leave()
    admission.start_draining()
    assert admission.try_enter() == "draining"
    assert admission.rejected == {"overloaded": 1, "draining": 1}


@pytest.mark.parametrize("field", ["max_in_flight", "retry_after_s"])
def test_admission_refuses_bad_settings(field: str) -> None:
    values = {"max_in_flight": 1, "retry_after_s": 1, field: 0}
    with pytest.raises(ValueError, match=field):
        Admission(**values)


def test_default_cap_is_max_num_seqs(tiny_model_dir: Path) -> None:
    assert engine_settings(tiny_model_dir, max_num_seqs=7).resolved_max_in_flight() == 7
    settings = engine_settings(tiny_model_dir, max_num_seqs=7, max_in_flight=3)
    assert settings.resolved_max_in_flight() == 3


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_burst_over_the_cap_is_refused_at_once(engine: Engine, tiny_model_dir: Path) -> None:
    settings = engine_settings(tiny_model_dir, max_in_flight=CAP, retry_after_s=2)
    async with gateway(settings, engine) as (url, app):
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            paths = ["/fast-response", "/fast-response/stream"] * (BURST // 2)
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.post(path, json=GOOD) for path in paths)), timeout=120
            )
            statuses = [response.status_code for response in responses]
            assert set(statuses) <= {200, 503}, statuses
            refused = [response for response in responses if response.status_code == 503]
            assert refused, "40 requests at once over a cap of 2: some must be refused"
            assert statuses.count(200) >= 1
            for response in refused:
                assert response.headers["retry-after"] == "2"
                detail = response.json()["detail"][0]
                assert detail["type"] == "overloaded"
                assert "FASTRESP_MAX_IN_FLIGHT" in detail["msg"] and str(CAP) in detail["msg"]

            admission: Admission = app.state.admission
            assert 1 <= admission.peak_in_flight <= CAP
            assert admission.rejected["overloaded"] == len(refused)
            assert admission.admitted == statuses.count(200)
            assert admission.in_flight == 0

            # After the burst: answered normally, other routes never limited, counters right.
            assert (await client.post("/fast-response", json=GOOD)).status_code == 200
            assert (await client.get("/healthz")).status_code == 200
            text = (await client.get("/metrics")).text
    rejected = samples(text, "fastresp_rejected_requests_total")
    assert rejected[(("reason", "overloaded"),)] == len(refused)
    assert samples(text, "fastresp_in_flight_requests")[()] == 0
    server_errors = sum(
        value
        for labels, value in samples(text, "fastresp_requests_total").items()
        if dict(labels)["outcome"] == "server_error"
    )
    assert server_errors == len(refused)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_draining_refuses_new_requests_and_readyz(
    engine: Engine, tiny_model_dir: Path
) -> None:
    async with (
        gateway(engine_settings(tiny_model_dir), engine) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        app.state.admission.start_draining()
        ready = await client.get("/readyz")
        refused = await client.post("/fast-response", json=GOOD)
        streamed = await client.post("/fast-response/stream", json=GOOD)
        healthz = await client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["admission"].startswith("draining")
    for response in (refused, streamed):
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["detail"][0]["type"] == "draining"
    assert healthz.status_code == 200
