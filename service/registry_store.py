"""Shared adapter-registry state: which adapter version serves each personality.

Every gateway replica reads and changes the same records, and hears about every
change, so all replicas serve the same adapter version per personality and a
replica that restarts picks up the current versions.

- `InMemoryRegistryStore`: one process (no Redis URL configured).
- `RedisRegistryStore`: Redis, shared by replicas. Keys, for the prefix `p`
  (setting `redis_key_prefix`, default `fastresp`):
    - `p:adapters`: hash, field = personality, value = the record as JSON
      (`{"personality", "path", "version", "canary", "revision", "updated_at"}`,
      `canary` null or `{"path", "version", "weight"}`);
    - `p:adapters:revision`: the revision counter (string integer);
    - `p:adapters:events`: pub/sub channel; each message is one record's JSON.

A consumer applies a record only if its `revision` is newer than the one it last
applied for that personality: subscriptions may repeat records (a resync after a
reconnect yields the current records again), never reorder one personality's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from pydantic import TypeAdapter, ValidationError
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import RegistryUnavailable
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CanaryRecord:
    """A second adapter version serving a share of a personality's sessions.

    Attributes:
        path: the canary adapter's directory on the engine's side.
        version: its version label; differs from the stable version.
        weight: the percentage of sessions it serves, 0 < weight < 100 (a session's
            share is decided by `service.adapter_registry.canary_bucket`).
    """

    path: str
    version: str
    weight: float


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """The adapter serving one personality, as of one change.

    Attributes:
        personality: the personality's id (manifest key).
        path: the adapter's directory on the engine's side. None: the personality is
            served by the base model (its adapter was removed).
        version: the adapter's version label; None when `path` is None.
        revision: assigned by the store; strictly increasing over all changes in one
            store (across personalities). Compare revisions, not `updated_at`.
        updated_at: when the change was stored, unix seconds (the Redis server's clock
            for `RedisRegistryStore`).
        canary: the canary version serving a share of the sessions, or None (records
            written before canaries existed have none).
    """

    personality: str
    path: str | None
    version: str | None
    revision: int
    updated_at: float
    canary: CanaryRecord | None = None


class RegistryStore(Protocol):
    """The adapter registry's shared state (see the module docstring)."""

    async def publish(
        self,
        personality: str,
        path: str | None,
        version: str | None,
        canary: CanaryRecord | None = None,
    ) -> AdapterRecord:
        """Atomically assign the next revision, store the record and notify subscribers.

        Args:
            personality: non-empty personality id.
            path: the stable adapter's directory, or None to serve the base model.
            version: adapter version label; must be None when `path` is None.
            canary: the canary serving a share of the sessions, or None.

        Returns:
            The stored record, with its revision and `updated_at`.

        Raises:
            ValueError: empty personality, a version without a path, or a canary with
                an empty path or version, the stable version, or a weight outside
                (0, 100).
            RegistryUnavailable: the store cannot be reached or is closed; nothing
                was stored.
        """
        ...

    async def records(self) -> dict[str, AdapterRecord]:
        """The current record per personality; unreadable stored records are logged and skipped.

        Raises:
            RegistryUnavailable: the store cannot be reached or is closed.
        """
        ...

    def subscribe(self) -> AsyncIterator[AdapterRecord]:
        """Every change from now on, this process's own included.

        It first yields the current records (oldest revision first), and yields them
        again after each reconnect, so a subscriber that missed events while
        disconnected resyncs. It never raises for an unreachable store: it logs and
        retries until the store is back. It ends when the store is closed; cancelling
        the consumer releases its connection.
        """
        ...

    async def close(self) -> None:
        """Stop the subscriptions and release connections; idempotent."""
        ...


def _check_change(
    personality: str, path: str | None, version: str | None, canary: CanaryRecord | None
) -> None:
    if not personality:
        raise ValueError("personality must be a non-empty string")
    if path is None and version is not None:
        raise ValueError(f"{personality}: version {version!r} given without an adapter path")
    if canary is None:
        return
    if not canary.path or not canary.version:
        raise ValueError(f"{personality}: a canary needs an adapter path and a version")
    if canary.version == version:
        raise ValueError(f"{personality}: canary version {version!r} is the stable version")
    if not 0 < canary.weight < 100:
        raise ValueError(f"{personality}: canary weight {canary.weight} is not in (0, 100)")


