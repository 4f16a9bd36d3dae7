"""Replay conversation triples against a running gateway and summarise the answers.

`replay` sends each triple to ``POST /fast-response`` with bounded concurrency over one
pooled HTTP client; `summarize` computes counts and latency percentiles; `render`
prints a table and the summary; `write_jsonl` stores the rows. `fastresp replay` in
`service.cli` wires them together.

Latency percentiles use `statistics.quantiles(data, n=100, method="inclusive")`:
linear interpolation between the closest ranks, i.e. Hyndman & Fan type 7, the
default of ``numpy.percentile`` and of spreadsheets' ``PERCENTILE``/``PERCENTILE.INC``.
Only rows answered with HTTP 200 count towards latency, so fast errors (a refused
connection, a 422) do not pull the percentiles down.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, computed_field
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from adapters.dataset import write_jsonl_atomic
from adapters.sources import Triple
from service.schemas import ErrorResponse, FastResponseResponse, Identifier

FAST_RESPONSE_PATH = "/fast-response"
PERSONALITIES_PATH = "/personalities"

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ReplayRow(BaseModel):
    """One replayed triple: what was sent and what came back."""

    model_config = ConfigDict(frozen=True)

    triple: Triple
    personality: str
    """The personality the request asked for."""
    session_id: str
    """The session id sent (one per source lesson, see `session_id_for`)."""
    request_id: str
    """The request id sent (the triple id, see `request_id_for`)."""
    status: int | None
    """HTTP status code; None when no response arrived (transport error)."""
    fast_response: str | None = None
    source: str | None = None
    """The server's ``source``: ``model``, ``cache`` or ``fallback``; None on error."""
    adapter_version: str | None = None
    latency_ms: float | None = None
    """Time the gateway reports it spent, in milliseconds; None on error."""
    client_ms: float
    """Client-side round trip (send, wait, read the body), in milliseconds."""
    error: str | None = None
    """Why the row failed: ``HTTP 422: body.user_turn: ...`` or ``ConnectError: ...``."""
    error_kind: str | None = None
    """A short, bounded error class: ``HTTP 422``, ``ConnectError``, ``bad_response``."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when the server answered 200 with a valid body."""
        return self.error is None


class Percentiles(BaseModel):
    """P50/P95/P99 of a latency sample, in milliseconds (type 7, see the module doc)."""

    model_config = ConfigDict(frozen=True)

    p50: float
    p95: float
    p99: float


class ReplaySummary(BaseModel):
    """Aggregate of a replay run."""

    model_config = ConfigDict(frozen=True)

    count: int
    ok: int
    errors: int
    fallback: int
    """Ok rows whose source is ``fallback``."""
    fallback_rate: float | None
    """``fallback / ok`` in [0, 1]; None when no row is ok."""
    sources: dict[str, int]
    """Ok rows by server ``source``."""
    error_kinds: dict[str, int]
    """Failed rows by `ReplayRow.error_kind`."""
    client_ms: Percentiles | None
    """Round-trip percentiles over ok rows; None when no row is ok."""
    server_ms: Percentiles | None
    """Server ``latency_ms`` percentiles over ok rows; None when no row is ok."""


