"""`fastresp serve --workers 2` in remote-engine mode against a real vLLM server
(`fastresp engine serve`, tiny model): `/metrics` reports the totals of both workers
through prometheus-client's multi-process collector, and values left in the metrics
directory by an earlier run do not leak into them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import TEST_DATA, free_port
from tests.test_metrics import requests_total, samples
from tests.vllm_servers import (
    FASTRESP,
    SERVER_START_TIMEOUT_S,
    Server,
    running_engine_server,
)

pytestmark = pytest.mark.engine

#: A pid no process has here (above the kernel's pid_max), for the "earlier run" files.
STALE_PID = 4_999_999
STALE_COUNT = 1000.0


@pytest.fixture(scope="module")
def upstream(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    with running_engine_server(tiny_model_dir, 8, log) as server:
        yield server


def write_stale_run(directory: Path) -> None:
    """Files an earlier gateway run would leave: 1000 answered requests, 5 in flight."""
    stale = {
        f"counter_{STALE_PID}.db": (
            "fastresp_requests",
            "fastresp_requests_total",
            ["personality", "source", "outcome", "adapter_version"],
            ["cheerful", "model", "ok", "base"],
            STALE_COUNT,
        ),
        f"gauge_livesum_{STALE_PID}.db": (
            "fastresp_in_flight_requests", "fastresp_in_flight_requests", [], [], 5.0
        ),
    }  # fmt: skip
    for file_name, (metric, sample, names, values, value) in stale.items():
        mmaped = MmapedDict(str(directory / file_name))  # type: ignore[no-untyped-call]
        key = mmap_key(metric, sample, names, values, "written by an earlier run")
        mmaped.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
        mmaped.close()  # type: ignore[no-untyped-call]


def requests_by_pid(directory: Path) -> dict[int, float]:
    """{worker pid: its fastresp_requests_total}, read from each worker's own file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        counts[pid] = sum(
            sample.value
            for family in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
            for sample in family.samples
            if sample.name == "fastresp_requests_total"
        )
    return counts


def wait_for_workers(log: Path, process: subprocess.Popen[bytes], workers: int) -> None:
    """Until `workers` workers logged uvicorn's startup line; fails if the server exits."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while log.read_text(errors="replace").count("Application startup complete") < workers:
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"gateway workers did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_two_workers_report_the_totals_of_both(
    upstream: Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    write_stale_run(metrics_dir)
    (metrics_dir / "notes.txt").write_text("not a metrics file: kept")
    port = free_port()
    log = tmp_path / "gateway.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "FASTRESP_ENGINE_URLS": upstream.url,
        "FASTRESP_ENGINE_DEVICE": "cpu",
        "FASTRESP_PERSONALITIES_FILE": str(TEST_DATA / "personalities.yaml"),
        "FASTRESP_DEADLINE_MS": "30000",
        "FASTRESP_CACHE_DIR": str(tmp_path / "cache"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    for name in ("FASTRESP_ADMIN_TOKEN", "FASTRESP_REDIS_URL"):
        env.pop(name, None)
    args = [FASTRESP, "serve", "--workers", "2", "--port", str(port)]
    args += ["--model", str(tiny_model_dir)]
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_for_workers(log, gateway, 2)
        assert not (metrics_dir / f"counter_{STALE_PID}.db").exists()
        sent = asyncio.run(drive(f"http://127.0.0.1:{port}", metrics_dir))
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        per_worker = requests_by_pid(metrics_dir)
    finally:
        gateway.send_signal(signal.SIGINT)
        try:
            gateway.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait(timeout=20)
    print(f"\nrequests per worker pid: {per_worker}; sent {sent}")
    assert len([n for n in per_worker.values() if n > 0]) == 2, per_worker
    counted = requests_total(text)
    assert sum(counted.values()) == sum(sent.values())
    assert sum(n for (_, _, outcome), n in counted.items() if outcome == "ok") == sent["ok"]
    assert counted[("_unknown", "none", "client_error")] == sent["client_error"]
    durations = samples(text, "fastresp_request_duration_seconds_count")
    assert sum(durations.values()) == sent["ok"]
    assert samples(text, "fastresp_in_flight_requests") == {(): 0.0}
    info = samples(text, "fastresp_active_adapter_info")
    assert info == {
        (("adapter", "none"), ("personality", p), ("version", "base")): 1.0
        for p in ("cheerful", "longwinded")
    }
    assert "vllm:" not in text  # the remote engine exposes its own
    # A clean exit drops each worker's live gauges; its counters stay for the totals.
    remaining = sorted(p.name for p in metrics_dir.iterdir())
    assert not [name for name in remaining if name.startswith("gauge_live")], remaining
    assert "notes.txt" in remaining
    assert len([name for name in remaining if name.startswith("counter_")]) == 2


async def drive(url: str, metrics_dir: Path) -> dict[str, int]:
    """Send rounds of 8 concurrent requests, each on a new connection (so either worker
    may accept it), until both workers have answered some; at most 40 rounds.

    Returns:
        {"ok": answered with 200, "client_error": answered with 404}.
    """
    sent = {"ok": 0, "client_error": 0}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(personality: str) -> None:
            body = {"personality": personality, "user_turn": "I ate pho with my dad"}
            response = await client.post("/fast-response", json=body)
            assert response.status_code in (200, 404), response.text
            sent["ok" if response.status_code == 200 else "client_error"] += 1

        for _ in range(40):
            await asyncio.gather(*(one("cheerful") for _ in range(7)), one("grumpy"))
            if len([n for n in requests_by_pid(metrics_dir).values() if n > 0]) >= 2:
                break
    return sent
