"""Satisfaction feedback: remember each served fast response, accept one rating per
request (`POST /feedback`), and count the ratings for `fastresp_feedback_rating`.

Every answered `/fast-response` is remembered for `feedback_ttl_s` (default 7 days) as a
`ServedRecord`: its request id, personality, adapter version (None: the base model),
source and the time it was served. A rating refers to one of those records: an id never
served, or served longer ago than the TTL, is refused (`UnknownRequestId`, 404). A second
rating of the same request replaces the first, so each request counts once, with its
latest rating. A request id that is served again (ids are the caller's) starts a new
request: the earlier one keeps its rating.

Two stores, chosen by `open_feedback_store`:

- `SQLiteFeedbackStore` (default): one SQLite file (`feedback_db`, default
  `<cache_dir>/feedback.sqlite3`) in WAL mode, shared safely by the gateway workers of
  one host. Table `served` holds the records (expired rows are deleted as new ones
  arrive); table `ratings` keeps every rated request for good.
- `RedisFeedbackStore` (when `redis_url` is set), keys under the prefix `p`
  (`redis_key_prefix`):
    - `p:feedback:served:<request_id>`: hash of one served record, with its current
      `rating`, `comment` and `rated_at` once rated; expires after the TTL;
    - `p:feedback:ratings`: stream, one entry per accepted rating (a replacement is a
      new entry whose `replaces` field holds the rating it replaced; read the last
      entry per `request_id` and `served_at`), trimmed to about
      `feedback_stream_maxlen` entries (`XADD MAXLEN ~`);
    - `p:feedback:histogram`: hash, field `["personality","version","rating"]` (JSON;
      version "" for the base model) -> rated requests; never trimmed.
  A rating is one Lua script (check the record, move the request between histogram
  fields, store the rating, append to the stream), so concurrent ratings of one
  request cannot both count.

SQLite calls run on the store's own single thread (never the event loop's default
pool, which a locked file would otherwise fill for minutes); a served record waits at
most `SERVED_BUSY_TIMEOUT_S` for another connection's write lock and is then dropped
with a warning. Redis calls use `redis.asyncio`. At most `MAX_PENDING` served records
wait for the store at once; beyond that they are dropped (and counted in the warning).
A `/metrics` scrape waits at most `REFRESH_TIMEOUT_S` for the rating counts and else
serves the last known ones.

Comments are redacted (`service.redaction.redact`: names, e-mails, phone numbers,
street addresses) before they are stored, and are never logged nor put in a metric
label.

If the store cannot be opened at startup, the gateway runs with
`UnavailableFeedbackStore`: answers go on, `POST /feedback` answers 503 naming the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from service.errors import FastResponseError
from service.metrics import RATINGS, Metrics
from service.redaction import redact
from service.schemas import FastResponseResponse, FeedbackRequest, FeedbackResponse, Source
from service.settings import Settings

logger = logging.getLogger(__name__)

#: Longest `POST /feedback` waits for the record of its request that this process is
#: still storing, and shutdown for all of them, in seconds.
PENDING_WAIT_S = 5.0

#: How long a SQLite call waits for another worker's write lock, in seconds.
SQLITE_BUSY_TIMEOUT_S = 5.0

#: How long storing a served record waits for another connection's write lock, in
#: seconds; then the record is dropped (it cannot be rated) with a warning. Records
#: queued behind a dropped one within this time are dropped at once, so a locked file
#: never builds a queue of waits.
SERVED_BUSY_TIMEOUT_S = 0.5

#: Most served records waiting to be stored at once (per process); more are dropped.
MAX_PENDING = 1000

#: Longest a `/metrics` scrape waits for the rating counts, in seconds; then the last
#: known figures are served.
REFRESH_TIMEOUT_S = 1.0

#: How often `SQLiteFeedbackStore` deletes expired served records, in seconds.
PRUNE_INTERVAL_S = 60.0

#: Expired served records deleted per pruning statement.
PRUNE_BATCH = 5000

#: At most one "cannot store served record" warning per this many seconds.
_WARN_INTERVAL_S = 60.0


class UnknownRequestId(FastResponseError):
    """The rated request id was never served, or longer ago than the feedback TTL (404)."""

    status_code = 404
    error_type = "unknown_request_id"


class FeedbackUnavailable(FastResponseError):
    """The feedback store (Redis or the SQLite file) cannot be used now (503)."""

    status_code = 503
    error_type = "feedback_unavailable"


@dataclass(frozen=True, slots=True)
class ServedRecord:
    """One served fast response, as remembered for feedback.

    Attributes:
        request_id: the response's `request_id`.
        personality: the personality that answered (a manifest name).
        adapter_version: the adapter version that answered; None for the base model.
        source: `model`, `cache` or `fallback`.
        served_at: when it was served, unix seconds (the gateway's clock).
    """

    request_id: str
    personality: str
    adapter_version: str | None
    source: Source
    served_at: float

    @classmethod
    def of(cls, response: FastResponseResponse, served_at: float | None = None) -> ServedRecord:
        """The record of `response`, served at `served_at` (default: now)."""
        return cls(
            request_id=response.request_id,
            personality=response.personality,
            adapter_version=response.adapter_version,
            source=response.source,
            served_at=time.time() if served_at is None else served_at,
        )


@dataclass(frozen=True, slots=True)
class StoredRating:
    """A request's current rating, with the served record it refers to.

    Attributes:
        served: the rated response.
        rating: 1 to 5.
        comment: the optional comment; None when none (or blank) was given.
        rated_at: when this rating was stored, unix seconds.
        replaced: the rating this one replaced; None for the request's first rating.
    """

    served: ServedRecord
    rating: int
    comment: str | None
    rated_at: float
    replaced: int | None


#: (personality, adapter version or None, rating) -> rated requests.
RatingCounts = dict[tuple[str, str | None, int], int]


class FeedbackStore(Protocol):
    """Where served records and ratings live (see the module docstring)."""

    async def record_served(self, record: ServedRecord) -> None:
        """Remember `record` for the feedback TTL; a record under the same request id is
        replaced (a new request, with no rating yet).

        Raises:
            FeedbackUnavailable: the store cannot be reached; nothing was stored.
        """
        ...

    async def rate(self, request_id: str, rating: int, comment: str | None) -> StoredRating:
        """Store `rating` (1-5) and `comment` for the served request `request_id`,
        replacing its earlier rating if any.

        Raises:
            UnknownRequestId: no such served request within the TTL; nothing was stored.
            ValueError: `rating` is not an int from 1 to 5.
            FeedbackUnavailable: the store cannot be reached; nothing was stored.
        """
        ...

    async def get_rating(self, request_id: str) -> StoredRating | None:
        """The current rating of the latest request served as `request_id`, or None when
        it is not rated (or, in Redis, its record has expired).

        Raises:
            FeedbackUnavailable: the store cannot be reached.
        """
        ...

    async def rating_counts(self) -> RatingCounts:
        """Rated requests per (personality, adapter version, rating); zeros are left out.

        Raises:
            FeedbackUnavailable: the store cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release the connection; idempotent."""
        ...


def _check_rating(rating: int) -> None:
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATINGS:
        raise ValueError(f"rating must be an int from 1 to 5, got {rating!r}")


def clean_comment(comment: str | None) -> str | None:
    """None for an absent or blank comment, else the comment as given."""
    return comment if comment is not None and comment.strip() else None


def stored_comment(comment: str | None) -> str | None:
    """The comment as a store keeps it: None for an absent or blank one, else redacted
    (`service.redaction.redact`: names, e-mails, phone numbers, addresses)."""
    cleaned = clean_comment(comment)
    return redact(cleaned) if cleaned is not None else None


_T = TypeVar("_T")


# ---- SQLite ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
    request_id TEXT PRIMARY KEY,
    personality TEXT NOT NULL,
    adapter_version TEXT,
    source TEXT NOT NULL,
    served_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS served_expires_at ON served (expires_at);
CREATE TABLE IF NOT EXISTS ratings (
    request_id TEXT NOT NULL,
    served_at REAL NOT NULL,
    personality TEXT NOT NULL,
    adapter_version TEXT,
    source TEXT NOT NULL,
    rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    comment TEXT,
    rated_at REAL NOT NULL,
    PRIMARY KEY (request_id, served_at)
);
CREATE INDEX IF NOT EXISTS ratings_histogram ON ratings (personality, adapter_version, rating);
"""


class SQLiteFeedbackStore:
    """`FeedbackStore` in one SQLite file (layout: module docstring).

    WAL journal, `synchronous=NORMAL` (a committed rating survives a crash of the
    process; the last ones may be lost on a power cut) and a busy timeout
    (`SQLITE_BUSY_TIMEOUT_S`; `SERVED_BUSY_TIMEOUT_S` for a served record), so several
    gateway workers of one host can share the file. One connection per store, used only
    by the store's own single thread (every public method runs there), so a locked file
    never holds up the event loop's default thread pool.

    Use `await SQLiteFeedbackStore.open(path, ttl_s)`.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        ttl_s: float,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._conn = connection
        self.path = path
        self.ttl_s = ttl_s
        self._executor = executor or _sqlite_executor()
        self._lock = threading.Lock()
        self._last_prune = 0.0
        self._busy_until = 0.0  # monotonic: served records are dropped at once until then
        self._closed = False

    @classmethod
    async def open(cls, path: Path, ttl_s: float) -> SQLiteFeedbackStore:
        """Open (and create, with its folder) the feedback database at `path`.

        Args:
            path: the SQLite file.
            ttl_s: how long a served record can be rated, in seconds (> 0).

        Raises:
            ValueError: `ttl_s` is not positive.
            FeedbackUnavailable: the file cannot be created or opened as a database.
        """
        if not ttl_s > 0:
            raise ValueError(f"feedback_ttl_s must be > 0, got {ttl_s!r}")
        executor = _sqlite_executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, cls._open, path, ttl_s, executor
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @classmethod
    def _open(
        cls, path: Path, ttl_s: float, executor: concurrent.futures.ThreadPoolExecutor
    ) -> SQLiteFeedbackStore:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                path,
                timeout=SQLITE_BUSY_TIMEOUT_S,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # one thread at a time, under the store's lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise FeedbackUnavailable(
                f"feedback database {path}: {exc} (set FASTRESP_FEEDBACK_DB to a writable "
                "file, or FASTRESP_REDIS_URL)"
            ) from exc
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            connection.close()
            raise FeedbackUnavailable(f"feedback database {path}: {exc}") from exc
        return cls(connection, path, ttl_s, executor)

    async def _run(self, method: Any, *args: Any) -> Any:
        """`self._call(method, *args)` on the store's own thread."""
        try:
            future = self._executor.submit(self._call, method, *args)
        except RuntimeError as exc:  # the executor was shut down
            raise FeedbackUnavailable("the feedback store is closed") from exc
        return await asyncio.wrap_future(future)

    async def record_served(self, record: ServedRecord) -> None:
        """See `FeedbackStore.record_served`: waits at most `SERVED_BUSY_TIMEOUT_S` for
        another connection's write lock (then `FeedbackUnavailable`). Also deletes
        expired records, at most once a minute."""
        await self._run(self._record_served, record)

    async def rate(self, request_id: str, rating: int, comment: str | None) -> StoredRating:
        """See `FeedbackStore.rate`; the comment is stored redacted (`stored_comment`)."""
        _check_rating(rating)
        result: StoredRating = await self._run(
            self._rate, request_id, rating, stored_comment(comment)
        )
        return result

    async def get_rating(self, request_id: str) -> StoredRating | None:
        """See `FeedbackStore.get_rating`."""
        result: StoredRating | None = await self._run(self._get_rating, request_id)
        return result

    async def rating_counts(self) -> RatingCounts:
        """See `FeedbackStore.rating_counts`."""
        result: RatingCounts = await self._run(self._rating_counts)
        return result

    async def close(self) -> None:
        """See `FeedbackStore.close`: closes the connection, then stops the thread."""
        with contextlib.suppress(RuntimeError):  # the executor was shut down already
            await asyncio.wrap_future(self._executor.submit(self._close))
        self._executor.shutdown(wait=False)

    def _close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def _call(self, method: Any, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise FeedbackUnavailable("the feedback store is closed")
            try:
                return method(*args)
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise FeedbackUnavailable(f"feedback database {self.path}: {exc}") from exc

    def _record_served(self, record: ServedRecord) -> None:
        if time.monotonic() < self._busy_until:
            raise FeedbackUnavailable(
                f"feedback database {self.path}: locked by another connection (dropped "
                "without waiting: the previous served record timed out)"
            )
        now = time.time()
        self._conn.execute(f"PRAGMA busy_timeout = {round(SERVED_BUSY_TIMEOUT_S * 1000)}")
        try:
            self._conn.execute(
                "INSERT OR REPLACE INTO served VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.request_id,
                    record.personality,
                    record.adapter_version,
                    record.source,
                    record.served_at,
                    record.served_at + self.ttl_s,
                ),
            )
        except sqlite3.OperationalError:
            self._busy_until = time.monotonic() + SERVED_BUSY_TIMEOUT_S
            raise
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {round(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if now - self._last_prune >= PRUNE_INTERVAL_S:
            self._last_prune = now
            self._conn.execute(
                "DELETE FROM served WHERE rowid IN "
                "(SELECT rowid FROM served WHERE expires_at <= ? LIMIT ?)",
                (now, PRUNE_BATCH),
            )

    def _rate(self, request_id: str, rating: int, comment: str | None) -> StoredRating:
        self._conn.execute("BEGIN IMMEDIATE")  # the write lock first: no upgrade deadlock
        try:
            row = self._conn.execute(
                "SELECT personality, adapter_version, source, served_at FROM served "
                "WHERE request_id = ? AND expires_at > ?",
                (request_id, time.time()),
            ).fetchone()
            if row is None:
                raise UnknownRequestId(
                    "no fast response was served with this request_id within the last "
                    f"{self.ttl_s:g} s (feedback_ttl_s)",
                    loc=("body", "request_id"),
                )
            served = ServedRecord(request_id, row[0], row[1], row[2], row[3])
            old = self._conn.execute(
                "SELECT rating FROM ratings WHERE request_id = ? AND served_at = ?",
                (request_id, served.served_at),
            ).fetchone()
            rated_at = time.time()
            self._conn.execute(
                "INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id, served_at) DO UPDATE SET "
                "rating = excluded.rating, comment = excluded.comment, "
                "rated_at = excluded.rated_at",
                (
                    request_id,
                    served.served_at,
                    served.personality,
                    served.adapter_version,
                    served.source,
                    rating,
                    comment,
                    rated_at,
                ),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return StoredRating(served, rating, comment, rated_at, old[0] if old else None)

    def _get_rating(self, request_id: str) -> StoredRating | None:
        row = self._conn.execute(
            "SELECT personality, adapter_version, source, served_at, rating, comment, "
            "rated_at FROM ratings WHERE request_id = ? ORDER BY served_at DESC LIMIT 1",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        served = ServedRecord(request_id, row[0], row[1], row[2], row[3])
        return StoredRating(served, row[4], row[5], row[6], None)

    def _rating_counts(self) -> RatingCounts:
        rows = self._conn.execute(
            "SELECT personality, adapter_version, rating, COUNT(*) FROM ratings "
            "GROUP BY personality, adapter_version, rating"
        ).fetchall()
        return {(p, v, r): n for p, v, r, n in rows if n > 0}


def _sqlite_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="feedback-sqlite"
    )


# ---- Redis ----------------------------------------------------------------------------

#: KEYS[1]: the served hash, KEYS[2]: the histogram hash, KEYS[3]: the ratings stream.
#: ARGV[1]: rating, ARGV[2]: comment ("" for none), ARGV[3]: request id, ARGV[4]: the
#: stream's MAXLEN. Returns false for an unknown or expired request, else
#: {personality, version, source, served_at, replaced rating or "", rated_at}.
_RATE_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'personality', 'adapter_version', 'source',
  'served_at', 'rating')
if not rec[1] then return false end
local now = redis.call('TIME')
local rated_at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
local old = rec[5] or ''
if old ~= '' then
  redis.call('HINCRBY', KEYS[2], cjson.encode({rec[1], rec[2], old}), -1)
end
redis.call('HINCRBY', KEYS[2], cjson.encode({rec[1], rec[2], ARGV[1]}), 1)
redis.call('HSET', KEYS[1], 'rating', ARGV[1], 'comment', ARGV[2], 'rated_at', rated_at)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'request_id', ARGV[3], 'personality', rec[1], 'adapter_version', rec[2],
  'source', rec[3], 'served_at', rec[4], 'rating', ARGV[1], 'comment', ARGV[2],
  'rated_at', rated_at, 'replaces', old)
return {rec[1], rec[2], rec[3], rec[4], old, rated_at}
"""

#: Retries of one Redis command before it is refused: at most ~0.3 s.
_REDIS_RETRY = Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.05), retries=2)


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


class RedisFeedbackStore:
    """`FeedbackStore` in Redis, shared by every gateway replica (layout: module docstring).

    Args:
        client: a `redis.asyncio.Redis` (bytes or decoded responses).
        ttl_s: how long a served record can be rated, in seconds (> 0; Redis keeps
            it to the millisecond).
        prefix: key prefix (`redis_key_prefix`).
        stream_maxlen: approximate bound of the ratings stream (`XADD MAXLEN ~`).
        owns_client: close `client` in `close()`.

    Raises:
        ValueError: `ttl_s` or `stream_maxlen` is not positive.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: float,
        *,
        prefix: str = "fastresp",
        stream_maxlen: int = 100_000,
        owns_client: bool = False,
    ) -> None:
        if not ttl_s > 0 or stream_maxlen < 1:
            raise ValueError(
                f"feedback_ttl_s must be > 0 and feedback_stream_maxlen >= 1, got "
                f"{ttl_s!r} and {stream_maxlen!r}"
            )
        self._client = client
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self.served_prefix = f"{prefix}:feedback:served:"
        self.stream_key = f"{prefix}:feedback:ratings"
        self.histogram_key = f"{prefix}:feedback:histogram"
        self.stream_maxlen = stream_maxlen
        self._rate_script = client.register_script(_RATE_LUA)
        self._owns_client = owns_client
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, ttl_s: float, *, prefix: str = "fastresp", stream_maxlen: int = 100_000
    ) -> RedisFeedbackStore:
        """A store with its own client for `url`: a command is refused after ~0.3 s of
        failed retries, a reply times out after 2 s and a connect after 1 s."""
        client = redis.Redis.from_url(
            url, retry=_REDIS_RETRY, socket_timeout=2.0, socket_connect_timeout=1.0
        )
        return cls(client, ttl_s, prefix=prefix, stream_maxlen=stream_maxlen, owns_client=True)

    def _check_open(self) -> None:
        if self._closed:
            raise FeedbackUnavailable("the feedback store is closed")

    async def record_served(self, record: ServedRecord) -> None:
        """See `FeedbackStore.record_served`: DEL, HSET, PEXPIRE in one transaction."""
        self._check_open()
        key = self.served_prefix + record.request_id
        fields: dict[FieldT, EncodableT] = {
            "personality": record.personality,
            "adapter_version": record.adapter_version or "",
            "source": record.source,
            "served_at": repr(record.served_at),
        }
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            raise FeedbackUnavailable(f"feedback store (Redis) unavailable: {exc}") from exc

    async def rate(self, request_id: str, rating: int, comment: str | None) -> StoredRating:
        """See `FeedbackStore.rate`. One Lua script (module docstring); the comment is
        stored redacted (`stored_comment`)."""
        _check_rating(rating)
        self._check_open()
        comment = stored_comment(comment)
        keys = [self.served_prefix + request_id, self.histogram_key, self.stream_key]
        args = [str(rating), comment or "", request_id, str(self.stream_maxlen)]
        try:
            reply = await self._rate_script(keys=keys, args=args)
        except RedisError as exc:
            raise FeedbackUnavailable(f"feedback store (Redis) unavailable: {exc}") from exc
        if not reply:
            raise UnknownRequestId(
                "no fast response was served with this request_id within the last "
                f"{self.ttl_s:g} s (feedback_ttl_s)",
                loc=("body", "request_id"),
            )
        personality, version, source, served_at, old, rated_at = (_text(x) for x in reply)
        served = ServedRecord(
            request_id, personality, version or None, _source(source), float(served_at)
        )
        return StoredRating(served, rating, comment, float(rated_at), int(old) if old else None)

    async def get_rating(self, request_id: str) -> StoredRating | None:
        """See `FeedbackStore.get_rating`: from the served record, so None once it expired."""
        self._check_open()
        try:
            raw: dict[Any, Any] = await self._client.hgetall(self.served_prefix + request_id)
        except RedisError as exc:
            raise FeedbackUnavailable(f"feedback store (Redis) unavailable: {exc}") from exc
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "rating" not in fields:
            return None
        served = ServedRecord(
            request_id,
            fields["personality"],
            fields["adapter_version"] or None,
            _source(fields["source"]),
            float(fields["served_at"]),
        )
        return StoredRating(
            served,
            int(fields["rating"]),
            fields.get("comment") or None,
            float(fields["rated_at"]),
            None,
        )

    async def rating_counts(self) -> RatingCounts:
        """See `FeedbackStore.rating_counts`. Unreadable histogram fields are skipped."""
        self._check_open()
        try:
            raw: dict[Any, Any] = await self._client.hgetall(self.histogram_key)
        except RedisError as exc:
            raise FeedbackUnavailable(f"feedback store (Redis) unavailable: {exc}") from exc
        counts: RatingCounts = {}
        for field, value in raw.items():
            try:
                personality, version, rating = json.loads(_text(field))
                key = (str(personality), str(version) or None, int(rating))
                count = int(value)
            except (ValueError, TypeError):
                logger.error("feedback: skipping bad field %.200r of %s", field, self.histogram_key)
                continue
            if count > 0 and key[2] in RATINGS:
                counts[key] = count
        return counts

    async def close(self) -> None:
        """See `FeedbackStore.close`; an owned client is closed."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()


def _source(value: str) -> Source:
    if value == "model":
        return "model"
    if value == "cache":
        return "cache"
    if value == "fallback":
        return "fallback"
    raise FeedbackUnavailable(f"feedback store holds an unknown source {value!r}")


class UnavailableFeedbackStore:
    """`FeedbackStore` of a gateway whose store could not be opened at startup: served
    records are dropped (the startup error said why), ratings are refused with
    `FeedbackUnavailable` (503) naming the store, and the rating counts are empty.

    Args:
        reason: why the store is unavailable, naming it (e.g. the SQLite file and the
            error); the message of every refusal.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def record_served(self, record: ServedRecord) -> None:
        """Drops `record`."""

    async def rate(self, request_id: str, rating: int, comment: str | None) -> StoredRating:
        """Raises `FeedbackUnavailable` (after `ValueError` for a bad rating)."""
        _check_rating(rating)
        raise FeedbackUnavailable(self.reason)

    async def get_rating(self, request_id: str) -> StoredRating | None:
        """Raises `FeedbackUnavailable`."""
        raise FeedbackUnavailable(self.reason)

    async def rating_counts(self) -> RatingCounts:
        """No ratings: `{}`."""
        return {}

    async def close(self) -> None:
        """Nothing to release."""