def latency_percentiles(values: Sequence[float]) -> Percentiles | None:
    """P50, P95 and P99 of `values` by linear interpolation (Hyndman & Fan type 7).

    Args:
        values: Latencies in milliseconds, any order.

    Returns:
        The percentiles; all three equal the value for one sample; None for none.
    """
    if not values:
        return None
    if len(values) == 1:
        return Percentiles(p50=values[0], p95=values[0], p99=values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return Percentiles(p50=cuts[49], p95=cuts[94], p99=cuts[98])


def session_id_for(triple: Triple) -> str:
    """A stable session id per source lesson (per triple when the lesson is unknown).

    The id is ``replay:{source}:{slug}:{hash}``: a readable slug of the lesson plus 8
    hex digits of its SHA-256, so it matches the wire `Identifier` pattern whatever
    characters the lesson name holds (Bridge lesson topics contain spaces).
    """
    key = triple.lesson_id if triple.lesson_id is not None else triple.id
    slug = _NOT_ID_CHARS.sub("-", key).strip("-")[:60] or "x"
    source = _NOT_ID_CHARS.sub("-", triple.source)[:20] or "x"
    digest = hashlib.sha256(f"{triple.source}\0{key}".encode()).hexdigest()[:8]
    return f"replay:{source}:{slug}:{digest}"


def request_id_for(triple: Triple) -> str:
    """The triple id when it is a valid wire `Identifier`, else ``replay:`` + its hash."""
    try:
        return _IDENTIFIER.validate_python(triple.id)
    except ValidationError:
        return "replay:" + hashlib.sha256(triple.id.encode()).hexdigest()[:32]


def request_body(triple: Triple, personality: str) -> dict[str, str]:
    """The ``POST /fast-response`` JSON body for one triple; None fields are omitted."""
    body = {
        "personality": personality,
        "pika_turn": triple.pika_turn,
        "user_turn": triple.user_turn,
        "main_response": triple.main_response,
        "session_id": session_id_for(triple),
        "request_id": request_id_for(triple),
    }
    return {key: value for key, value in body.items() if value is not None}


def _error_detail(response: httpx.Response) -> str:
    """The error body as ``loc: msg; ...`` (the gateway's ErrorResponse) or its text."""
    try:
        error = ErrorResponse.model_validate_json(response.content)
    except ValidationError:
        pass
    else:
        return "; ".join(
            f"{'.'.join(str(part) for part in item.loc)}: {item.msg}" for item in error.detail
        )
    try:
        payload: Any = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        return str(payload["detail"])
    return response.text[:200] or response.reason_phrase


async def _send(client: httpx.AsyncClient, triple: Triple, personality: str) -> ReplayRow:
    body = request_body(triple, personality)
    common: dict[str, Any] = {
        "triple": triple,
        "personality": personality,
        "session_id": body["session_id"],
        "request_id": body["request_id"],
    }
    start = time.perf_counter()
    try:
        response = await client.post(FAST_RESPONSE_PATH, json=body)
    except httpx.HTTPError as exc:
        elapsed = (time.perf_counter() - start) * 1000.0
        kind = type(exc).__name__
        message = str(exc)
        return ReplayRow(
            **common,
            status=None,
            client_ms=elapsed,
            error=f"{kind}: {message}" if message else kind,
            error_kind=kind,
        )
    elapsed = (time.perf_counter() - start) * 1000.0
    if response.status_code != 200:
        return ReplayRow(
            **common,
            status=response.status_code,
            client_ms=elapsed,
            error=f"HTTP {response.status_code}: {_error_detail(response)}",
            error_kind=f"HTTP {response.status_code}",
        )
    try:
        answer = FastResponseResponse.model_validate_json(response.content)
    except ValidationError as exc:
        return ReplayRow(
            **common,
            status=response.status_code,
            client_ms=elapsed,
            error=f"bad response body: {exc.error_count()} problem(s)",
            error_kind="bad_response",
        )
    return ReplayRow(
        **common,
        status=response.status_code,
        fast_response=answer.fast_response,
        source=answer.source,
        adapter_version=answer.adapter_version,
        latency_ms=answer.latency_ms,
        client_ms=elapsed,
    )


async def replay(
    triples: Iterable[Triple],
    base_url: str,
    personalities: Sequence[str],
    concurrency: int = 4,
    timeout_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[ReplayRow]:
    """Send every triple to ``POST {base_url}/fast-response`` and collect the answers.

    One pooled `httpx.AsyncClient` (at most `concurrency` connections) and a semaphore
    keep at most `concurrency` requests in flight. Triple ``i`` gets personality
    ``personalities[i % len(personalities)]``; see `request_body` for the body. A
    failed request (non-200 status, transport error, timeout, malformed body) becomes
    a row with `ReplayRow.error` set; it never raises.

    Args:
        triples: The triples to send.
        base_url: The gateway, e.g. ``http://127.0.0.1:8000``.
        personalities: Personality names, used round robin; at least one.
        concurrency: Most requests in flight at once; at least 1.
        timeout_s: Per-request timeout (connect, read, write, pool), in seconds.
        progress: Called as ``progress(done, total)`` after each row completes.
        transport: Where requests go instead of the network, e.g.
            ``httpx.ASGITransport(app)`` for a gateway running in this process.

    Returns:
        One row per triple, in the order of `triples`.

    Raises:
        ValueError: No personalities, or `concurrency` below 1.
    """
    if not personalities:
        raise ValueError("at least one personality is needed")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    items = list(triples)
    total = len(items)
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits, transport=transport
    ) as client:

        async def one(index: int, triple: Triple) -> ReplayRow:
            nonlocal done
            async with semaphore:
                row = await _send(client, triple, personalities[index % len(personalities)])
            done += 1
            if progress is not None:
                progress(done, total)
            return row

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, triple)) for i, triple in enumerate(items)]
    return [task.result() for task in tasks]


def fetch_personalities(base_url: str, timeout_s: float = 10.0) -> list[str]:
    """Names from ``GET {base_url}/personalities`` (``{"personalities": [{"name": ...}]}``).

    Blocking; for the CLI, outside any event loop.

    Raises:
        httpx.HTTPError: Transport error or a non-2xx status.
        ValueError: The body is not the expected shape.
    """
    response = httpx.get(base_url.rstrip("/") + PERSONALITIES_PATH, timeout=timeout_s)
    response.raise_for_status()
    payload: Any = response.json()
    try:
        return [str(item["name"]) for item in payload["personalities"]]
    except (TypeError, KeyError) as exc:
        raise ValueError(f"unexpected {PERSONALITIES_PATH} body: {response.text[:200]}") from exc


