"""API tests through the real app and a real in-process vLLM engine (tiny model).

The tiny model's words are noise, so these tests check mechanics, never wording.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from service.engine import Engine, GenerationRequest
from service.guard import clean_fast_response
from service.schemas import MAX_MAIN_RESPONSE_CHARS, MAX_PIKA_TURN_CHARS, MAX_USER_TURN_CHARS
from tests.conftest import engine_settings, serve

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

GOOD = {
    "personality": "cheerful",
    "pika_turn": "What did you eat for breakfast?",
    "user_turn": "I ate pho with my dad",
    "main_response": "Pho is a noodle soup. Can you say noodle soup?",
}


async def test_fast_response_answers_from_the_model(engine: Engine, tiny_model_dir: Path) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        response = await client.post("/fast-response", json={**GOOD, "request_id": "req-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "fast_response", "source", "personality", "adapter_version", "latency_ms", "request_id"
    }  # fmt: skip
    assert body["personality"] == "cheerful"
    assert body["request_id"] == "req-1"
    assert body["adapter_version"] is None
    assert body["latency_ms"] > 0
    assert body["source"] in {"model", "fallback"}
    if body["source"] == "model":  # the tiny model's noise may fail the guard; then a fallback
        assert clean_fast_response(body["fast_response"], 12).text == body["fast_response"]
    else:
        assert body["fast_response"] in {"Ooh, let me think!", "Hmm, good one!"}


async def test_request_id_is_generated_when_absent(engine: Engine, tiny_model_dir: Path) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        first = (await client.post("/fast-response", json=GOOD)).json()["request_id"]
        second = (await client.post("/fast-response", json=GOOD)).json()["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


async def test_unknown_personality_is_404(engine: Engine, tiny_model_dir: Path) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        response = await client.post("/fast-response", json={**GOOD, "personality": "grumpy"})
    assert response.status_code == 404
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "personality"]
    assert detail["type"] == "unknown_personality"
    assert "grumpy" not in detail["msg"], "the input must not be echoed back"
    assert "cheerful" in detail["msg"]


BAD_FIELDS = [
    ({"user_turn": ""}, "user_turn"),
    ({"user_turn": "   \n\t "}, "user_turn"),
    ({"user_turn": "a" * (MAX_USER_TURN_CHARS + 1)}, "user_turn"),
    ({"pika_turn": ""}, "pika_turn"),
    ({"pika_turn": "  "}, "pika_turn"),
    ({"pika_turn": "a" * (MAX_PIKA_TURN_CHARS + 1)}, "pika_turn"),
    ({"main_response": " "}, "main_response"),
    ({"main_response": "a" * (MAX_MAIN_RESPONSE_CHARS + 1)}, "main_response"),
    ({"user_turn": "\u200b\u200b"}, "user_turn"),
    ({"user_turn": "\x00"}, "user_turn"),
    ({"user_turn": 42}, "user_turn"),
    ({"user_turn": ["hi"]}, "user_turn"),
    ({"personality": None}, "personality"),
    ({"session_id": "has spaces"}, "session_id"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"mood": "happy"}, "mood"),
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS)
async def test_bad_field_is_422_naming_it(
    engine: Engine, tiny_model_dir: Path, change: dict[str, object], field: str
) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        response = await client.post("/fast-response", json={**GOOD, **change})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(err["loc"][:2] == ["body", field] for err in detail), detail
    assert "input" not in detail[0], "the input must not be echoed back"


async def test_missing_user_turn_is_422(engine: Engine, tiny_model_dir: Path) -> None:
    body = {k: v for k, v in GOOD.items() if k != "user_turn"}
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        response = await client.post("/fast-response", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "user_turn"]


@pytest.mark.parametrize(
    "content",
    [b'{"personality": "cheerful", "user_turn": "caf\xe9"}', b"\xff\xfe{}", b"{not json"],
)
async def test_undecodable_body_is_422_naming_body(
    engine: Engine, tiny_model_dir: Path, content: bytes
) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        response = await client.post(
            "/fast-response", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


async def test_body_over_64_kb_is_refused(engine: Engine, tiny_model_dir: Path) -> None:
    big = json.dumps({**GOOD, "user_turn": "a" * (65 * 1024)}).encode()
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        sized = await client.post(
            "/fast-response", content=big, headers={"content-type": "application/json"}
        )

        async def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        chunked = await client.post(
            "/fast-response", content=chunks(), headers={"content-type": "application/json"}
        )
        still_fine = await client.post("/fast-response", json=GOOD)
    for response in (sized, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["detail"][0]["loc"] == ["body"]
    assert still_fine.status_code == 200


async def test_health_readiness_and_personalities(engine: Engine, tiny_model_dir: Path) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        listed = await client.get("/personalities")
    assert health.json() == {"status": "ok", "checks": {}}
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"engine": "ok"}
    names = [p["name"] for p in listed.json()["personalities"]]
    assert names == ["cheerful", "longwinded"]


async def test_readyz_reports_an_unreachable_redis_as_degraded_and_stays_ready(
    engine: Engine, tiny_model_dir: Path
) -> None:
    """Redis is optional (issue 8): without it the gateway answers, without session memory
    or the response cache, and stays ready."""
    settings = engine_settings(
        tiny_model_dir,
        redis_url="redis://127.0.0.1:1/0",
        session_memory_turns=5,
        response_cache=True,
    )
    async with serve(settings, engine) as client:
        ready = await client.get("/readyz")
        answer = await client.post("/fast-response", json={**GOOD, "session_id": "s1"})
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["engine"] == "ok"
    assert ready.json()["checks"]["redis"].startswith("degraded: "), ready.json()
    assert answer.status_code == 200, answer.text
    assert answer.json()["source"] in {"model", "fallback"}


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition; 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_by_personality_and_source(
    engine: Engine, tiny_model_dir: Path
) -> None:
    async with serve(engine_settings(tiny_model_dir), engine) as client:
        sources = [(await client.post("/fast-response", json=GOOD)).json()["source"] for _ in "abc"]
        text = (await client.get("/metrics")).text
    for source in set(sources):
        count = _metric(
            text, "fastresp_request_duration_seconds_count", personality="cheerful", source=source
        )
        assert count == sources.count(source)
    # buckets are dense around the 100 ms goal
    assert 'le="0.09"' in text and 'le="0.1"' in text and 'le="0.11"' in text
    assert "vllm:num_requests_running" in text


async def test_deadline_gives_fallback_and_aborts_the_engine_request(
    engine: Engine, tiny_model_dir: Path
) -> None:
    deadline_ms = 150
    settings = engine_settings(tiny_model_dir, deadline_ms=deadline_ms)
    async with serve(settings, engine) as client:
        # Without a deadline this personality generates up to 256 tokens (seconds on the CPU).
        started = time.perf_counter()
        response = await client.post("/fast-response", json={**GOOD, "personality": "longwinded"})
        wall_ms = (time.perf_counter() - started) * 1000
        body = response.json()
        assert response.status_code == 200
        assert body["source"] == "fallback"
        assert body["fast_response"] == "Let me think about that."
        print(
            f"deadline {deadline_ms} ms: server latency {body['latency_ms']} ms, wall {wall_ms:.1f}"
        )
        assert body["latency_ms"] <= deadline_ms + 50
        # The engine request was aborted, not left running in vLLM.
        for _ in range(100):
            text = (await client.get("/metrics")).text
            running = _metric(text, "vllm:num_requests_running")
            if engine.num_unfinished_requests() == 0 and running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.num_unfinished_requests() == 0
        assert _metric(text, "vllm:num_requests_running") == 0
        assert _metric(text, "fastresp_fallbacks_total", reason="deadline") == 1


async def test_a_long_generation_finishes_without_a_deadline(
    engine: Engine, tiny_model_dir: Path
) -> None:
    """The control for the deadline test: the same request, given time, runs past 150 ms."""
    request = GenerationRequest(
        prompt="Child said: hello", max_tokens=256, temperature=0.0, top_p=1.0, stop=()
    )
    generation = await engine.generate("control-1", request)
    assert generation.output_tokens > 20
