"""`POST /fast-response/stream`: Server-Sent Events through a real HTTP client.

The gateway runs on a real uvicorn server over the session's in-process vLLM engine
(tiny model). The oracle for the text is a signature adapter (tests/signature_adapters.py):
under greedy decoding the "alpha" adapter makes the tiny model say "alpha alpha" to any
prompt, so what the stream must send is known from outside the code under test. The
SSE wire format is parsed here by hand (the WHATWG event-stream rules), not by FastAPI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio

from service.app import create_app
from service.engine import Engine, GenerationDelta, GenerationRequest, GenerationResult
from service.guard import clean_fast_response, word_count
from service.settings import Settings
from service.streaming import StreamGuard
from tests.conftest import TEST_DATA, engine_settings, free_port
from tests.conftest import live_gateway as live_server
from tests.vllm_servers import (
    Server,
    running_engine_server,
)

TURN = {"pika_turn": "What did you eat today?", "user_turn": "I ate pho with my dad"}
SAMPLING = '{max_tokens: %d, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}'


# -- the guard on the stream, text only ----------------------------------------------


def _guarded(deltas: list[str], max_words: int = 12, finish: str = "stop") -> tuple[list[str], Any]:
    guard = StreamGuard(max_words)
    sent = [piece for delta in deltas if (piece := guard.feed(delta))]
    verdict = guard.finish(GenerationResult("".join(deltas), len(deltas), finish, None))
    return sent, verdict


@pytest.mark.parametrize(
    ("deltas", "max_words", "finish", "sent", "rest", "rejection"),
    [
        # the first sentence word by word, the last word once the generation ends
        (["Wow", ", you", " saw a", " big", " dog", "!"], 12, "stop",
         ["Wow,", " you saw", " a", " big"], " dog!", None),
        # a role prefix is never sent; a second sentence only once it is finished
        (["Pika:", " Wow", ", great", " job", "! You", " are", " so", " smart", "."], 12, "stop",
         ["Wow,", " great", " job!"], " You are so smart.", None),
        # an unfinished second sentence is never sent, and dropped at the end
        (["Wow, great job! You are"], 12, "length", ["Wow, great job!"], "", None),
        # quotes around the answer are never sent
        (['"Yum', ' yum!"'], 12, "stop", ["Yum"], " yum!", None),
        # never more than max_words; the whole then fails the guard
        (["One", " two", " three", " four", " five."], 3, "stop",
         ["One", " two", " three"], None, "too_long"),
        # cut off by the token limit: the words sent so far are withdrawn
        (["We", " went", " to", " the"], 12, "length", ["We", " went", " to"], None, "truncated"),
        # nothing after the first line
        (["Oh", " nice\nAnd", " then", " more."], 12, "stop", ["Oh nice"], "", None),
        # a role prefix spread over several words is held back until its colon shows
        (["Pika", " quick", " reaction:", " Hi", " there."], 12, "stop",
         ["Hi"], " there.", None),
        (["Pika's", " quick", " reaction", ":", " Wow", ",", " yum", "!"], 12, "stop",
         ["Wow,"], " yum!", None),
        (["Teacher", " :", " Wow", "!"], 12, "stop", [], "Wow!", None),
        # a word that could start a label is sent once the next word shows it does not
        (["Teacher", " says", " hi", "!"], 12, "stop", ["Teacher says"], " hi!", None),
        # words sent, then a later line that changes the answer: withdrawn
        (["Wow", " nice", " job", " Pika:"], 12, "length", ["Wow", " nice", " job"], None,
         "truncated"),
        # no letters: nothing sent
        (["...", " !!", " ?"], 12, "stop", [], None, "empty"),
    ],
)  # fmt: skip
def test_stream_guard_sends_only_what_the_guard_accepts(
    deltas: list[str],
    max_words: int,
    finish: str,
    sent: list[str],
    rest: str | None,
    rejection: str | None,
) -> None:
    got_sent, verdict = _guarded(deltas, max_words, finish)
    assert got_sent == sent
    assert (verdict.rest, verdict.rejection) == (rest, rejection)
    if rest is not None:  # an accepted stream says exactly what the non-stream guard says
        whole = clean_fast_response("".join(deltas), max_words, truncated=finish == "length")
        assert "".join(sent) + rest == whole.text


def test_tone_guard_holds_back_a_clashing_reply() -> None:
    guard = StreamGuard(12, user_turn="My dog died and I am so sad")
    assert guard.feed("Yay! That is so awesome and amazing! ") == ""
    verdict = guard.finish(
        GenerationResult("Yay! That is so awesome and amazing!", 9, "stop", None)
    )
    assert (verdict.rest, verdict.rejection) == (None, "tone_mismatch")


def test_openapi_documents_the_event_stream_and_json_errors() -> None:
    app = create_app(Settings(personalities_file=TEST_DATA / "personalities.yaml"))
    responses = app.openapi()["paths"]["/fast-response/stream"]["post"]["responses"]
    assert list(responses["200"]["content"]) == ["text/event-stream"]
    for status in ("404", "413", "422"):
        assert list(responses[status]["content"]) == ["application/json"], status


# -- through HTTP, on the real engine -------------------------------------------------


@pytest.fixture(scope="module")
def manifest(signature_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sig` says "alpha alpha" (greedy); `sig_one_word` allows 1 word, so the guard
    rejects that; `base` is the tiny base model; `longwinded` talks for 256 tokens."""
    alpha = signature_adapters["alpha"]
    path = tmp_path_factory.mktemp("streaming") / "personalities.yaml"
    entries = {
        "sig": (12, SAMPLING % 12, alpha),
        "sig_one_word": (1, SAMPLING % 12, alpha),
        "base": (12, SAMPLING % 12, None),
        "longwinded": (40, "{max_tokens: 256, temperature: 0.0, top_p: 1.0, stop: []}", None),
    }
    text = "personalities:\n"
    for name, (max_words, sampling, adapter) in entries.items():
        text += (
            f"  {name}:\n    description: d\n    style: s\n    max_words: {max_words}\n"
            f"    sampling: {sampling}\n    fallback_phrases: [Hm.]\n"
        )
        if adapter is not None:
            text += f"    adapter: {adapter}\n"
    path.write_text(text)
    return path


