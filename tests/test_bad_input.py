"""Bad input (issue 8, part 5) and the cheap security checks of part 6.

The gateway runs for real: `create_app` served by uvicorn on a free port in a thread, so
requests go over real HTTP (real Content-Length and chunked framing, raw bytes on the
wire), with a scripted engine that always answers (no model). Every request has a
client timeout: a hang fails the test instead of blocking it.

- a table of bad requests to `POST /fast-response` and `POST /feedback`, each with the
  exact 4xx status and the error field (`detail[].loc`) the README's API section
  documents;
- a Hypothesis property: for any JSON value, and for request-shaped objects with random
  field values, the answer is 2xx or 4xx, never 5xx;
- admin routes: no token 401, a wrong token (same or different length) 403, the right
  one 200; no token, child text or unknown personality name in error bodies or metrics;
  CORS off (no `Access-Control-Allow-Origin`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.engine import Engine, GenerationRequest, GenerationResult
from service.settings import Settings
from tests.conftest import TEST_DATA, free_port
from tests.test_fast_response_service import ScriptedEngine

ADMIN_TOKEN = "adm1n-T0ken-for-bad-input-tests"
MAX_BODY = 64 * 1024
TIMEOUT = httpx.Timeout(10.0)
GOOD: dict[str, Any] = {"personality": "cheerful", "user_turn": "Red!"}
JSON = {"content-type": "application/json"}


class AlwaysAnswers(ScriptedEngine):
    """A scripted engine that answers every generation with the same short text."""

    def __init__(self) -> None:
        super().__init__([])

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        self.request_ids.append(request_id)
        return GenerationResult("Ooh, nice!", output_tokens=3, finish_reason="stop", ttft_s=0.0)

    async def loaded_adapters(self) -> list[str]:
        return []


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The gateway on a real uvicorn server in a thread; yields its base URL."""
    app_settings = Settings(
        personalities_file=TEST_DATA / "personalities.yaml",
        warm_up=False,
        admin_token=ADMIN_TOKEN,
        adapter_store=TEST_DATA / "no-published-adapters",
    )
    assert app_settings.max_body_bytes == MAX_BODY
    app = create_app(app_settings, engine=cast(Engine, AlwaysAnswers()))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the gateway did not start"
        assert time.monotonic() < deadline, "the gateway did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as http:
        yield http


def _body(**change: Any) -> bytes:
    return json.dumps({**GOOD, **change}).encode()


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Case(NamedTuple):
    """One bad request: its raw body and headers, and the answer the README documents."""

    name: str
    body: bytes
    status: int
    loc: tuple[str | int, ...] | None
    """The first error's `loc` (a prefix of it); None for a 200 accepted on purpose."""
    path: str = "/fast-response"
    headers: dict[str, str] = JSON


def bad(name: str, body: bytes, status: int, *loc: str, **kw: Any) -> Case:
    return Case(name, body, status, loc, **kw)


def accepted(name: str, body: bytes) -> Case:
    return Case(name, body, 200, None)


def feedback(name: str, body: bytes, status: int, *loc: str) -> Case:
    return Case(name, body, status, loc, path="/feedback")


