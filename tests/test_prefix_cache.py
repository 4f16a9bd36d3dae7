"""Prefix stability (issue 11): two requests of one personality share the exact prompt
tokens up to the per-request part, with the real tokenizers of the tiny model and of
gemma-3-270m, in the few-shot (base) and chat modes; and vLLM's prefix cache serves that
shared prefix (its own hit counter moves by at least the prefix's whole KV blocks).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from service.engine import Engine, GenerationRequest
from service.personalities import Personality, load_personalities
from service.prompts import PromptMode, Turn, build_prompt, format_turn, system_text
from service.settings import Settings, default_personalities_file
from tests.conftest import TEST_DATA

#: Two requests that share nothing but their personality.
TURN_A = Turn("What did you eat for lunch?", "I ate pho with my dad.")
TURN_B = Turn("Do you like dogs?", "Yes! I have a puppy named Bo.", "Let's talk about pets.")
#: The CPU KV block size (`service.vllm_engine.CPU_BLOCK_SIZE`): vLLM caches whole blocks.
BLOCK = 32


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _shared_text(personality: Personality, mode: PromptMode, tokenizer: Any) -> str:
    """The text before request A's per-request part, checked to be request B's start."""
    prompt_a = build_prompt(personality, TURN_A, mode, tokenizer)
    prompt_b = build_prompt(personality, TURN_B, mode, tokenizer)
    shared = prompt_a[: prompt_a.index(format_turn(TURN_A))]
    assert prompt_b.startswith(shared)
    assert prompt_b[len(shared) :].startswith(format_turn(TURN_B))
    return shared


def _check_prefix(model_dir: Path, personalities_file: Path) -> None:
    tokenizer = _tokenizer(model_dir)
    personalities = load_personalities(personalities_file)
    assert personalities
    for name, personality in personalities.items():
        for mode in ("few_shot", "chat"):
            shared = _shared_text(personality, mode, tokenizer)
            # Everything the personality owns is in the shared part.
            assert system_text(personality).splitlines()[0] in shared, (name, mode)
            if mode == "few_shot":
                for example in personality.few_shot:
                    assert " ".join(example.fast_response.split()) in shared, (name, example)
            shared_ids = _ids(tokenizer, shared)
            assert len(shared_ids) > 50, (name, mode)
            for turn in (TURN_A, TURN_B):
                ids = _ids(tokenizer, build_prompt(personality, turn, mode, tokenizer))
                assert ids[: len(shared_ids)] == shared_ids, (name, mode, turn)
                assert len(ids) > len(shared_ids)


def test_prefix_tokens_are_shared_on_the_tiny_model(tiny_model_dir: Path) -> None:
    _check_prefix(tiny_model_dir, TEST_DATA / "personalities.yaml")


@pytest.mark.realmodel
def test_prefix_tokens_are_shared_on_gemma() -> None:
    from service.model_prep import is_prepared

    model_dir = Settings().default_model_dir()
    assert is_prepared(model_dir), f"run `fastresp model prepare` first ({model_dir})"
    _check_prefix(model_dir, default_personalities_file())


def _prefix_cache_hits() -> float:
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "vllm:prefix_cache_hits_total"
    )


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_prefix_cache_hits_the_shared_prefix(
    engine: Engine, tiny_model_dir: Path
) -> None:
    """After request A, request B of the same personality hits at least every whole KV
    block of the shared prefix in vLLM's prefix cache (`vllm:prefix_cache_hits`)."""
    import asyncio

    tokenizer = engine.get_tokenizer()
    personality = load_personalities(TEST_DATA / "personalities.yaml")["cheerful"]
    shared_ids = _ids(tokenizer, _shared_text(personality, "few_shot", tokenizer))
    whole_blocks = len(shared_ids) // BLOCK * BLOCK
    assert whole_blocks >= BLOCK

    async def send(turn: Turn) -> None:
        prompt = build_prompt(personality, turn, "few_shot")
        request = GenerationRequest(prompt, 2, 0.0, 1.0, ())
        await engine.generate(uuid.uuid4().hex, request)

    await send(TURN_A)
    await asyncio.sleep(0.3)  # stats of the last engine step follow its output
    before = _prefix_cache_hits()
    await send(TURN_B)
    await asyncio.sleep(0.3)
    hits = _prefix_cache_hits() - before
    assert hits >= whole_blocks, (hits, len(shared_ids))
