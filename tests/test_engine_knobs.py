"""The latency knobs of issue 11 reach vLLM: settings validation, the in-process engine's
`AsyncEngineArgs` and the remote server's command line, read back by vLLM's own parser.

Nothing is downloaded and no engine starts: the quantized base is only named, the model
folder is the tiny test model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.engine_server import server_command
from service.settings import Settings
from tests.conftest import TEST_DATA

KNOBS: dict[str, Any] = {
    "max_num_batched_tokens": 384,
    "ngram_speculative_tokens": 3,
    "ngram_prompt_lookup_max": 5,
    "quantization": "awq_marlin",
    "max_num_seqs": 8,
}
#: vLLM's `speculative_config` for KNOBS, written out by hand from vLLM's docs
#: (docs.vllm.ai, "N-gram based speculative decoding").
EXPECTED_SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 5,
    "prompt_lookup_min": 1,
}


def _settings(model: Path, **values: Any) -> Settings:
    return Settings(model=model, personalities_file=TEST_DATA / "personalities.yaml", **values)


def test_knobs_default_to_vllm_defaults(tiny_model_dir: Path) -> None:
    """Unset knobs add nothing to the server command (vLLM's defaults apply)."""
    settings = _settings(tiny_model_dir)
    assert settings.max_num_batched_tokens is None
    assert settings.ngram_speculative_tokens is None
    assert settings.quantization is None
    argv = server_command(settings, device="cuda", host="h", port=1).argv
    for flag in ("--max-num-batched-tokens", "--speculative-config", "--quantization"):
        assert flag not in argv


def test_knobs_from_the_environment(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTRESP_MAX_NUM_BATCHED_TOKENS", "512")
    monkeypatch.setenv("FASTRESP_NGRAM_SPECULATIVE_TOKENS", "2")
    monkeypatch.setenv("FASTRESP_QUANTIZATION", "gptq")
    settings = _settings(tiny_model_dir)
    assert settings.max_num_batched_tokens == 512
    assert settings.ngram_speculative_tokens == 2
    assert settings.quantization == "gptq"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"quantization": "int3"}, "quantization"),
        ({"ngram_speculative_tokens": 0}, "ngram_speculative_tokens"),
        ({"ngram_prompt_lookup_max": 0}, "ngram_prompt_lookup_max"),
        ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": 32, "max_num_seqs": 64}, "max_num_batched_tokens"),
    ],
)
def test_bad_knob_values_are_refused_naming_the_field(
    tiny_model_dir: Path, values: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        _settings(tiny_model_dir, **values)


def test_server_command_carries_the_knobs(tiny_model_dir: Path) -> None:
    argv = server_command(_settings(tiny_model_dir, **KNOBS), device="cuda", host="h", port=1).argv
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "384"
    assert argv[argv.index("--quantization") + 1] == "awq_marlin"
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == EXPECTED_SPEC


@pytest.mark.engine
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_both_engine_paths_give_vllm_the_same_knobs(tiny_model_dir: Path, device: str) -> None:
    """The in-process `AsyncEngineArgs` and vLLM's parse of the server argv agree on every
    knob, and hold the values set."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from service.vllm_engine import engine_args

    settings = _settings(tiny_model_dir, **KNOBS)
    in_process = engine_args(settings, device)
    argv = server_command(settings, device=device, host="h", port=1).argv[3:]
    served = AsyncEngineArgs.from_cli_args(
        make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    )
    for args in (in_process, served):
        assert args.max_num_batched_tokens == 384
        assert args.quantization == "awq_marlin"
        assert args.speculative_config == EXPECTED_SPEC
        assert args.max_num_seqs == 8


@pytest.mark.engine
def test_unset_knobs_leave_vllm_defaults(tiny_model_dir: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from service.vllm_engine import engine_args

    defaults = AsyncEngineArgs(model=str(tiny_model_dir))
    args = engine_args(_settings(tiny_model_dir), "cuda")
    assert args.max_num_batched_tokens == defaults.max_num_batched_tokens
    assert args.speculative_config is None
    assert args.quantization == defaults.quantization


# -- quantized bases and the architecture check (service/adapter_validation.py) ----------

#: Linear layers a LoRA adapts; their weights become packed int4 in a quantized build.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_copy(base: Path, out: Path, method: str, group: int = 32) -> Path:
    """A pre-quantized build of `base` in the checkpoint layout of `method`: AutoAWQ's
    (qweight in x out/8, qzeros in/g x out/8, scales in/g x out) or GPTQ's (qweight
    in/8 x out, qzeros in/g x out/8, scales in/g x out), with `quantization_config` in its
    config.json, as the Qwen3-4B AWQ/GPTQ builds ship. The packed values are zeros: only
    the layout matters to validation."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    tensors = {}
    for key, tensor in load_file(str(base / "model.safetensors")).items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in PROJECTIONS:
            tensors[key] = tensor
            continue
        out_features, in_features = tensor.shape
        packed = (
            (in_features, out_features // 8)
            if method == "awq"
            else (in_features // 8, out_features)
        )
        tensors[f"{module}.qweight"] = torch.zeros(packed, dtype=torch.int32)
        tensors[f"{module}.qzeros"] = torch.zeros(
            in_features // group, out_features // 8, dtype=torch.int32
        )
        tensors[f"{module}.scales"] = torch.ones(
            in_features // group, out_features, dtype=torch.float16
        )
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group}
    (out / "config.json").write_text(json.dumps(config))
    return out


def _other_architecture(base: Path, out: Path) -> Path:
    """A base folder (config.json only) of another architecture: a Llama with a wider
    hidden size, as an adapter trained elsewhere would name."""
    out.mkdir(parents=True)
    config = json.loads((base / "config.json").read_text())
    config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def valid_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.adapter_factory import make_lora

    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "valid", rank=8)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_adapter_of_the_full_precision_base_serves_on_its_quantized_build(
    tiny_model_dir: Path, valid_adapter: Path, tmp_path: Path, method: str
) -> None:
    """`tiny-AWQ`/`tiny-GPTQ` are quantized builds of `tiny`: same architecture, packed
    weights. The adapter trained on `tiny` passes every check on them, and the layer
    shapes read from the packed tensors are the full-precision ones."""
    from service.adapter_validation import BaseModelInfo, validate_adapter

    quantized = _quantized_copy(tiny_model_dir, tmp_path / f"tiny-{method.upper()}", method)
    info = BaseModelInfo.from_dir(quantized)
    full = BaseModelInfo.from_dir(tiny_model_dir)
    assert info.architecture is not None and info.architecture.quant_method == method
    projections = {m for m in full.linear_modules if m.rsplit(".", 1)[-1] in PROJECTIONS}
    assert projections <= info.linear_modules
    assert {m: info.linear_shapes[m] for m in projections} == {
        m: full.linear_shapes[m] for m in projections
    }
    validated = validate_adapter(valid_adapter, info, max_lora_rank=16)
    assert validated.rank == 8


