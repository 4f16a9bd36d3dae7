"""Tests of service.replay and `fastresp replay`.

The HTTP tests run against a FAKE gateway: a tiny FastAPI app in a uvicorn thread
that answers by keywords in `user_turn` ("slow", "reject", "fallback", "garbage") and
records the requests it saw. It is not the real service; the real end-to-end replay
test lives elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console
from typer.testing import CliRunner

from adapters.sources import Triple
from service.cli import app as cli_app
from service.replay import (
    Percentiles,
    ReplayRow,
    latency_percentiles,
    render,
    replay,
    request_body,
    session_id_for,
    summarize,
    write_jsonl,
)
from tests.conftest import free_port

# --- helpers ----------------------------------------------------------------------------


def _triple(
    i: int | str,
    user_turn: str = "red",
    *,
    lesson: str | None = "L1",
    pika: str | None = "What colour is it?",
    main: str | None = "Yes, red!",
) -> Triple:
    return Triple(
        id=f"t:{i}",
        source="test",
        lesson_id=lesson,
        pika_turn=pika,
        user_turn=user_turn,
        main_response=main,
    )


def _row(
    i: int,
    *,
    source: str | None = "model",
    client_ms: float = 10.0,
    latency_ms: float | None = 1.0,
    status: int | None = 200,
    error: str | None = None,
    error_kind: str | None = None,
    user_turn: str = "red",
    answer: str | None = "Ooh, red!",
) -> ReplayRow:
    return ReplayRow(
        triple=_triple(i, user_turn),
        personality="cheerful",
        session_id="s",
        request_id=f"t:{i}",
        status=status,
        fast_response=answer if error is None else None,
        source=source if error is None else None,
        latency_ms=latency_ms if error is None else None,
        client_ms=client_ms,
        error=error,
        error_kind=error_kind,
    )


# --- percentiles and summary ------------------------------------------------------------


def test_latency_percentiles_golden() -> None:
    # Type 7: position h = (n - 1) p over the sorted sample, linear in between.
    # 1..10: P50 h=4.5 -> 5.5; P95 h=8.55 -> 9 + 0.55 = 9.55; P99 h=8.91 -> 9.91.
    got = latency_percentiles([7.0, 1.0, 10.0, 3.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0])
    assert got == pytest.approx(Percentiles(p50=5.5, p95=9.55, p99=9.91))
    assert got is not None
    assert (got.p50, got.p95, got.p99) == pytest.approx((5.5, 9.55, 9.91))
    # Two points: 10 + p * 10.
    two = latency_percentiles([20.0, 10.0])
    assert two is not None
    assert (two.p50, two.p95, two.p99) == pytest.approx((15.0, 19.5, 19.9))
    assert latency_percentiles([42.0]) == Percentiles(p50=42.0, p95=42.0, p99=42.0)
    assert latency_percentiles([]) is None


def _mixed_rows() -> list[ReplayRow]:
    return [
        _row(0, source="model", client_ms=10.0, latency_ms=1.0),
        _row(1, source="cache", client_ms=40.0, latency_ms=4.0),
        _row(2, source="fallback", client_ms=20.0, latency_ms=2.0, answer="Hmm, let me think!"),
        _row(3, source="model", client_ms=30.0, latency_ms=3.0),
        _row(
            4,
            status=422,
            client_ms=1000.0,
            error="HTTP 422: body.user_turn: too long",
            error_kind="HTTP 422",
        ),
        _row(
            5,
            status=None,
            client_ms=0.5,
            error="ConnectError: All connection attempts failed",
            error_kind="ConnectError",
        ),
    ]


def test_summarize_golden() -> None:
    summary = summarize(_mixed_rows())
    assert (summary.count, summary.ok, summary.errors) == (6, 4, 2)
    assert summary.fallback == 1
    assert summary.fallback_rate == pytest.approx(0.25)
    assert summary.sources == {"cache": 1, "fallback": 1, "model": 2}
    assert summary.error_kinds == {"HTTP 422": 1, "ConnectError": 1}
    # Ok rows only: client 10, 20, 30, 40 -> P50 25; P95 h=2.85 -> 38.5; P99 h=2.97 -> 39.7.
    assert summary.client_ms is not None
    assert (summary.client_ms.p50, summary.client_ms.p95, summary.client_ms.p99) == (
        pytest.approx((25.0, 38.5, 39.7))
    )
    assert summary.server_ms is not None
    assert (summary.server_ms.p50, summary.server_ms.p95, summary.server_ms.p99) == (
        pytest.approx((2.5, 3.85, 3.97))
    )


def test_summarize_empty_and_single() -> None:
    empty = summarize([])
    assert (empty.count, empty.ok, empty.errors, empty.fallback) == (0, 0, 0, 0)
    assert empty.fallback_rate is None
    assert empty.client_ms is None
    assert empty.server_ms is None
    one = summarize([_row(0, client_ms=12.5, latency_ms=3.0)])
    assert one.client_ms == Percentiles(p50=12.5, p95=12.5, p99=12.5)
    assert one.fallback_rate == 0.0
    all_failed = summarize([_row(0, status=503, error="HTTP 503: busy", error_kind="HTTP 503")])
    assert (all_failed.ok, all_failed.errors, all_failed.fallback_rate) == (0, 1, None)


# --- render and write_jsonl -------------------------------------------------------------


def test_render_shows_rows_and_summary() -> None:
    rows = _mixed_rows()
    long_turn = "the dog is " + "very " * 40 + "big [bold]really[/bold]"
    rows.append(_row(6, user_turn=long_turn, answer="Wow, a big dog!"))
    buffer = StringIO()
    console = Console(file=buffer, width=250, color_system=None)
    render(rows, summarize(rows), console, max_text=40)
    out = buffer.getvalue()

    for header in ("pika turn", "child turn", "fast response", "source", "latency ms"):
        assert header in out
    assert "What colour is it?" in out
    assert "Ooh, red!" in out
    assert "Hmm, let me think!" in out
    assert "fallback" in out
    assert "HTTP 422: body.user_turn: too long" in out
    # 45 characters cut to 40: 39 and an ellipsis.
    assert "ConnectError: All connection attempts f…" in out
    assert "the dog is very" in out
    assert "…" in out
    assert long_turn not in out
    assert "Wow, a big dog!" in out
    # Summary block.
    assert "rows 7: ok 5, errors 2 (ConnectError 1, HTTP 422 1)" in out
    assert "fallback 1 = 20.0% of ok rows" in out
    assert "round trip ms: P50 20.0" in out
    assert "server latency_ms: P50 2.0" in out


def test_render_does_not_interpret_markup() -> None:
    rows = [_row(0, user_turn="[red]not red[/red]", answer="[bold]x[/bold]")]
    buffer = StringIO()
    render(rows, summarize(rows), Console(file=buffer, width=200, color_system=None))
    assert "[red]not red[/red]" in buffer.getvalue()
    assert "[bold]x[/bold]" in buffer.getvalue()


def test_write_jsonl_is_complete_and_atomic(tmp_path: Path) -> None:
    out = tmp_path / "replay.jsonl"
    out.write_text("old content\n", encoding="utf-8")
    rows = _mixed_rows()
    write_jsonl(rows, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rows)
    parsed = [json.loads(line) for line in lines]
    assert [p["triple"]["id"] for p in parsed] == [f"t:{i}" for i in range(6)]
    assert [p["ok"] for p in parsed] == [True, True, True, True, False, False]
    assert parsed[4]["status"] == 422
    assert parsed[5]["error_kind"] == "ConnectError"
    assert ReplayRow.model_validate_json(lines[0]).triple == rows[0].triple
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.jsonl"]  # no temp file left
    with pytest.raises(OSError):
        write_jsonl(rows, tmp_path / "missing-dir" / "x.jsonl")


def test_request_body_and_session_ids() -> None:
    body = request_body(_triple(1, pika=None, main=None, lesson="3.6D.Decomposing Figures"), "calm")
    assert body == {
        "personality": "calm",
        "user_turn": "red",
        "session_id": body["session_id"],
        "request_id": "t:1",
    }
    assert body["session_id"].startswith("replay:test:3.6D.Decomposing-Figures:")
    # One session per lesson; none when unknown, then one per triple.
    assert session_id_for(_triple(1)) == session_id_for(_triple(2))
    assert session_id_for(_triple(1)) != session_id_for(_triple(1, lesson="L2"))
    assert session_id_for(_triple(1, lesson=None)) != session_id_for(_triple(2, lesson=None))
    odd = Triple(id="has spaces/and slashes", source="x", user_turn="hi")
    assert request_body(odd, "calm")["request_id"].startswith("replay:")


# --- the fake gateway -------------------------------------------------------------------


@dataclass
class FakeGateway:
    """A FAKE /fast-response server for replay tests; answers by keywords in user_turn."""

    url: str
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests.clear()


def _fake_app(state: FakeGateway) -> FastAPI:
    fake = FastAPI()

    @fake.get("/personalities")
    async def personalities() -> dict[str, list[dict[str, str]]]:
        return {"personalities": [{"name": "cheerful"}, {"name": "calm"}]}

    @fake.post("/fast-response")
    async def fast_response(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            turn: str = body["user_turn"]
            if "slow" in turn:
                await asyncio.sleep(0.2)
            if "reject" in turn:
                detail = [{"loc": ["body", "user_turn"], "msg": "fake rejection", "type": "x"}]
                return JSONResponse(status_code=422, content={"detail": detail})
            if "garbage" in turn:
                return JSONResponse({"unexpected": True})
            return JSONResponse(
                {
                    "fast_response": f"Ooh, {turn}!",
                    "source": "fallback" if "fallback" in turn else "model",
                    "personality": body["personality"],
                    "adapter_version": None,
                    "latency_ms": 2.5,
                    "request_id": body.get("request_id", "none"),
                }
            )
        finally:
            state.in_flight -= 1

    return fake


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    state = FakeGateway(url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(
        _fake_app(state), log_level="warning", lifespan="off", ws="none", http="h11"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    assert server.started, "fake gateway did not start"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def gateway(fake_gateway: FakeGateway) -> FakeGateway:
    fake_gateway.reset()
    return fake_gateway


# --- replay() against the fake ------------------------------------------------------------


def test_replay_bounds_concurrency_and_round_robins(gateway: FakeGateway) -> None:
    triples = [_triple(i, f"slow {i}", lesson=f"L{i % 2}") for i in range(12)]
    personalities = ["cheerful", "calm", "grumpy"]
    seen: list[tuple[int, int]] = []
    rows = asyncio.run(
        replay(
            triples,
            gateway.url,
            personalities,
            concurrency=3,
            progress=lambda done, total: seen.append((done, total)),
        )
    )
    assert gateway.max_in_flight == 3
    assert len(gateway.requests) == 12
    assert [row.triple for row in rows] == triples
    assert all(row.ok and row.status == 200 for row in rows)
    assert [row.personality for row in rows] == [personalities[i % 3] for i in range(12)]
    assert [row.fast_response for row in rows] == [f"Ooh, slow {i}!" for i in range(12)]
    sent = {r["request_id"]: r for r in gateway.requests}
    assert {rid: r["personality"] for rid, r in sent.items()} == {
        f"t:{i}": personalities[i % 3] for i in range(12)
    }
    assert len({r["session_id"] for r in gateway.requests}) == 2
    assert all(row.latency_ms == 2.5 for row in rows)
    assert all(row.client_ms >= 200.0 for row in rows)
    assert seen == [(n, 12) for n in range(1, 13)]


def test_replay_records_errors_without_raising(gateway: FakeGateway) -> None:
    triples = [
        _triple(0, "blue"),
        _triple(1, "please reject me"),
        _triple(2, "fallback please", pika=None, main=None),
        _triple(3, "garbage"),
    ]
    rows = asyncio.run(replay(triples, gateway.url, ["calm"], concurrency=2))
    assert [row.ok for row in rows] == [True, False, True, False]
    assert rows[1].status == 422
    assert rows[1].error == "HTTP 422: body.user_turn: fake rejection"
    assert rows[1].error_kind == "HTTP 422"
    assert rows[2].source == "fallback"
    assert rows[3].status == 200
    assert rows[3].error_kind == "bad_response"
    # None fields are omitted from the body.
    sent = {r["request_id"]: r for r in gateway.requests}
    assert "pika_turn" not in sent["t:2"]
    assert "main_response" not in sent["t:2"]
    assert sent["t:0"]["pika_turn"] == "What colour is it?"
    summary = summarize(rows)
    assert (summary.ok, summary.errors, summary.fallback) == (2, 2, 1)


def test_replay_timeout_is_an_error_row(gateway: FakeGateway) -> None:
    rows = asyncio.run(replay([_triple(0, "slow")], gateway.url, ["calm"], timeout_s=0.05))
    assert rows[0].status is None
    assert rows[0].error_kind == "ReadTimeout"


def test_replay_connection_refused_gives_error_rows() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rows = asyncio.run(replay([_triple(i) for i in range(3)], url, ["calm"]))
    assert len(rows) == 3
    assert all(row.status is None and row.error_kind == "ConnectError" for row in rows)
    assert all(row.error and row.error.startswith("ConnectError") for row in rows)


def test_replay_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="personality"):
        asyncio.run(replay([_triple(0)], "http://127.0.0.1:1", []))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(replay([_triple(0)], "http://127.0.0.1:1", ["calm"], concurrency=0))


# --- the CLI ----------------------------------------------------------------------------


def _shared_data() -> Path:
    override = os.environ.get("FASTRESP_SHARED_DATA")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"
    assert (path / "bridge" / "validation.json").is_file(), f"shared data not found at {path}"
    return path


def _write_triples(path: Path, turns: list[str]) -> Path:
    path.write_text(
        "".join(_triple(i, turn).model_dump_json() + "\n" for i, turn in enumerate(turns))
        + "{not json\n",
        encoding="utf-8",
    )
    return path


def test_cli_all_ok_exits_0_and_writes_rows(gateway: FakeGateway, tmp_path: Path) -> None:
    source = _write_triples(tmp_path / "in.jsonl", ["red", "blue", "fallback green"])
    out = tmp_path / "out.jsonl"
    args = ["replay", "--source", "jsonl", "--path", str(source), "--url", gateway.url]
    args += ["--personality", "cheerful", "--personality", "calm", "--out", str(out)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "skipped source rows: invalid_json 1" in result.stdout
    assert "Ooh, blue!" in result.stdout
    assert "rows 3: ok 3, errors 0" in result.stdout
    assert "fallback 1 = 33.3% of ok rows" in result.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["personality"] for r in rows] == ["cheerful", "calm", "cheerful"]


def test_cli_any_failure_exits_1(gateway: FakeGateway, tmp_path: Path) -> None:
    source = _write_triples(tmp_path / "in.jsonl", ["red", "reject this"])
    args = ["replay", "--source", "jsonl", "--path", str(source), "--url", gateway.url]
    result = CliRunner().invoke(cli_app, [*args, "--personality", "calm"])
    assert result.exit_code == 1, result.output
    assert "fake rejection" in result.stdout
    assert "rows 2: ok 1, errors 1 (HTTP 422 1)" in result.stdout


def test_cli_default_personalities_come_from_the_service(
    gateway: FakeGateway, tmp_path: Path
) -> None:
    source = _write_triples(tmp_path / "in.jsonl", ["a", "b", "c", "d"])
    args = ["replay", "--source", "jsonl", "--path", str(source), "--url", gateway.url]
    result = CliRunner().invoke(cli_app, [*args, "--concurrency", "1"])
    assert result.exit_code == 0, result.output
    assert [r["personality"] for r in gateway.requests] == ["cheerful", "calm"] * 2


def test_cli_real_bridge_data(gateway: FakeGateway) -> None:
    path = _shared_data() / "bridge" / "validation.json"
    args = ["replay", "--path", str(path), "--url", gateway.url, "--limit", "5"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "5 triple(s)" in result.stdout
    assert "What is your final answer?" in result.stdout  # pika turn of 6315993_39
    assert "Ooh, 30!" in result.stdout
    assert len(gateway.requests) == 5


def test_cli_default_path_is_relative_to_the_current_directory(
    gateway: FakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "main"
    project.mkdir()
    bridge = tmp_path / "shared" / "data" / "bridge"
    bridge.mkdir(parents=True)
    items = json.loads((_shared_data() / "bridge" / "validation.json").read_text("utf-8"))
    (bridge / "validation.json").write_text(json.dumps(items[:2]), encoding="utf-8")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli_app, ["replay", "--url", gateway.url])
    assert result.exit_code == 0, result.output
    assert "2 triple(s)" in result.stdout


def test_cli_connection_refused_exits_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    source = _write_triples(tmp_path / "in.jsonl", ["red", "blue"])
    base = ["replay", "--source", "jsonl", "--path", str(source), "--url", url]
    result = CliRunner().invoke(cli_app, [*base, "--personality", "calm"])
    assert result.exit_code == 1, result.output
    assert "rows 2: ok 0, errors 2 (ConnectError 2)" in result.stdout
    # Without --personality the listing itself fails: still 1, with a clear message.
    result = CliRunner().invoke(cli_app, base)
    assert result.exit_code == 1, result.output
    assert "cannot list personalities" in result.stderr


def test_cli_bad_arguments_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["replay", "--path", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2
    assert "--path" in missing.stderr
    assert "nope.json" in missing.stderr
    unknown = runner.invoke(cli_app, ["replay", "--source", "csv"])
    assert unknown.exit_code == 2
    assert "--source" in unknown.stderr
    no_path = runner.invoke(cli_app, ["replay", "--source", "jsonl"])
    assert no_path.exit_code == 2
    assert "--path is required" in no_path.stderr
    zero = runner.invoke(cli_app, ["replay", "--concurrency", "0"])
    assert zero.exit_code == 2
    assert "--concurrency" in zero.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    nothing = runner.invoke(cli_app, ["replay", "--source", "jsonl", "--path", str(empty)])
    assert nothing.exit_code == 2
    assert "no usable triples" in nothing.stderr


def test_cli_bad_source_file_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    shutil.copyfile(Path(__file__), broken)  # not JSON
    result = CliRunner().invoke(cli_app, ["replay", "--path", str(broken)])
    assert result.exit_code == 2
    assert "not a usable bridge file" in result.stderr
