"""Privacy-safe request log for the data flywheel (issue 10, part 3). Off by default.

With `request_log_dir` set (env `FASTRESP_REQUEST_LOG_DIR`) every served fast response
becomes one JSON line, and every rating (`POST /feedback`) one more line, in the format
`adapters.sources.read_request_log` reads back (``fastresp data triples --source
request-log DIR``):

- the triple fields (``id`` = the request id, ``source`` = ``request-log``,
  ``lesson_id`` = the hashed session id or null, ``pika_turn``, ``user_turn``,
  ``main_response``), plus ``fast_response``, ``served_from`` (the response's own
  ``source``, renamed because ``source`` is the triple's origin), ``adapter_version``,
  ``latency_ms``, ``request_id``, ``personality``, ``ts`` (ISO 8601, UTC) and
  ``type: "served"``;
- ``{"type": "rating", "request_id", "rating", "comment", "ts"}`` per rating, joined to
  its served line on read (a later rating replaces an earlier one).

Privacy: every text (the four turns and the rating comment) goes through
`service.redaction` in the writer thread, before its line is formatted, so nothing
unredacted reaches the disk; a name found in one text of a record is removed from all of
them, and from every later record of the same session (the writer remembers the names
of the last `SESSION_NAMES_MAX` sessions, by hashed session id, and the session of the
last `REQUEST_SESSIONS_MAX` request ids, for the rating comments). The session id is
replaced by the first 32 hex digits of its HMAC-SHA256 under `request_log_hash_key`
(default: a random key kept in ``<dir>/hmac.key``, mode 0600). Files and the folder are
created owner-only (0600/0700).

Files: one per worker process, ``requests-<pid>.jsonl``, so workers never interleave
lines. At `request_log_max_bytes`, or at the first write once the file was started (or
last written) `MAX_FILE_AGE_S` (a day) or `request_log_retention_days` (if shorter) ago,
the file is renamed to ``requests-<pid>.<UTC timestamp>.jsonl`` and a new one started
(a leftover active file of a dead worker with this pid is renamed at startup); rotated
files older than `request_log_retention_days` (by modification time) are deleted at
each rotation and at startup, as is the active file of a worker that no longer runs on
this host.

Writes do not block the event loop: the caller only builds the row (hashing the
session id) and puts it on a queue (`logging.handlers.QueueHandler`, with no formatting
on the caller's side): 10 microseconds at P95 whatever the texts (2,000 calls each
of maximum-length texts full of digit groups and of plain ones, from a coroutine, with
the writer busy redacting meanwhile; ``time.perf_counter`` around `record_served`). A
`QueueListener` thread redacts, serialises and writes it through a rotating
`logging.handlers.RotatingFileHandler` on a dedicated, non-propagating logger.
Redaction takes up to about 50 ms for such worst-case texts; the writer shares the
GIL, so the event loop may wait up to one switch interval (5 ms) now and then while it
runs, never for a whole redaction. A burst only delays the lines. `close()` writes out
what is queued.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import queue
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path
from typing import Any, cast

from adapters.sources import REQUEST_LOG_SOURCE
from service.redaction import record_names, redact, redact_record
from service.schemas import FastResponseRequest, FastResponseResponse
from service.settings import Settings

_log = logging.getLogger(__name__)

KEY_FILE = "hmac.key"
"""The default HMAC key's file in the log folder (64 hex digits, mode 0600)."""

SESSION_NAMES_MAX = 10_000
"""Sessions whose names the writer remembers (least recently used forgotten first)."""

REQUEST_SESSIONS_MAX = 100_000
"""Request ids whose session the writer remembers, to redact a rating comment with it."""

MAX_FILE_AGE_S = 86400.0
"""A file is rotated once it was started this long ago (or `retention_days`, if shorter),
at its next write, so that retention can delete it even when it never fills."""

_ACTIVE = re.compile(r"requests-(\d+)\.jsonl")
_ROTATED = re.compile(r"requests-(\d+)\.(\d{8}T\d{12}Z)(?:-\d+)?\.jsonl")


def active_file(directory: Path, pid: int | None = None) -> Path:
    """The file the worker `pid` (default: this process) writes now."""
    return directory / f"requests-{os.getpid() if pid is None else pid}.jsonl"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def delete_expired(directory: Path, retention_s: float, now: float | None = None) -> list[Path]:
    """Delete the request-log files of `directory` not modified for `retention_s` seconds.

    Rotated files go by age alone; an active file (``requests-<pid>.jsonl``) only when
    no process `pid` runs on this host and it is not this process's, so a live worker's
    file is never pulled from under it.

    Returns:
        The deleted files.
    """
    cutoff = (time.time() if now is None else now) - retention_s
    deleted: list[Path] = []
    for path in directory.glob("requests-*.jsonl"):
        active = _ACTIVE.fullmatch(path.name)
        if not (_ROTATED.fullmatch(path.name) or active):
            continue
        if active is not None:
            pid = int(active.group(1))
            if pid == os.getpid() or _pid_running(pid):
                continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                deleted.append(path)
        except FileNotFoundError:
            continue  # another worker deleted it first
    return deleted


