"""Prompt parity: the prompt SFT trains on is, byte for byte, the prompt the gateway sends.

Three real Bridge triples become training rows through the dataset builder
(`adapters.dataset.training_row`, one with its main response dropped), go through a
JSON Lines file as `fastresp data build` writes them, and are rendered by
`adapters.sft_format` with the training side's tokenizer (transformers'
`AutoTokenizer`, as `train_sft` loads it). The same triples are posted to the real
gateway, serving the shipped `calm` personality with a LoRA adapter on the in-process
vLLM engine; the prompt is captured at the engine boundary (a proxy around the real
engine records each `GenerationRequest`). Then:

- the captured prompt equals the training prompt exactly;
- the prompt token ids of the training example equal the ids vLLM itself tokenised
  the captured prompt to (`RequestOutput.prompt_token_ids` of the real engine).

The gemma check (marker `realmodel`) repeats the token-level part on the prepared
gemma-3-270m's tokenizer as vLLM loads it, where `<bos>` matters: exactly one, first.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from adapters.dataset import training_row
from adapters.labels import LabeledRow, base_fields
from adapters.random_lora import make_random_lora
from adapters.sft_format import (
    TrainingDataError,
    read_training_rows,
    row_fast_response,
    row_turn,
    tokenize_example,
    training_completion,
    training_prompt,
)
from adapters.sources import Triple, load_triples
from service.engine import Engine, GenerationRequest, GenerationResult
from service.personalities import load_personalities
from service.prompts import Turn, system_text
from service.settings import Settings, default_personalities_file
from tests.conftest import engine_settings, serve

PERSONALITY = "calm"
FAST_RESPONSE = "Hm, let me see."


class CapturingEngine:
    """The real engine; `prompts` records the prompt of every generation requested
    through `generate` (the gateway's only way to the model)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.prompts: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        if not request_id.startswith("swap-warmup-"):  # the registry's adapter warm-up
            self.prompts.append(request.prompt)
        return await self._engine.generate(request_id, request)


@pytest.fixture(scope="module")
def triples(shared_data: Path) -> list[Triple]:
    found = load_triples("bridge", shared_data / "bridge" / "validation.json", limit=3)
    assert len(found) == 3 and all(t.pika_turn and t.main_response for t in found)
    return found


def _training_rows(triples: list[Triple], manifest: Path, folder: Path) -> list[dict[str, Any]]:
    """The triples as `fastresp data build` writes them (the third with its main
    response dropped), read back from a JSON Lines file."""
    system = system_text(load_personalities(manifest)[PERSONALITY])
    lines = []
    for index, triple in enumerate(triples):
        labelled = LabeledRow(
            **base_fields(triple, PERSONALITY),
            labeler="tutor-openers",
            prompt_version="test",
            status="accepted",
            fast_response=FAST_RESPONSE,
        )
        lines.append(training_row(labelled, system, drop=index == 2).to_json())
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_training_rows(path)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_training_prompt_is_the_served_prompt(
    engine: Engine, tiny_model_dir: Path, triples: list[Triple], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    make_random_lora(tiny_model_dir, tmp_path / "calm-adapter", version="parity")
    shipped = yaml.safe_load(default_personalities_file().read_text(encoding="utf-8"))
    calm = {**shipped["personalities"][PERSONALITY], "adapter": "calm-adapter"}
    calm["sampling"] = {**calm.get("sampling", {}), "max_tokens": 2}  # the prompt is the point
    manifest = tmp_path / "personalities.yaml"
    manifest.write_text(yaml.safe_dump({"personalities": {PERSONALITY: calm}}), encoding="utf-8")
    rows = _training_rows(triples, manifest, tmp_path)
    assert rows[2]["main_response"] is None and rows[0]["main_response"] is not None

    capturing = CapturingEngine(engine)
    settings = engine_settings(tiny_model_dir, personalities_file=manifest, warm_up=False)
    served: list[str] = []
    async with serve(settings, cast(Engine, capturing)) as client:
        for triple, row in zip(triples, rows, strict=True):
            body = {
                "personality": PERSONALITY,
                "pika_turn": triple.pika_turn,
                "user_turn": triple.user_turn,
                "main_response": row["main_response"],
            }
            before = len(capturing.prompts)
            response = await client.post("/fast-response", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["adapter_version"] == "parity"
            prompts = capturing.prompts[before:]
            assert prompts and len(set(prompts)) == 1  # a guard resample sends the same
            served.append(prompts[0])

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    personality = load_personalities(manifest)[PERSONALITY]
    llm = cast(Any, engine)._llm  # the real AsyncLLM: how vLLM itself tokenised the prompt
    for row, prompt in zip(rows, served, strict=True):
        turn = row_turn(row)
        trained = training_prompt(personality, turn, tokenizer)
        assert trained == prompt  # byte for byte
        assert trained.encode() == prompt.encode()

        completion = training_completion(personality, turn, row_fast_response(row), tokenizer)
        assert completion == f"{FAST_RESPONSE}<|im_end|>"
        example = tokenize_example(trained, completion, tokenizer)
        prompt_ids = example["input_ids"][: example["completion_mask"].index(1)]
        final = None
        params = SamplingParams(max_tokens=1, temperature=0.0)
        async for output in llm.generate(prompt, params, f"parity-{uuid.uuid4().hex}"):
            final = output
        assert final is not None
        assert list(final.prompt_token_ids) == prompt_ids


@pytest.mark.realmodel
def test_gemma_training_ids_are_the_ids_vllm_tokenises(
    triples: list[Triple], tmp_path: Path
) -> None:
    """gemma-3-270m: the training example starts with exactly one `<bos>` and its prompt
    ids are what vLLM's tokenizer gives for a text prompt (`add_special_tokens=True`,
    vLLM's default for completions: `BaseRenderer.default_cmpl_tok_params`); the answer
    ends with `<end_of_turn>` (id 106), a stop token of the prepared model."""
    from transformers import AutoTokenizer
    from vllm.tokenizers import get_tokenizer

    model = Settings().default_model_dir()
    assert (model / "config.json").is_file(), f"run `fastresp model prepare` first ({model})"
    manifest = default_personalities_file()
    personality = load_personalities(manifest)[PERSONALITY]
    rows = _training_rows(triples, manifest, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    served = get_tokenizer(str(model))
    for row in rows:
        turn = row_turn(row)
        prompt = training_prompt(personality, turn, tokenizer)
        assert prompt == training_prompt(personality, turn, served)  # same template
        completion = training_completion(personality, turn, row_fast_response(row), tokenizer)
        assert completion == f"{FAST_RESPONSE}<end_of_turn>"
        example = tokenize_example(prompt, completion, tokenizer)
        split = example["completion_mask"].index(1)
        assert example["input_ids"][:split] == served.encode(prompt, add_special_tokens=True)
        assert example["input_ids"][0] == tokenizer.bos_token_id
        assert example["input_ids"].count(tokenizer.bos_token_id) == 1
        assert example["input_ids"][-1] == 106


# --- the row format itself: no engine needed ---------------------------------------

SYSTEM = {"role": "system", "content": "(any system text)"}


def test_row_turn_reads_the_seed_format() -> None:
    row = {
        "id": "r|calm",
        "previous_conversation": [
            SYSTEM,
            {"role": "assistant", "content": "What is 2 + 2?"},
            {"role": "user", "content": "four"},
        ],
        "main_response": "Yes! Four.",
        "assistant_fast_response": "Ooh.",
    }
    assert row_turn(row) == Turn("What is 2 + 2?", "four", "Yes! Four.")
    no_pika = {**row, "previous_conversation": [SYSTEM, row["previous_conversation"][2]]}
    assert row_turn(no_pika | {"main_response": None}) == Turn(None, "four", None)
    assert row_fast_response(row) == "Ooh."


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"previous_conversation": []},
            "previous_conversation: must be a non-empty list of messages",
        ),
        ({"previous_conversation": [SYSTEM]}, "previous_conversation: no non-empty user message"),
        (
            {"previous_conversation": [SYSTEM, {"role": "child", "content": "hi"}]},
            "previous_conversation[1].role: must be system, assistant or user",
        ),
        (
            {"previous_conversation": [SYSTEM, {"role": "user", "content": 3}]},
            "previous_conversation[1].content: must be a string",
        ),
        ({"main_response": 7}, "main_response: must be a string or null"),
        ({"assistant_fast_response": " "}, "assistant_fast_response: must be a non-empty string"),
    ],
)
def test_a_malformed_row_is_named(change: dict[str, Any], message: str) -> None:
    row = {
        "id": "bridge:1|calm",
        "previous_conversation": [SYSTEM, {"role": "user", "content": "hi"}],
        "main_response": None,
        "assistant_fast_response": "Hm.",
    } | change
    with pytest.raises(TrainingDataError) as caught:
        row_turn(row)
        row_fast_response(row)
    assert str(caught.value) == f"row 'bridge:1|calm': {message}"


def test_read_training_rows_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n[1]\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"rows\.jsonl:3: not a JSON object$"):
        read_training_rows(path)


class _DriftingTemplate:
    """A chat template that renders the system text differently once an answer follows."""

    def apply_chat_template(self, conversation: Any, /, **kwargs: Any) -> str:
        answered = not kwargs["add_generation_prompt"]
        text = "".join(f"[{m['role']}]{m['content']}" for m in conversation)
        return ("(answered)" if answered else "") + text + ("" if answered else "[assistant]")


def test_a_template_that_drifts_from_the_prompt_is_refused() -> None:
    personality = load_personalities(default_personalities_file())[PERSONALITY]
    with pytest.raises(TrainingDataError, match="renders the conversation with the answer"):
        training_completion(personality, Turn(None, "hi"), "Hm.", _DriftingTemplate())
