"""A personality with a LoRA adapter is served through a vLLM LoRARequest.

The adapter is a PEFT LoRA with random, non-zero weights (no training needed): under
greedy decoding it must change what the tiny model says for the same prompt, which
proves the adapter is really applied, and only for its own personality.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from adapters.random_lora import make_random_lora
from service.engine import AdapterRef, Engine, GenerationRequest, GenerationResult
from service.errors import AdapterRejected
from service.personalities import load_personalities
from service.prompts import Turn, build_prompt
from tests.conftest import engine_settings, serve

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def adapter_manifest(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    make_random_lora(tiny_model_dir, folder / "cheerful-v7", version="v7", alpha=64)
    manifest = folder / "personalities.yaml"
    sampling = '{max_tokens: 8, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}'
    manifest.write_text(
        "personalities:\n"
        "  tuned:\n    description: d\n    style: s\n    max_words: 40\n"
        f"    sampling: {sampling}\n    adapter: cheerful-v7\n    fallback_phrases: [Hm.]\n"
        "  base:\n    description: d\n    style: s\n    max_words: 40\n"
        f"    sampling: {sampling}\n    fallback_phrases: [Hm.]\n"
    )
    return manifest


class RecordingEngine:
    """The real engine, recording each GenerationRequest the service sends it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.requests: list[GenerationRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        if not request_id.startswith("swap-warmup-"):  # the registry's load warm-up
            self.requests.append(request)
        return await self._engine.generate(request_id, request)


async def test_adapter_personality_is_served_through_its_lora(
    engine: Engine, tiny_model_dir: Path, adapter_manifest: Path
) -> None:
    # No warm-up, so the recorded requests are only those of the two posts below.
    settings = engine_settings(tiny_model_dir, personalities_file=adapter_manifest, warm_up=False)
    recording = RecordingEngine(engine)
    turn = {"pika_turn": "What did you eat?", "user_turn": "I ate pho with my dad"}
    async with serve(settings, cast(Engine, recording)) as client:
        tuned = await client.post("/fast-response", json={"personality": "tuned", **turn})
        base = await client.post("/fast-response", json={"personality": "base", **turn})
        listed = (await client.get("/personalities")).json()["personalities"]
    assert tuned.status_code == base.status_code == 200
    assert tuned.json()["adapter_version"] == "v7"
    assert base.json()["adapter_version"] is None
    assert {p["name"]: p["adapter_version"] for p in listed} == {"tuned": "v7", "base": None}

    # The guard may resample the tiny model's noise, so take the first and last request.
    tuned_request, base_request = recording.requests[0], recording.requests[-1]
    assert tuned_request.adapter is not None
    assert tuned_request.adapter.path == adapter_manifest.parent / "cheerful-v7"
    assert base_request.adapter is None
    # An adapter is served with the chat template it is trained with; the base model
    # (a base, not instruct, model) with the few-shot prompt.
    assert tuned_request.prompt.endswith("<|im_start|>assistant\n")
    assert base_request.prompt.endswith("Pika's quick reaction:")


async def test_the_lora_changes_the_output_under_greedy_decoding(
    engine: Engine, adapter_manifest: Path
) -> None:
    """The same prompt with and without the adapter: only the LoRA can make them differ."""
    personality = load_personalities(adapter_manifest)["base"]
    prompt = build_prompt(personality, Turn("What did you eat?", "I ate pho"), "few_shot")
    request = GenerationRequest(prompt=prompt, max_tokens=8, temperature=0.0, top_p=1.0, stop=())
    ref = AdapterRef("probe", 99, adapter_manifest.parent / "cheerful-v7")
    await engine.add_adapter(ref)
    try:
        with_lora = await engine.generate("probe-lora", replace(request, adapter=ref))
        without = await engine.generate("probe-base", request)
        without_again = await engine.generate("probe-base-2", request)
    finally:
        await engine.remove_adapter(ref)
    assert without.text == without_again.text, "greedy decoding must be deterministic"
    assert with_lora.text != without.text, (with_lora.text, without.text)


async def test_configured_adapter_that_fails_to_load_fails_startup(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "p.yaml"
    manifest.write_text(
        "personalities:\n  broken:\n    description: d\n    style: s\n"
        "    adapter: missing-adapter\n    fallback_phrases: [Hm.]\n"
    )
    with pytest.raises(AdapterRejected, match=r"personality 'broken' .*missing-adapter"):
        async with serve(engine_settings(tiny_model_dir, personalities_file=manifest), engine):
            pass