class _RotatingJsonlHandler(RotatingFileHandler):
    """`RotatingFileHandler` that renames a full file with a UTC timestamp (no renaming
    chain of ``.1``, ``.2``...), deletes expired files at each rotation, and creates files
    owner-only."""

    def __init__(
        self, path: Path, max_bytes: int, retention_s: float, clock: Callable[[], float]
    ) -> None:
        self.retention_s = retention_s
        self.max_age_s = min(MAX_FILE_AGE_S, retention_s)
        self.clock = clock
        self.opened_at = clock()
        # backupCount only has to be > 0 for the base class to rotate at all.
        super().__init__(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8", delay=True)

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.opened_at = self.clock()
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def shouldRollover(self, record: logging.LogRecord) -> int:
        if self.stream is not None:
            # Started long ago, or not written for as long (its lines are all that old).
            cutoff = self.clock() - self.max_age_s
            if self.opened_at <= cutoff or os.fstat(self.stream.fileno()).st_mtime <= cutoff:
                return 1
        return super().shouldRollover(record)

    def rotated_name(self) -> Path:
        base = Path(self.baseFilename)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        candidate = base.with_name(f"{base.stem}.{stamp}.jsonl")
        n = 1
        while candidate.exists():  # two rotations in one microsecond
            candidate = base.with_name(f"{base.stem}.{stamp}-{n}.jsonl")
            n += 1
        return candidate

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None  # reopened by the next emit
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, self.rotated_name())
        delete_expired(Path(self.baseFilename).parent, self.retention_s, now=self.clock())

    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib's handleError prints the record's message; keep the texts out of
        # stderr and say only what failed.
        _log.error("request log: cannot write %s", self.baseFilename, exc_info=True)


