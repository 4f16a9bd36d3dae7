"""Session memory (anti-repetition), the response cache, and a Redis outage (issue 8).

Unit tests of `service.session_state` first (the in-memory store alone; the Redis ones on a
real redis-server), then the gateway on the real tiny vLLM engine. There the oracle is the
signature adapters (tests/signature_adapters.py): an adapter always says its own string,
so "alpha alpha" twice in one session is exactly the repeat the memory must prevent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from service.engine import Engine
from service.metrics import Metrics
from service.session_state import (
    InMemorySessionMemory,
    RedisSessionMemory,
    ResponseCache,
    cache_key,
    repeats,
)
from tests.conftest import RedisServer, engine_settings, serve
from tests.swap_scenarios import TOKEN, put_adapter

#: The test personality's fallback phrases: four different openers.
PHRASES = ["Hm, I see.", "Okay, thank you.", "Mm-hm, yes.", "Right, got it."]
TURN = {"pika_turn": "What did you eat today?", "user_turn": "I ate pho with my dad"}


# --- repeats: examples of what a listener hears as "the same again" ---


@pytest.mark.parametrize(
    ("candidate", "recent", "expected"),
    [
        ("Great try!", ["great try."], True),  # same words, other case and punctuation
        ("Great try, Anna!", ["Great try!"], True),  # same opener
        ("Ooh, nice one!", ["Wow!", "Ooh, nice try!"], True),  # any of the recent ones
        ("Yes!", ["yes"], True),
        ("Wow, an elephant!", ["Wow, so big!"], False),  # one shared word only
        ("I see.", ["I hear you."], False),
        ("Hmm.", [], False),
        ("\uff2f\uff4f\uff48, nice one!", ["Ooh, nice try!"], True),  # full-width letters
    ],
)
def test_repeats(candidate: str, recent: list[str], expected: bool) -> None:
    assert repeats(candidate, recent) is expected


def test_cache_key_covers_version_and_ignores_case_and_punctuation() -> None:
    key = cache_key("calm", "v1", "What's 2+2?", "Four!", None)
    assert key == cache_key("calm", "v1", "  what\u2019s 2+2", "four", None)
    # Emoji are not punctuation: another animal is another turn.
    assert cache_key("calm", "v1", None, "Red 🦄!", None) != cache_key(
        "calm", "v1", None, "Red 🐶!", None
    )
    assert key != cache_key("calm", "v1", "What's 2+2?", "Four!", None, context="other model")
    # Punctuation inside a turn is kept: these are different questions.
    for a, b in [("How much is 1.5 + 1.5?", "How much is 15 + 15?"), ("20-5", "205")]:
        assert cache_key("calm", "v1", a, "3", None) != cache_key("calm", "v1", b, "3", None)
    # ... and at the ends, a sign, a decimal point or a face is part of the answer.
    for a, b in [("-5", "5"), (".5", "5"), ("I am sad :(", "I am sad :)")]:
        assert cache_key("calm", "v1", "2 minus 7?", a, None) != cache_key(
            "calm", "v1", "2 minus 7?", b, None
        )
    assert key != cache_key("calm", "v2", "What's 2+2?", "Four!", None)
    assert key != cache_key("calm", None, "What's 2+2?", "Four!", None)
    assert key != cache_key("cheerful", "v1", "What's 2+2?", "Four!", None)
    assert key != cache_key("calm", "v1", "What's 2+2?", "Four!", "Yes, four.")
    assert len(key) == 64 and "four" not in key


@pytest.mark.asyncio(loop_scope="session")
async def test_in_memory_memory_keeps_the_last_turns_newest_first() -> None:
    memory = InMemorySessionMemory(turns=3, ttl_s=60, max_sessions=2)
    for text in ["a", "b", "c", "d"]:
        await memory.remember("s1", text)
    assert await memory.recent("s1") == ["d", "c", "b"]
    assert await memory.recent("other") == []
    await memory.remember("s2", "x")
    await memory.remember("s3", "y")  # over max_sessions: s1, the least recent, goes
    assert await memory.recent("s1") == []
    assert await memory.recent("s3") == ["y"]


@pytest.mark.asyncio(loop_scope="session")
async def test_in_memory_memory_forgets_after_its_ttl() -> None:
    now = [1000.0]
    memory = InMemorySessionMemory(turns=5, ttl_s=60, timer=lambda: now[0])
    await memory.remember("s", "a")
    now[0] += 59
    await memory.remember("s", "b")  # the TTL counts from the latest answer
    now[0] += 59
    assert await memory.recent("s") == ["b", "a"]
    now[0] += 2
    assert await memory.recent("s") == []


@pytest.mark.asyncio(loop_scope="session")
async def test_redis_memory_and_cache_on_a_real_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    try:
        memory = RedisSessionMemory(client, turns=5, ttl_s=600, prefix=prefix)
        for i in range(7):
            await memory.remember("s1", f"answer {i}")
        assert await memory.recent("s1") == [f"answer {i}" for i in (6, 5, 4, 3, 2)]
        assert 0 < await client.ttl(f"{prefix}:session:s1:recent") <= 600

        cache = ResponseCache(client, size=3, ttl_s=900, prefix=prefix)
        key = cache_key("calm", "v1", None, "I like red", None)
        assert await cache.get(key) == []
        # Concurrent adds (several gateways) never store more than `size`.
        await asyncio.gather(*(cache.add(key, f"Red, lovely {i}.") for i in range(20)))
        stored = await cache.get(key)
        assert stored is not None and len(stored) == 3
        await cache.add(key, stored[0])  # already there: still 3
        assert await cache.get(key) == stored
        assert 0 < await client.ttl(f"{prefix}:cache:{key}") <= 900
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        assert not any("red" in k.lower() for k in keys), keys  # no child text in keys
    finally:
        await client.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_redis_means_nothing_remembered_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.session_state import redis_client
    from service.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=200)
    client = redis_client(settings)
    metrics = Metrics()
    try:
        memory = RedisSessionMemory(client, turns=5, ttl_s=60, metrics=metrics)
        cache = ResponseCache(client, size=3, ttl_s=60, metrics=metrics)
        await memory.remember("s", "a")  # never raises
        assert await memory.recent("s") == []
        assert await cache.get("k") is None
        await cache.add("k", "a")
        exposition = metrics.exposition().decode()
        for operation in ("session_write", "session_read", "cache_read", "cache_write"):
            assert f'fastresp_redis_errors_total{{operation="{operation}"}} 1.0' in exposition
        # Logged once per store and 10 s, not once per call (a flood at 50 RPS).
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
    finally:
        await client.aclose()
        metrics.close()


# --- The gateway on the tiny engine ---


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "p.yaml"
    sampling = '{max_tokens: 12, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}'
    path.write_text(
        "personalities:\n  p1:\n    description: d\n    style: s\n    max_words: 12\n"
        f"    sampling: {sampling}\n    fallback_phrases: {json.dumps(PHRASES)}\n"
    )
    return path


def gateway_settings(model: Path, manifest: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "personalities_file": manifest,
        "admin_token": TOKEN,
        "warm_up": False,
        "deadline_ms": 30_000,  # a deadline fallback would look like an anti-repeat one
    }
    return engine_settings(model, **(values | overrides))


async def ask(client: httpx.AsyncClient, session: str, **turn: str) -> dict[str, Any]:
    body = {"personality": "p1", "session_id": session, **TURN, **turn}
    response = await client.post("/fast-response", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of the app's metrics, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_a_session_never_hears_its_last_five_answers_again(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
) -> None:
    """The adapter can only say "alpha alpha": the session's first answer is the model's;
    the next four are its four unused fallback phrases (reason `repeat`), then the one said
    longest ago. Another session is unaffected."""
    settings = gateway_settings(tiny_model_dir, manifest, session_memory_turns=5)
    async with serve(settings, engine) as client:
        assert (await put_adapter(client, "p1", signature_adapters["alpha"])).status_code == 200
        answers = [await ask(client, "s1") for _ in range(6)]
        other = await ask(client, "s2")
        metrics = (await client.get("/metrics")).text
    texts = [a["fast_response"] for a in answers]
    assert [a["source"] for a in answers] == ["model"] + ["fallback"] * 5, answers
    assert texts[0] == "alpha alpha"
    assert sorted(texts[1:5]) == sorted(PHRASES), texts  # each phrase once, no repeat
    assert texts[5] == texts[1], texts  # all phrases were recent: the oldest one
    assert (other["source"], other["fast_response"]) == ("model", "alpha alpha")
    assert sample(metrics, "fastresp_fallbacks_total", reason="repeat") == 5


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_the_response_cache_serves_other_sessions_and_follows_the_version(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    redis_url: str,
) -> None:
    prefix = f"cache-{uuid.uuid4().hex[:8]}"
    settings = gateway_settings(
        tiny_model_dir, manifest, redis_url=redis_url, redis_key_prefix=prefix,
        session_memory_turns=5, response_cache=True,
    )  # fmt: skip
    async with serve(settings, engine) as client:
        assert (await put_adapter(client, "p1", signature_adapters["alpha"])).status_code == 200
        first = await ask(client, "a")
        # Another child, the same turn written differently: the stored answer.
        hit = await ask(client, "b", user_turn="i ate PHO with my dad!")
        # The same child again: the only stored answer is its own last one; the model's
        # answer repeats it too, so a fallback phrase.
        again = await ask(client, "b")
        stream = await client.post(
            "/fast-response/stream", json={"personality": "p1", "session_id": "c", **TURN}
        )
        # A new adapter version: a new key, so the model answers, and then the cache.
        assert (await put_adapter(client, "p1", signature_adapters["beta"])).status_code == 200
        fresh = await ask(client, "d")
        fresh_hit = await ask(client, "e")
        # A turn with the child's name is never cached, not even hashed: two models.
        named = [await ask(client, s, user_turn="my name is Zoe Park") for s in ("f", "g")]
        metrics = (await client.get("/metrics")).text
    assert (first["source"], first["fast_response"]) == ("model", "alpha alpha")
    assert (hit["source"], hit["fast_response"]) == ("cache", "alpha alpha")
    assert again["source"] == "fallback" and again["fast_response"] in PHRASES
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert events[0] == {"text": "alpha alpha"}, events
    assert (events[-1]["source"], events[-1]["fast_response"]) == ("cache", "alpha alpha")
    assert (fresh["source"], fresh["fast_response"]) == ("model", "beta beta")
    assert (fresh_hit["source"], fresh_hit["fast_response"]) == ("cache", "beta beta")
    assert [a["source"] for a in named] == ["model", "model"], named
    assert sample(metrics, "fastresp_cache_lookups_total", result="hit") == 3
    assert sample(metrics, "fastresp_cache_lookups_total", result="miss") == 3
    check = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await check.lrange(f"{prefix}:session:b:recent", 0, -1) == [
            again["fast_response"],
            "alpha alpha",
        ]
        versions = [await check.smembers(k) async for k in check.scan_iter(f"{prefix}:cache:*")]
        assert sorted(map(sorted, versions)) == [["alpha alpha"], ["beta beta"]]
    finally:
        await check.aclose()


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_redis_killed_during_load_and_used_again_when_back(
    engine: Engine, tiny_model_dir: Path, manifest: Path, redis_server: RedisServer
) -> None:
    """Issue 8, part 4: requests keep succeeding while Redis is dead, /readyz says
    degraded but ready, and the same gateway uses Redis again once it is back."""
    settings = gateway_settings(
        tiny_model_dir, manifest, redis_url=redis_server.url, session_memory_turns=5,
        response_cache=True, deadline_ms=10_000,
    )  # fmt: skip
    statuses: list[int] = []
    eight_answered = asyncio.Event()
    async with serve(settings, engine) as client:

        async def load(worker: int, count: int) -> None:
            for i in range(count):
                body = {"personality": "p1", "session_id": f"w{worker}", **TURN}
                body["user_turn"] = f"I ate {i} apples"
                statuses.append((await client.post("/fast-response", json=body)).status_code)
                if len(statuses) >= 8:
                    eight_answered.set()

        loaders = [asyncio.create_task(load(w, 12)) for w in range(4)]
        await eight_answered.wait()
        redis_server.kill()
        await asyncio.gather(*loaders)
        down = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text
        redis_server.start()
        back = await client.get("/readyz")
        await ask(client, "after-restart")
    assert statuses == [200] * 48, statuses
    assert down.status_code == 200, down.text
    assert down.json()["checks"]["redis"].startswith("degraded: "), down.json()
    assert sample(metrics, "fastresp_redis_errors_total", operation="session_read") > 0
    assert back.status_code == 200 and back.json()["checks"]["redis"] == "ok", back.json()
    check = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:  # the restarted Redis is empty: this key was written after it came back
        assert await check.llen("fastresp:session:after-restart:recent") == 1
    finally:
        await check.aclose()


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_weights_replaced_in_place_are_not_answered_from_the_cache(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """The same folder and version, new weights loaded again: new cache keys."""
    folder = tmp_path / "adapter"
    shutil.copytree(signature_adapters["alpha"], folder, copy_function=shutil.copyfile)
    settings = gateway_settings(
        tiny_model_dir, manifest, redis_url=redis_url, redis_key_prefix=f"w-{uuid.uuid4().hex}",
        session_memory_turns=5, response_cache=True,
    )  # fmt: skip
    async with serve(settings, engine) as client:
        assert (await put_adapter(client, "p1", folder, "v7")).status_code == 200
        before = await ask(client, "a")
        shutil.rmtree(folder)
        shutil.copytree(signature_adapters["beta"], folder, copy_function=shutil.copyfile)
        assert (await put_adapter(client, "p1", folder, "v7")).status_code == 200
        after = await ask(client, "b")
    assert (before["source"], before["fast_response"]) == ("model", "alpha alpha")
    assert (after["source"], after["fast_response"]) == ("model", "beta beta"), after
