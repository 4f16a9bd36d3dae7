"""Train to serve, end to end: `fastresp train sft` on the tiny model, then the gateway.

Five real Bridge triples (the shortest of the validation file, so the tiny model's
almost character-level prompts stay near 300 tokens) become training rows through the
dataset builder, each with its own target sentence. `fastresp train sft` trains a
rank-8 LoRA on them; the same rows are the validation split (this checks that the
adapter learned the rows, and that evaluation and best-checkpoint selection run).
Then the in-process vLLM engine serves the adapter behind the real gateway, and every
training turn posted to `/fast-response` with greedy decoding must return its trained
target exactly, after the guard: the proof that what training learns is what serving
says.

Measured on the 2-core machine (one torch thread), with these rows and settings (all
5 rows a batch, lr 5e-3 decayed linearly, rank 8 on every projection, 120 steps):
- about 0.25 s a step, 30 s of training;
- the training loss went from 5.97 (about ln of the ~400-token vocabulary: a random
  model) to 3.62 at step 40 (TRL's token accuracy 0.98), 3.456 at 80 and 3.4505 at
  120, where it levels off. It cannot go much lower: the tiny model ties its output
  layer to its input embedding, which LoRA does not adapt, so the logits stay within
  a few units (tests/signature_adapters.py). The argmax is right long before that
  (token accuracy 1.0 from step 40 on the validation pass). `TRAIN_LOSS_BELOW` = 3.6
  is under the step-40 loss and above the plateau;
- all 5 targets came back exactly through the gateway (also with 200 steps); with an
  earlier set of rows 60 steps gave 4 of 5 (a row ended with another row's words), so
  the margin is about 2x.

Also checked: the card's fields against values computed here (file hashes, library
versions, git commit, the best step from the log history), the loss curve PNG,
dropped and skipped rows, the gateway's own adapter validation, and that a failed run
leaves nothing at the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from adapters.dataset import training_row
from adapters.labels import LabeledRow, base_fields
from adapters.sources import Triple, load_triples
from service.adapter_validation import BaseModelInfo, validate_adapter
from service.cli import app
from service.engine import Engine
from service.personalities import load_personalities
from service.prompts import PROMPT_VERSION, system_text
from tests.conftest import REPO_ROOT, engine_settings, serve

PERSONALITY = "tuned"
#: One target per row: sentences the tiny tokenizer knows (its corpus), each ending a
#: sentence so the guard keeps it whole.
TARGETS = (
    "The cat likes a red ball.",
    "A dog sees the big tree!",
    "My friend draws a happy song.",
    "Our robot finds some cookies?",
    "The child reads about the zoo.",
)
STEPS = 120
LEARNING_RATE = 5e-3
RANK = 8
MAX_SEQ_LENGTH = 768
TRAIN_LOSS_BELOW = 3.6


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One torch thread: on two shared cores, two threads were 2-5x slower
    (tests/signature_adapters.py)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _manifest(path: Path, adapter: Path) -> Path:
    body = {
        "description": "Bubbly and playful.",
        "style": "Short and upbeat.",
        "max_words": 12,
        "sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"]},
        "adapter": str(adapter),
        "fallback_phrases": ["Hmm, good one!"],
    }
    path.write_text(yaml.safe_dump({"personalities": {PERSONALITY: body}}), encoding="utf-8")
    return path


def _rows(triples: list[Triple], manifest: Path) -> list[str]:
    """Training rows (JSON lines) of the triples, with TARGETS as fast responses; the
    last has its main response dropped."""
    system = system_text(load_personalities(manifest)[PERSONALITY])
    lines = []
    for index, (triple, target) in enumerate(zip(triples, TARGETS, strict=True)):
        labelled = LabeledRow(
            **base_fields(triple, PERSONALITY),
            labeler="teacher",
            prompt_version="test",
            status="accepted",
            fast_response=target,
        )
        lines.append(training_row(labelled, system, drop=index == len(TARGETS) - 1).to_json())
    return lines


@pytest.fixture(scope="module")
def short_triples(shared_data: Path) -> list[Triple]:
    triples = load_triples("bridge", shared_data / "bridge" / "validation.json")
    triples.sort(key=lambda t: len(f"{t.pika_turn}{t.user_turn}{t.main_response}"))
    return triples[: len(TARGETS)]


@pytest.fixture(scope="module")
def trained(
    tiny_model_dir: Path,
    short_triples: list[Triple],
    tmp_path_factory: pytest.TempPathFactory,
    torch_one_thread: None,
) -> dict[str, Any]:
    """Run `fastresp train sft` once; returns paths, the rows and the CLI result."""
    folder = tmp_path_factory.mktemp("sft")
    out = folder / "adapters" / "tuned-sft"
    manifest = _manifest(folder / "personalities.yaml", out)
    rows = _rows(short_triples, manifest)
    other = json.loads(rows[0]) | {"personality": "other", "id": "x|other"}
    too_long = json.loads(rows[1]) | {"id": "long|tuned"}
    too_long["previous_conversation"][-1]["content"] = "I like the big tree. " * 60
    (folder / "data").mkdir()
    train = folder / "data" / "train.jsonl"
    extra = [json.dumps(other), json.dumps(too_long)]
    train.write_text("\n".join(rows + extra) + "\n", encoding="utf-8")
    validation = folder / "data" / "validation.jsonl"
    validation.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = folder / "sft.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\n"
        f"personality: {PERSONALITY}\n"
        "personalities_file: personalities.yaml\n"
        "data: {train: data/train.jsonl, validation: data/validation.jsonl}\n"
        "output_dir: adapters/tuned-sft\n"
        f"max_steps: {STEPS}\n"
        f"learning_rate: {LEARNING_RATE}\n"
        f"batch_size: {len(TARGETS)}\n"
        "gradient_accumulation_steps: 1\n"
        f"max_seq_length: {MAX_SEQ_LENGTH}\n"
        "logging_steps: 20\n"
        "eval_steps: 40\n"
        f"lora: {{rank: {RANK}, alpha: {2 * RANK}, dropout: 0.0}}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 0, result.output
    return {
        "out": out,
        "manifest": manifest,
        "train": train,
        "validation": validation,
        "output": result.output,
        "rows": [json.loads(line) for line in rows],
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_lowers_the_loss_and_writes_the_card(
    trained: dict[str, Any], tiny_model_dir: Path
) -> None:
    out: Path = trained["out"]
    card = json.loads((out / "fastresp_card.json").read_text())
    history = json.loads((out / "log_history.json").read_text())
    metrics = card["metrics"]

    assert metrics["train_loss"] < TRAIN_LOSS_BELOW, metrics
    vocabulary = len(json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    assert metrics["initial_validation_loss"] > math.log(vocabulary) - 0.5  # untrained: ~uniform
    evals = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert sorted(evals) == [0, 40, 80, 120]
    assert evals[0] == metrics["initial_validation_loss"]
    del evals[0]  # the checkpoints are those of steps 40..120
    assert metrics["validation_loss"] == min(evals.values())
    assert metrics["best_step"] == min(evals, key=lambda step: evals[step])
    assert metrics["steps"] == STEPS

    assert card["format"] == 1 and card["kind"] == "sft" and card["version"] is None
    assert card["personality"] == PERSONALITY
    assert card["base_model"] == {
        "name": "tiny-random-qwen3",  # the prepared model's marker
        "path": str(tiny_model_dir),
        "config_sha256": _sha256(tiny_model_dir / "config.json"),
    }
    assert card["data"]["train"] == {
        "path": str(trained["train"]),
        "sha256": _sha256(trained["train"]),
        "rows": len(TARGETS),
        "rows_dropped_too_long": 1,
        "rows_other_personality": 1,
        "rows_other_system_text": 0,
    }
    assert card["data"]["validation"]["rows"] == len(TARGETS)
    assert card["data"]["validation"]["sha256"] == _sha256(trained["validation"])
    hyper = card["hyperparameters"]
    assert (hyper["learning_rate"], hyper["max_steps"], hyper["seed"]) == (LEARNING_RATE, STEPS, 0)
    assert hyper["lora"] == {
        "rank": RANK,
        "alpha": 2 * RANK,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"],
    }  # fmt: skip
    assert card["prompt_version"] == PROMPT_VERSION
    assert card["libraries"] == {
        name: metadata.version(name)
        for name in ("torch", "transformers", "trl", "peft", "datasets")
    }
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert card["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert (card["device"], card["dtype"]) == ("cpu", "float32")
    assert card["training_seconds"] > 0

    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # Progress: one line per logging step with an ETA, and the evaluations, on stderr.
    assert "step 20/120" in trained["output"] and "eta " in trained["output"]
    assert "eval  before training  validation loss" in trained["output"]
    assert f"adapter: {out}" in trained["output"]
    # Atomic: only the adapter folder is left beside it.
    assert [p.name for p in out.parent.iterdir()] == [out.name]

    # The gateway's own checks accept it for this base model.
    adapter = validate_adapter(out, BaseModelInfo.from_dir(tiny_model_dir), max_lora_rank=16)
    assert adapter.rank == RANK


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_the_served_adapter_says_what_it_was_trained_to(
    engine: Engine, trained: dict[str, Any], tiny_model_dir: Path, short_triples: list[Triple]
) -> None:
    settings = engine_settings(tiny_model_dir, personalities_file=trained["manifest"])
    answers = []
    async with serve(settings, engine) as client:
        for triple, row in zip(short_triples, trained["rows"], strict=True):
            body = {
                "personality": PERSONALITY,
                "pika_turn": triple.pika_turn,
                "user_turn": triple.user_turn,
                "main_response": row["main_response"],
            }
            response = await client.post("/fast-response", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert {a["source"] for a in answers} == {"model"}
    assert {a["adapter_version"] for a in answers} == {"tuned-sft"}  # no version: the folder
    assert [a["fast_response"] for a in answers] == list(TARGETS)


def test_a_failed_run_leaves_nothing_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A malformed row is found after the tokenizer loads: exit 2 naming the row and
    field, and neither the output folder nor the work folder is left (nor the work
    folder of an earlier run that was killed)."""
    manifest = _manifest(tmp_path / "personalities.yaml", tmp_path / "out")
    row = {"id": "bad|tuned", "personality": PERSONALITY, "previous_conversation": []}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\npersonality: {PERSONALITY}\n"
        f"personalities_file: {manifest}\ndata: {{train: train.jsonl}}\noutput_dir: out\n",
        encoding="utf-8",
    )
    stale = tmp_path / ".out.partial-999999999"  # a killed run's work folder (no such pid)
    (stale / "checkpoints").mkdir(parents=True)
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert (
        "error: row 'bad|tuned': previous_conversation: must be a non-empty list of messages"
        in result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "personalities.yaml",
        "sft.yaml",
        "train.jsonl",
    ]
