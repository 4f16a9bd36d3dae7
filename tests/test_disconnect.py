"""A client that disconnects from `POST /fast-response` mid-generation (issue 8, faults).

The gateway runs on a real uvicorn server over the session's in-process vLLM engine
(tiny model, `AsyncLLM`). The `long` personality's generations are made long ones
(LONG_TOKENS tokens, no stop string) so that one runs for a while; the client sends it,
waits until vLLM runs it, then drops the connection. What happened to the generation
is read from vLLM's own Prometheus counters on the gateway's `/metrics`, never from the
code under test: an aborted request is not counted as finished
(`vllm:request_success_total`) and made fewer than LONG_TOKENS tokens. Without the
route noticing the disconnect, the generation runs to its end and the test fails.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from service.app import create_app
from service.disconnect import until_disconnected
from service.engine import Engine, GenerationRequest, GenerationResult
from tests.conftest import engine_settings, live_app
from tests.test_streaming import wait_unfinished

TURN = {"pika_turn": "What did you eat today?", "user_turn": "I ate pho with my dad"}
LONG_TOKENS = 1900
"""Tokens of a `long` generation: seconds of work for the tiny model on the CPU, while
the personality limit (256) can be made before a disconnect is noticed."""


class LongGenerations:
    """The real engine, with the `long` personality's generations made long ones: a
    short prompt, LONG_TOKENS tokens and no stop string. Other personalities unchanged."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        if request.routing_key == "long":
            request = replace(request, prompt="Once upon a time", max_tokens=LONG_TOKENS, stop=())
        return await self._engine.generate(request_id, request)


@pytest.fixture(scope="module")
def manifest(signature_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`long` talks for LONG_TOKENS tokens; `sig` says "alpha alpha" (greedy)."""
    path = tmp_path_factory.mktemp("disconnect") / "personalities.yaml"
    sampling = "{max_tokens: %d, temperature: 0.0, top_p: 1.0, stop: []}"
    path.write_text(
        "personalities:\n"
        "  long:\n    description: d\n    style: s\n    max_words: 40\n"
        f"    sampling: {sampling % 256}\n    fallback_phrases: [Hm.]\n"
        "  sig:\n    description: d\n    style: s\n    max_words: 12\n"
        f"    sampling: {sampling % 12}\n    fallback_phrases: [Hm.]\n"
        f"    adapter: {signature_adapters['alpha']}\n"
    )
    return path


def samples(metrics: str, name: str, **labels: str) -> float:
    """Sum of the samples called exactly `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


FINISHED = "vllm:request_success_total"  # vLLM counts finished requests; aborts are not
GENERATED = "vllm:generation_tokens_total"
REQUESTS = "fastresp_requests_total"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_client_disconnect_aborts_the_engine_request(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> None:
    """Drop the connection while the generation runs: vLLM's unfinished count returns
    to 0, the generation ended unfinished (no finished request, fewer than LONG_TOKENS
    tokens), the gateway's gauges are released, the request is counted as a client
    error, and the next request is answered. The deadline (60 s) never cuts it.

    A machine so fast that the generation ends before the disconnect arrives proves
    nothing, so that is retried."""
    settings = engine_settings(
        tiny_model_dir, personalities_file=manifest, warm_up=False, deadline_ms=60_000
    )
    app = create_app(settings, engine=cast(Engine, LongGenerations(engine)))
    outcomes: list[str] = []
    finished = made = float("nan")  # no attempt measured yet
    async with live_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        for attempt in range(5):
            before = (await http.get("/metrics")).text
            body = {"personality": "long", **TURN, "request_id": f"gone-{attempt}"}
            # Its own client, so cancelling the call closes its own connection.
            async with httpx.AsyncClient(base_url=url, timeout=60) as leaving:
                call = asyncio.create_task(leaving.post("/fast-response", json=body))
                assert await wait_unfinished(engine, lambda n: n > 0) == 1
                call.cancel()  # httpx closes the connection with the answer unread
                await asyncio.gather(call, return_exceptions=True)
            if not call.cancelled():  # answered before the disconnect: proves nothing
                outcomes.append(f"answered first: {call.result().status_code}")
                continue
            assert await wait_unfinished(engine, lambda n: n == 0) == 0
            await asyncio.sleep(0.5)  # vLLM updates its counters in its output loop
            after = (await http.get("/metrics")).text
            finished = samples(after, FINISHED) - samples(before, FINISHED)
            made = samples(after, GENERATED) - samples(before, GENERATED)
            outcomes.append(f"{made:.0f} tokens, {finished:.0f} finished")
            if finished == 0 and made < LONG_TOKENS:
                break
        assert finished == 0 and made < LONG_TOKENS, outcomes
        print(f"disconnect: {outcomes[-1]} (a full run: {LONG_TOKENS} tokens)")

        # The gateway released what the aborted request held, and counted it (status
        # 499) as a client error, not as an answer.
        assert app.state.admission.in_flight == 0
        assert samples(after, "fastresp_in_flight_requests") == 0
        counts = {
            outcome: samples(after, REQUESTS, personality="long", outcome=outcome)
            - samples(before, REQUESTS, personality="long", outcome=outcome)
            for outcome in ("client_error", "ok")
        }
        assert counts == {"client_error": 1, "ok": 0}, counts

        # The next request on the same gateway is answered by the model.
        answer = await http.post("/fast-response", json={"personality": "sig", **TURN})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["source"], answer.json()["fast_response"]) == (
            "model",
            "alpha alpha",
        )


# -- `until_disconnected` on its own: plain asyncio, an ASGI receive channel by hand ---


class Channel:
    """An ASGI receive channel: the request body once, then `http.disconnect` when the
    test calls `disconnect()` (as uvicorn does when the client goes away)."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()
        self._body_sent = False

    def disconnect(self) -> None:
        self._gone.set()

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}


@pytest.mark.asyncio
async def test_work_that_ends_first_gives_its_result_or_its_own_exception() -> None:
    async def answer() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    async def refuse() -> str:
        raise KeyError("unknown personality")

    assert await until_disconnected(Channel().receive, answer()) == "answer"
    with pytest.raises(KeyError, match="unknown personality"):  # as is: no ExceptionGroup
        await until_disconnected(Channel().receive, refuse())


@pytest.mark.asyncio
async def test_a_disconnect_cancels_the_work_once_and_waits_for_its_cleanup() -> None:
    """The cleanup awaits after the cancellation (as vLLM's abort does) and is not
    cancelled again; None comes back only once it finished."""
    channel = Channel()
    events: list[str] = []

    async def generate() -> str:
        try:
            events.append("started")
            await asyncio.sleep(60)
            return "too late"
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # e.g. sending the abort to the engine
            events.append("aborted")
            raise

    async def leave_soon() -> None:
        await asyncio.sleep(0.05)
        channel.disconnect()

    leaving = asyncio.create_task(leave_soon())
    assert await until_disconnected(channel.receive, generate()) is None
    await leaving
    assert events == ["started", "aborted"]


@pytest.mark.asyncio
async def test_cancelling_the_caller_cancels_the_work_and_propagates() -> None:
    events: list[str] = []

    async def generate() -> str:
        try:
            await asyncio.sleep(60)
            return "too late"
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    caller = asyncio.create_task(until_disconnected(Channel().receive, generate()))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert events == ["cancelled"]