def test_wrong_shape_is_still_refused_on_a_quantized_base(
    tiny_model_dir: Path, valid_adapter: Path, tmp_path: Path
) -> None:
    from service.adapter_validation import BaseModelInfo, validate_adapter
    from service.errors import AdapterRejected
    from tests.adapter_factory import break_adapter

    info = BaseModelInfo.from_dir(_quantized_copy(tiny_model_dir, tmp_path / "tiny-AWQ", "awq"))
    broken = break_adapter(tiny_model_dir, valid_adapter, "wrong_shape", tmp_path / "broken")
    with pytest.raises(AdapterRejected) as caught:
        validate_adapter(broken, info, max_lora_rank=16)
    assert caught.value.error_type == "weights_shape_mismatch"


@pytest.mark.parametrize("via", ["adapter_config", "card"])
@pytest.mark.parametrize("quantized", [False, True])
def test_adapter_of_another_architecture_is_refused(
    tiny_model_dir: Path, valid_adapter: Path, tmp_path: Path, via: str, quantized: bool
) -> None:
    """The adapter's base (named by adapter_config.json or by the card `fastresp train`
    writes) is a Llama of another hidden size: refused as `base_architecture_mismatch`,
    even where the name check is waived, and on a quantized build of the served base."""
    import shutil

    from service.adapter_validation import BaseModelInfo, validate_adapter
    from service.errors import AdapterRejected

    other = _other_architecture(tiny_model_dir, tmp_path / "other-base")
    adapter = Path(shutil.copytree(valid_adapter, tmp_path / "adapter"))
    config_file = adapter / "adapter_config.json"
    if via == "adapter_config":
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(other)
        config_file.write_text(json.dumps(config))
    else:  # the name matches the served base; the card's recorded base path does not
        card = {"version": "v1", "base_model": {"name": "tiny", "path": str(other)}}
        (adapter / "fastresp_card.json").write_text(json.dumps(card))
    served = tiny_model_dir
    if quantized:
        served = _quantized_copy(tiny_model_dir, tmp_path / "tiny-AWQ", "awq")
    info = BaseModelInfo.from_dir(served)
    for allow in (False, True):
        with pytest.raises(AdapterRejected) as caught:
            validate_adapter(adapter, info, max_lora_rank=16, allow_base_model_mismatch=allow)
        assert caught.value.error_type == "base_architecture_mismatch"
        assert "LlamaForCausalLM" in str(caught.value) and "Qwen3ForCausalLM" in str(caught.value)
        assert "hidden_size 256 != 128" in str(caught.value)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_a_refused_knob_is_named_at_startup(tiny_model_dir: Path) -> None:
    """vLLM refuses `quantization=awq` for the full-precision tiny model (its config has no
    AWQ quantization_config); the start-up error names the setting and its variable."""
    from service.errors import EngineUnavailable
    from service.vllm_engine import VLLMEngine

    settings = _settings(
        tiny_model_dir, quantization="awq", cpu_kv_cache_gib=0.25, enforce_eager=True
    )
    with pytest.raises(EngineUnavailable, match=r"quantization=awq \(FASTRESP_QUANTIZATION\)"):
        await VLLMEngine.start(settings)
