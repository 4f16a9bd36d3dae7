"""The adapter-registry store contract, in memory and against a real redis-server.

Each contract test runs on both stores. `Replicas.new()` gives another handle on the
same registry, as a second gateway replica holds one: for Redis a separate
`RedisRegistryStore` (own client) on the same server and prefix; in memory the one
shared store, since in-process components share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as redis
from redis.backoff import ConstantBackoff

from service.errors import RegistryUnavailable
from service.registry_store import (
    AdapterRecord,
    CanaryRecord,
    InMemoryRegistryStore,
    RedisRegistryStore,
    RegistryStore,
)
from tests.conftest import RedisServer

LOGGER = "service.registry_store"
#: Generous bound for waits that are not the contract's 1 s propagation requirement.
PATIENCE_S = 15.0


class Replicas:
    """Handles on one registry; every handle made is closed by `close()`."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self._memory = InMemoryRegistryStore()
        self._stores: list[RegistryStore] = []

    def new(self) -> RegistryStore:
        if self.kind == "memory":
            return self._memory
        assert self.url is not None
        store = RedisRegistryStore.from_url(
            self.url, prefix=self.prefix, reconnect_backoff=ConstantBackoff(0.1)
        )
        self._stores.append(store)
        return store

    async def close(self) -> None:
        for store in [self._memory, *self._stores]:
            await store.close()


@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="function")
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    handles = Replicas(request.param, url)
    try:
        yield handles
    finally:
        await handles.close()


