"""The teacher client against a scripted local OpenAI-compatible server (aiohttp).

A real vLLM server never answers 429 or refuses `response_format`, so these cases are
scripted here: retries on 429/5xx/timeouts, no retry on other 4xx, the structured-output
fallback, the fatal 401, bounded concurrency, resume.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.labels import read_rows
from adapters.sources import Triple
from adapters.teacher import TeacherConfig, TeacherUnavailable, label_with_teacher
from service.personalities import Personality

GOOD_REPLY = '{"candidates": ["Ooh, a cow!", "Mm, I hear you, friend."]}'


def completion(content: str, prompt_tokens: int = 11, completion_tokens: int = 7) -> Any:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "teacher",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error(status: int, message: str = "scripted") -> web.Response:
    body = {"error": {"message": message, "type": "test", "code": status}}
    return web.json_response(body, status=status)


Handler = Callable[[dict[str, Any], int], Any]
"""(request body, 0-based request number) -> a web.Response, or a coroutine giving one."""


@dataclass
class FakeTeacher:
    """A scripted chat-completions endpoint that records what it was sent."""

    handler: Handler
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    delay_s: float = 0.0
    url: str = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        number = len(self.requests)
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            result = self.handler(body, number)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result)
        finally:
            self.in_flight -= 1


@pytest_asyncio.fixture(loop_scope="function")
async def fake() -> AsyncIterator[Callable[[Handler], Any]]:
    servers: list[TestServer] = []

    async def start(handler: Handler, delay_s: float = 0.0) -> FakeTeacher:
        teacher = FakeTeacher(handler=handler, delay_s=delay_s)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", teacher.chat)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        teacher.url = str(server.make_url("/v1"))
        return teacher

    yield start
    for server in servers:
        await server.close()


PERSONALITY = Personality(
    name="calm",
    description="Gentle and patient.",
    style="Calm, warm and simple.",
    fallback_phrases=("Mm.",),
)
CHEERFUL = Personality(
    name="cheerful",
    description="Bubbly.",
    style="Upbeat.",
    fallback_phrases=("Ooh!",),
)


def triples(n: int) -> list[Triple]:
    return [
        Triple(
            id=f"t{i}",
            source="test",
            lesson_id="L",
            pika_turn="Which animal says moo?",
            user_turn="Cow.",
            main_response=None,
        )
        for i in range(n)
    ]


def config(url: str, **overrides: Any) -> TeacherConfig:
    values: dict[str, Any] = {
        "base_url": url,
        "model": "teacher",
        "k": 2,
        "concurrency": 1,
        "max_retries": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 10.0,
    }
    values.update(overrides)
    return TeacherConfig(**values)


@pytest.mark.asyncio
async def test_429_then_500_then_success_is_retried(fake: Any, tmp_path: Path) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        if number == 0:
            response = error(429, "slow down")
            response.headers["Retry-After"] = "0"
            return response
        if number == 1:
            return error(500, "boom")
        return completion(GOOD_REPLY)

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    ticks: list[int] = []
    summary = await label_with_teacher(
        triples(1), [PERSONALITY], out, config(teacher.url), progress=lambda: ticks.append(1)
    )
    assert len(teacher.requests) == 3
    assert summary.rows == 1 and summary.accepted == 1
    assert "teacher_error" not in summary.rejections
    assert summary.prompt_tokens == 11 and summary.completion_tokens == 7
    assert len(ticks) == 1
    (row,) = list(read_rows(out))
    assert row.id == "t0|calm"
    assert row.status == "accepted"
    assert row.fast_response in ("Ooh, a cow!", "Mm, I hear you, friend.")
    assert row.teacher is not None
    assert row.teacher["structured_output"] is True
    assert row.teacher["model"] == "teacher"
    # the SDK did not retry on its own: every attempt reached the server once
    assert all(body["model"] == "teacher" for body in teacher.requests)


@pytest.mark.asyncio
async def test_gives_up_after_max_retries_writes_nothing_and_a_rerun_retries(
    fake: Any, tmp_path: Path
) -> None:
    healthy = False

    def handler(body: dict[str, Any], number: int) -> Any:
        return completion(GOOD_REPLY) if healthy else error(503, "overloaded")

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(
        triples(1), [PERSONALITY], out, config(teacher.url, max_retries=2)
    )
    assert len(teacher.requests) == 3  # the first attempt and two retries
    assert summary.rows == 0
    assert summary.rejections == {"teacher_error": 1}
    assert list(read_rows(out)) == []

    healthy = True
    again = await label_with_teacher(triples(1), [PERSONALITY], out, config(teacher.url))
    assert again.rows == 1 and again.skipped_done == 0
    assert [row.id for row in read_rows(out)] == ["t0|calm"]


@pytest.mark.asyncio
async def test_timeout_is_retried(fake: Any, tmp_path: Path) -> None:
    async def handler(body: dict[str, Any], number: int) -> Any:
        if number == 0:
            await asyncio.sleep(5)  # past the client's timeout below
        return completion(GOOD_REPLY)

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(
        triples(1), [PERSONALITY], out, config(teacher.url, timeout_s=0.5)
    )
    assert len(teacher.requests) == 2
    assert summary.rows == 1


@pytest.mark.asyncio
async def test_connection_refused_is_a_teacher_error(tmp_path: Path) -> None:
    from tests.conftest import free_port

    out = tmp_path / "labels.jsonl"
    url = f"http://127.0.0.1:{free_port()}/v1"
    summary = await label_with_teacher(triples(2), [PERSONALITY], out, config(url, max_retries=1))
    assert summary.rows == 0
    assert summary.rejections == {"teacher_error": 2}
    assert list(read_rows(out)) == []


@pytest.mark.asyncio
async def test_a_dead_teacher_stops_the_run(fake: Any, tmp_path: Path) -> None:
    teacher = await fake(lambda body, number: error(503, "down"))
    out = tmp_path / "labels.jsonl"
    settings = config(teacher.url, max_retries=0, concurrency=1, max_consecutive_errors=3)
    with pytest.raises(TeacherUnavailable, match="3 pairs in a row failed"):
        await label_with_teacher(triples(20), [PERSONALITY], out, settings)
    assert len(teacher.requests) == 3  # not one request per pair of the input
    assert list(read_rows(out)) == []


@pytest.mark.asyncio
async def test_a_success_resets_the_failure_count(fake: Any, tmp_path: Path) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        return completion(GOOD_REPLY) if number % 3 == 2 else error(503, "flaky")

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    settings = config(teacher.url, max_retries=0, concurrency=1, max_consecutive_errors=3)
    summary = await label_with_teacher(triples(9), [PERSONALITY], out, settings)
    assert summary.rows == 3
    assert summary.rejections.get("teacher_error") == 6


@pytest.mark.parametrize(
    "reply",
    [
        lambda: web.Response(text="upstream proxy says hello", content_type="text/plain"),
        lambda: web.Response(text="<html>502 from a proxy</html>", content_type="text/html"),
        lambda: web.Response(text="{not json", content_type="application/json"),
        lambda: {},
        lambda: {"choices": [1]},
        lambda: {"choices": [{"message": None}]},
    ],
    ids=["text", "html", "broken-json", "empty-object", "int-choice", "null-message"],
)
@pytest.mark.asyncio
async def test_a_200_that_is_not_a_chat_completion_is_a_teacher_error(
    fake: Any, tmp_path: Path, reply: Callable[[], Any]
) -> None:
    # Before the fix the SDK's unvalidated result crashed the whole run (AttributeError
    # or JSONDecodeError inside the TaskGroup).
    healthy = False

    def handler(body: dict[str, Any], number: int) -> Any:
        return completion(GOOD_REPLY) if healthy else reply()

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(triples(2), [PERSONALITY], out, config(teacher.url))
    assert summary.rows == 0
    assert summary.rejections == {"teacher_error": 2}
    assert list(read_rows(out)) == []

    healthy = True  # a re-run retries the pairs: nothing was recorded as done
    again = await label_with_teacher(triples(2), [PERSONALITY], out, config(teacher.url))
    assert again.rows == 2 and again.skipped_done == 0


@pytest.mark.asyncio
async def test_other_4xx_is_not_retried(fake: Any, tmp_path: Path) -> None:
    teacher = await fake(lambda body, number: error(422, "bad request"))
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(triples(1), [PERSONALITY], out, config(teacher.url))
    assert len(teacher.requests) == 1
    assert summary.rejections == {"teacher_error": 1}
    assert summary.rows == 0


@pytest.mark.asyncio
async def test_auto_falls_back_when_response_format_is_refused(fake: Any, tmp_path: Path) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        if "response_format" in body:
            return error(400, "response_format json_schema is not supported")
        return completion(GOOD_REPLY)

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(triples(3), [PERSONALITY], out, config(teacher.url))
    with_schema = [body for body in teacher.requests if "response_format" in body]
    assert len(with_schema) == 1  # tried once, then remembered for the run
    assert with_schema[0]["response_format"]["type"] == "json_schema"
    assert len(teacher.requests) == 4
    assert summary.rows == 3 and summary.accepted == 3
    rows = list(read_rows(out))
    assert len(rows) == 3
    assert all(
        row.teacher is not None and row.teacher["structured_output"] is False for row in rows
    )


@pytest.mark.asyncio
async def test_auto_keeps_the_schema_when_the_400_is_the_requests_own(
    fake: Any, tmp_path: Path
) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        user = body["messages"][1]["content"]
        if "too long" in user:
            return error(400, "context length exceeded")
        return completion(GOOD_REPLY)

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    items = [
        Triple(id="long", source="test", user_turn="too long"),
        Triple(id="ok", source="test", user_turn="Cow."),
    ]
    summary = await label_with_teacher(items, [PERSONALITY], out, config(teacher.url))
    assert summary.rejections == {"teacher_error": 1}
    assert summary.rows == 1
    # the failing pair was tried with and without the schema; the next one with it again
    assert ["response_format" in body for body in teacher.requests] == [True, False, True]
    (row,) = list(read_rows(out))
    assert row.id == "ok|calm"
    assert row.teacher is not None and row.teacher["structured_output"] is True


@pytest.mark.asyncio
async def test_structured_on_never_falls_back(fake: Any, tmp_path: Path) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        if "response_format" in body:
            return error(400, "response_format json_schema is not supported")
        return completion(GOOD_REPLY)

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    summary = await label_with_teacher(
        triples(2), [PERSONALITY], out, config(teacher.url, structured_output="on")
    )
    assert len(teacher.requests) == 2
    assert summary.rejections == {"teacher_error": 2}


@pytest.mark.asyncio
async def test_structured_off_sends_no_schema(fake: Any, tmp_path: Path) -> None:
    teacher = await fake(lambda body, number: completion(GOOD_REPLY))
    out = tmp_path / "labels.jsonl"
    await label_with_teacher(
        triples(2), [PERSONALITY], out, config(teacher.url, structured_output="off")
    )
    assert len(teacher.requests) == 2
    assert not any("response_format" in body for body in teacher.requests)


@pytest.mark.asyncio
async def test_401_stops_the_run(fake: Any, tmp_path: Path) -> None:
    def handler(body: dict[str, Any], number: int) -> Any:
        return completion(GOOD_REPLY) if number == 0 else error(401, "bad key")

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    with pytest.raises(TeacherUnavailable, match="AuthenticationError"):
        await label_with_teacher(triples(5), [PERSONALITY], out, config(teacher.url))
    assert len(teacher.requests) == 2  # stopped at the first 401, not retried
    assert [row.id for row in read_rows(out)] == ["t0|calm"]  # the row before it stays


@pytest.mark.asyncio
async def test_unparsable_and_filtered_replies_are_rejected_rows(fake: Any, tmp_path: Path) -> None:
    replies = {
        "t0": "Sorry, I can't do that.",
        "t1": '{"candidates": ["Great job, you got it right, the answer is five!"]}',
        "t2": '```json\n{"candidates": ["Hmm, thank you for trying!"]}\n```',
    }

    def handler(body: dict[str, Any], number: int) -> Any:
        user = body["messages"][1]["content"]
        triple_id = next(key for key in replies if f"[{key}]" in user)
        return completion(replies[triple_id])

    teacher = await fake(handler)
    out = tmp_path / "labels.jsonl"
    items = [
        Triple(
            id=key,
            source="test",
            pika_turn="What is three plus two?",
            user_turn=f"[{key}] Six.",
            main_response="Not quite. Three plus two is five. Let's count on our fingers.",
        )
        for key in replies
    ]
    summary = await label_with_teacher(items, [PERSONALITY], out, config(teacher.url))
    rows = {row.triple_id: row for row in read_rows(out)}
    assert rows["t0"].reason == "unparsable_reply"
    assert rows["t0"].teacher is not None
    assert rows["t0"].teacher["reply"] == "Sorry, I can't do that."
    assert rows["t1"].reason == "no_candidate_passed"
    assert "no_contradiction" in rows["t1"].rejected[0].reasons
    assert "no_leak" in rows["t1"].rejected[0].reasons
    assert rows["t2"].status == "accepted"
    assert rows["t2"].fast_response == "Hmm, thank you for trying!"
    assert rows["t2"].teacher is not None and rows["t2"].teacher["repairs"] == ["code_fence"]
    assert summary.rows == 3 and summary.accepted == 1 and summary.rejected == 2
    assert summary.rejections["unparsable_reply"] == 1
    assert summary.rejections["no_candidate_passed"] == 1
    assert summary.rejections["no_contradiction"] == 1
    assert summary.prompt_tokens == 33


@pytest.mark.asyncio
async def test_concurrency_is_bounded_and_resume_skips_done(fake: Any, tmp_path: Path) -> None:
    teacher = await fake(lambda body, number: completion(GOOD_REPLY), delay_s=0.05)
    out = tmp_path / "labels.jsonl"
    cfg = config(teacher.url, concurrency=3)
    summary = await label_with_teacher(triples(6), [PERSONALITY, CHEERFUL], out, cfg)
    assert summary.rows == 12
    assert 1 <= teacher.max_in_flight <= 3
    ids = [row.id for row in read_rows(out)]
    assert len(ids) == len(set(ids)) == 12
    assert {row.personality for row in read_rows(out)} == {"calm", "cheerful"}
    lines_before = out.read_text(encoding="utf-8")

    seen = len(teacher.requests)
    ticks: list[int] = []
    again = await label_with_teacher(
        triples(6), [PERSONALITY, CHEERFUL], out, cfg, progress=lambda: ticks.append(1)
    )
    assert len(teacher.requests) == seen  # nothing sent
    assert again.rows == 0 and again.skipped_done == 12
    assert len(ticks) == 12
    assert out.read_text(encoding="utf-8") == lines_before


@pytest.mark.asyncio
async def test_prompt_reaches_the_server(fake: Any, tmp_path: Path) -> None:
    teacher = await fake(lambda body, number: completion(GOOD_REPLY))
    out = tmp_path / "labels.jsonl"
    await label_with_teacher(
        triples(1), [PERSONALITY], out, config(teacher.url, k=3, temperature=0.3, max_tokens=77)
    )
    (body,) = teacher.requests
    assert body["temperature"] == 0.3
    assert body["max_tokens"] == 77
    assert (
        body["response_format"]["json_schema"]["schema"]["properties"]["candidates"]["maxItems"]
        == 3
    )
    system, user = body["messages"]
    assert system["role"] == "system" and "fast response" in system["content"]
    assert "The child said: Cow.\n" in user["content"]
    assert "Main answer: not known yet\n" in user["content"]
    assert json.dumps(body).count("Gentle and patient.") == 1