def summarize(rows: Sequence[ReplayRow]) -> ReplaySummary:
    """Counts, fallback rate and latency percentiles of a replay (see the module doc).

    Args:
        rows: The rows from `replay`; may be empty.

    Returns:
        The summary; rates and percentiles are None when no row is ok.
    """
    ok_rows = [row for row in rows if row.ok]
    sources = Counter(row.source or "unknown" for row in ok_rows)
    fallback = sources.get("fallback", 0)
    return ReplaySummary(
        count=len(rows),
        ok=len(ok_rows),
        errors=len(rows) - len(ok_rows),
        fallback=fallback,
        fallback_rate=fallback / len(ok_rows) if ok_rows else None,
        sources=dict(sorted(sources.items())),
        error_kinds=dict(Counter(row.error_kind or "error" for row in rows if not row.ok)),
        client_ms=latency_percentiles([row.client_ms for row in ok_rows]),
        server_ms=latency_percentiles(
            [row.latency_ms for row in ok_rows if row.latency_ms is not None]
        ),
    )


def _clip(text: str | None, max_text: int) -> str:
    """One-line `text`, cut to `max_text` characters with an ellipsis; ``-`` for None."""
    if text is None:
        return "-"
    flat = " ".join(text.split())
    if len(flat) <= max_text:
        return flat
    return flat[: max(max_text - 1, 0)].rstrip() + "…"


def _format_percentiles(p: Percentiles | None) -> str:
    if p is None:
        return "n/a"
    return f"P50 {p.p50:.1f}  P95 {p.p95:.1f}  P99 {p.p99:.1f}"


def summary_lines(summary: ReplaySummary) -> list[str]:
    """The summary as plain lines (what `render` prints under the table)."""
    errors = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.error_kinds.items()))
    sources = ", ".join(f"{name} {n}" for name, n in summary.sources.items()) or "none"
    rate = "n/a" if summary.fallback_rate is None else f"{summary.fallback_rate:.1%}"
    return [
        f"rows {summary.count}: ok {summary.ok}, errors {summary.errors}"
        + (f" ({errors})" if errors else ""),
        f"sources: {sources}; fallback {summary.fallback} = {rate} of ok rows",
        f"round trip ms: {_format_percentiles(summary.client_ms)}",
        f"server latency_ms: {_format_percentiles(summary.server_ms)}",
    ]


def render(
    rows: Sequence[ReplayRow], summary: ReplaySummary, console: Console, max_text: int = 60
) -> None:
    """Print the rows as a table, then the summary block.

    Columns: row number, personality, pika turn, child turn, fast response (or the
    error, in red), source, round-trip latency ms and the server's latency_ms. Texts
    are flattened to one line and cut to `max_text` characters with ``…`` (and
    further with ``…`` if the console is too narrow); they are printed as plain
    text (no rich markup is interpreted). About ``3 * max_text + 75`` columns show
    every row on one line.

    Args:
        rows: The rows from `replay`.
        summary: `summarize(rows)`.
        console: Where to print.
        max_text: Longest text shown per cell, in characters.
    """
    table = Table(title="fast-response replay", show_lines=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("personality", no_wrap=True)
    for header in ("pika turn", "child turn", "fast response"):
        table.add_column(header, max_width=max_text, no_wrap=True, overflow="ellipsis")
    table.add_column("source")
    table.add_column("latency ms", justify="right")
    table.add_column("server ms", justify="right")
    for number, row in enumerate(rows, start=1):
        if row.ok:
            answer = Text(_clip(row.fast_response, max_text))
            source = Text(row.source or "-", style="yellow" if row.source == "fallback" else "")
        else:
            answer = Text(_clip(row.error, max_text), style="red")
            source = Text("error", style="red")
        table.add_row(
            str(number),
            Text(row.personality),
            Text(_clip(row.triple.pika_turn, max_text)),
            Text(_clip(row.triple.user_turn, max_text)),
            answer,
            source,
            f"{row.client_ms:.1f}",
            "-" if row.latency_ms is None else f"{row.latency_ms:.1f}",
        )
    console.print(table)
    console.print(Group(*(Text(line) for line in summary_lines(summary))))


class ReplayFileError(ValueError):
    """A replay file is unreadable or a line is not a `ReplayRow`; the message names both."""


def read_replay_rows(path: Path) -> list[ReplayRow]:
    """Every row of a file `write_jsonl` wrote (``fastresp replay --out``, an evaluation
    run's ``responses.jsonl``), in file order.

    Raises:
        ReplayFileError: the file is missing or unreadable, or a line is not a replay row
            (``path:line: not a replay row: field: message``).
    """
    from adapters.labels import read_jsonl_strict

    return read_jsonl_strict(path, ReplayRow, ReplayFileError, "replay file")


def write_jsonl(rows: Iterable[ReplayRow], path: Path) -> None:
    """Write one JSON object per row to `path`, atomically (temp file + `os.replace`;
    `adapters.dataset.write_jsonl_atomic`).

    Each object is `ReplayRow` as JSON, including the nested triple and ``ok``.

    Raises:
        OSError: The directory is missing or not writable; `path` is then untouched.
    """
    write_jsonl_atomic((row.model_dump_json() for row in rows), Path(path))
