"""Real vLLM OpenAI servers for tests, started with `fastresp engine serve`.

`launch_engine_server` starts one in its own process group (so `Server.kill` reaches
vLLM's engine core and worker too); `wait_healthy` polls `/health` until every server
answers 200 or fails the test with the server's log tail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def running_engine_server(model: Path, max_lora_rank: int, log: Path) -> Iterator[Server]:
    """One healthy `launch_engine_server` on core 0; stopped with SIGTERM (SIGKILL after
    20 s) on the way out."""
    server = launch_engine_server(model, max_lora_rank, log, core=0)
    try:
        wait_healthy([server], SERVER_START_TIMEOUT_S)
        yield server
    finally:
        server.kill(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill(signal.SIGKILL)
            server.process.wait(timeout=20)


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


def wait_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str
) -> None:
    """Poll `url` until it answers 200; fail the test with the log's tail when the
    process exits first or `timeout_s` passes (`what` names the server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready in {timeout_s:g} s:\n{log_tail(log)}")
        time.sleep(0.3)


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a server log, for failure messages."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


CHAT_MAX_MODEL_LEN = 8192
"""Context of `tiny_chat_server`: the teacher and judge prompts are 3,000-4,000 tokens
for the tiny model's almost character-level tokenizer, more than the 2,048 positions its
config declares."""


@dataclass(frozen=True)
class ChatServer:
    """A running OpenAI-compatible server: its ``/v1`` root, model name and files."""

    api_url: str
    """Ends in ``/v1`` (what an OpenAI client takes as base_url)."""
    model: str
    """The served model name."""
    url: str
    """The server root (``/health``, the engine URL a gateway takes)."""
    model_dir: Path


@contextmanager
def tiny_chat_server(
    tiny_model_dir: Path, root: Path, core: int = 0, extra_vllm_args: tuple[str, ...] = ()
) -> Iterator[ChatServer]:
    """A vLLM server on a copy of the tiny model whose config allows `CHAT_MAX_MODEL_LEN`
    positions (RoPE has no learned positions; the weights are random anyway): a stand-in
    teacher or judge whose replies are noise, for tests of mechanics. `extra_vllm_args`
    go to vLLM last."""
    model = root / "tiny-long"
    shutil.copytree(tiny_model_dir, model)
    config_file = model / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["max_position_embeddings"] = CHAT_MAX_MODEL_LEN
    config_file.write_text(json.dumps(config), encoding="utf-8")
    server = launch_engine_server(
        model,
        8,
        root / "vllm.log",
        core=core,
        extra_vllm_args=("--max-model-len", str(CHAT_MAX_MODEL_LEN), *extra_vllm_args),
    )
    try:
        wait_healthy([server], SERVER_START_TIMEOUT_S)
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        yield ChatServer(f"{server.url}/v1", models["data"][0]["id"], server.url, model)
    finally:
        server.kill()
        server.process.wait()