TEN_MB = _body(user_turn="a" * 10_000_000)
FORM = {"content-type": "application/x-www-form-urlencoded"}
CAFE_LATIN1 = b'{"personality": "cheerful", "user_turn": "caf\xe9"}'
SURROGATE = b'{"personality": "cheerful", "user_turn": "\\ud800"}'
BIG_INT = b'{"personality": "cheerful", "user_turn": ' + b"9" * 5_000 + b"}"
ONE_BYTE_OVER = b" " * (MAX_BODY - len(_body()) + 1) + _body()
CASES: list[Case] = [
    # -- empty, not an object, not JSON, not UTF-8 --
    bad("empty body", b"", 422, "body"),
    bad("empty object", b"{}", 422, "body", "personality"),
    bad("JSON null", b"null", 422, "body"),
    bad("array instead of object", b"[1, 2]", 422, "body"),
    bad("string instead of object", b'"hi"', 422, "body"),
    bad("number instead of object", b"42", 422, "body"),
    bad("not JSON", b"{not json", 422, "body"),
    bad("truncated JSON", _body()[:-3], 422, "body"),
    bad("invalid UTF-8 in a turn", CAFE_LATIN1, 422, "body"),
    bad("UTF-16 body", _body().decode().encode("utf-16"), 422, "body"),
    bad("lone surrogate escape", SURROGATE, 422, "body", "user_turn"),
    # -- wrong content type: the JSON is not parsed, the body is refused as a whole --
    bad("text/plain", _body(), 422, "body", headers={"content-type": "text/plain"}),
    bad("form-encoded", b"personality=cheerful&user_turn=Red", 422, "body", headers=FORM),
    bad("no content type", _body(), 422, "body", headers={}),
    # -- size and depth (README: 413 over 64 KB; 400 for JSON the parser refuses) --
    bad("10 MB string (Content-Length)", TEN_MB, 413, "body"),
    bad("body 1 byte over the limit", ONE_BYTE_OVER, 413, "body"),
    bad("array nested 30,000 deep", b"[" * 30_000 + b"]" * 30_000, 400),
    bad("object nested 5,000 deep", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400),
    bad("integer of 5,000 digits", BIG_INT, 400),
    bad("NaN literal", _body()[:-1] + b', "pika_turn": NaN}', 422, "body", "pika_turn"),
    # -- text content --
    bad("NUL-only turn", _body(user_turn="\x00"), 422, "body", "user_turn"),
    bad("control characters only", _body(user_turn="\x01\x07\x1b\x7f"), 422, "body", "user_turn"),
    bad("right-to-left overrides only", _body(user_turn="\u202e\u202d"), 422, "body", "user_turn"),
    bad("zero-width characters only", _body(user_turn="\u200b\ufeff"), 422, "body", "user_turn"),
    bad("whitespace-only pika_turn", _body(pika_turn=" \t\n"), 422, "body", "pika_turn"),
    bad("user_turn over 500 chars", _body(user_turn="a" * 501), 422, "body", "user_turn"),
    bad("main_response over 2,000", _body(main_response="a" * 2001), 422, "body", "main_response"),
    bad("emoji-only turn", _body(user_turn="\U0001f984\U0001f308"), 422, "body", "user_turn"),
    bad("punctuation-only pika_turn", _body(pika_turn="?!"), 422, "body", "pika_turn"),
    bad("RLO inside text", _body(user_turn="\u202eRed!"), 422, "body", "user_turn"),
    bad(
        "isolate inside main_response",
        _body(main_response="Red \u2067x"),
        422,
        "body",
        "main_response",
    ),
    bad("NUL inside text", _body(user_turn="Red\x00!"), 422, "body", "user_turn"),
    bad(
        "tag characters inside text",
        _body(user_turn="Red\U000e0069\U000e0067!"),
        422,
        "body",
        "user_turn",
    ),
    bad("escape inside text", _body(user_turn="Red\x1b[31m!"), 422, "body", "user_turn"),
    bad("C1 control inside text", _body(user_turn="Red\x85!"), 422, "body", "user_turn"),
    # Accepted on purpose: words with emoji, accents, tabs and newlines, zero-width joiners.
    accepted("emoji beside words", _body(user_turn="Red \U0001f984!")),
    accepted(
        "tab, newline and accents", _body(user_turn="caf\u00e9\tcr\u00e8me\nbr\u00fbl\u00e9e")
    ),
    accepted("a digit only", _body(user_turn="7")),
    # -- wrong types and nulls --
    bad("number for user_turn", _body(user_turn=5), 422, "body", "user_turn"),
    bad("number for personality", _body(personality=7), 422, "body", "personality"),
    bad("bool for user_turn", _body(user_turn=True), 422, "body", "user_turn"),
    bad("list for user_turn", _body(user_turn=["Red"]), 422, "body", "user_turn"),
    bad("object for pika_turn", _body(pika_turn={"a": 1}), 422, "body", "pika_turn"),
    bad("null user_turn", _body(user_turn=None), 422, "body", "user_turn"),
    bad("null personality", _body(personality=None), 422, "body", "personality"),
    bad("unknown field", _body(child_name="Sam"), 422, "body", "child_name"),
    # -- personality and identifiers --
    bad("unknown personality", _body(personality="grumpy"), 404, "body", "personality"),
    bad("personality __proto__", _body(personality="__proto__"), 404, "body", "personality"),
    bad("empty personality", _body(personality=""), 422, "body", "personality"),
    bad("personality over 64 chars", _body(personality="c" * 65), 422, "body", "personality"),
    bad("session_id over 128 chars", _body(session_id="s" * 129), 422, "body", "session_id"),
    bad("session_id with a space", _body(session_id="a b"), 422, "body", "session_id"),
    bad("session_id with a newline", _body(session_id="abc\n"), 422, "body", "session_id"),
    bad("request_id over 128 chars", _body(request_id="r" * 129), 422, "body", "request_id"),
    # -- duplicate keys: the JSON parser keeps the last one, which is then validated --
    accepted(
        "duplicate key, last one valid",
        b'{"personality": "grumpy", "personality": "cheerful", "user_turn": "Red!"}',
    ),
    bad(
        "duplicate key, last one blank",
        b'{"personality": "cheerful", "user_turn": "Red!", "user_turn": " "}',
        422,
        "body",
        "user_turn",
    ),
    # -- POST /feedback --
    feedback("feedback: empty body", b"", 422, "body"),
    feedback("feedback: empty object", b"{}", 422, "body", "request_id"),
    feedback("feedback: array", b"[1]", 422, "body"),
    feedback(
        "feedback: rating as string", b'{"request_id": "x", "rating": "5"}', 422, "body", "rating"
    ),
    feedback("feedback: rating 4.5", b'{"request_id": "x", "rating": 4.5}', 422, "body", "rating"),
    feedback(
        "feedback: rating true", b'{"request_id": "x", "rating": true}', 422, "body", "rating"
    ),
    feedback("feedback: rating 6", b'{"request_id": "x", "rating": 6}', 422, "body", "rating"),
    feedback(
        "feedback: comment as number",
        b'{"request_id": "x", "rating": 5, "comment": 5}',
        422,
        "body",
        "comment",
    ),
    feedback(
        "feedback: never-served id",
        b'{"request_id": "never-served", "rating": 5}',
        404,
        "body",
        "request_id",
    ),
    feedback("feedback: 10 MB body", b'{"comment": "' + b"a" * 10_000_000 + b'"}', 413, "body"),
]


