"""Security (issue 8, part 6) on the real gateway: the real in-process vLLM engine (tiny
model), real Redis, real HTTP through uvicorn.

- CORS is off on every route the app has: preflights and cross-origin requests get no
  `Access-Control-*` header;
- every `/admin` route, listed from the app itself (so a new one is covered too), refuses
  a missing token (401) and a wrong one (403) before it reads its body;
- the child's text (distinct markers in `user_turn`, `pika_turn`, `main_response`) and a
  wrong admin token never reach an error body, a line of `/metrics`, a log record of the
  gateway or a Redis key, over successful requests and 4xx of many kinds.

Covered elsewhere, not repeated here: the exact-token cases of two admin routes
(tests/test_bad_input.py::test_admin_routes_need_the_exact_token, tests/test_hot_swap.py)
and the 413 of a body over FASTRESP_MAX_BODY_BYTES (tests/test_bad_input.py: Content-Length,
chunked and 10 MB bodies; tests/test_api.py; tests/test_metrics_engine.py).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from fastapi import FastAPI

from service.app import create_app
from service.engine import Engine
from service.schemas import MAX_MAIN_RESPONSE_CHARS, MAX_PIKA_TURN_CHARS, MAX_USER_TURN_CHARS
from tests.conftest import engine_settings, live_app

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

TOKEN = "sec-Adm1n-token-7f3a9c"
WRONG_TOKEN = "zq8wrongtokenmarker"
# Distinct, never-generated strings: the tiny model's noise and the fallbacks cannot
# produce them, so finding one anywhere means the input was copied there.
USER = "zq8childturnmarker"
PIKA = "zq8pikaturnmarker"
MAIN = "zq8mainresponsemarker"
MARKERS = (USER, PIKA, MAIN, WRONG_TOKEN, TOKEN)
GOOD: dict[str, Any] = {
    "personality": "cheerful",
    "pika_turn": f"What did you eat, {PIKA}?",
    "user_turn": f"I ate {USER} with my dad",
    "main_response": f"Yum, {MAIN} is a noodle soup!",
}
JSON = {"content-type": "application/json"}
ORIGIN = "https://evil.example"


class Gateway:
    """The app, its base URL and the Redis key prefix it uses."""

    def __init__(self, app: FastAPI, url: str, prefix: str) -> None:
        self.app = app
        self.url = url
        self.prefix = prefix


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(engine: Engine, tiny_model_dir: Path, redis_url: str) -> AsyncIterator[Gateway]:
    """`create_app` on the shared engine with an admin token and Redis, behind uvicorn."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    settings = engine_settings(
        tiny_model_dir,
        admin_token=TOKEN,
        redis_url=redis_url,
        redis_key_prefix=prefix,
        warm_up=False,
    )
    assert settings.max_body_bytes == 64 * 1024
    app = create_app(settings, engine=engine)
    async with live_app(app) as url:
        yield Gateway(app, url, prefix)


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route of the app, path parameters filled in."""
    found = []
    for route in app.routes:
        methods = getattr(route, "methods", None) or set()
        path: str = getattr(route, "path", "")
        for method in sorted(methods - {"HEAD"}):
            found.append((method, path.replace("{name}", "cheerful")))
    assert ("POST", "/fast-response") in found and ("GET", "/metrics") in found, found
    return found


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


async def test_cors_is_off_on_every_route(gateway: Gateway) -> None:
    """No route answers a preflight or a cross-origin request with CORS headers, so a web
    page on another origin cannot call the service from a browser."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for method, path in _routes(gateway.app):
            preflight = await client.options(
                path,
                headers={
                    "origin": ORIGIN,
                    "access-control-request-method": method,
                    "access-control-request-headers": "content-type, authorization",
                },
            )
            assert not 200 <= preflight.status_code < 300, (path, preflight.status_code)
            assert _cors_headers(preflight) == {}, (method, path, preflight.headers)
            body = GOOD if path.startswith("/fast-response") else {}
            simple = await client.request(
                method,
                path,
                headers={"origin": ORIGIN, **(JSON if method != "GET" else {})},
                content=json.dumps(body) if method != "GET" else None,
            )
            assert simple.status_code < 500, (method, path, simple.text)
            assert _cors_headers(simple) == {}, (method, path, simple.headers)


async def test_every_admin_route_refuses_a_missing_or_wrong_token(gateway: Gateway) -> None:
    admin = [(m, p) for m, p in _routes(gateway.app) if p.startswith("/admin")]
    assert len(admin) >= 6, admin  # adapters, adapter put/delete, canary put/promote/rollback
    public = {p for _, p in _routes(gateway.app) if not p.startswith("/admin")}
    assert not any("admin" in p for p in public), public
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for method, path in admin:
            # A well-formed body: the refusal must come from the token check, not the body.
            content = None if method in ("GET", "DELETE") else b"{}"
            for headers, status in [
                ({}, 401),
                ({"authorization": f"Bearer {WRONG_TOKEN}"}, 403),
                ({"authorization": f"Bearer {TOKEN[:-1]}"}, 403),
                ({"authorization": f"Basic {TOKEN}"}, 401),
            ]:
                response = await client.request(
                    method, path, headers={**JSON, **headers}, content=content
                )
                assert response.status_code == status, (method, path, headers, response.text)
                kind = {401: "unauthorized", 403: "forbidden"}[status]
                assert response.json()["detail"][0]["type"] == kind, response.text
                assert WRONG_TOKEN not in response.text and TOKEN[:-1] not in response.text