def default_feedback_db(settings: Settings) -> Path:
    """The SQLite file: `feedback_db`, or `<cache_dir>/feedback.sqlite3`."""
    return settings.feedback_db or settings.cache_dir / "feedback.sqlite3"


async def open_feedback_store(settings: Settings) -> FeedbackStore:
    """The store for `settings`: Redis at `redis_url` (prefix `redis_key_prefix`), else
    the SQLite file `default_feedback_db(settings)`.

    Raises:
        FeedbackUnavailable: the SQLite file cannot be created or opened.
    """
    if settings.redis_url:
        return RedisFeedbackStore.from_url(
            settings.redis_url,
            settings.feedback_ttl_s,
            prefix=settings.redis_key_prefix,
            stream_maxlen=settings.feedback_stream_maxlen,
        )
    return await SQLiteFeedbackStore.open(default_feedback_db(settings), settings.feedback_ttl_s)


# ---- the service the routes call ------------------------------------------------------


class FeedbackService:
    """What the routes call: remember answers, take ratings, refresh the rating metric.

    Args:
        store: where records and ratings live; closed by `close()`.
        metrics: the app's metrics, whose `feedback_ratings` `refresh_metrics` sets.
    """

    def __init__(self, store: FeedbackStore, metrics: Metrics) -> None:
        self.store = store
        self._metrics = metrics
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._last_warning = 0.0
        self._failed_since_warning = 0
        self._last_refresh_warning = 0.0
        #: served records dropped because `MAX_PENDING` were already waiting
        self.dropped_over_pending = 0

    async def remember(self, response: FastResponseResponse) -> None:
        """Store the served record of `response` in the background: the answer does not
        wait for it (a rating that arrives first waits, `PENDING_WAIT_S`). Never raises: a
        store failure is logged (at most once a minute) and the response can then not be
        rated. With
        `MAX_PENDING` records already waiting for the store, the record is dropped
        (counted in `dropped_over_pending` and in the warning)."""
        record = ServedRecord.of(response)
        if len(self._pending) >= MAX_PENDING:
            self.dropped_over_pending += 1
            self._warn_dropped(f"{MAX_PENDING} served records are already waiting for the store")
            return
        task = asyncio.create_task(self._store(record))
        self._pending[record.request_id] = task
        task.add_done_callback(lambda done: self._forget(record.request_id, done))

    def _forget(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(request_id) is task:
            del self._pending[request_id]

    async def _store(self, record: ServedRecord) -> None:
        try:
            await self.store.record_served(record)
        except FeedbackUnavailable as exc:
            self._warn_dropped(exc.message)

    def _warn_dropped(self, reason: str) -> None:
        """Count one dropped served record; warn at most once per `_WARN_INTERVAL_S`."""
        self._failed_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_INTERVAL_S:
            logger.warning(
                "feedback: %d served record(s) could not be stored, so they cannot be rated: %s",
                self._failed_since_warning,
                reason,
            )
            self._last_warning = now
            self._failed_since_warning = 0

    async def rate(self, body: FeedbackRequest) -> FeedbackResponse:
        """Store the rating of `body.request_id`, replacing an earlier one.

        Raises:
            UnknownRequestId: not served, or served longer ago than the TTL (404).
            FeedbackUnavailable: the store cannot be reached (503).
        """
        pending = self._pending.get(body.request_id)
        if pending is not None:  # answered a moment ago; its record is still being stored
            await asyncio.wait({pending}, timeout=PENDING_WAIT_S)
        stored = await self.store.rate(body.request_id, body.rating, body.comment)
        return FeedbackResponse(
            request_id=body.request_id,
            rating=stored.rating,
            personality=stored.served.personality,
            adapter_version=stored.served.adapter_version,
            source=stored.served.source,
            replaced=stored.replaced is not None,
        )

    async def refresh_metrics(self) -> None:
        """Set `fastresp_feedback_rating` from the store's counts, waiting at most
        `REFRESH_TIMEOUT_S`. If the store cannot be read in time, the last values stay
        and a warning is logged (at most once a minute)."""
        try:
            counts = await asyncio.wait_for(self.store.rating_counts(), REFRESH_TIMEOUT_S)
        except (FeedbackUnavailable, TimeoutError) as exc:
            now = time.monotonic()
            if now - self._last_refresh_warning >= _WARN_INTERVAL_S:
                self._last_refresh_warning = now
                reason = (
                    exc.message
                    if isinstance(exc, FeedbackUnavailable)
                    else f"no answer within {REFRESH_TIMEOUT_S:g} s"
                )
                logger.warning(
                    "feedback: rating histogram not refreshed, serving the last known figures: %s",
                    reason,
                )
            return
        self._metrics.feedback_ratings.update(counts)

    async def settle(self) -> None:
        """Wait (at most `PENDING_WAIT_S`) for the records still being stored; cancel
        those that take longer."""
        pending = set(self._pending.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=PENDING_WAIT_S)
            for task in late:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)

    async def close(self) -> None:
        """`settle`, then close the store."""
        await self.settle()
        await self.store.close()
