"""PEFT LoRA adapters with random weights, for tests and benchmarks (no training).

Needs `peft` (the `dev` extra).
"""

from __future__ import annotations

import json
from pathlib import Path


def make_random_lora(
    base_model: Path,
    out_dir: Path,
    *,
    version: str | None = None,
    rank: int = 8,
    alpha: int | None = None,
    random_b: bool = True,
    seed: int = 1,
) -> Path:
    """Save a PEFT LoRA on all linear layers of `base_model` into `out_dir`.

    Args:
        base_model: a transformers model folder; recorded as the adapter's
            `base_model_name_or_path`.
        out_dir: created; holds `adapter_config.json` and `adapter_model.safetensors`.
        version: written to `fastresp_card.json` when given.
        rank: LoRA rank r.
        alpha: lora_alpha; None: 2r. Larger means a stronger change to the output.
        random_b: B random as well as A, so the adapter changes the output (PEFT's
            default init has B = 0: such an adapter changes nothing).
        seed: torch seed of the random weights.

    Returns:
        `out_dir`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules="all-linear",
        init_lora_weights=not random_b,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out_dir))
    if version is not None:
        (out_dir / "fastresp_card.json").write_text(json.dumps({"version": version}))
    return out_dir
