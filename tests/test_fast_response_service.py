"""Unit tests of FastResponseService's fallback rules, with a scripted fake engine.

The fake honours the Engine protocol; the real engine is covered in test_api.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import httpx
import pytest

from service.app import create_app
from service.engine import AdapterRef, Engine, GenerationRequest, GenerationResult
from service.errors import EngineError, EngineUnavailable
from service.fast_response import FastResponseService
from service.metrics import Metrics
from service.personalities import Personality
from service.prompts import ChatTokenizer
from service.schemas import FastResponseRequest
from service.settings import Settings
from tests.conftest import TEST_DATA

PERSONALITY = Personality(
    name="cheerful", description="d", style="s", max_words=12, fallback_phrases=("Hmm!", "Oh!")
)


class ScriptedEngine:
    """Answers each generate() with the next scripted text, or raises it if an exception."""

    device = "cpu"

    def __init__(self, script: Sequence[str | Exception], delay_s: float = 0.0) -> None:
        self.script = list(script)
        self.delay_s = delay_s
        self.request_ids: list[str] = []

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        self.request_ids.append(request_id)
        await asyncio.sleep(self.delay_s)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return GenerationResult(step, output_tokens=3, finish_reason="stop", ttft_s=0.0)

    async def check_health(self) -> None: ...
    def get_tokenizer(self) -> ChatTokenizer:
        raise NotImplementedError

    async def add_adapter(self, adapter: AdapterRef) -> None: ...
    async def remove_adapter(self, adapter: AdapterRef) -> None: ...
    def num_unfinished_requests(self) -> int:
        return 0

    async def close(self) -> None: ...


class NoAdapters:
    """Every personality on the base model (the AdapterLookup of FastResponseService)."""

    def active(self, name: str) -> None:
        return None

    @contextmanager
    def lease(self, name: str, session: str | None = None) -> Iterator[None]:
        yield None


def _service(
    engine: ScriptedEngine, metrics: Metrics, deadline_s: float = 1.0
) -> FastResponseService:
    return FastResponseService(
        engine, {"cheerful": PERSONALITY}, NoAdapters(), metrics, deadline_s, "few_shot"
    )


REQUEST = FastResponseRequest(personality="cheerful", user_turn="Red!", request_id="r1")


def _fallbacks(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "fastresp_fallbacks_total",
        {"personality": "cheerful", "reason": reason, "adapter_version": "base"},
    )
    return value or 0.0


@pytest.mark.asyncio
async def test_a_guard_rejection_is_sampled_again() -> None:
    engine, metrics = ScriptedEngine(["  ...  ", "Ooh, red!"]), Metrics()
    answer = await _service(engine, metrics).respond(REQUEST)
    assert (answer.source, answer.fast_response) == ("model", "Ooh, red!")
    first, retry = engine.request_ids
    assert first.startswith("r1-0-") and retry.startswith("r1-1-")
    assert _fallbacks(metrics, "guard") == 0


@pytest.mark.asyncio
async def test_two_guard_rejections_give_a_counted_fallback() -> None:
    engine, metrics = ScriptedEngine(["", "!!!"]), Metrics()
    answer = await _service(engine, metrics).respond(REQUEST)
    assert (answer.source, answer.fast_response) == ("fallback", "Hmm!")
    assert _fallbacks(metrics, "guard") == 1


@pytest.mark.asyncio
async def test_an_engine_error_gives_a_counted_fallback() -> None:
    engine, metrics = ScriptedEngine([EngineError("boom")]), Metrics()
    answer = await _service(engine, metrics).respond(REQUEST)
    assert answer.source == "fallback"
    assert _fallbacks(metrics, "engine_error") == 1


@pytest.mark.asyncio
async def test_fallback_phrases_rotate() -> None:
    engine, metrics = ScriptedEngine([EngineError("a"), EngineError("b")]), Metrics()
    service = _service(engine, metrics)
    phrases = [(await service.respond(REQUEST)).fast_response for _ in range(2)]
    assert phrases == ["Hmm!", "Oh!"]


@pytest.mark.asyncio
async def test_a_retry_past_the_deadline_is_a_deadline_fallback() -> None:
    engine, metrics = ScriptedEngine(["", "Ooh!"], delay_s=0.06), Metrics()
    answer = await _service(engine, metrics, deadline_s=0.1).respond(REQUEST)
    assert answer.source == "fallback"
    assert _fallbacks(metrics, "deadline") == 1


class DeadEngine(ScriptedEngine):
    """An engine whose core has died: every health check fails."""

    async def check_health(self) -> None:
        raise EngineUnavailable("vLLM engine is dead")


@pytest.mark.asyncio
async def test_healthz_and_readyz_fail_when_the_engine_is_dead(tmp_path: Path) -> None:
    settings = Settings(personalities_file=TEST_DATA / "personalities.yaml", warm_up=False)
    app = create_app(settings, engine=cast(Engine, DeadEngine([])))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
    assert health.status_code == ready.status_code == 503
    assert health.json()["checks"]["engine"] == "vLLM engine is dead"
