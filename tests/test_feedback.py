"""Satisfaction feedback (`POST /feedback`, issue 10 part 1): the stores on real SQLite
and a real Redis, the rating histogram, and the round trip through the real gateway on
the tiny model.

The tiny model's words are noise; these tests check the bookkeeping, never wording.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from service.engine import Engine
from service.feedback import (
    REFRESH_TIMEOUT_S,
    FeedbackService,
    FeedbackStore,
    RedisFeedbackStore,
    ServedRecord,
    SQLiteFeedbackStore,
    UnknownRequestId,
)
from service.metrics import Metrics
from service.schemas import MAX_FEEDBACK_COMMENT_CHARS
from tests.conftest import REPO_ROOT, RedisServer, engine_settings, serve

GOOD = {
    "personality": "cheerful",
    "pika_turn": "What did you eat for breakfast?",
    "user_turn": "I ate pho with my dad",
}

#: The rating histogram's name in the exposition.
RATING = "fastresp_feedback_rating"


def served(
    request_id: str, personality: str = "cheerful", version: str | None = None
) -> ServedRecord:
    return ServedRecord(request_id, personality, version, "model", served_at=time.time())


def histogram(text: str, **labels: str) -> dict[str, float]:
    """{sample suffix or le: value} of `fastresp_feedback_rating` with `labels` in an
    exposition: `count`, `sum` and each bucket's upper bound."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != RATING:
            continue
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            if sample.name.endswith("_bucket"):
                found[sample.labels["le"]] = sample.value
            else:
                found[sample.name.removeprefix(RATING + "_")] = sample.value
    return found


