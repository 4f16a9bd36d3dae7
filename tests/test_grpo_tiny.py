"""`train_grpo` end to end on the tiny model: rewards logged, card written, adapter loads.

An SFT adapter is trained first with `train_sft` (2 steps: its quality does not matter,
only that it is a real `fastresp train sft` output), then GRPO runs 2 steps from it
with every rule reward and a judge. The tiny model's completions are noise, so the
rule rewards' values are not asserted, only that each is logged at every step and lies
in [0, 1]. The judge is a scripted OpenAI-compatible HTTP server (tests/fake_judge.py)
that always answers ``{"score": 4}``: a real judge model is too slow for the suite and
its quality is not the subject here; the expected judge mean is therefore (4 - 1) / 4 =
0.75 at every step, and the expected number of judge calls is steps x completions per
step (batch_size 2 x gradient_accumulation_steps 2 = 4).

The judge-down case points the judge at a port nothing listens on: every judge reward
is 0.0 and counted as a failure, and training still completes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.grpo import GRPOTrainConfig, train_grpo
from adapters.rewards import JUDGE_NAME, REWARDS
from adapters.sft import train_sft
from adapters.train_config import SFTConfig, TrainConfigError, load_config
from service.adapter_validation import BaseModelInfo, validate_adapter
from tests.conftest import TEST_DATA, free_port
from tests.fake_judge import fake_judge

PERSONALITIES = TEST_DATA / "personalities.yaml"
PERSONALITY = "cheerful"
SYSTEM = "(stored system text; the prompt is rendered from the manifest)"


def row(number: int, pika: str | None, child: str, main: str | None, fast: str) -> dict[str, Any]:
    conversation = [{"role": "system", "content": SYSTEM}]
    if pika is not None:
        conversation.append({"role": "assistant", "content": pika})
    conversation.append({"role": "user", "content": child})
    return {
        "previous_conversation": conversation,
        "main_response": main,
        "assistant_fast_response": fast,
        "personality": PERSONALITY,
        "lesson_id": "lesson-1",
        "source": "test",
        "labeler": "teacher",
        "prompt_version": "teacher-v1",
        "main_response_dropped": main is None,
        "id": f"t{number}|{PERSONALITY}",
        "triple_id": f"t{number}",
    }


ROWS = [
    row(1, "What colour is the sky?", "Blue!", "Yes, blue! What colour is grass?", "Ooh, blue!"),
    row(2, "What is three plus two?", "Six.", "Not quite. Three plus two is five.", "Hmm, six!"),
    row(3, None, "I saw a dog", None, "Aww, a dog!"),
    row(4, "Which animal says moo?", "Cow.", "Yes! A cow says moo. Can you moo?", "Ooh, a cow!"),
    # Same turn as row 3, another label: one GRPO prompt.
    row(5, None, "I saw a dog", None, "Wow, a dog!"),
]
# An other personality's row is skipped.
ROWS.append({**ROWS[0], "personality": "longwinded", "id": "t1|longwinded"})


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Training rows and a 2-step SFT adapter on the tiny model."""
    root = tmp_path_factory.mktemp("grpo")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    sft_yaml = write_yaml(
        root / "sft.yaml",
        {
            "base_model": str(tiny_model_dir),
            "personality": PERSONALITY,
            "personalities_file": str(PERSONALITIES),
            "data": {"train": "train.jsonl"},
            "output_dir": "sft-adapter",
            "max_steps": 2,
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "max_seq_length": 2048,
            "logging_steps": 1,
            "lora": {"rank": 4, "alpha": 8},
        },
    )
    train_sft(load_config(sft_yaml, SFTConfig), progress=lambda line: None)
    return {"root": root, "train": train, "sft": root / "sft-adapter", "model": tiny_model_dir}