def _check_error(response: httpx.Response, status: int, loc: list[str | int]) -> None:
    """`status` with an ErrorResponse body whose first error is at `loc` (or inside it),
    every error with a message and a type, and none echoing the input."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for err in detail:
        assert set(err) == {"loc", "msg", "type"}, err  # no "input": never echoed back
        assert isinstance(err["msg"], str) and err["msg"], err
        assert isinstance(err["type"], str) and err["type"], err
    # A JSON syntax error adds the character position: ["body", 1].
    first = detail[0]["loc"]
    assert first == loc if not loc else first[: len(loc)] == loc, detail


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_bad_request_gets_the_documented_answer(client: httpx.Client, case: Case) -> None:
    response = client.post(case.path, content=case.body, headers=case.headers)
    if case.loc is None:
        assert response.status_code == case.status == 200, response.text[:500]
        assert response.json()["source"] in ("model", "fallback")
    else:
        _check_error(response, case.status, list(case.loc))


def test_table_has_at_least_25_refusals() -> None:
    assert sum(1 for case in CASES if case.status >= 400) >= 25


@pytest.mark.parametrize("path", ["/fast-response", "/feedback"])
def test_chunked_body_over_the_limit_is_413(client: httpx.Client, path: str) -> None:
    """A body without Content-Length is counted as it arrives (10 MB, 8 KB chunks)."""
    response = client.post(path, content=_chunks(TEN_MB), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    _check_error(response, 413, ["body"])
    assert client.post("/fast-response", json=GOOD).status_code == 200


def test_chunked_body_under_the_limit_is_served(client: httpx.Client) -> None:
    response = client.post("/fast-response", content=_chunks(_body(), 4), headers=JSON)
    assert response.status_code == 200, response.text


def _raw_http(base_url: str, request: bytes) -> bytes:
    """Send `request` bytes as is on a fresh connection; the whole answer (10 s max)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_content_length_over_the_limit_is_refused_before_the_body(base_url: str) -> None:
    """A Content-Length over the limit is answered 413 at once, though no body follows."""
    answer = _raw_http(
        base_url,
        b"POST /fast-response HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"body_too_large"' in answer


def test_body_shorter_than_its_content_length_does_not_hang_or_500(base_url: str) -> None:
    """The client sends less than it announced and closes: no 5xx, no hang."""
    answer = _raw_http(
        base_url,
        b"POST /fast-response HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nConnection: close\r\n\r\n{}",
    )
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]


# --- Hypothesis: any JSON gets 2xx or 4xx ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELD_VALUES = JSON_VALUES | st.text(max_size=600) | st.sampled_from(["cheerful", "longwinded"])
REQUEST_LIKE = st.fixed_dictionaries(
    {"personality": FIELD_VALUES, "user_turn": FIELD_VALUES},
    optional={
        name: FIELD_VALUES
        for name in ("pika_turn", "main_response", "session_id", "request_id", "extra")
    },
)

#: Requests of the right shape with random text: mostly 200s, some 404s and 422s.
WELL_FORMED = st.fixed_dictionaries(
    {
        "personality": st.sampled_from(["cheerful", "longwinded", "grumpy"]),
        "user_turn": st.text(min_size=1, max_size=520),
    },
    optional={
        "pika_turn": st.none() | st.text(max_size=1010),
        "main_response": st.none() | st.text(max_size=50),
        "session_id": st.none() | st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True),
    },
)


