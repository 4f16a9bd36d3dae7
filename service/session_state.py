"""Per-session memory (anti-repetition) and the response cache (issue 8, parts 1 and 2).

- `SessionMemory` remembers each session's last N fast responses (setting
  `session_memory_turns`, 5) for `session_memory_ttl_s`. `InMemorySessionMemory` is the
  default (one gateway process, bounded LRU of sessions); with `redis_url` it is
  `RedisSessionMemory`, shared by every replica: one list per session,
  `<prefix>:session:<session_id>:recent`, newest first (`LPUSH`, `LTRIM`, `EXPIRE` in one
  pipeline).
- `ResponseCache` (Redis only) keeps up to K (`response_cache_size`, 4) distinct guarded
  model answers per key, for `response_cache_ttl_s`, in a set
  `<prefix>:cache:<sha256>`. The key is the sha256 of the personality, the adapter
  version and the normalised pika turn, user turn and main response (`cache_key`), so a
  new adapter version never reads an older version's answers.
- `repeats(candidate, recent)`: the rule both use. A candidate repeats when its
  normalised text equals a remembered one, or its opener (first two words,
  `service.text_checks.opener`, the unit of the eval's top-opener share) equals a
  remembered one's.

Redis is optional on the hot path: every call has the client's short timeout (setting
`redis_timeout_ms`, 25 ms, no retries), and a failure is logged (without text), counted in
`fastresp_redis_errors_total{operation}` and treated as "nothing remembered / nothing
cached", so a Redis outage costs variety and cache hits, never an answer. The same client
reconnects by itself when Redis is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from cachetools import TTLCache

from service.text_checks import opener

if TYPE_CHECKING:
    import redis.asyncio as redis

    from service.metrics import Metrics
    from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A Redis outage is logged at most once per this many seconds per store (each failed
#: call is counted in `fastresp_redis_errors_total`).
LOG_EVERY_S = 10.0

#: Connections of one gateway process's hot-path Redis client.
MAX_REDIS_CONNECTIONS = 128


#: Typographic quotes and apostrophes read as the plain ones.
_QUOTES = str.maketrans("\u2018\u2019\u201c\u201d", "''\"\"")


#: Stripped at the end of a text: sentence punctuation, quotes and spaces.
_END_MARKS = frozenset(".!?\u2026,;:'\" ")
#: Stripped at the start: quotes, Spanish inverted marks and spaces.
_START_MARKS = frozenset("'\"\u00bf\u00a1 ")


def normalise(text: str | None) -> str:
    """`text` compared loosely: NFKC, case-folded, typographic quotes made plain, spacing
    collapsed to single spaces, sentence punctuation and quotes stripped at the end and
    quotes at the start ("  What's 2+2? " -> "what's 2+2"; "No!" and "no" alike).
    Everything else stays, so "1.5 + 1.5" and "15 + 15", "-5" and "5", ".5" and "5",
    ":(" and ":)", "Red 🦄" and "Red 🐶" differ. None -> ""."""
    if not text:
        return ""
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_QUOTES).split())
    start, end = 0, len(folded)
    while start < end and folded[start] in _START_MARKS:
        start += 1
    while end > start and folded[end - 1] in _END_MARKS:
        end -= 1
    return folded[start:end]


def repeats(candidate: str, recent: Sequence[str]) -> bool:
    """Whether `candidate` repeats one of `recent` (a session's last fast responses): the
    same normalised text, or the same opener (first two words, `text_checks.opener`)."""
    return said_ago(candidate, recent) < len(recent)


def said_ago(candidate: str, recent: Sequence[str]) -> int:
    """How many answers ago (`recent` newest first) `candidate` was said, by the rule of
    `repeats`; len(recent) when it was not."""
    text = normalise(candidate)
    first = opener(text)
    for ago, said in enumerate(recent):
        if normalise(said) == text or (first and opener(normalise(said)) == first):
            return ago
    return len(recent)


def redis_client(settings: Settings) -> redis.Redis:
    """The hot-path Redis client for `settings.redis_url`: connect and reply timeouts of
    `redis_timeout_ms`, no retries (a late answer is worse than none here), at most
    `MAX_REDIS_CONNECTIONS` connections (past them a call fails at once and is counted:
    a hung Redis does not collect one connection per request). Raises ValueError on a
    malformed URL."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    assert settings.redis_url is not None
    timeout_s = settings.redis_timeout_ms / 1000
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        max_connections=MAX_REDIS_CONNECTIONS,
    )


