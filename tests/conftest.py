"""Shared fixtures: the real data folder, the tiny model, one in-process vLLM engine.

The engine is started once per test session (about 25 s on two cores) in the
session's event loop, and every API test builds its own app around it with
`create_app(settings, engine=...)`, so each test gets fresh metrics.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.app import create_app
from service.engine import Engine
from service.settings import Settings

# Every gateway the tests build, in this process or as `fastresp serve` subprocesses,
# remembers answers for POST /feedback; not in the developer's
# ~/.cache/pika-fastresp/feedback.sqlite3. Tests of the store pass their own file.
os.environ.setdefault(
    "FASTRESP_FEEDBACK_DB",
    str(Path(tempfile.mkdtemp(prefix="fastresp-tests-feedback-")) / "feedback.sqlite3"),
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (override: FASTRESP_SHARED_DATA)."""
    path = Path(os.environ.get("FASTRESP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    assert (path / "bridge" / "validation.json").is_file(), f"real data not found at {path}"
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen3 model, built once per session (a few seconds)."""
    from service.model_prep import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def engine_settings(model: Path, **overrides: Any) -> Settings:
    """Settings for tests: the tiny model, a small KV cache, test personalities."""
    values: dict[str, Any] = {
        "model": model,
        "cpu_kv_cache_gib": 0.5,
        "max_model_len": 2048,
        "enforce_eager": True,
        "personalities_file": TEST_DATA / "personalities.yaml",
        "deadline_ms": 10_000,
        # Not the developer's ~/.cache store: adapters published there are not for tests.
        "adapter_store": TEST_DATA / "no-published-adapters",
        # Off here: they change which text answers a repeated turn or session, and most
        # tests identify an adapter by its text. tests/test_session_state.py turns them on.
        "session_memory_turns": 0,
        "response_cache": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """One real in-process vLLM engine (AsyncLLM) on the tiny model, with LoRA enabled."""
    from service.vllm_engine import VLLMEngine

    running = await VLLMEngine.start(engine_settings(tiny_model_dir))
    try:
        yield running
    finally:
        await running.close()


@asynccontextmanager
async def serve(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """Run `create_app(settings, engine)` with its lifespan and yield a client for it."""
    app = create_app(settings, engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@asynccontextmanager
async def live_gateway(settings: Settings, engine: Engine) -> AsyncIterator[str]:
    """`create_app(settings, engine)` behind a real uvicorn server on a free port, in
    this event loop (the shared engine belongs to it); yields the base URL."""
    async with live_app(create_app(settings, engine=engine)) as url:
        yield url


@asynccontextmanager
async def live_app(app: Any, backlog: int = 2048) -> AsyncIterator[str]:
    """`app` behind a real uvicorn server on a free port, in this event loop; yields
    the base URL. `backlog`: the listening socket's queue (uvicorn's default 2048)."""
    import asyncio

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", ws="none", http="h11", backlog=backlog)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                pytest.fail("the gateway exited during startup")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class RedisServer:
    """A real `redis-server` on 127.0.0.1:`port`, with no persistence, run from `directory`.

    `kill()` then `start()` simulates an outage: the same port comes back. The server
    still loads `directory/dump.rdb` at start if a `SAVE` wrote one.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; `make test` installs it "
                "(apt-get install -y --no-install-recommends redis-server)"
            )
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it answers PING."""
        log = self.directory / "redis.log"
        options = {"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
        options |= {"dir": str(self.directory), "logfile": str(log)}
        args = [arg for name, value in options.items() for arg in (f"--{name}", value)]
        self.process = subprocess.Popen([self.binary, *args], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not answer PING within {timeout_s} s: {log}")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real redis-server shared by the session; tests isolate by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A test's own running redis-server, which the test may kill and start again."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: The signature adapters the `signature_adapters` fixture provides: version ->
#: (signature, LoRA rank).
SIGNATURES: dict[str, tuple[str, int]] = {
    "alpha": ("alpha alpha", 8),
    "beta": ("beta beta", 8),
    "gamma": ("gamma gamma", 8),
    "delta16": ("delta delta", 16),
}


@pytest.fixture(scope="session")
def signature_adapters(
    tiny_model_dir: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """version -> PEFT adapter folder of a LoRA that makes the tiny model answer its
    signature (`SIGNATURES`) to any chat-mode prompt; see tests/signature_adapters.py.

    Trained once (about 15 s each) and kept in the pytest cache between sessions;
    under `-p no:cacheprovider`, in a temporary folder.
    """
    from tests.signature_adapters import signature_adapter_set

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("signature-adapters") if cache else tmp_path_factory.mktemp("sig")
    return signature_adapter_set(
        tiny_model_dir,
        Path(root),
        {version: signature for version, (signature, _) in SIGNATURES.items()},
        ranks={version: rank for version, (_, rank) in SIGNATURES.items()},
    )
