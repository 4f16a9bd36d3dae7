"""The optional tone guard (setting `tone_guard`), off by default.

Unit tests of `service.guard.check_tone_fit` and of FastResponseService with the
scripted fake engine of test_fast_response_service.py. The expected tones are hand
labels ("Yay! Awesome!" to a child whose dog died clashes; "Oh no, I'm sorry." fits).
"""

from __future__ import annotations

import logging
from typing import cast

import pytest

from adapters.signals.tone import tone_mismatch
from service.engine import Engine
from service.fast_response import NEUTRAL_FALLBACK, FastResponseService
from service.guard import GuardRejection, check_tone_fit
from service.metrics import Metrics
from service.personalities import Personality
from service.schemas import FastResponseRequest
from service.settings import Settings
from tests.conftest import TEST_DATA
from tests.test_fast_response_service import NoAdapters, ScriptedEngine

SAD = "My dog died."
#: Cheerful fallbacks: the first two would clash with a sad child, the third fits.
PERSONALITY = Personality(
    name="cheerful",
    description="d",
    style="s",
    max_words=12,
    fallback_phrases=("Wow, amazing!", "Yay, awesome!", "Ooh, let me think."),
)
SAD_REQUEST = FastResponseRequest(personality="cheerful", user_turn=SAD, request_id="r1")


def _service(engine: ScriptedEngine, metrics: Metrics, tone_guard: bool) -> FastResponseService:
    return FastResponseService(
        cast(Engine, engine),
        {"cheerful": PERSONALITY},
        NoAdapters(),
        metrics,
        deadline_s=1.0,
        base_prompt_mode="few_shot",
        tone_guard=tone_guard,
    )


def _guard_fallbacks(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "fastresp_fallbacks_total",
        {"personality": "cheerful", "reason": "guard", "adapter_version": "base"},
    )
    return value or 0.0


def test_the_setting_is_off_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = TEST_DATA / "personalities.yaml"
    assert Settings(personalities_file=manifest).tone_guard is False
    monkeypatch.setenv("FASTRESP_TONE_GUARD", "true")
    assert Settings(personalities_file=manifest).tone_guard is True


def test_check_tone_fit_rejects_a_clash_with_its_reason() -> None:
    rejected = check_tone_fit("Yay! Awesome!", SAD)
    assert (rejected.text, rejected.rejection) == (None, GuardRejection.TONE_MISMATCH)
    assert GuardRejection.TONE_MISMATCH.value == "tone_mismatch"
    assert check_tone_fit("Oh no, I'm sorry.", SAD).text == "Oh no, I'm sorry."


@pytest.mark.asyncio
async def test_with_the_guard_on_a_clashing_candidate_is_resampled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, metrics = ScriptedEngine(["Yay! Awesome!", "Oh no, I'm sorry."]), Metrics()
    with caplog.at_level(logging.INFO, logger="service.fast_response"):
        answer = await _service(engine, metrics, tone_guard=True).respond(SAD_REQUEST)
    assert (answer.source, answer.fast_response) == ("model", "Oh no, I'm sorry.")
    reasons = [
        r.args[1]
        for r in caplog.records
        if "guard rejected" in r.msg and isinstance(r.args, tuple) and len(r.args) == 2
    ]
    assert reasons == [GuardRejection.TONE_MISMATCH]
    assert _guard_fallbacks(metrics) == 0


@pytest.mark.asyncio
async def test_with_the_guard_on_two_clashes_give_a_fitting_fallback() -> None:
    engine, metrics = ScriptedEngine(["Yay! Awesome!", "Woohoo, hooray!"]), Metrics()
    answer = await _service(engine, metrics, tone_guard=True).respond(SAD_REQUEST)
    assert answer.source == "fallback"
    assert _guard_fallbacks(metrics) == 1
    # The two exuberant phrases are skipped for a sad child.
    assert answer.fast_response == "Ooh, let me think."
    assert tone_mismatch(SAD, answer.fast_response) is None


@pytest.mark.asyncio
async def test_with_the_guard_off_the_clashing_candidate_passes() -> None:
    engine, metrics = ScriptedEngine(["Yay! Awesome!"]), Metrics()
    answer = await _service(engine, metrics, tone_guard=False).respond(SAD_REQUEST)
    assert (answer.source, answer.fast_response) == ("model", "Yay! Awesome!")


@pytest.mark.asyncio
async def test_with_the_guard_off_fallbacks_rotate_as_before() -> None:
    engine, metrics = ScriptedEngine(["", ""]), Metrics()
    answer = await _service(engine, metrics, tone_guard=False).respond(SAD_REQUEST)
    assert answer.fast_response == "Wow, amazing!"


@pytest.mark.asyncio
async def test_when_every_fallback_clashes_the_neutral_one_is_served() -> None:
    loud = PERSONALITY.model_copy(update={"fallback_phrases": ("Yay! Awesome!", "Woohoo!")})
    service = FastResponseService(
        cast(Engine, ScriptedEngine(["", ""])),
        {"cheerful": loud},
        NoAdapters(),
        Metrics(),
        deadline_s=1.0,
        base_prompt_mode="few_shot",
        tone_guard=True,
    )
    answer = await service.respond(SAD_REQUEST)
    assert answer.fast_response == NEUTRAL_FALLBACK
    assert tone_mismatch(SAD, NEUTRAL_FALLBACK) is None


@pytest.mark.asyncio
async def test_a_happy_child_keeps_an_exuberant_fallback() -> None:
    engine = ScriptedEngine(["", ""])
    happy = FastResponseRequest(personality="cheerful", user_turn="I won the race!")
    answer = await _service(engine, Metrics(), tone_guard=True).respond(happy)
    assert answer.fast_response == "Wow, amazing!"


@pytest.mark.asyncio
@pytest.mark.parametrize(("tone_guard", "source"), [(True, "fallback"), (False, "model")])
async def test_the_gateway_applies_the_setting(tone_guard: bool, source: str) -> None:
    """`FASTRESP_TONE_GUARD` reaches the service the app builds (not only a hand-built one)."""
    from tests.conftest import serve

    settings = Settings(
        personalities_file=TEST_DATA / "personalities.yaml", warm_up=False, tone_guard=tone_guard
    )
    engine = ScriptedEngine(["Yay! Awesome!", "Woohoo, hooray!"])
    async with serve(settings, cast(Engine, engine)) as client:
        reply = await client.post(
            "/fast-response", json={"personality": "cheerful", "user_turn": SAD}
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["source"] == source
