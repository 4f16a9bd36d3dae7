"""The metrics catalogue without a vLLM engine: labelling rules, the error-outcome
middleware through the real app with a scripted engine, the info gauge, the
multi-process directory, and the `--workers` refusals.

The real engine is covered in test_metrics_engine.py, several workers in
test_metrics_workers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli_app
from service.engine import Engine
from service.errors import RegistryUnavailable
from service.metrics import (
    TOKEN_BUCKETS,
    Metrics,
    mark_dead_workers,
    outcome_of,
    personality_of,
    prepare_multiprocess_dir,
)
from tests.conftest import TEST_DATA, engine_settings
from tests.test_fast_response_service import ScriptedEngine

GOOD = {"personality": "cheerful", "user_turn": "Red!"}
KNOWN = ("cheerful", "longwinded")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label items: value} of every sample called `name` in an exposition."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    """{(personality, source, outcome): count} of `fastresp_requests_total`."""
    return {
        (dict(k)["personality"], dict(k)["source"], dict(k)["outcome"]): v
        for k, v in samples(text, "fastresp_requests_total").items()
    }


# -- labelling rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (400, "client_error"),
        (404, "client_error"),
        (413, "client_error"),
        (422, "client_error"),
        (429, "client_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_outcome_of_status(status: int, outcome: str) -> None:
    assert outcome_of(status) == outcome


@pytest.mark.parametrize(
    ("body", "label"),
    [
        (json.dumps(GOOD).encode(), "cheerful"),
        (json.dumps({**GOOD, "user_turn": ""}).encode(), "cheerful"),  # bad field, known name
        (json.dumps({**GOOD, "personality": "grumpy"}).encode(), "_unknown"),
        (json.dumps({**GOOD, "personality": ["cheerful"]}).encode(), "_unknown"),
        (json.dumps({"user_turn": "hi"}).encode(), "_unknown"),
        (b'["cheerful"]', "_unknown"),
        (b"{not json", "_unknown"),
        (b"\xff\xfe{}", "_unknown"),
        (b"[" * 30_000 + b"]" * 30_000, "_unknown"),  # deeper than the parser goes
        (b"", "_unknown"),
    ],
)
def test_personality_label_is_a_manifest_name_or_unknown(body: bytes, label: str) -> None:
    assert personality_of(body, KNOWN) == label


# -- through the app, with a scripted engine ---------------------------------------------


@asynccontextmanager
async def scripted_app(
    tiny_model_dir: Path, engine: ScriptedEngine
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app around a scripted engine; app exceptions become 500 responses."""
    settings = engine_settings(tiny_model_dir, warm_up=False)
    app = create_app(settings, engine=cast(Engine, engine))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


@pytest.mark.asyncio
async def test_every_status_is_counted_with_bounded_labels(tiny_model_dir: Path) -> None:
    script: list[str | Exception] = [
        "Ooh, red!",
        RuntimeError("a bug"),  # unhandled: 500
        RegistryUnavailable("store down"),  # a domain error with status 503
    ]
    engine = ScriptedEngine(script)
    statuses: list[int] = []
    async with scripted_app(tiny_model_dir, engine) as client:

        async def post(content: bytes, **headers: str) -> None:
            response = await client.post(
                "/fast-response",
                content=content,
                headers={"content-type": "application/json", **headers},
            )
            statuses.append(response.status_code)

        await post(json.dumps(GOOD).encode())  # 200
        await post(json.dumps({**GOOD, "personality": "grumpy"}).encode())  # 404
        await post(json.dumps({**GOOD, "user_turn": ""}).encode())  # 422, known name
        await post(json.dumps({**GOOD, "mood": "happy", "personality": "x"}).encode())  # 422
        await post(b"{not json")  # 422
        await post(b"\xff\xfe{}")  # 422 from the UTF-8 check
        await post(json.dumps({**GOOD, "user_turn": "a" * 70_000}).encode())  # 413
        await post(b"[" * 30_000 + b"]" * 30_000)  # 400 from FastAPI's parser
        await post(json.dumps(GOOD).encode())  # 500
        await post(json.dumps({**GOOD, "personality": "longwinded"}).encode())  # 503
        assert (await client.get("/healthz")).status_code == 200  # other routes: not counted
        assert (await client.get("/nowhere")).status_code == 404
        text = (await client.get("/metrics")).text
    assert statuses == [200, 404, 422, 422, 422, 422, 413, 400, 500, 503]
    assert requests_total(text) == {
        ("cheerful", "model", "ok"): 1,
        ("_unknown", "none", "client_error"): 6,
        ("cheerful", "none", "client_error"): 1,
        ("cheerful", "none", "server_error"): 1,
        ("longwinded", "none", "server_error"): 1,
    }
    assert "grumpy" not in text and '"x"' not in text


