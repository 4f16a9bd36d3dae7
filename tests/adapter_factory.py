"""Build PEFT LoRA adapter folders for tests: valid ones, and each kind of broken one.

`make_lora` (`adapters.random_lora`) saves a real PEFT adapter for the tiny model;
`break_adapter` copies a valid adapter and damages it one way, as a user's mistake would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapters.random_lora import make_random_lora as make_lora

#: Each way `break_adapter` can damage an adapter, and the check that must refuse it
#: (`AdapterRejected.error_type`, the `type` in the 422 body).
BROKEN_KINDS: dict[str, str] = {
    "nonexistent_path": "adapter_not_found",
    "no_adapter_config": "adapter_config_missing",
    "rank_over_limit": "rank_over_limit",
    "base_model_mismatch": "base_model_mismatch",
    "target_modules_match_nothing": "no_target_modules",
    "corrupt_safetensors": "weights_corrupt",
    "nan_weights": "weights_not_finite",
    "wrong_shape": "weights_shape_mismatch",
    "zero_lora_b": "adapter_changes_nothing",
}


def break_adapter(base_model: Path, valid: Path, kind: str, out_dir: Path) -> Path:
    """A copy of the valid adapter `valid`, damaged as `kind` (a key of BROKEN_KINDS).

    `rank_over_limit` builds a rank-32 adapter (the tests' engine allows 16);
    `zero_lora_b` builds a freshly initialised one (B = 0).
    """
    import torch
    from safetensors.torch import load_file, save_file

    if kind == "nonexistent_path":
        return out_dir / "does-not-exist"
    if kind == "rank_over_limit":
        return make_lora(base_model, out_dir, rank=32)
    if kind == "zero_lora_b":
        return make_lora(base_model, out_dir, random_b=False)
    shutil.copytree(valid, out_dir)
    config_file = out_dir / "adapter_config.json"
    weights_file = out_dir / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    if kind == "no_adapter_config":
        config_file.unlink()
    elif kind == "base_model_mismatch":
        config["base_model_name_or_path"] = "google/gemma-3-270m"
        config_file.write_text(json.dumps(config))
    elif kind == "target_modules_match_nothing":
        config["target_modules"] = ["not_a_layer"]
        config_file.write_text(json.dumps(config))
        tensors = load_file(str(weights_file))
        renamed = {
            key.replace("q_proj", "not_a_layer")
            .replace("k_proj", "not_a_layer_k")
            .replace("v_proj", "not_a_layer_v")
            .replace("o_proj", "not_a_layer_o")
            .replace("gate_proj", "not_a_layer_g")
            .replace("up_proj", "not_a_layer_u")
            .replace("down_proj", "not_a_layer_d"): value
            for key, value in tensors.items()
        }
        save_file(renamed, str(weights_file))
    elif kind == "corrupt_safetensors":
        data = weights_file.read_bytes()
        weights_file.write_bytes(data[: len(data) // 2])  # truncated mid-tensor
    elif kind == "wrong_shape":  # one lora_A three columns too wide for its layer
        tensors = load_file(str(weights_file))
        key = sorted(k for k in tensors if "lora_A" in k)[0]
        tensors[key] = torch.cat([tensors[key], torch.ones(tensors[key].shape[0], 3)], dim=1)
        save_file(tensors, str(weights_file))
    elif kind == "nan_weights":
        tensors = load_file(str(weights_file))
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, str(weights_file))
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(BROKEN_KINDS)}")
    return out_dir