class InMemoryRegistryStore:
    """`RegistryStore` inside one process: the embedded default without Redis.

    Revisions start at 1. Each subscriber has an unbounded queue, so a slow
    subscriber never blocks `publish`.
    """

    def __init__(self) -> None:
        self._records: dict[str, AdapterRecord] = {}
        self._revision = 0
        self._queues: set[asyncio.Queue[AdapterRecord | None]] = set()
        self._closed = False

    async def publish(
        self,
        personality: str,
        path: str | None,
        version: str | None,
        canary: CanaryRecord | None = None,
    ) -> AdapterRecord:
        """See `RegistryStore.publish`."""
        _check_change(personality, path, version, canary)
        if self._closed:
            raise RegistryUnavailable("the adapter registry store is closed")
        self._revision += 1
        record = AdapterRecord(personality, path, version, self._revision, time.time(), canary)
        self._records[personality] = record
        for queue in self._queues:
            queue.put_nowait(record)
        return record

    async def records(self) -> dict[str, AdapterRecord]:
        """See `RegistryStore.records`."""
        if self._closed:
            raise RegistryUnavailable("the adapter registry store is closed")
        return dict(self._records)

    async def subscribe(self) -> AsyncIterator[AdapterRecord]:
        """See `RegistryStore.subscribe`."""
        if self._closed:
            return
        queue: asyncio.Queue[AdapterRecord | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            # No await between the snapshot and registering the queue: nothing is missed.
            for record in sorted(self._records.values(), key=lambda r: r.revision):
                yield record
            while (record_or_end := await queue.get()) is not None:
                yield record_or_end
        finally:
            self._queues.discard(queue)

    async def close(self) -> None:
        """See `RegistryStore.close`."""
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(None)


#: INCR + HSET + PUBLISH in one script, so concurrent publishers cannot interleave.
#: KEYS[1]: records hash, KEYS[2]: revision counter.
#: ARGV[1]: personality; ARGV[2]: the record's JSON object without `revision`,
#: `updated_at` and its closing brace; ARGV[3]: the pub/sub channel.
#: The JSON is completed by string concatenation: Lua numbers are doubles, and
#: cjson would print a 13-digit revision in exponent form.
#: A missing counter is seeded from the server clock in milliseconds, so revisions
#: keep increasing if Redis loses its data (a restart without persistence), as long
#: as fewer than 1000 changes per second were published on average before.
_PUBLISH_LUA = """
local now = redis.call('TIME')
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000)))
end
local revision = redis.call('INCR', KEYS[2])
local payload = ARGV[2] .. ',"revision":' .. string.format('%d', revision)
  .. ',"updated_at":' .. now[1] .. '.' .. string.format('%06d', tonumber(now[2])) .. '}'
redis.call('HSET', KEYS[1], ARGV[1], payload)
redis.call('PUBLISH', ARGV[3], payload)
return payload
"""

_RECORD_JSON: TypeAdapter[AdapterRecord] = TypeAdapter(AdapterRecord)

#: How long one pub/sub read waits before the subscriber checks whether the store was
#: closed, in seconds. Cancelling the consumer does not wait for it.
_POLL_S = 1.0

#: Retries of one command (publish, records) before it is refused: at most ~0.7 s.
_COMMAND_RETRY = Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=3)


class _StoreClosed(Exception):
    """Raised inside the subscriber's retry to stop it once the store is closed."""


def _decode(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


def _parse_record(raw: Any, where: str, personality: str | None = None) -> AdapterRecord | None:
    """One record from its JSON, or None (logged) when it is not a valid record."""
    try:
        record = _RECORD_JSON.validate_json(raw, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'json'}: {e['msg']}" for e in exc.errors()
        )
        logger.error(
            "adapter registry: skipping a bad record in %s (%s): %.200r", where, problems, raw
        )
        return None
    if personality is not None and record.personality != personality:
        logger.error(
            "adapter registry: skipping the record in %s: it names personality %r",
            where,
            record.personality,
        )
        return None
    return record


