"""Real vLLM OpenAI servers for tests, started with `fastresp engine serve`.

`launch_engine_server` starts one in its own process group (so `Server.kill` reaches
vLLM's engine core and worker too); `wait_healthy` polls `/health` until every server
answers 200 or fails the test with the server's log tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

FASTRESP = str(Path(sys.executable).parent / "fastresp")
SERVER_START_TIMEOUT_S = 420.0
"""Start-up limit for one server: two started together on 2 busy cores took minutes."""


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the server's whole process group (API server, engine core, worker)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def launch_engine_server(
    model: Path, max_lora_rank: int, log: Path, core: int, extra_vllm_args: tuple[str, ...] = ()
) -> Server:
    """`fastresp engine serve` with its vLLM worker bound to CPU core `core` (modulo the
    cores there are). Both servers bound to core 0, vLLM's default here, stalled one
    server's worker for two minutes while the other was under load (CI, 2026-11-29)."""
    port = free_port()
    args = [FASTRESP, "engine", "serve", "--model", str(model), "--port", str(port)]
    args += ["--max-lora-rank", str(max_lora_rank), "--cpu-kv-cache-gib", "0.5"]
    args += ["--max-model-len", "2048", "--enforce-eager", "--"]
    args += ["--disable-uvicorn-access-log", *extra_vllm_args]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so killpg reaches vLLM's children
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1)),
            },
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_healthy(servers: list[Server], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                pytest.fail(f"vLLM server {server.url} exited:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    pending.remove(server)
            except httpx.TransportError:
                pass
        if pending and time.monotonic() > deadline:
            pytest.fail(f"vLLM server {pending[0].url} not healthy in {timeout_s:g} s")
        time.sleep(0.5)