@pytest.mark.asyncio
async def test_each_generation_records_ttft_and_output_tokens(tiny_model_dir: Path) -> None:
    # A guard rejection ("...") is sampled again: two generations for one request.
    engine = ScriptedEngine(["  ...  ", "Ooh, red!", "Hmm, red!"])
    async with scripted_app(tiny_model_dir, engine) as client:
        for _ in range(2):
            assert (await client.post("/fast-response", json=GOOD)).json()["source"] == "model"
        text = (await client.get("/metrics")).text
    cheerful = (("personality", "cheerful"),)
    # ScriptedEngine answers with ttft_s=0.0 and output_tokens=3
    assert samples(text, "fastresp_time_to_first_token_seconds_count") == {cheerful: 3}
    assert samples(text, "fastresp_time_to_first_token_seconds_sum") == {cheerful: 0.0}
    assert samples(text, "fastresp_output_tokens_count") == {cheerful: 3}
    assert samples(text, "fastresp_output_tokens_sum") == {cheerful: 9}
    buckets = samples(text, "fastresp_output_tokens_bucket")
    assert buckets[(("le", "2.0"), *cheerful)] == 0
    assert buckets[(("le", "3.0"), *cheerful)] == 3
    assert [float(b) for b in TOKEN_BUCKETS][:6] == [1, 2, 3, 4, 5, 6]
    assert TOKEN_BUCKETS[-1] == 64
    assert samples(text, "fastresp_in_flight_requests") == {(): 0}


@pytest.mark.asyncio
async def test_the_catalogue_is_declared_and_the_cache_counter_stays_empty(
    tiny_model_dir: Path,
) -> None:
    async with scripted_app(tiny_model_dir, ScriptedEngine(["Ooh!"])) as client:
        await client.post("/fast-response", json=GOOD)
        text = (await client.get("/metrics")).text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {
        "fastresp_request_duration_seconds": "histogram",
        "fastresp_engine_duration_seconds": "histogram",
        "fastresp_time_to_first_token_seconds": "histogram",
        "fastresp_output_tokens": "histogram",
        "fastresp_in_flight_requests": "gauge",
        "fastresp_requests": "counter",
        "fastresp_fallbacks": "counter",
        "fastresp_cache_lookups": "counter",
        "fastresp_adapter_swaps": "counter",
        "fastresp_adapter_swap_duration_seconds": "histogram",
        "fastresp_active_adapter_info": "gauge",
    }
    assert {name: types.get(name) for name in expected} == expected
    assert samples(text, "fastresp_cache_lookups_total") == {}  # no cache yet, no fake zeros
    # Both manifest personalities start on the base model.
    info = samples(text, "fastresp_active_adapter_info")
    assert info == {
        (("adapter", "none"), ("personality", p), ("version", "base")): 1.0 for p in KNOWN
    }


def test_the_info_gauge_keeps_one_series_per_personality() -> None:
    metrics = Metrics()

    def info() -> dict[tuple[tuple[str, str], ...], float]:
        return samples(metrics.exposition().decode(), "fastresp_active_adapter_info")

    metrics.set_active_adapter("p1", "none", "base")
    metrics.set_active_adapter("p2", "none", "base")
    metrics.set_active_adapter("p1", "cheerful-lora", "v1")
    metrics.set_active_adapter("p1", "cheerful-lora", "v2")
    assert info() == {
        (("adapter", "cheerful-lora"), ("personality", "p1"), ("version", "v2")): 1.0,
        (("adapter", "none"), ("personality", "p2"), ("version", "base")): 1.0,
    }
    metrics.set_active_adapter("p1", "none", "base")
    assert len(info()) == 2


# -- the multi-process directory ---------------------------------------------------------


def test_prepare_empties_a_configured_dir_of_stale_values(tmp_path: Path) -> None:
    configured = tmp_path / "prom"
    configured.mkdir()
    for name in ("counter_123.db", "histogram_123.db", "gauge_livesum_123.db"):
        (configured / name).write_bytes(b"stale")
    (configured / "README").write_text("not ours")
    assert prepare_multiprocess_dir(configured) == configured
    assert sorted(p.name for p in configured.iterdir()) == ["README"]
    created = prepare_multiprocess_dir(tmp_path / "new" / "dir")
    assert created.is_dir()
    fresh = prepare_multiprocess_dir(None)
    try:
        assert fresh.is_dir() and list(fresh.iterdir()) == []
    finally:
        fresh.rmdir()


def test_dead_workers_live_gauges_are_dropped(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    names = [
        f"gauge_livesum_{dead_pid}.db",  # dropped: a live gauge of a dead process
        f"gauge_livemax_{dead_pid}.db",  # dropped
        f"counter_{dead_pid}.db",  # kept: its counts stay in the totals
        f"gauge_livesum_{os.getpid()}.db",  # kept: this process
        f"gauge_livesum_{os.getppid()}.db",  # kept: alive
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert mark_dead_workers(tmp_path) == [dead_pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


# -- --workers ---------------------------------------------------------------------------


def test_workers_need_remote_engine_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTRESP_ENGINE_URLS", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    args = [
        "serve",
        "--workers",
        "2",
        "--personalities-file",
        str(TEST_DATA / "personalities.yaml"),
    ]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert "workers=2 needs remote-engine mode" in result.output
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_workers_with_the_admin_api_need_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTRESP_ENGINE_URLS", "http://127.0.0.1:1")
    monkeypatch.setenv("FASTRESP_ADMIN_TOKEN", "t")
    monkeypatch.delenv("FASTRESP_REDIS_URL", raising=False)
    result = CliRunner().invoke(cli_app, ["serve", "--workers", "3"])
    assert result.exit_code == 2, result.output
    assert "workers=3 with admin_token needs redis_url" in result.output