class _RawQueueHandler(QueueHandler):
    """`QueueHandler` that queues the record as it is: the caller's side does no
    formatting, the writer thread's `_RedactingFormatter` does it all."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _RedactingFormatter(logging.Formatter):
    """Turns a queued row (``record.msg``, a dict of raw texts) into its redacted JSON line.

    Runs in the `QueueListener`'s one writer thread only, so its memory needs no lock:
    the names found per session (`SESSION_NAMES_MAX` sessions, keyed by the hashed
    session id, least recently used forgotten first) are redacted from every later
    record of that session, and a rating comment is redacted with the names of its
    request's session (`REQUEST_SESSIONS_MAX` request ids remembered).
    """

    def __init__(self, phone_regions: Sequence[str]) -> None:
        super().__init__()
        self.phone_regions = tuple(phone_regions)
        self.session_names: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.request_sessions: OrderedDict[str, str] = OrderedDict()

    def _names_of(self, session: str | None) -> tuple[str, ...]:
        if session is None or session not in self.session_names:
            return ()
        self.session_names.move_to_end(session)
        return self.session_names[session]

    def _remember(self, request_id: str, session: str | None, names: Sequence[str]) -> None:
        if session is None:
            return
        known = self._names_of(session)
        self.session_names[session] = tuple(dict.fromkeys((*known, *names)))
        self.session_names.move_to_end(session)
        while len(self.session_names) > SESSION_NAMES_MAX:
            self.session_names.popitem(last=False)
        self.request_sessions[request_id] = session
        self.request_sessions.move_to_end(request_id)
        while len(self.request_sessions) > REQUEST_SESSIONS_MAX:
            self.request_sessions.popitem(last=False)

    def _redacted(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["type"] == "rating":
            session = self.request_sessions.get(row["request_id"])
            comment = row["comment"]
            if comment:
                row["comment"] = redact(
                    comment, names=self._names_of(session), phone_regions=self.phone_regions
                )
            return row
        texts = {key: row[key] for key in _TEXT_FIELDS}
        session = row["lesson_id"]
        found = record_names(texts)
        self._remember(row["request_id"], session, found)
        row.update(
            redact_record(texts, names=self._names_of(session), phone_regions=self.phone_regions)
        )
        return row

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "redacted_line", None)
        if line is None:  # RotatingFileHandler formats twice: for the size check, to write
            row = self._redacted(dict(cast("dict[str, Any]", record.msg)))
            line = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
            record.redacted_line = line
        return str(line)


_TEXT_FIELDS = ("pika_turn", "user_turn", "main_response", "fast_response")


def _load_or_create_key(directory: Path) -> bytes:
    """The folder's default HMAC key, made once; safe when several workers race."""
    path = directory / KEY_FILE
    if not path.exists():
        tmp = directory / f".{KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic: the first worker's key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    text = path.read_text(encoding="ascii").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"request_log_hash_key: {path} does not hold 64 hex digits")
    return bytes.fromhex(text)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestLog:
    """Writes redacted served responses and ratings to rotated JSON Lines files.

    Build it per worker process (in the app's lifespan), with `from_settings`; call
    `close` at shutdown. `record_served` and `record_rating` never raise on a write
    problem: the request is worth more than its log line (the failure is logged, without
    the texts).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        retention_days: float = 30.0,
        hash_key: bytes | None = None,
        phone_regions: Sequence[str] = ("US", "GB"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open the log in `directory` (created, mode 0700, when missing).

        Args:
            directory: The log folder.
            max_bytes: File size in bytes at which the file is rotated (>= 1024).
            retention_days: Rotated files older than this (days, > 0) are deleted.
            hash_key: HMAC-SHA256 key for session ids; None: the folder's `KEY_FILE`.
            phone_regions: See `service.redaction.redact`.
            clock: Seconds since the epoch, for the files' age (tests pass a fake one).

        Raises:
            ValueError: `max_bytes` or `retention_days` out of range, or a bad key file.
            OSError: The folder cannot be created or written.
        """
        if max_bytes < 1024:
            raise ValueError(f"request_log_max_bytes must be >= 1024, got {max_bytes}")
        if retention_days <= 0:
            raise ValueError(f"request_log_retention_days must be > 0, got {retention_days}")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.path = active_file(directory)
        self.phone_regions = tuple(phone_regions)
        self._key = hash_key if hash_key is not None else _load_or_create_key(directory)
        retention_s = retention_days * 86400.0
        self._handler = _RotatingJsonlHandler(self.path, max_bytes, retention_s, clock)
        self._handler.setFormatter(_RedactingFormatter(self.phone_regions))
        if self.path.exists() and self.path.stat().st_size > 0:
            # A file of a dead worker with our pid: start afresh, so that its lines age out.
            self._handler.doRollover()
        delete_expired(directory, retention_s, now=clock())
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        # An unregistered Logger: private to this instance, so tests (or two logs in one
        # process) never share handlers, and nothing propagates to the root logger.
        self._logger = logging.Logger(f"{__name__}.{os.getpid()}", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(_RawQueueHandler(lines))
        self._listener = QueueListener(lines, self._handler)
        self._listener.start()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLog | None:
        """The log `settings` ask for; None when `request_log_dir` is not set (the default).

        Raises:
            OSError: `request_log_dir` cannot be created or written.
            ValueError: Its key file is not a key.
        """
        if settings.request_log_dir is None:
            return None
        key = settings.request_log_hash_key
        return cls(
            settings.request_log_dir,
            max_bytes=settings.request_log_max_bytes,
            retention_days=settings.request_log_retention_days,
            hash_key=key.get_secret_value().encode("utf-8") if key is not None else None,
            phone_regions=settings.request_log_phone_regions.split(","),
        )

    def hash_session(self, session_id: str | None) -> str | None:
        """The logged form of a session id: 32 hex digits of its HMAC-SHA256; None stays."""
        if session_id is None:
            return None
        digest = hmac.new(self._key, session_id.encode("utf-8"), hashlib.sha256)
        return digest.hexdigest()[:32]

    def _write(self, row: dict[str, Any]) -> None:
        if self._closed:
            _log.debug("request log closed; %s line dropped", row.get("type"))
            return
        self._logger.info(row)  # redacted and serialised by the writer thread

    def record_served(self, request: FastResponseRequest, response: FastResponseResponse) -> None:
        """Queue one ``served`` line for `response` to `request`; the writer thread redacts
        its texts (with the names of the session's earlier records) before writing."""
        try:
            self._write(
                {
                    "type": "served",
                    "id": response.request_id,
                    "source": REQUEST_LOG_SOURCE,
                    "lesson_id": self.hash_session(request.session_id),
                    "pika_turn": request.pika_turn,
                    "user_turn": request.user_turn,
                    "main_response": request.main_response,
                    "fast_response": response.fast_response,
                    "served_from": response.source,
                    "adapter_version": response.adapter_version,
                    "latency_ms": round(response.latency_ms, 3),
                    "request_id": response.request_id,
                    "personality": response.personality,
                    "ts": _now(),
                }
            )
        except Exception:  # never fail the request for its log line
            _log.exception("request log: cannot record request %s", response.request_id)

    def record_rating(self, request_id: str, rating: int, comment: str | None) -> None:
        """Queue one ``rating`` line; the writer thread redacts the comment (with the names
        of the rated request's session, when it is remembered) before writing.

        Raises:
            ValueError: `rating` is not an integer from 1 to 5.
        """
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise ValueError(f"rating: must be an integer from 1 to 5, got {rating!r}")
        try:
            self._write(
                {
                    "type": "rating",
                    "request_id": request_id,
                    "rating": rating,
                    "comment": comment or None,
                    "ts": _now(),
                }
            )
        except Exception:
            _log.exception("request log: cannot record the rating of %s", request_id)

    def flush(self) -> None:
        """Wait until every queued line is written (for tests and shutdown)."""
        if self._closed:
            return
        self._listener.stop()  # drains the queue, then joins the thread
        self._handler.flush()
        self._listener.start()

    def close(self) -> None:
        """Write out what is queued and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._listener.stop()
        self._handler.close()
