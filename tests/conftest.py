"""Shared fixtures: the real data folder, the tiny model, one in-process vLLM engine.

The engine is started once per test session (about 25 s on two cores) in the
session's event loop, and every API test builds its own app around it with
`create_app(settings, engine=...)`, so each test gets fresh metrics.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.app import create_app
from service.engine import Engine
from service.settings import Settings

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