def _with(**change: Any) -> bytes:
    return json.dumps({**GOOD, **change}).encode()


# (what, path, raw body, status): every one carries the child's text in some field.
ERRORS: list[tuple[str, str, bytes, int]] = [
    ("unknown personality", "/fast-response", _with(personality="grumpy"), 404),
    ("user_turn too long", "/fast-response", _with(user_turn=USER * MAX_USER_TURN_CHARS), 422),
    ("pika_turn too long", "/fast-response", _with(pika_turn=PIKA * MAX_PIKA_TURN_CHARS), 422),
    (
        "main_response too long",
        "/fast-response",
        _with(main_response=MAIN * MAX_MAIN_RESPONSE_CHARS),
        422,
    ),
    ("session_id a number", "/fast-response", _with(session_id=42), 422),
    ("personality a list", "/fast-response", _with(personality=["cheerful"]), 422),
    ("user_turn a number, texts beside", "/fast-response", _with(user_turn=7), 422),
    ("unknown field", "/fast-response", _with(extra_field=USER), 422),
    ("control character", "/fast-response", _with(user_turn=f"{USER}\x07"), 422),
    ("NUL in pika_turn", "/fast-response", _with(pika_turn=f"{PIKA}\x00"), 422),
    ("right-to-left override", "/fast-response", _with(main_response=f"\u202e{MAIN}"), 422),
    ("bad session_id", "/fast-response", _with(session_id=f"{USER} {PIKA}"), 422),
    ("JSON cut short", "/fast-response", _with()[:-10], 422),
    ("JSON with a stray comma", "/fast-response", _with()[:-1] + b",}", 422),
    ("body over the limit", "/fast-response", _with(user_turn=USER * 5000), 413),
    ("stream: user_turn too long", "/fast-response/stream", _with(user_turn=USER * 100), 422),
    ("stream: unknown personality", "/fast-response/stream", _with(personality="grumpy"), 404),
    (
        "feedback: unknown request_id",
        "/feedback",
        json.dumps({"request_id": "nope-0", "rating": 1, "comment": USER}).encode(),
        404,
    ),
    (
        "feedback: bad rating",
        "/feedback",
        json.dumps({"request_id": "nope-0", "rating": 9, "comment": USER}).encode(),
        422,
    ),
]


async def _redis_keys(url: str, prefix: str) -> list[str]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    finally:
        await client.aclose()


async def test_no_child_text_or_token_in_errors_metrics_logs_or_redis_keys(
    gateway: Gateway, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the service's default log level
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        served = []
        for session in ("sec-session-1", "sec-session-1", "sec-session-2"):
            response = await client.post(
                "/fast-response", content=_with(session_id=session), headers=JSON
            )
            assert response.status_code == 200, response.text
            served.append(response.json())
        stream = await client.post("/fast-response/stream", content=_with(), headers=JSON)
        assert stream.status_code == 200 and "event: done" in stream.text, stream.text
        rated = await client.post(
            "/feedback",
            json={"request_id": served[0]["request_id"], "rating": 1, "comment": USER},
        )
        assert rated.status_code == 200, rated.text

        bodies: dict[str, str] = {}
        for what, path, raw, status in ERRORS:
            response = await client.post(path, content=raw, headers=JSON)
            assert response.status_code == status, (what, response.status_code, response.text)
            assert response.json()["detail"][0]["msg"], (what, response.text)
            bodies[what] = response.text
        for headers in ({"authorization": f"Bearer {WRONG_TOKEN}"}, {}):
            response = await client.get("/admin/adapters", headers=headers)
            assert response.status_code in (401, 403), response.text
            bodies[f"admin {headers}"] = response.text
        listed = await client.get("/admin/adapters", headers={"authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200, listed.text
        bodies["admin with the token"] = listed.text
        metrics = (await client.get("/metrics")).text

    assert "fastresp_requests_total" in metrics
    keys = await _redis_keys(redis_url, gateway.prefix)
    assert keys, "the gateway wrote nothing to Redis: the key check would prove nothing"
    log_lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    assert any("wrong token" in line for line in log_lines), log_lines  # the 403 was logged
    for marker in MARKERS:
        leaks = [f"{what}: {body}" for what, body in bodies.items() if marker in body]
        leaks += [f"/metrics: {line}" for line in metrics.splitlines() if marker in line]
        leaks += [f"log {line}" for line in log_lines if marker in line]
        leaks += [f"redis key {key}" for key in keys if marker in key]
        assert not leaks, f"{marker!r} leaked:\n" + "\n".join(leaks)