class Collector:
    """Consumes `store.subscribe()` in a background task, keeping every record seen."""

    def __init__(self, store: RegistryStore) -> None:
        self.seen: list[AdapterRecord] = []
        self.task = asyncio.create_task(self._run(store))

    async def _run(self, store: RegistryStore) -> None:
        async for record in store.subscribe():
            self.seen.append(record)

    async def wait_for(
        self, predicate: Callable[[AdapterRecord], bool], timeout_s: float = PATIENCE_S
    ) -> AdapterRecord:
        """The first record seen that matches; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            for record in self.seen:
                if predicate(record):
                    return record
            if self.task.done():
                pytest.fail(f"the subscription ended: {self.task!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"no matching record within {timeout_s} s; seen: {self.seen}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def is_(record: AdapterRecord) -> Callable[[AdapterRecord], bool]:
    return lambda seen: seen == record


@pytest.mark.asyncio
async def test_publish_then_records_round_trip(replicas: Replicas) -> None:
    store = replicas.new()
    assert await store.records() == {}
    before = time.time()
    added = await store.publish("bubbles", "/adapters/bubbles/1.2.0", "1.2.0")
    assert (added.personality, added.path, added.version) == (
        "bubbles",
        "/adapters/bubbles/1.2.0",
        "1.2.0",
    )
    assert abs(added.updated_at - before) < 60  # unix seconds, not ms
    assert await store.records() == {"bubbles": added}

    removed = await store.publish("bubbles", None, None)
    assert (removed.path, removed.version) == (None, None)
    assert removed.revision > added.revision
    assert await store.records() == {"bubbles": removed}


@pytest.mark.asyncio
async def test_publish_rejects_a_version_without_a_path(replicas: Replicas) -> None:
    store = replicas.new()
    with pytest.raises(ValueError, match="without an adapter path"):
        await store.publish("bubbles", None, "1.0")
    with pytest.raises(ValueError, match="non-empty"):
        await store.publish("", "/a", "1.0")
    assert await store.records() == {}


@pytest.mark.asyncio
async def test_a_canary_round_trips_to_other_replicas(replicas: Replicas) -> None:
    store, other = replicas.new(), replicas.new()
    seen = Collector(other)
    try:
        canary = CanaryRecord("/adapters/bubbles/v2", "v2", 12.5)
        added = await store.publish("bubbles", "/adapters/bubbles/v1", "v1", canary)
        assert added.canary == canary
        assert await other.records() == {"bubbles": added}
        assert (await seen.wait_for(is_(added))).canary == canary
        promoted = await store.publish("bubbles", "/adapters/bubbles/v2", "v2")
        assert (await other.records())["bubbles"].canary is None
        assert await seen.wait_for(is_(promoted))
    finally:
        await seen.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("canary", "problem"),
    [
        (CanaryRecord("/a/v2", "v2", 0.0), "not in \\(0, 100\\)"),
        (CanaryRecord("/a/v2", "v2", 100.0), "not in \\(0, 100\\)"),
        (CanaryRecord("/a/v1", "v1", 10.0), "is the stable version"),
        (CanaryRecord("", "v2", 10.0), "needs an adapter path"),
    ],
)
async def test_publish_rejects_a_bad_canary(
    replicas: Replicas, canary: CanaryRecord, problem: str
) -> None:
    store = replicas.new()
    with pytest.raises(ValueError, match=problem):
        await store.publish("bubbles", "/a/v1", "v1", canary)
    assert await store.records() == {}


@pytest.mark.asyncio
async def test_revisions_strictly_increase_across_personalities(replicas: Replicas) -> None:
    store = replicas.new()
    published = [
        await store.publish(f"p{i % 3}", f"/adapters/p{i % 3}/{i}", str(i)) for i in range(9)
    ]
    revisions = [record.revision for record in published]
    assert all(a < b for a, b in itertools.pairwise(revisions)), revisions
    assert await store.records() == {f"p{i}": published[6 + i] for i in range(3)}


@pytest.mark.asyncio
async def test_subscriber_sees_another_replicas_change_within_1s(replicas: Replicas) -> None:
    listener, publisher = replicas.new(), replicas.new()
    ready = await publisher.publish("ready", "/adapters/ready/1", "1")
    collector = Collector(listener)
    try:
        await collector.wait_for(is_(ready))  # the subscription is live
        started = time.monotonic()
        change = await publisher.publish("bubbles", "/adapters/bubbles/2", "2")
        await collector.wait_for(is_(change), timeout_s=1.0 - (time.monotonic() - started))
    finally:
        await collector.stop()


@pytest.mark.asyncio
async def test_concurrent_publishes_get_unique_ordered_revisions(replicas: Replicas) -> None:
    first, second, listener = replicas.new(), replicas.new(), replicas.new()
    ready = await first.publish("ready", None, None)
    collector = Collector(listener)
    try:
        await collector.wait_for(is_(ready))

        async def publish_all(name: str, store: RegistryStore) -> list[AdapterRecord]:
            return list(
                await asyncio.gather(
                    *(store.publish(f"p{i % 4}", f"/{name}/{i}", f"{name}-{i}") for i in range(50))
                )
            )

        from_first, from_second = await asyncio.gather(
            publish_all("a", first), publish_all("b", second)
        )
        published = from_first + from_second
        revisions = sorted(record.revision for record in published)
        assert len(set(revisions)) == 100
        assert revisions[0] > ready.revision

        latest: dict[str, AdapterRecord] = {}
        for record in published:
            if (
                record.personality not in latest
                or record.revision > latest[record.personality].revision
            ):
                latest[record.personality] = record
        assert await listener.records() == {"ready": ready, **latest}

        # Subscribers get the changes in revision order: no publish interleaved another.
        last = max(published, key=lambda record: record.revision)
        await collector.wait_for(is_(last))
        events = [record for record in collector.seen if record.revision > ready.revision]
        assert [record.revision for record in events] == revisions
        assert sorted(events, key=lambda r: r.revision) == sorted(
            published, key=lambda r: r.revision
        )
    finally:
        await collector.stop()


@pytest.mark.asyncio
async def test_a_restarted_replica_sees_the_current_state(replicas: Replicas) -> None:
    running = replicas.new()
    await running.publish("bubbles", "/adapters/bubbles/1", "1")
    await running.publish("sunny", "/adapters/sunny/1", "1")
    await running.publish("bubbles", "/adapters/bubbles/2", "2")
    await running.publish("sunny", None, None)
    current = await running.records()

    restarted = replicas.new()
    assert await restarted.records() == current
    subscription = restarted.subscribe()
    try:
        async with asyncio.timeout(PATIENCE_S):
            first = [await anext(subscription) for _ in range(len(current))]
        assert first == sorted(current.values(), key=lambda record: record.revision)
        change = await running.publish("bubbles", "/adapters/bubbles/3", "3")
        async with asyncio.timeout(PATIENCE_S):
            assert await anext(subscription) == change
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_close_ends_subscriptions_and_refuses_publish(replicas: Replicas) -> None:
    store = replicas.new()
    ready = await store.publish("ready", None, None)
    collector = Collector(store)
    await collector.wait_for(is_(ready))
    await store.close()
    async with asyncio.timeout(PATIENCE_S):
        await collector.task  # ends by itself, without raising
    with pytest.raises(RegistryUnavailable):
        await store.publish("bubbles", None, None)


async def subscribers(url: str, channel: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        counts: Any = await client.pubsub_numsub(channel)
        return int(counts[0][1])
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_cancelling_a_subscriber_releases_its_subscription(redis_url: str) -> None:
    store = RedisRegistryStore.from_url(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    try:
        ready = await store.publish("ready", None, None)
        collector = Collector(store)
        await collector.wait_for(is_(ready))
        assert await subscribers(redis_url, store.channel) == 1
        await collector.stop()
        deadline = time.monotonic() + PATIENCE_S
        while await subscribers(redis_url, store.channel) != 0:
            assert time.monotonic() < deadline, "the pub/sub connection is still subscribed"
            await asyncio.sleep(0.05)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_bad_json_is_logged_and_skipped(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    store = RedisRegistryStore.from_url(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    raw = redis.Redis.from_url(redis_url)
    collector: Collector | None = None
    try:
        good = await store.publish("bubbles", "/adapters/bubbles/1", "1")
        await raw.hset(store.hash_key, "garbled", "{not json")
        wrong = json.dumps({"personality": "bubbles", "path": 5, "revision": "x"})
        await raw.hset(store.hash_key, "mistyped", wrong)

        assert await store.records() == {"bubbles": good}
        logged = caplog.text
        assert "field 'garbled'" in logged
        assert "field 'mistyped'" in logged

        caplog.clear()
        collector = Collector(store)
        await collector.wait_for(is_(good))  # the snapshot skipped the bad fields
        await raw.publish(store.channel, b"\xff garbage")
        change = await store.publish("sunny", "/adapters/sunny/1", "1")
        await collector.wait_for(is_(change))
        assert collector.seen == [good, change]
        assert "field 'garbled'" in caplog.text
        assert f"channel {store.channel}" in caplog.text
    finally:
        if collector is not None:
            await collector.stop()
        await raw.aclose()
        await store.close()


@pytest.mark.asyncio
async def test_revisions_keep_increasing_after_redis_loses_its_data(redis_url: str) -> None:
    store = RedisRegistryStore.from_url(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    raw = redis.Redis.from_url(redis_url)
    try:
        before = await store.publish("bubbles", "/adapters/bubbles/1", "1")
        await raw.delete(store.hash_key, store.revision_key)  # a restart without persistence
        # The counter is re-seeded from the clock in ms, which the contract (see
        # _PUBLISH_LUA) bounds to fewer than 1000 changes a second: both publishes in one
        # millisecond gave the same revision on a fast CI run.
        await asyncio.sleep(0.005)
        after = await store.publish("bubbles", "/adapters/bubbles/2", "2")
        assert after.revision > before.revision
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.asyncio
async def test_redis_outage(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Kill Redis: publish is refused, the subscriber keeps running; restart: it resyncs."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    prefix = "outage"
    listener = RedisRegistryStore.from_url(
        redis_server.url, prefix=prefix, reconnect_backoff=ConstantBackoff(0.1)
    )
    publisher = RedisRegistryStore.from_url(redis_server.url, prefix=prefix)
    raw = redis.Redis.from_url(redis_server.url)
    collector = Collector(listener)
    try:
        first = await publisher.publish("bubbles", "/adapters/bubbles/1", "1")
        await collector.wait_for(is_(first))

        # A change written without a pub/sub message: only a resync can deliver it.
        missed = AdapterRecord("sunny", "/adapters/sunny/9", "9", first.revision + 1, time.time())
        record_json = json.dumps(
            {
                "personality": missed.personality,
                "path": missed.path,
                "version": missed.version,
                "revision": missed.revision,
                "updated_at": missed.updated_at,
            }
        )
        await raw.hset(listener.hash_key, "sunny", record_json)
        await raw.set(listener.revision_key, missed.revision)
        await raw.save()  # the restarted server loads this dump
        await raw.aclose()

        redis_server.kill()
        with pytest.raises(RegistryUnavailable, match="unavailable"):
            await publisher.publish("bubbles", "/adapters/bubbles/2", "2")
        with pytest.raises(RegistryUnavailable):
            await publisher.records()
        deadline = time.monotonic() + PATIENCE_S
        while "Redis unavailable for the subscription" not in caplog.text:
            assert time.monotonic() < deadline, f"no outage logged: {caplog.text}"
            await asyncio.sleep(0.05)
        assert not collector.task.done()
        assert missed not in collector.seen

        redis_server.start()
        await collector.wait_for(is_(missed))
        change = await publisher.publish("bubbles", "/adapters/bubbles/3", "3")
        assert change.revision > missed.revision
        await collector.wait_for(is_(change))
    finally:
        await collector.stop()
        await listener.close()
        await publisher.close()