class _RedisCalls:
    """Runs Redis calls that may fail: a failure is logged, counted and becomes None."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    async def call(self, operation: str, awaitable: Awaitable[T]) -> T | None:
        import redis

        try:
            return await awaitable
        except (redis.RedisError, OSError) as exc:
            if self._metrics is not None:
                self._metrics.redis_errors.labels(operation).inc()
            now = time.monotonic()
            if now - self._logged_at < LOG_EVERY_S:
                self._unlogged += 1
                return None
            logger.warning(
                "redis %s failed: %s (%d failures not logged since the last such message; "
                "at most one per %.0f s)",
                operation, f"{type(exc).__name__}: {exc}", self._unlogged, LOG_EVERY_S,
            )  # fmt: skip
            self._logged_at, self._unlogged = now, 0
            return None


class SessionMemory(Protocol):
    """A session's last fast responses, newest first."""

    async def recent(self, session_id: str) -> list[str]:
        """Up to `turns` remembered responses of `session_id`, newest first; [] for an
        unknown or expired session (or when the store is unreachable)."""
        ...

    async def remember(self, session_id: str, text: str) -> None:
        """Add `text` as the newest response of `session_id` (never raises)."""
        ...


class InMemorySessionMemory:
    """`SessionMemory` in this process: a `cachetools.TTLCache` of at most `max_sessions`
    sessions (least recently used dropped first), each the last `turns` responses,
    dropped `ttl_s` seconds after its latest response. `timer` is the clock in seconds
    (`time.monotonic`; a test may pass its own)."""

    def __init__(
        self,
        turns: int,
        ttl_s: float,
        max_sessions: int = 100_000,
        timer: Callable[[], float] | None = None,
    ) -> None:
        self.turns = turns
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: TTLCache[str, deque[str]] = TTLCache(
            max_sessions, ttl_s, timer=timer or time.monotonic
        )

    async def recent(self, session_id: str) -> list[str]:
        return list(self._sessions.get(session_id, ()))

    async def remember(self, session_id: str, text: str) -> None:
        if self.turns == 0:
            return
        texts = self._sessions.pop(session_id, None) or deque(maxlen=self.turns)
        texts.appendleft(text)
        self._sessions[session_id] = texts  # re-set: its TTL counts from now


class RedisSessionMemory:
    """`SessionMemory` in Redis, shared by all replicas (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        turns: int,
        ttl_s: float,
        prefix: str = "fastresp",
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self.turns = turns
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._calls = _RedisCalls(metrics)

    def key(self, session_id: str) -> str:
        """The Redis list of `session_id`."""
        return f"{self.prefix}:session:{session_id}:recent"

    async def recent(self, session_id: str) -> list[str]:
        if self.turns == 0:
            return []
        found = await self._calls.call(
            "session_read", self._client.lrange(self.key(session_id), 0, self.turns - 1)
        )
        return [str(text) for text in found or []]

    async def remember(self, session_id: str, text: str) -> None:
        if self.turns == 0:
            return
        key = self.key(session_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.lpush(key, text)
        pipe.ltrim(key, 0, self.turns - 1)
        pipe.pexpire(key, max(1, round(self.ttl_s * 1000)))
        await self._calls.call("session_write", pipe.execute())


# Adds one answer unless the set already holds K, then restarts the TTL (ms), so a key
# lives `ttl_s` after its latest add. Atomic: concurrent gateways never store more than K.
_CACHE_ADD = """
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('SCARD', KEYS[1])
"""


def cache_key(
    personality: str,
    adapter_version: str | None,
    pika_turn: str | None,
    user_turn: str,
    main_response: str | None,
    context: str = "",
) -> str:
    """The response-cache key: sha256 hex of the personality, the adapter version (None:
    the base model), the `normalise`d turns and `context` (what else decides the answer:
    the base model, the prompt mode, the personality's definition and the adapter's
    folder; `FastResponseService` passes them). Raw text is never part of a Redis key."""
    parts = [
        personality,
        adapter_version,
        normalise(pika_turn),
        normalise(user_turn),
        normalise(main_response),
        context,
    ]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


class ResponseCache:
    """Up to `size` guarded model answers per `cache_key`, in Redis, for `ttl_s` seconds
    after the latest one was added (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        size: int,
        ttl_s: float,
        prefix: str = "fastresp",
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self.size = size
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._calls = _RedisCalls(metrics)
        self._add = client.register_script(_CACHE_ADD)

    def redis_key(self, key: str) -> str:
        """The Redis set of `key` (a `cache_key`)."""
        return f"{self.prefix}:cache:{key}"

    async def get(self, key: str) -> list[str] | None:
        """The answers stored under `key` (sorted, so the order is stable); None when
        Redis failed (counted as a lookup error, not a miss)."""
        found = await self._calls.call("cache_read", self._client.smembers(self.redis_key(key)))
        if found is None:
            return None
        return sorted(str(text) for text in found)

    async def add(self, key: str, text: str) -> None:
        """Store `text` under `key` unless `size` answers are there already (never
        raises)."""
        await self._calls.call(
            "cache_write",
            self._add(
                keys=[self.redis_key(key)],
                args=[text, self.size, max(1, round(self.ttl_s * 1000))],
            ),
        )