@settings(
    max_examples=200,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=JSON_VALUES | REQUEST_LIKE | WELL_FORMED)
def test_any_json_gets_2xx_or_4xx(client: httpx.Client, body: object) -> None:
    response = client.post("/fast-response", content=json.dumps(body).encode(), headers=JSON)
    event(f"status {response.status_code}")
    assert 200 <= response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["detail"], response.text


@settings(max_examples=100, deadline=None, database=None)
@given(raw=st.binary(max_size=300))
def test_any_bytes_get_2xx_or_4xx(base_url: str, raw: bytes) -> None:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as http:
        response = http.post("/fast-response", content=raw, headers=JSON)
    event(f"status {response.status_code}")
    assert 200 <= response.status_code < 500, (response.status_code, response.text[:300])


# --- part 6: admin token, no secrets or child text in errors/metrics, CORS ---


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        pytest.param(None, 401, id="no header"),
        pytest.param("Bearer", 401, id="scheme only"),
        pytest.param(f"Basic {ADMIN_TOKEN}", 401, id="wrong scheme"),
        pytest.param("Bearer " + "x" * len(ADMIN_TOKEN), 403, id="wrong token same length"),
        pytest.param("Bearer " + ADMIN_TOKEN[:-1], 403, id="token prefix"),
        pytest.param("Bearer " + ADMIN_TOKEN + "x", 403, id="token plus one char"),
        pytest.param("Bearer " + ADMIN_TOKEN.upper(), 403, id="wrong case"),
        pytest.param("Bearer " + "x" * 5000, 403, id="very long token"),
        pytest.param("Bearer " + ADMIN_TOKEN, 200, id="right token"),
    ],
)
def test_admin_routes_need_the_exact_token(
    client: httpx.Client, authorization: str | None, status: int
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path in [
        ("GET", "/admin/adapters"),
        ("DELETE", "/admin/personalities/cheerful/adapter"),
    ]:
        response = client.request(method, path, headers=headers)
        assert response.status_code == status, (method, response.text)
        assert ADMIN_TOKEN not in response.text
        assert ADMIN_TOKEN[:-1] not in response.text
        if status != 200:
            _check_error(response, status, [])


def test_no_child_text_or_unknown_name_in_errors_or_metrics(client: httpx.Client) -> None:
    """Error bodies and /metrics never hold the child's text, an unknown personality name
    or a token; an unknown field's *name* is named in `loc`, as the README documents."""
    turn_marker = "zq7childsecretturn"
    name_marker = "zq7notapersonality"
    requests: list[tuple[str, str, dict[str, Any], int]] = [
        (
            "/fast-response",
            "personality",
            {"user_turn": turn_marker, "personality": name_marker},
            404,
        ),
        ("/fast-response", "personality", {"user_turn": turn_marker, "personality": ""}, 422),
        ("/fast-response", "user_turn", {"user_turn": turn_marker * 40}, 422),
        ("/fast-response", "session_id", {"user_turn": turn_marker, "session_id": "a b"}, 422),
        ("/feedback", "rating", {"request_id": "x", "rating": 9, "comment": turn_marker}, 422),
    ]
    for path, field, change, status in requests:
        body = {**GOOD, **change} if path == "/fast-response" else change
        response = client.post(path, json=body)
        _check_error(response, status, ["body", field])
        assert turn_marker not in response.text and name_marker not in response.text
    wrong_token = client.get("/admin/adapters", headers={"authorization": f"Bearer {turn_marker}"})
    _check_error(wrong_token, 403, [])
    assert turn_marker not in wrong_token.text and ADMIN_TOKEN not in wrong_token.text
    metrics = client.get("/metrics").text
    assert 'personality="_unknown"' in metrics  # the unknown name was counted, unnamed
    for secret in (turn_marker, name_marker, ADMIN_TOKEN):
        assert secret not in metrics


def test_cors_is_off_by_default(client: httpx.Client) -> None:
    origin = {"origin": "https://evil.example"}
    preflight = client.options(
        "/fast-response", headers={**origin, "access-control-request-method": "POST"}
    )
    simple = client.post("/fast-response", json=GOOD, headers=origin)
    listed = client.get("/personalities", headers=origin)
    assert preflight.status_code in (400, 405)
    assert simple.status_code == 200 and listed.status_code == 200
    for response in (preflight, simple, listed):
        assert not any(h.startswith("access-control-") for h in response.headers), response.headers