@asynccontextmanager
async def live_gateway(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for `tests.conftest.live_gateway`'s real uvicorn server."""
    async with (
        live_server(settings, engine) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        yield http


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = engine_settings(tiny_model_dir, personalities_file=manifest, warm_up=False)
    async with live_gateway(settings, engine) as http:
        yield http


async def read_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each event of an SSE body, by the WHATWG rules: lines
    `field: value`, an event ends at a blank line, `:` lines are comments."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    return events


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """POST /fast-response/stream; asserts a 200 event stream and returns its events."""
    async with client.stream("POST", "/fast-response/stream", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return await read_events(response)


def check_order(events: list[tuple[str, Any]]) -> dict[str, Any]:
    """`token`* [`error`] `done`, with `error` only before a fallback; returns done's data."""
    names = [name for name, _ in events]
    assert names and names[-1] == "done" and names.count("done") == 1, names
    assert set(names[:-1]) <= {"token", "error"}, names
    if "error" in names:
        assert names.index("error") == len(names) - 2, names
        assert events[-1][1]["source"] == "fallback"
    done: dict[str, Any] = events[-1][1]
    return done


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_tokens_then_done_matching_the_non_stream_answer(client: httpx.AsyncClient) -> None:
    body = {"personality": "sig", **TURN, "session_id": "s1"}
    events = await stream(client, {**body, "request_id": "stream-1"})
    plain = await client.post("/fast-response", json={**body, "request_id": "plain-1"})
    done = check_order(events)
    tokens = [data["text"] for name, data in events if name == "token"]
    assert tokens == ["alpha", " alpha"]  # a word at a time, the last at the end
    assert plain.status_code == 200
    expected = plain.json()
    assert set(done) == set(expected)
    for field in ("fast_response", "source", "personality", "adapter_version"):
        assert done[field] == expected[field], field
    assert done["fast_response"] == "alpha alpha" and done["adapter_version"] == "alpha"
    assert done["request_id"] == "stream-1" and done["latency_ms"] > 0

    # The answer is remembered for feedback, as /fast-response's are.
    rated = await client.post("/feedback", json={"request_id": "stream-1", "rating": 5})
    assert rated.status_code == 200, rated.text

    metrics = (await client.get("/metrics")).text
    for name in ("fastresp_stream_first_token_seconds", "fastresp_stream_done_seconds"):
        assert f'{name}_count{{personality="sig"}} 1.0' in metrics, name
    assert 'fastresp_requests_total{adapter_version="alpha",outcome="ok",' in metrics


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_base_model_stream_is_ordered_and_agrees_with_the_non_stream_answer(
    client: httpx.AsyncClient,
) -> None:
    """The tiny base model's noise may pass or fail the guard; the two endpoints agree."""
    body = {"personality": "base", **TURN}
    done = check_order(await stream(client, body))
    plain = (await client.post("/fast-response", json=body)).json()
    assert done["source"] == plain["source"]
    if done["source"] == "model":
        assert done["fast_response"] == plain["fast_response"]
    else:
        assert done["fast_response"] == plain["fast_response"] == "Hm."


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_guard_holds_on_the_stream(client: httpx.AsyncClient) -> None:
    """One word allowed, "alpha alpha" generated: at most one word is ever sent, then an
    error naming the check and the fallback."""
    events = await stream(client, {"personality": "sig_one_word", **TURN})
    done = check_order(events)
    sent = "".join(data["text"] for name, data in events if name == "token")
    assert word_count(sent) <= 1
    errors = [data for name, data in events if name == "error"]
    assert [(e["reason"], e["detail"]) for e in errors] == [("guard", "too_long")]
    assert errors[0]["message"]
    assert (done["source"], done["fast_response"]) == ("fallback", "Hm.")
    plain = await client.post("/fast-response", json={"personality": "sig_one_word", **TURN})
    assert plain.json()["source"] == "fallback"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_errors_before_the_stream_are_json_with_their_status(
    client: httpx.AsyncClient,
) -> None:
    for body, status, loc in [
        ({"personality": "grumpy", **TURN}, 404, ["body", "personality"]),
        ({"personality": "sig", "user_turn": ""}, 422, ["body", "user_turn"]),
    ]:
        response = await client.post("/fast-response/stream", json=body)
        plain = await client.post("/fast-response", json=body)
        assert response.status_code == plain.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json() == plain.json()
        assert response.json()["detail"][0]["loc"] == loc


def vllm_total(metrics: str, name: str) -> float:
    """Sum of every sample called exactly `name` (any labels) in an exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


FINISHED = "vllm:request_success_total"  # vLLM counts finished requests; aborts are not
GENERATED = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
LONG_TOKENS = 1900


class LongGenerations:
    """The real engine, with every streamed generation made a long one: a short prompt
    and LONG_TOKENS tokens (personalities allow 256, which the tiny model can make
    before a disconnect is noticed)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate_stream(
        self, request_id: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationDelta, None]:
        long = replace(request, prompt="Once upon a time", max_tokens=LONG_TOKENS, stop=())
        return self._engine.generate_stream(request_id, long)


async def wait_unfinished(engine: Engine, done: Callable[[int], bool]) -> int:
    for _ in range(600):
        if done(count := engine.num_unfinished_requests()):
            break
        await asyncio.sleep(0.02)
    return count


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_client_disconnect_aborts_the_engine_request(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> None:
    """Disconnect while the generation runs: it ends at once, unfinished (vLLM counts no
    finished request and made fewer than LONG_TOKENS tokens). A machine so fast that the
    generation ends before the disconnect arrives proves nothing, so that is retried."""
    settings = engine_settings(tiny_model_dir, personalities_file=manifest, warm_up=False)
    outcomes: list[str] = []
    async with live_gateway(settings, cast(Engine, LongGenerations(engine))) as http:
        for attempt in range(5):
            before = (await http.get("/metrics")).text
            body = {"personality": "longwinded", **TURN, "request_id": f"cut-{attempt}"}
            async with http.stream("POST", "/fast-response/stream", json=body) as response:
                assert response.status_code == 200
                assert await wait_unfinished(engine, lambda n: n > 0) == 1
            # Leaving the block closed the connection with the body unread: a disconnect.
            assert await wait_unfinished(engine, lambda n: n == 0) == 0
            await asyncio.sleep(0.5)  # vLLM updates its counters in its output loop
            after = (await http.get("/metrics")).text
            finished = vllm_total(after, FINISHED) - vllm_total(before, FINISHED)
            made = vllm_total(after, GENERATED) - vllm_total(before, GENERATED)
            outcomes.append(f"{made:.0f} tokens, {finished:.0f} finished")
            if finished == 0 and made < LONG_TOKENS:
                break
    assert finished == 0 and made < LONG_TOKENS, outcomes


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_deadline_mid_stream_gives_an_error_then_the_fallback(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> None:
    """100 ms for LONG_TOKENS tokens: the stream (status 200, already sent) ends with an
    `error` event and the fallback, and the engine request is aborted."""
    settings = engine_settings(
        tiny_model_dir, personalities_file=manifest, warm_up=False, deadline_ms=100
    )
    async with live_gateway(settings, cast(Engine, LongGenerations(engine))) as http:
        events = await stream(http, {"personality": "longwinded", **TURN})
    done = check_order(events)
    error = next(data for name, data in events if name == "error")
    assert (error["reason"], error["detail"]) == ("deadline", None)
    assert (done["source"], done["fast_response"]) == ("fallback", "Hm.")
    assert await wait_unfinished(engine, lambda n: n == 0) == 0


# -- the remote engine: one real vLLM server ------------------------------------------


@pytest.fixture(scope="module")
def upstream(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `fastresp engine serve` vLLM server on the tiny model; killed after."""
    log = tmp_path_factory.mktemp("vllm-stream") / "vllm.log"
    with running_engine_server(tiny_model_dir, 8, log) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def remote(upstream: Server, tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """A RemoteEngine over the upstream and a URL where nothing listens. A failed upstream
    is not skipped afterwards (`engine_down_s` 0), so keys homed on the dead URL try it
    first every time and fail over."""
    from service.remote_engine import RemoteEngine

    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        model=tiny_model_dir,
        engine_urls=[upstream.url, dead],
        engine_device="cpu",
        engine_connect_timeout_s=10.0,
        engine_down_s=0.0,
    )
    engine = await RemoteEngine.start(settings)
    try:
        yield engine
    finally:
        await engine.close()


def remote_request(key: str, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(
        prompt="Once upon a time", max_tokens=max_tokens, temperature=0.0, top_p=1.0,
        stop=(), routing_key=key,
    )  # fmt: skip


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_remote_stream_matches_generate_and_fails_over_before_its_first_text(
    remote: Engine, upstream: Server
) -> None:
    from service.remote_engine import RemoteEngine, rendezvous_order

    assert isinstance(remote, RemoteEngine)
    dead = next(url for url in remote.urls if url != upstream.url)
    # A key whose home is the dead URL: the stream fails over before any text.
    keys = (f"k{i}" for i in range(200))
    homed_dead = next(k for k in keys if rendezvous_order(k, remote.urls)[0] == dead)
    request = remote_request(homed_dead)
    whole = await remote.generate("whole-1", request)
    deltas = [delta async for delta in remote.generate_stream("stream-1", request)]
    *texts, last = deltas
    assert last.result is not None and last.text == ""
    assert all(d.result is None for d in texts)
    assert "".join(d.text for d in texts) == last.result.text == whole.text
    assert last.result.output_tokens == whole.output_tokens
    assert last.result.finish_reason == whole.finish_reason
    assert remote.num_unfinished_requests() == 0


def upstream_metric(url: str, name: str) -> float:
    return vllm_total(httpx.get(f"{url}/metrics", timeout=10).text, name)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_closing_a_remote_stream_aborts_the_upstream_request(
    remote: Engine, upstream: Server
) -> None:
    """Close the stream after its first text: the upstream ends the generation unfinished
    (no finished request, fewer than LONG_TOKENS tokens); retried if it finished first."""
    outcomes: list[str] = []
    for attempt in range(5):
        finished_before = await asyncio.to_thread(upstream_metric, upstream.url, FINISHED)
        made_before = await asyncio.to_thread(upstream_metric, upstream.url, GENERATED)
        stream = remote.generate_stream(f"close-{attempt}", remote_request("k", LONG_TOKENS))
        first = await anext(stream)  # the first text: the request runs upstream
        assert first.text and first.result is None
        await stream.aclose()
        assert remote.num_unfinished_requests() == 0
        for _ in range(200):  # the server notices the closed connection, then aborts
            running = await asyncio.to_thread(upstream_metric, upstream.url, RUNNING)
            if running == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        finished = await asyncio.to_thread(upstream_metric, upstream.url, FINISHED)
        made = await asyncio.to_thread(upstream_metric, upstream.url, GENERATED)
        finished, made = finished - finished_before, made - made_before
        outcomes.append(f"{made:.0f} tokens, {finished:.0f} finished")
        if finished == 0 and made < LONG_TOKENS:
            break
    assert finished == 0 and made < LONG_TOKENS, outcomes
