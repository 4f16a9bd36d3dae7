"""validate_adapter on real PEFT adapters for the tiny model, valid and broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.adapter_validation import (
    BaseModelInfo,
    adapter_version,
    validate_adapter,
)
from service.errors import AdapterRejected
from tests.adapter_factory import BROKEN_KINDS, break_adapter, make_lora

MAX_RANK = 16


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModelInfo:
    return BaseModelInfo.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def valid_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "v1", version="v1")


def test_base_model_info_lists_the_tiny_models_linear_layers(base: BaseModelInfo) -> None:
    # Qwen3Config(num_hidden_layers=2): 7 projections per layer (model_prep.build_tiny_model).
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {m.rsplit(".", 1)[-1] for m in base.linear_modules} == projections
    assert len(base.linear_modules) == 2 * len(projections)
    assert "model.layers.1.mlp.down_proj" in base.linear_modules
    assert not any("embed_tokens" in m or "norm" in m for m in base.linear_modules)


def test_a_valid_adapter_passes_with_its_rank_and_version(
    base: BaseModelInfo, valid_adapter: Path, tiny_model_dir: Path
) -> None:
    checked = validate_adapter(valid_adapter, base, MAX_RANK)
    assert checked.rank == 8  # make_lora's default
    assert checked.version == "v1"  # from fastresp_card.json
    assert checked.base_model == str(tiny_model_dir)
    assert validate_adapter(valid_adapter, base, MAX_RANK, version="v9").version == "v9"


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_each_broken_adapter_is_refused_with_its_check(
    kind: str,
    base: BaseModelInfo,
    valid_adapter: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    broken = break_adapter(tiny_model_dir, valid_adapter, kind, tmp_path / "broken")
    with pytest.raises(AdapterRejected) as refused:
        validate_adapter(broken, base, MAX_RANK)
    assert refused.value.error_type == BROKEN_KINDS[kind]
    assert refused.value.status_code == 422
    assert refused.value.loc == ("body", "path")


def test_base_model_mismatch_can_be_allowed(
    base: BaseModelInfo, valid_adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = break_adapter(tiny_model_dir, valid_adapter, "base_model_mismatch", tmp_path / "b")
    assert validate_adapter(broken, base, MAX_RANK, allow_base_model_mismatch=True).rank == 8


def test_a_relative_path_is_refused(base: BaseModelInfo) -> None:
    with pytest.raises(AdapterRejected, match="absolute") as refused:
        validate_adapter(Path("adapters/cheerful"), base, MAX_RANK)
    assert refused.value.error_type == "adapter_not_found"


def test_pickled_weights_are_refused_by_name(
    base: BaseModelInfo, valid_adapter: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "bin"
    shutil.copytree(valid_adapter, copy)
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match=r"adapter_model\.bin") as refused:
        validate_adapter(copy, base, MAX_RANK)
    assert refused.value.error_type == "adapter_weights_missing"


def test_a_rank_pattern_over_the_limit_is_refused(
    base: BaseModelInfo, valid_adapter: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "pattern"
    shutil.copytree(valid_adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 64}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterRejected, match="rank 64") as refused:
        validate_adapter(copy, base, MAX_RANK)
    assert refused.value.error_type == "rank_over_limit"


@pytest.mark.parametrize(
    ("stored", "served", "expected"),
    [
        ("google/gemma-3-270m", "gemma-3-270m", True),
        ("/models/Qwen3-4B/", "Qwen3-4B", True),
        ("Qwen/Qwen3-4B", "gemma-3-270m", False),
        ("", "gemma-3-270m", False),
    ],
)
def test_base_model_names_match_by_path_or_last_component(
    stored: str, served: str, expected: bool, tmp_path: Path
) -> None:
    info = BaseModelInfo(served, frozenset({served.lower(), f"/srv/{served}".lower()}), frozenset())
    assert info.matches(stored) is expected


def test_version_falls_back_to_the_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "cheerful-2026-11-29"
    folder.mkdir()
    assert adapter_version(folder) == "cheerful-2026-11-29"
    (folder / "fastresp_card.json").write_text("not json")
    assert adapter_version(folder) == "cheerful-2026-11-29"
    (folder / "fastresp_card.json").write_text(json.dumps({"version": "v3"}))
    assert adapter_version(folder) == "v3"


def test_serve_refuses_a_bad_manifest_adapter_before_the_engine_loads(
    tiny_model_dir: Path, valid_adapter: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    broken = break_adapter(tiny_model_dir, valid_adapter, "rank_over_limit", tmp_path / "r32")
    manifest = tmp_path / "p.yaml"
    manifest.write_text(
        "personalities:\n  tuned:\n    description: d\n    style: s\n"
        f"    adapter: {broken}\n    fallback_phrases: [Hm.]\n"
    )
    args = ["serve", "--model", str(tiny_model_dir), "--personalities-file", str(manifest)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "personality 'tuned'" in result.output
    assert "rank 32 is over the engine's max_lora_rank 16 (rank_over_limit)" in result.output