def grpo_yaml(workspace: dict[str, Path], name: str, **fields: Any) -> Path:
    values: dict[str, Any] = {
        "base_model": str(workspace["model"]),
        "personality": PERSONALITY,
        "personalities_file": str(PERSONALITIES),
        "data": {"train": "train.jsonl"},
        "sft_adapter": "sft-adapter",
        "output_dir": f"{name}-adapter",
        "max_steps": 2,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_seq_length": 2048,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "reward_weights": {"reward_diverse_opener": 0.5},
    }
    values.update(fields)
    return write_yaml(workspace["root"] / f"{name}.yaml", values)


def logged_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step log entries (the final summary entry has no loss)."""
    return [entry for entry in history if "loss" in entry]


def test_grpo_logs_every_reward_and_writes_a_servable_adapter(
    workspace: dict[str, Path],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [*REWARDS, JUDGE_NAME]
    lines: list[str] = []
    with fake_judge(lambda body, number: (200, '{"score": 4}')) as judge_server:
        path = grpo_yaml(
            workspace,
            "grpo",
            judge={"base_url": judge_server.url, "model": "judge", "weight": 0.5},
        )
        config = load_config(path, GRPOTrainConfig)
        result = train_grpo(config, progress=lines.append)
        judge_requests = len(judge_server.requests)

    out = result.output_dir
    assert out == workspace["root"] / "grpo-adapter"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # PEFT's model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "fastresp_card.json",
        "log_history.json",
        "reward_curve.png",
    ]  # only the trained adapter: no "ref" copy, no checkpoints
    assert not list(workspace["root"].glob(".grpo-adapter.partial-*"))

    # Every reward's mean at every logged step (logging_steps 1, max_steps 2).
    history = json.loads((out / "log_history.json").read_text())
    steps = logged_steps(history)
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        for name in names:
            value = entry[f"rewards/{name}/mean"]
            assert 0.0 <= value <= 1.0, (name, value)
        assert entry[f"rewards/{JUDGE_NAME}/mean"] == pytest.approx(0.75)
    # 2 steps x 4 completions, one judge request each.
    assert judge_requests == 8

    # One progress line per logged step, naming every reward.
    reward_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in reward_lines] == ["1/2", "2/2"]
    for line in reward_lines:
        for name in names:
            assert f" {name.removeprefix('reward_')} " in line
        assert "eta" in line

    card = json.loads((out / "fastresp_card.json").read_text())
    parent = json.loads((workspace["sft"] / "fastresp_card.json").read_text())
    assert card["kind"] == "grpo"
    assert card["personality"] == PERSONALITY
    assert card["base_model"] == parent["base_model"]
    assert card["parent"] == {"path": str(workspace["sft"]), "card": parent}
    assert card["rewards"]["weights"] == {
        "reward_length": 1.0,
        "reward_kid_safe": 1.0,
        "reward_no_leak": 1.0,
        "reward_no_praise_before_correction": 1.0,
        "reward_no_question_when_main_asks": 1.0,
        "reward_diverse_opener": 0.5,
        "reward_tone_fit": 1.0,
        "reward_uptake": 1.0,
        "reward_judge": 0.5,
    }
    assert set(card["rewards"]["first_step"]) == set(names)
    assert card["rewards"]["first_step"] == {
        name: steps[0][f"rewards/{name}/mean"] for name in names
    }
    assert card["rewards"]["last_step"] == {
        name: steps[-1][f"rewards/{name}/mean"] for name in names
    }
    judge_card = card["rewards"]["judge"]
    assert (judge_card["calls"], judge_card["failures"]) == (8, 0)
    assert judge_card["prompt_version"] == "grpo-judge-v1"
    # 4 distinct prompts of "cheerful": rows 3 and 5 share one, the longwinded row is skipped.
    assert card["data"]["train"]["prompts"] == 4
    assert card["data"]["train"]["rows_same_prompt"] == 1
    assert card["data"]["train"]["rows_other_personality"] == 1
    assert card["metrics"]["steps"] == 2
    assert card["version"] is None
    png = (out / "reward_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000

    # The adapter loads with PEFT on the base model, and the gateway's checks accept it
    # with the SFT adapter's shape.
    base = AutoModelForCausalLM.from_pretrained(str(workspace["model"]))
    loaded = PeftModel.from_pretrained(base, str(out))
    assert list(loaded.peft_config) == ["default"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    sft_config = json.loads((workspace["sft"] / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path"):
        assert adapter_config[key] == sft_config[key]
    validate_adapter(out, BaseModelInfo.from_dir(workspace["model"]), max_lora_rank=16)


def test_judge_down_scores_zero_and_training_completes(workspace: dict[str, Path]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    path = grpo_yaml(
        workspace,
        "judge-down",
        max_steps=1,
        judge={"base_url": url, "model": "judge", "max_retries": 0},
    )
    result = train_grpo(load_config(path, GRPOTrainConfig), progress=lambda line: None)
    history = json.loads((result.output_dir / "log_history.json").read_text())
    steps = logged_steps(history)
    assert [entry["step"] for entry in steps] == [1]
    assert steps[0][f"rewards/{JUDGE_NAME}/mean"] == 0.0
    assert steps[0]["judge/failures"] == 4.0  # the 4 completions of the step
    judge_card = result.card["rewards"]["judge"]
    assert (judge_card["calls"], judge_card["failures"]) == (4, 4)


def test_bad_grpo_configs_name_the_field(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases: dict[str, dict[str, Any]] = {
        "reward_weights.reward_lenght": {"reward_weights": {"reward_lenght": 1.0}},
        "reward_weights.reward_judge": {"reward_weights": {"reward_judge": 1.0}},
        "num_generations": {"num_generations": 3},  # 2 x 2 completions per step
        "max_completion_length": {"max_completion_length": 4096},
    }
    for field, change in cases.items():
        with pytest.raises(TrainConfigError, match=rf"^{field}: "):
            load_config(grpo_yaml(workspace, "bad", **change), GRPOTrainConfig)

    # An SFT adapter trained on another base model (its card says so).
    other = workspace["root"] / "other-sft"
    shutil.copytree(workspace["sft"], other, dirs_exist_ok=True)
    card = json.loads((other / "fastresp_card.json").read_text())
    card["base_model"]["config_sha256"] = "0" * 64
    (other / "fastresp_card.json").write_text(json.dumps(card))
    with pytest.raises(TrainConfigError, match=r"^sft_adapter: .* was trained on base model"):
        load_config(grpo_yaml(workspace, "bad", sft_adapter="other-sft"), GRPOTrainConfig)

    # A judge key variable that is not set fails before anything loads or is written.
    monkeypatch.delenv("FASTRESP_TEST_JUDGE_KEY", raising=False)
    judge = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "j",
        "api_key_env": "FASTRESP_TEST_JUDGE_KEY",
    }
    config = load_config(grpo_yaml(workspace, "bad", judge=judge), GRPOTrainConfig)
    with pytest.raises(TrainConfigError, match=r"^judge.api_key_env: .*FASTRESP_TEST_JUDGE_KEY"):
        train_grpo(config, progress=lambda line: None)
    assert not list(workspace["root"].glob(".bad-adapter.partial-*"))


def test_cli_bad_config_exits_2_naming_the_field(workspace: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    path = grpo_yaml(workspace, "bad-cli", num_generations=3)
    result = CliRunner().invoke(app, ["train", "grpo", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "error: num_generations: " in result.output
    assert not (workspace["root"] / "bad-cli-adapter").exists()


def test_example_config_is_valid() -> None:
    from adapters.train_config import DEFAULT_BASE_MODEL

    path = Path(__file__).resolve().parents[1] / "adapters" / "configs" / "grpo-gemma-calm.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["base_model"] == DEFAULT_BASE_MODEL
    raw["base_model"] = "/models/gemma"  # "default" reads the machine's settings
    config = GRPOTrainConfig.model_validate(raw, context={"base_dir": path.parent})
    assert config.sft_adapter == path.parent / "out" / "sft-gemma-calm"
    assert config.data.train == path.parent / "data" / "train.jsonl"
    assert config.batch_size * config.gradient_accumulation_steps % config.num_generations == 0
