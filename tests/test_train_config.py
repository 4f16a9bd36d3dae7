"""Training configs: every bad config fails before any model loads, naming its field.

The base model here is a fake folder: a `config.json` of a model type that does not
exist and a small safetensors file whose tensor names are a Llama-style layer's. No
model can be loaded from it, so a check that passes or fails on it read only file
names and headers. One test also runs `load_config` in a fresh interpreter and shows
the training stack (transformers, peft, trl, datasets) was never imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from adapters.train_config import (
    GRPOConfig,
    SFTConfig,
    TrainConfigError,
    load_config,
    resolve_target_modules,
)
from service.cli import app
from tests.conftest import REPO_ROOT

#: The fake base model's linear layers (last name components): what an error lists.
FAKE_MODULES = ("down_proj", "lm_head", "q_proj", "v_proj")


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    layer = "model.layers.0"
    tensors = {
        f"{layer}.self_attn.q_proj.weight": np.zeros((4, 4), np.float32),
        f"{layer}.self_attn.v_proj.weight": np.zeros((4, 4), np.float32),
        f"{layer}.mlp.down_proj.weight": np.zeros((4, 8), np.float32),
        f"{layer}.input_layernorm.weight": np.zeros((4,), np.float32),
        "model.embed_tokens.weight": np.zeros((10, 4), np.float32),
        "lm_head.weight": np.zeros((10, 4), np.float32),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def config_dir(tmp_path: Path, fake_model: Path) -> Path:
    """A folder with data files and a good config, `sft.yaml`, using relative paths."""
    folder = tmp_path / "run"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "data" / "validation.jsonl").write_text("{}\n")
    _write(folder / "sft.yaml", "")
    return folder


def _write(path: Path, extra: str, *, base_model: str = "../fake-model") -> Path:
    path.write_text(
        f"base_model: {base_model}\n"
        "personality: calm\n"
        "data:\n  train: data/train.jsonl\n  validation: data/validation.jsonl\n"
        "output_dir: out/calm\n" + extra
    )
    return path


def _error(path: Path, kind: type[SFTConfig] | type[GRPOConfig] = SFTConfig) -> str:
    with pytest.raises(TrainConfigError) as caught:
        load_config(path, kind)
    return str(caught.value)


def test_good_config_resolves_paths_against_its_folder(
    config_dir: Path, fake_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = load_config(config_dir / "sft.yaml", SFTConfig)
    assert config.base_model == config_dir / "../fake-model"
    assert config.base_model.resolve() == fake_model.resolve()
    assert config.data.train == config_dir / "data" / "train.jsonl"
    assert config.output_dir == config_dir / "out" / "calm"
    assert config.personalities_file == REPO_ROOT / "adapters" / "personalities.yaml"
    # The defaults of the issue: rank 16, alpha 32, every attention and MLP projection
    # the base model has (this one has q, v and down only), in the usual order.
    assert (config.lora.rank, config.lora.alpha, config.lora.target_modules) == (16, 32, None)
    assert resolve_target_modules(config.lora, config.base_model_info()) == (
        "q_proj",
        "v_proj",
        "down_proj",
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("lora:\n  target_modules: [q_proj, foo_proj]\n", "lora.target_modules: unknown module "
         f"'foo_proj'; the base model has: {', '.join(FAKE_MODULES)}"),
        ("lora:\n  rank: 257\n", "lora.rank: Input should be less than or equal to 256"),
        ("lora:\n  ranks: 8\n", "lora.ranks: unknown key"),
        ("learning_rat: 0.1\n", "learning_rat: unknown key"),
        ("epochs: null\n", "epochs: set epochs or max_steps"),
        ("batch_size: 0\n", "batch_size: Input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_bad_value_names_its_field(config_dir: Path, extra: str, expected: str) -> None:
    assert _error(_write(config_dir / "bad.yaml", extra)) == expected


def test_rank_256_is_allowed(config_dir: Path) -> None:
    config = load_config(_write(config_dir / "ok.yaml", "lora:\n  rank: 256\n"), SFTConfig)
    assert config.lora.rank == 256


def test_missing_data_files_are_named(config_dir: Path) -> None:
    (config_dir / "data" / "validation.jsonl").unlink()
    missing = config_dir / "data" / "validation.jsonl"
    assert _error(config_dir / "sft.yaml") == f"data.validation: file not found: {missing}"
    (config_dir / "data" / "train.jsonl").unlink()
    missing = config_dir / "data" / "train.jsonl"
    assert _error(config_dir / "sft.yaml") == f"data.train: file not found: {missing}"


def test_unknown_personality(config_dir: Path) -> None:
    path = config_dir / "sft.yaml"
    path.write_text(path.read_text().replace("personality: calm", "personality: grumpy"))
    assert _error(path).startswith("personality: unknown personality 'grumpy' in ")
    assert _error(path).endswith("known: cheerful, calm")


def test_bad_yaml_and_unreadable_file(config_dir: Path) -> None:
    bad = config_dir / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    message = _error(bad)
    assert message.startswith(f"config: {bad} is not valid YAML (line 2, column 1):")
    assert "\n" not in message
    bad.write_text("- a list\n")
    assert _error(bad) == f"config: {bad} must hold a mapping of fields"
    assert _error(config_dir / "none.yaml").startswith(f"config: cannot read {config_dir}")


def test_base_model_must_be_a_model_folder(config_dir: Path, fake_model: Path) -> None:
    (fake_model / "config.json").unlink()
    assert _error(config_dir / "sft.yaml") == (
        f"base_model: {config_dir / '../fake-model'} has no config.json (not a model folder)"
    )


def test_default_base_model_is_the_prepared_gemma(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTRESP_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(config_dir / "default.yaml", "", base_model="default")
    expected = tmp_path / "cache" / "models" / "gemma-3-270m"
    assert _error(path) == f"base_model: not a folder: {expected}"


def test_output_dir_is_never_overwritten_by_accident(config_dir: Path) -> None:
    out = config_dir / "out" / "calm"
    out.mkdir(parents=True)
    load_config(config_dir / "sft.yaml", SFTConfig)  # an empty folder is fine

    (out / "notes.txt").write_text("mine")
    for overrides in (None, {"overwrite": True}):
        with pytest.raises(TrainConfigError, match=r"^output_dir: .* is not empty and is not a"):
            load_config(config_dir / "sft.yaml", SFTConfig, overrides)

    (out / "fastresp_card.json").write_text("{}")  # a previous adapter output
    with pytest.raises(TrainConfigError, match=r"^output_dir: .*set overwrite: true \(or --force"):
        load_config(config_dir / "sft.yaml", SFTConfig)
    assert load_config(config_dir / "sft.yaml", SFTConfig, {"overwrite": True}).overwrite


def test_grpo_config_checks_the_sft_adapter(config_dir: Path) -> None:
    adapter = config_dir / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    path = _write(config_dir / "grpo.yaml", "sft_adapter: sft-adapter\n")
    assert _error(path, GRPOConfig) == (
        f"sft_adapter: {adapter} has no fastresp_card.json (not a `fastresp train sft` output)"
    )
    (adapter / "fastresp_card.json").write_text("{}")
    config = load_config(path, GRPOConfig)
    assert (config.sft_adapter, config.num_generations, config.judge) == (adapter, 4, None)
    judge = "judge:\n  base_url: not-a-url\n  model: m\n"
    message = _error(
        _write(config_dir / "g2.yaml", "sft_adapter: sft-adapter\n" + judge), GRPOConfig
    )
    assert message.startswith("judge.base_url: ")


def test_checks_do_not_import_the_training_stack(config_dir: Path) -> None:
    """In a fresh interpreter, a failed and a passing check leave transformers, peft,
    trl and datasets unimported: nothing was loaded to find the problem."""
    bad = _write(config_dir / "bad.yaml", "lora:\n  target_modules: [foo_proj]\n")
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from adapters.train_config import SFTConfig, TrainConfigError, load_config\n"
        f"load_config(Path({str(config_dir / 'sft.yaml')!r}), SFTConfig)\n"
        f"try:\n    load_config(Path({str(bad)!r}), SFTConfig)\n"
        "except TrainConfigError as exc:\n    print(exc)\n"
        "stack = ('transformers', 'peft', 'trl', 'datasets')\n"
        "print(sorted(m for m in stack if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("lora.target_modules: unknown module 'foo_proj'")
    assert lines[1] == "[]"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("lora:\n  rank: 257\n", "lora.rank: "),
        ("lora:\n  target_modules: [x]\n", "lora.target_modules: "),
    ],
)
def test_cli_exits_2_naming_the_field(config_dir: Path, extra: str, field: str) -> None:
    bad = _write(config_dir / "bad.yaml", extra)
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {field}")
    assert len(result.output.strip().splitlines()) == 1
    assert not (config_dir / "out").exists()


def test_cli_missing_data_file(config_dir: Path) -> None:
    (config_dir / "data" / "train.jsonl").unlink()
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(config_dir / "sft.yaml")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: data.train: file not found: {config_dir / 'data' / 'train.jsonl'}"
    )


def test_a_training_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    from adapters.sft_format import TrainingDataError, read_training_rows

    rows = tmp_path / "train.jsonl"
    rows.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n{"x": "\xff\xfe"}\n')
    with pytest.raises(TrainingDataError, match=r"train.jsonl:4: not UTF-8"):
        read_training_rows(rows)
    rows.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n')
    assert [row["id"] for row in read_training_rows(rows)] == ["a", "b"]