class RedisRegistryStore:
    """`RegistryStore` in Redis, shared by every gateway replica (layout: module docstring).

    Args:
        client: a `redis.asyncio.Redis` (bytes or decoded responses). Its retry
            policy governs how long `publish` and `records` try before they are refused.
        prefix: key prefix; keys are `{prefix}:adapters`, `{prefix}:adapters:revision`
            and the channel `{prefix}:adapters:events`.
        reconnect_backoff: the wait between a subscriber's reconnect attempts (redis-py
            backoff). Default: exponential with jitter, from 0.1 s up to 5 s.
        owns_client: close `client` in `close()`.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "fastresp",
        reconnect_backoff: AbstractBackoff | None = None,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self.hash_key = f"{prefix}:adapters"
        self.revision_key = f"{prefix}:adapters:revision"
        self.channel = f"{prefix}:adapters:events"
        self._publish_script = client.register_script(_PUBLISH_LUA)
        self._reconnect_backoff = reconnect_backoff or ExponentialWithJitterBackoff(
            cap=5.0, base=0.1
        )
        self._owns_client = owns_client
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "fastresp",
        reconnect_backoff: AbstractBackoff | None = None,
    ) -> RedisRegistryStore:
        """A store with its own client for `url` (e.g. `redis://localhost:6379/0`).

        The client refuses a command after ~0.7 s of failed retries, times out a
        reply after 5 s and a connect after 2 s, and checks an idle subscription
        every 30 s, so a silent network failure is noticed.
        """
        client = redis.Redis.from_url(
            url,
            retry=_COMMAND_RETRY,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
        )
        return cls(client, prefix=prefix, reconnect_backoff=reconnect_backoff, owns_client=True)

    async def publish(
        self,
        personality: str,
        path: str | None,
        version: str | None,
        canary: CanaryRecord | None = None,
    ) -> AdapterRecord:
        """See `RegistryStore.publish`. One Lua script: INCR, HSET and PUBLISH."""
        _check_change(personality, path, version, canary)
        if self._closed:
            raise RegistryUnavailable("the adapter registry store is closed")
        fields: dict[str, Any] = {"personality": personality, "path": path, "version": version}
        fields["canary"] = dataclasses.asdict(canary) if canary is not None else None
        head = json.dumps(fields)[:-1]
        try:
            payload = await self._publish_script(
                keys=[self.hash_key, self.revision_key], args=[personality, head, self.channel]
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise RegistryUnavailable(f"adapter registry (Redis) unavailable: {exc}") from exc
        record = _parse_record(payload, f"the reply to publishing {personality!r}")
        if record is None:  # our own script wrote it: a bug, not bad data
            raise RuntimeError(f"publish script returned an unreadable record: {payload!r}")
        return record

    async def records(self) -> dict[str, AdapterRecord]:
        """See `RegistryStore.records`."""
        if self._closed:
            raise RegistryUnavailable("the adapter registry store is closed")
        try:
            return await self._read_records()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise RegistryUnavailable(f"adapter registry (Redis) unavailable: {exc}") from exc

    async def _read_records(self) -> dict[str, AdapterRecord]:
        raw: dict[Any, Any] = await self._client.hgetall(self.hash_key)
        records = {}
        for field, value in raw.items():
            personality = _decode(field)
            where = f"{self.hash_key} field {personality!r}"
            record = _parse_record(value, where, personality)
            if record is not None:
                records[personality] = record
        return records

    async def subscribe(self) -> AsyncIterator[AdapterRecord]:
        """See `RegistryStore.subscribe`.

        Subscribes to the channel, waits for Redis to confirm, then reads the hash
        (so no change falls between the two) and yields it; then yields each message.
        While Redis is unreachable it logs each failed attempt and retries with
        `reconnect_backoff` (redis-py `Retry`, no limit). If redis-py reconnects and
        resubscribes by itself, the confirmation it gets triggers the same resync.
        """
        retry = Retry(self._reconnect_backoff, retries=-1, supported_errors=(RedisError,))
        while not self._closed:
            try:
                pubsub, snapshot = await retry.call_with_retry(
                    self._open_subscription, self._reconnect_failed, with_failure_count=True
                )
            except _StoreClosed:
                return
            try:
                for record in snapshot:
                    yield record
                while not self._closed:
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        for record in await self._snapshot():
                            yield record
                    elif message["type"] == "message":
                        parsed = _parse_record(message["data"], f"channel {self.channel}")
                        if parsed is not None:
                            yield parsed
            except RedisError as exc:
                if not self._closed:
                    logger.warning(
                        "adapter registry: lost the subscription to %s (%s); resubscribing",
                        self.channel,
                        exc,
                    )
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8

    async def _open_subscription(self) -> tuple[PubSub, list[AdapterRecord]]:
        """A confirmed subscription and the records read after it (oldest first)."""
        if self._closed:
            raise _StoreClosed
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # The first reply is the confirmation: Redis delivers no message before it.
            confirmation = await pubsub.get_message(timeout=5.0)
            if confirmation is None or confirmation["type"] != "subscribe":
                raise RedisTimeoutError(f"no confirmation of SUBSCRIBE {self.channel}")
            return pubsub, await self._snapshot()
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8
            raise

    async def _snapshot(self) -> list[AdapterRecord]:
        return sorted((await self._read_records()).values(), key=lambda r: r.revision)

    async def _reconnect_failed(self, error: Exception, failures: int) -> None:
        if self._closed:
            raise _StoreClosed from error
        logger.warning(
            "adapter registry: Redis unavailable for the subscription (%s: %s), attempt %d; "
            "retrying, the gateway keeps its last known adapters",
            type(error).__name__,
            error,
            failures,
        )

    async def close(self) -> None:
        """See `RegistryStore.close`. Subscribers end within ~1 s; an owned client is closed."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()


def open_registry_store(settings: Settings) -> RegistryStore:
    """The store for `settings`: Redis at `redis_url` with `redis_key_prefix`, else in memory."""
    if settings.redis_url:
        return RedisRegistryStore.from_url(settings.redis_url, prefix=settings.redis_key_prefix)
    return InMemoryRegistryStore()