def rating_labels(text: str) -> set[tuple[tuple[str, str], ...]]:
    """Every label set of the rating histogram's samples."""
    return {
        tuple(sorted(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        if family.name == RATING
        for sample in family.samples
    }


# ---- the stores, SQLite and Redis ------------------------------------------------------


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[FeedbackStore]:
    """Each store with a 7-day TTL: SQLite in a fresh file, Redis under a fresh prefix."""
    opened: FeedbackStore
    if request.param == "sqlite":
        opened = await SQLiteFeedbackStore.open(tmp_path / "feedback.sqlite3", 7 * 86400)
    else:
        prefix = f"test-{uuid.uuid4().hex[:8]}"
        opened = RedisFeedbackStore.from_url(redis_url, 7 * 86400, prefix=prefix)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_store_keeps_a_rating_and_counts_it(store: FeedbackStore) -> None:
    await store.record_served(served("r1", version="v2"))
    await store.record_served(served("r2"))
    first = await store.rate("r1", 4, "She laughed.")
    assert (first.rating, first.comment, first.replaced) == (4, "She laughed.", None)
    assert first.served.adapter_version == "v2"
    await store.rate("r2", 5, "   ")

    kept = await store.get_rating("r1")
    assert kept is not None
    assert (kept.rating, kept.comment, kept.served.personality) == (4, "She laughed.", "cheerful")
    blank = await store.get_rating("r2")
    assert blank is not None and blank.comment is None, "a blank comment is stored as none"
    assert await store.rating_counts() == {("cheerful", "v2", 4): 1, ("cheerful", None, 5): 1}


@pytest.mark.asyncio(loop_scope="session")
async def test_store_duplicate_rating_replaces(store: FeedbackStore) -> None:
    await store.record_served(served("r1"))
    await store.rate("r1", 5, None)
    again = await store.rate("r1", 2, "on second thought")
    assert again.replaced == 5
    assert await store.rating_counts() == {("cheerful", None, 2): 1}
    kept = await store.get_rating("r1")
    assert kept is not None and kept.rating == 2


@pytest.mark.asyncio(loop_scope="session")
async def test_store_refuses_unknown_ids_and_bad_ratings(store: FeedbackStore) -> None:
    with pytest.raises(UnknownRequestId) as caught:
        await store.rate("never-served", 3, None)
    assert caught.value.loc == ("body", "request_id")
    assert "never-served" not in caught.value.message, "the input is not echoed"
    await store.record_served(served("r1"))
    for bad in (0, 6, True):
        with pytest.raises(ValueError, match="rating"):
            await store.rate("r1", bad, None)
    assert await store.rating_counts() == {}


@pytest.mark.asyncio(loop_scope="session")
async def test_store_a_request_id_served_again_is_a_new_request(store: FeedbackStore) -> None:
    """Ids are the caller's: an id served twice is two requests, each rated once."""
    await store.record_served(ServedRecord("dup", "cheerful", "v1", "model", served_at=time.time()))
    await store.rate("dup", 5, None)
    await store.record_served(
        ServedRecord("dup", "cheerful", "v2", "model", served_at=time.time() + 1)
    )
    second = await store.rate("dup", 3, None)
    assert second.replaced is None and second.served.adapter_version == "v2"
    assert await store.rating_counts() == {("cheerful", "v1", 5): 1, ("cheerful", "v2", 3): 1}


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_store_expired_id_is_unknown(kind: str, tmp_path: Path, redis_url: str) -> None:
    ttl_s = 0.3
    store: FeedbackStore
    if kind == "sqlite":
        store = await SQLiteFeedbackStore.open(tmp_path / "feedback.sqlite3", ttl_s)
    else:
        store = RedisFeedbackStore.from_url(redis_url, ttl_s, prefix=f"exp-{uuid.uuid4().hex}")
    try:
        # served now: the TTL counts from the time the record is stored
        await store.record_served(ServedRecord.of(_response("fresh")))
        await store.record_served(ServedRecord.of(_response("stale")))
        await store.rate("fresh", 4, None)  # within the TTL
        await asyncio.sleep(ttl_s + 0.7)
        for request_id in ("stale", "fresh"):
            with pytest.raises(UnknownRequestId):
                await store.rate(request_id, 1, None)
        assert await store.rating_counts() == {("cheerful", None, 4): 1}
    finally:
        await store.close()


def _response(request_id: str) -> Any:
    from service.schemas import FastResponseResponse

    return FastResponseResponse(
        fast_response="Yay!",
        source="model",
        personality="cheerful",
        adapter_version=None,
        latency_ms=1.0,
        request_id=request_id,
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_redis_stream_is_bounded_and_the_histogram_is_not(redis_url: str) -> None:
    prefix = f"bound-{uuid.uuid4().hex[:8]}"
    store = RedisFeedbackStore.from_url(redis_url, 600, prefix=prefix, stream_maxlen=10)
    client = redis.Redis.from_url(redis_url)
    try:
        for i in range(400):
            await store.record_served(served(f"r{i}"))
            await store.rate(f"r{i}", 1 + i % 5, None)
        await store.rate("r0", 5, "changed")  # replaces 1
        length = await client.xlen(store.stream_key)
        assert length < 400, "MAXLEN ~ trims the stream"
        counts = await store.rating_counts()
        assert sum(counts.values()) == 400
        assert counts[("cheerful", None, 5)] == 81 and counts[("cheerful", None, 1)] == 79
        newest: Any = await client.xrevrange(store.stream_key, count=1)
        (_, last), *_ = newest
        fields = {k.decode(): v.decode() for k, v in last.items()}
        assert fields["request_id"] == "r0"
        assert (fields["rating"], fields["replaces"], fields["comment"]) == ("5", "1", "changed")
        ttl_ms = await client.pttl(store.served_prefix + "r0")
        assert 0 < ttl_ms <= 600_000, "served records expire"
    finally:
        await client.aclose()
        await store.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_redis_down_is_feedback_unavailable(redis_server: RedisServer) -> None:
    from service.feedback import FeedbackUnavailable

    store = RedisFeedbackStore.from_url(redis_server.url, 600)
    try:
        await store.record_served(served("r1"))
        redis_server.kill()
        with pytest.raises(FeedbackUnavailable):
            await store.rate("r1", 3, None)
        with pytest.raises(FeedbackUnavailable):
            await store.record_served(served("r2"))
    finally:
        await store.close()


#: Longest a call that must not wait for a locked store may take before the test fails
#: instead of hanging; seconds (the calls take milliseconds).
HANG_GUARD_S = 60.0

#: A phone number in a comment, and the digits that must not be stored.
PHONE_COMMENT = ("She loved it, call me at (415) 555-0134", "555-0134")


@pytest.mark.asyncio(loop_scope="session")
async def test_store_keeps_comments_redacted(store: FeedbackStore) -> None:
    comment, digits = PHONE_COMMENT
    await store.record_served(served("r1"))
    stored = await store.rate("r1", 4, comment)
    kept = await store.get_rating("r1")
    assert kept is not None and kept.comment is not None
    for text in (stored.comment, kept.comment):
        assert text is not None and digits not in text and "[PHONE]" in text
        assert text.startswith("She loved it"), "the rest of the comment is kept"


@pytest.mark.asyncio(loop_scope="session")
async def test_sqlite_file_holds_no_phone_number(tmp_path: Path) -> None:
    comment, digits = PHONE_COMMENT
    store = await SQLiteFeedbackStore.open(tmp_path / "feedback.sqlite3", 600)
    try:
        await store.record_served(served("r1"))
        await store.rate("r1", 5, comment)
        await store.rate("r1", 4, comment + " again")  # the replaced row too
    finally:
        await store.close()
    assert _files_holding(tmp_path, digits) == []
    with sqlite3.connect(tmp_path / "feedback.sqlite3") as db:
        assert db.execute("SELECT comment FROM ratings").fetchall() == [
            ("She loved it, call me at [PHONE] again",)
        ]


def _files_holding(folder: Path, text: str) -> list[Path]:
    """The feedback database's files (the database, any WAL left over) holding `text`."""
    files = list(folder.glob("feedback.sqlite3*"))
    assert files, "no database written"
    return [path for path in files if text.encode() in path.read_bytes()]


@pytest.mark.asyncio(loop_scope="session")
async def test_locked_sqlite_file_stalls_neither_the_default_pool_nor_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the write lock: answers' records are dropped (with a
    warning) instead of filling the event loop's default thread pool, an unrelated
    `asyncio.to_thread` call runs while a rating still waits for the lock, and a scrape
    gives up after `REFRESH_TIMEOUT_S` and keeps the last known figures."""
    path = tmp_path / "feedback.sqlite3"
    metrics = Metrics()
    service = FeedbackService(await SQLiteFeedbackStore.open(path, 600), metrics)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await service.remember(_response("before"))
        await service.settle()  # stored in the background
        await service.store.rate("before", 3, None)
        await service.refresh_metrics()
        assert histogram(metrics.exposition().decode())["count"] == 1

        other.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.WARNING, logger="service.feedback"):
            for i in range(40):
                await service.remember(_response(f"locked-{i}"))
            # the store's thread now waits (busy timeout) on the lock for this rating
            rating = asyncio.create_task(service.store.rate("before", 5, None))
            await asyncio.sleep(0.1)
            # (a 60 s guard turns the stall seen before, minutes, into a failure)
            await asyncio.wait_for(asyncio.to_thread(lambda: None), HANG_GUARD_S)
            assert not rating.done(), "to_thread waited for the feedback store"
            await asyncio.wait_for(service.refresh_metrics(), HANG_GUARD_S)
            assert not rating.done(), "the scrape waited for the feedback store"
        assert histogram(metrics.exposition().decode())["count"] == 1, "last figures kept"
        assert "could not be stored" in caplog.text
        assert f"no answer within {REFRESH_TIMEOUT_S:g} s" in caplog.text
        other.execute("ROLLBACK")
        await asyncio.gather(rating, return_exceptions=True)
        for request_id in ("locked-0", "locked-39"):  # dropped, so they cannot be rated
            with pytest.raises(UnknownRequestId):
                await service.store.rate(request_id, 4, None)
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
        await service.close()


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from service.feedback import SQLiteFeedbackStore

    async def main(path, rating, n):
        store = await SQLiteFeedbackStore.open(Path(path), 600)
        try:
            for i in range(n):
                await store.rate(f"r{i}", rating, None)
        finally:
            await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


@pytest.mark.asyncio(loop_scope="session")
async def test_sqlite_shared_by_worker_processes_counts_each_request_once(
    tmp_path: Path,
) -> None:
    """Two processes (as two gateway workers) rate the same 150 requests at once, each
    with its own rating: every request ends with one rating, counted once."""
    path = tmp_path / "feedback.sqlite3"
    store = await SQLiteFeedbackStore.open(path, 600)
    n = 150
    try:
        for i in range(n):
            await store.record_served(served(f"r{i}"))
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _WORKER, str(path), str(rating), str(n),
                cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE,
            )
            for rating in (2, 5)
        ]  # fmt: skip
        for worker in workers:
            _, stderr = await asyncio.wait_for(worker.communicate(), timeout=120)
            assert worker.returncode == 0, stderr.decode()
        counts = await store.rating_counts()
        assert set(counts) <= {("cheerful", None, 2), ("cheerful", None, 5)}
        assert sum(counts.values()) == n
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM ratings"
        ).fetchone() == (n, n)


# ---- the histogram ---------------------------------------------------------------------


def test_histogram_from_counts() -> None:
    metrics = Metrics()
    metrics.feedback_ratings.update(
        {("cheerful", None, 5): 3, ("cheerful", None, 2): 1, ("calm", "v7", 4): 2}
    )
    text = metrics.exposition().decode()
    base = histogram(text, personality="cheerful", adapter_version="base")
    assert base == {
        "1.0": 0, "2.0": 1, "3.0": 1, "4.0": 1, "5.0": 4, "+Inf": 4, "count": 4, "sum": 17
    }  # fmt: skip
    v7 = histogram(text, personality="calm", adapter_version="v7")
    assert (v7["count"], v7["sum"], v7["3.0"], v7["4.0"]) == (2, 8, 0, 2)
    metrics.feedback_ratings.update({})  # values are replaced, not added to
    assert histogram(metrics.exposition().decode()) == {}
    with pytest.raises(ValueError, match="rating"):
        metrics.feedback_ratings.update({("cheerful", None, 6): 1})


def test_histogram_in_multi_worker_mode(tmp_path: Path) -> None:
    """With `PROMETHEUS_MULTIPROC_DIR` set (`fastresp serve --workers N`), the exposition
    built from the workers' files also carries the histogram."""
    script = textwrap.dedent(
        """
        from service.metrics import Metrics
        metrics = Metrics()
        metrics.requests.labels("cheerful", "model", "ok", "base").inc()
        metrics.feedback_ratings.update({("cheerful", "v1", 3): 2})
        print(metrics.exposition().decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("counter_*.db")), "not in multi-process mode"
    assert histogram(result.stdout, adapter_version="v1") == {
        "1.0": 0, "2.0": 0, "3.0": 2, "4.0": 2, "5.0": 2, "+Inf": 2, "count": 2, "sum": 6
    }  # fmt: skip


# ---- the gateway, on the tiny model ---------------------------------------------------


async def _answer(client: httpx.AsyncClient, **extra: str) -> dict[str, Any]:
    response = await client.post("/fast-response", json={**GOOD, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_feedback_round_trip_sqlite(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "fb" / "feedback.sqlite3"
    async with serve(engine_settings(tiny_model_dir, feedback_db=db), engine) as client:
        answer = await _answer(client)
        request_id = answer["request_id"]
        rated = await client.post("/feedback", json={"request_id": request_id, "rating": 4})
        assert rated.status_code == 200, rated.text
        assert rated.json() == {
            "request_id": request_id,
            "rating": 4,
            "personality": "cheerful",
            "adapter_version": None,
            "source": answer["source"],
            "replaced": False,
        }
        first = histogram((await client.get("/metrics")).text, adapter_version="base")
        assert (first["count"], first["sum"], first["4.0"], first["3.0"]) == (1, 4, 1, 0)

        again = await client.post(
            "/feedback", json={"request_id": request_id, "rating": 2, "comment": "too loud"}
        )
        assert again.status_code == 200, again.text
        assert again.json()["replaced"] is True
        second = histogram((await client.get("/metrics")).text, adapter_version="base")
        assert (second["count"], second["sum"], second["2.0"]) == (1, 2, 1), "not counted twice"

    with sqlite3.connect(db) as stored:  # what the gateway wrote, read on its own
        rows = stored.execute(
            "SELECT request_id, personality, adapter_version, source, rating, comment FROM ratings"
        ).fetchall()
    assert rows == [(request_id, "cheerful", None, answer["source"], 2, "too loud")]


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_feedback_round_trip_redis(
    engine: Engine, tiny_model_dir: Path, redis_url: str
) -> None:
    prefix = f"api-{uuid.uuid4().hex[:8]}"
    settings = engine_settings(tiny_model_dir, redis_url=redis_url, redis_key_prefix=prefix)
    async with serve(settings, engine) as client:
        request_id = (await _answer(client, request_id="child-42.turn-3"))["request_id"]
        assert request_id == "child-42.turn-3"
        for rating in (5, 3):
            rated = await client.post(
                "/feedback", json={"request_id": request_id, "rating": rating}
            )
            assert rated.status_code == 200, rated.text
        unknown = await client.post("/feedback", json={"request_id": "nope", "rating": 3})
        assert unknown.status_code == 404
        values = histogram((await client.get("/metrics")).text, personality="cheerful")
        assert (values["count"], values["sum"], values["3.0"], values["2.0"]) == (1, 3, 1, 0)

    client_ = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = await client_.xrange(f"{prefix}:feedback:ratings")
        record: Any = await client_.hgetall(f"{prefix}:feedback:served:{request_id}")
    finally:
        await client_.aclose()
    assert [(e["request_id"], e["rating"], e["replaces"]) for _, e in entries] == [
        (request_id, "5", ""),
        (request_id, "3", "5"),
    ]
    assert (record["personality"], record["rating"]) == ("cheerful", "3")


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_feedback_unknown_and_expired_ids_are_404(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ttl_s = 0.5
    settings = engine_settings(
        tiny_model_dir, feedback_db=tmp_path / "f.sqlite3", feedback_ttl_s=ttl_s
    )
    async with serve(settings, engine) as client:
        unknown = await client.post("/feedback", json={"request_id": "never-served", "rating": 5})
        request_id = (await _answer(client))["request_id"]
        await asyncio.sleep(ttl_s + 1.0)
        expired = await client.post("/feedback", json={"request_id": request_id, "rating": 5})
        text = (await client.get("/metrics")).text
    for response in (unknown, expired):
        assert response.status_code == 404, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "request_id"]
        assert detail["type"] == "unknown_request_id"
    assert histogram(text) == {}, "a refused rating is not counted"


BAD_FEEDBACK: list[tuple[dict[str, Any], str]] = [
    ({"rating": 0}, "rating"),
    ({"rating": 6}, "rating"),
    ({"rating": -1}, "rating"),
    ({"rating": 4.5}, "rating"),
    ({"rating": 4.0}, "rating"),
    ({"rating": "4"}, "rating"),
    ({"rating": True}, "rating"),
    ({"rating": None}, "rating"),
    ({"comment": "a" * (MAX_FEEDBACK_COMMENT_CHARS + 1)}, "comment"),
    ({"comment": 5}, "comment"),
    ({"request_id": "has spaces"}, "request_id"),
    ({"request_id": ""}, "request_id"),
    ({"request_id": 12}, "request_id"),
    ({"stars": 5}, "stars"),
]


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_feedback_bad_fields_are_422_naming_them(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = engine_settings(tiny_model_dir, feedback_db=tmp_path / "f.sqlite3")
    async with serve(settings, engine) as client:
        request_id = (await _answer(client))["request_id"]
        good: dict[str, Any] = {"request_id": request_id, "rating": 3}
        for change, field in BAD_FEEDBACK:
            response = await client.post("/feedback", json={**good, **change})
            assert response.status_code == 422, (change, response.text)
            detail = response.json()["detail"]
            assert any(err["loc"][:2] == ["body", field] for err in detail), (change, detail)
        for missing in ("request_id", "rating"):
            body = {k: v for k, v in good.items() if k != missing}
            response = await client.post("/feedback", json=body)
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["body", missing]
        text = (await client.get("/metrics")).text
        # the control: the same request with a good body is accepted
        accepted = await client.post("/feedback", json={**good, "comment": "ok"})
        assert accepted.status_code == 200, accepted.text
    assert histogram(text) == {}, "no refused rating was counted"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_rating_labels_hold_no_text(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    secret = "Zanzibar-Quokka"
    settings = engine_settings(tiny_model_dir, feedback_db=tmp_path / "f.sqlite3")
    async with serve(settings, engine) as client:
        answer = await _answer(
            client,
            user_turn=f"my name is {secret}",
            session_id=f"session-{secret}",
            request_id=f"req-{secret}",
        )
        rated = await client.post(
            "/feedback",
            json={"request_id": answer["request_id"], "rating": 5, "comment": f"{secret} loved it"},
        )
        assert rated.status_code == 200, rated.text
        text = (await client.get("/metrics")).text
    assert secret not in text
    assert rating_labels(text), "the rating was not exported"
    for labels in rating_labels(text):
        assert dict(labels).keys() <= {"personality", "adapter_version", "le"}
        assert dict(labels)["personality"] == "cheerful"
        assert dict(labels)["adapter_version"] == "base"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_answers_go_on_when_the_feedback_store_is_down(
    engine: Engine, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    """Redis down: the child still gets the answer; rating it is 503, not a 500."""
    settings = engine_settings(tiny_model_dir, redis_url=redis_server.url)
    async with serve(settings, engine) as client:
        request_id = (await _answer(client))["request_id"]
        redis_server.kill()
        answer = await _answer(client)
        rated = await client.post("/feedback", json={"request_id": request_id, "rating": 4})
        assert answer["source"] in {"model", "fallback"}
        assert rated.status_code == 503, rated.text
        assert rated.json()["detail"][0]["type"] == "feedback_unavailable"
        redis_server.start()  # the same port: the lifespan's Redis clients close cleanly


def test_feedback_db_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """Refused by the settings, before anything loads, naming the field."""
    from pydantic import ValidationError

    from service.settings import Settings

    personalities = REPO_ROOT / "tests" / "data" / "personalities.yaml"
    with pytest.raises(ValidationError) as caught:
        Settings(personalities_file=personalities, feedback_db=tmp_path)
    (error,) = caught.value.errors()
    assert error["loc"] == ("feedback_db",) and "is a directory" in error["msg"]
    ok = Settings(personalities_file=personalities, feedback_db=tmp_path / "f.sqlite3")
    assert ok.feedback_db == tmp_path / "f.sqlite3"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_gateway_starts_without_an_openable_feedback_store(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite file's parent is a regular file: the gateway still answers, logs the
    error once, and `POST /feedback` answers 503 naming the store."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file")
    db = blocker / "feedback.sqlite3"
    with caplog.at_level(logging.ERROR, logger="service.app"):
        async with serve(engine_settings(tiny_model_dir, feedback_db=db), engine) as client:
            request_id = (await _answer(client))["request_id"]
            await _answer(client)
            rated = await client.post("/feedback", json={"request_id": request_id, "rating": 4})
            scrape = await client.get("/metrics")
    assert rated.status_code == 503, rated.text
    (detail,) = rated.json()["detail"]
    assert detail["type"] == "feedback_unavailable" and str(db) in detail["msg"]
    assert scrape.status_code == 200
    errors = [r for r in caplog.records if "feedback store unavailable" in r.getMessage()]
    assert len(errors) == 1 and str(db) in errors[0].getMessage()


def test_request_body_schema_is_documented() -> None:
    """The OpenAPI schema names the new route and its error answers."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(
        Settings(personalities_file=REPO_ROOT / "tests" / "data" / "personalities.yaml")
    )
    operation = app.openapi()["paths"]["/feedback"]["post"]
    assert {"200", "404", "422", "503"} <= set(operation["responses"])
    schema = json.dumps(app.openapi()["components"]["schemas"]["FeedbackRequest"])
    assert '"maximum": 5' in schema and '"minimum": 1' in schema


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_request_log_gets_the_answer_and_its_ratings(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With the request log on, the gateway writes each answer and each accepted rating
    to it (a refused rating is not written)."""
    log_dir = tmp_path / "request-log"
    settings = engine_settings(
        tiny_model_dir, feedback_db=tmp_path / "f.sqlite3", request_log_dir=log_dir
    )
    async with serve(settings, engine) as client:
        request_id = (await _answer(client, session_id="lesson-7"))["request_id"]
        for rating in (5, 2):
            rated = await client.post(
                "/feedback", json={"request_id": request_id, "rating": rating}
            )
            assert rated.status_code == 200, rated.text
        refused = await client.post("/feedback", json={"request_id": "other", "rating": 1})
        assert refused.status_code == 404
    # the lifespan closed the log, which writes out what was queued
    lines = [
        json.loads(line)
        for path in sorted(log_dir.glob("requests-*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    served_lines = [line for line in lines if line["type"] == "served"]
    assert [(s["request_id"], s["personality"]) for s in served_lines] == [(request_id, "cheerful")]
    assert served_lines[0]["lesson_id"] not in (None, "lesson-7"), "the session id is hashed"
    ratings = [(r["request_id"], r["rating"]) for r in lines if r["type"] == "rating"]
    assert ratings == [(request_id, 5), (request_id, 2)]
