"""Checks a LoRA adapter folder before it may serve a personality.

An adapter is refused, with an `AdapterRejected` (422) naming the failed check, when:
- the path is not an absolute, existing folder (`adapter_not_found`);
- it has no readable `adapter_config.json` (`adapter_config_missing`, `adapter_config_invalid`);
- it has no `adapter_model.safetensors` (`adapter_weights_missing`; pickled `.bin`
  weights are refused, re-save with PEFT `save_pretrained(safe_serialization=True)`);
- its rank is over the engine's `max_lora_rank` (`rank_over_limit`);
- its base model's architecture differs from the served base's (`base_architecture_mismatch`):
  `architectures`, `model_type`, hidden size or layer count in that base's `config.json`,
  found through the card's `base_model.path` or a local `base_model_name_or_path` (the
  check is skipped when neither is on disk). A pre-quantized build (AWQ, GPTQ) of the same
  base passes it, and its name with the quantization suffix dropped (`Qwen3-4B-AWQ` ->
  `Qwen3-4B`) passes the name check below;
- its `base_model_name_or_path` is not the served base model (`base_model_mismatch`),
  unless the caller allows it;
- neither its `target_modules` nor its LoRA tensors touch one of the base model's
  linear layers, or every `lora_B` is zero, so it would change nothing (`no_target_modules`,
  `adapter_changes_nothing`);
- its weights cannot be read (`weights_corrupt`), hold NaN/inf (`weights_not_finite`),
  or do not fit the shape of the layer they adapt (`weights_shape_mismatch`).

Validation only reads files; it is synchronous and may take a second for a large
adapter, so async callers run it in a thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import AdapterRejected

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CARD = "fastresp_card.json"
#: Base-model files `fastresp model prepare` writes; its `model` field names the model.
MODEL_MARKER = "fastresp_model.json"
_LORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
#: 2-D weights that are not linear layers a LoRA can target in vLLM.
_NOT_LINEAR = frozenset({"embed_tokens", "wte", "word_embeddings"})
#: Name suffixes of pre-quantized builds (`Qwen3-4B-AWQ`, `...-GPTQ-Int4`), dropped to find
#: the full-precision base an adapter names.
_QUANT_SUFFIX = re.compile(r"(?:[-_](?:awq|gptq|marlin|int4|int8|w4a16|4bit|8bit))+$", re.I)


@dataclass(frozen=True, slots=True)
class ModelArchitecture:
    """What a LoRA adapter depends on in a base model's transformers `config.json`:
    the model class (`architectures`), `model_type`, `hidden_size` and
    `num_hidden_layers` (of `text_config` for multimodal configs), and the
    `quantization_config.quant_method` of a pre-quantized build (None: full precision;
    not compared: a LoRA trained on the full-precision base serves on its AWQ/GPTQ build)."""

    architectures: tuple[str, ...]
    model_type: str | None
    hidden_size: int | None
    num_hidden_layers: int | None
    quant_method: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArchitecture:
        """From a parsed `config.json`."""
        text = config.get("text_config")
        inner: Mapping[str, Any] = text if isinstance(text, Mapping) else config
        quant = config.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None

        def integer(key: str) -> int | None:
            value = inner.get(key, config.get(key))
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        architectures = config.get("architectures") or ()
        model_type = inner.get("model_type", config.get("model_type"))
        return cls(
            architectures=tuple(str(a) for a in architectures),
            model_type=str(model_type) if model_type else None,
            hidden_size=integer("hidden_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            quant_method=str(method).lower() if method else None,
        )

    @classmethod
    def from_dir(cls, folder: Path) -> ModelArchitecture | None:
        """From `folder/config.json`; None when it is missing or not a JSON object."""
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls.from_config(config) if isinstance(config, dict) else None

    def differences(self, other: ModelArchitecture) -> list[str]:
        """`field: mine != other's` for each compared field known on both sides."""
        found = []
        for name in ("architectures", "model_type", "hidden_size", "num_hidden_layers"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine and theirs and mine != theirs:
                found.append(f"{name} {_show(mine)} != {_show(theirs)}")
        return found

    def describe(self) -> str:
        """e.g. `Qwen3ForCausalLM (qwen3, hidden_size 2560, 36 layers, awq)`."""
        parts = [self.model_type or "?", f"hidden_size {self.hidden_size}"]
        parts.append(f"{self.num_hidden_layers} layers")
        if self.quant_method:
            parts.append(self.quant_method)
        return f"{'/'.join(self.architectures) or '?'} ({', '.join(parts)})"


def _show(value: object) -> str:
    return "/".join(value) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True, slots=True)
class BaseModelInfo:
    """What validation needs to know about the served base model.

    `names`: lower-case identities an adapter's `base_model_name_or_path` may use (the
    folder's path and name, the prepared model's name); `linear_modules`: full module
    names of its linear layers, e.g. `model.layers.0.self_attn.q_proj`.
    """

    display_name: str
    names: frozenset[str]
    linear_modules: frozenset[str]
    linear_shapes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """module -> (out_features, in_features); empty: shapes are not checked."""
    architecture: ModelArchitecture | None = None
    """From the model's `config.json`; None: the architecture check is skipped."""

    @classmethod
    def from_dir(cls, model_dir: Path) -> BaseModelInfo:
        """Read the model's safetensors headers (not its weights) and marker.

        Raises:
            FileNotFoundError: the folder has no `*.safetensors` file.
        """
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
        architecture = ModelArchitecture.from_dir(model_dir)
        linear: dict[str, tuple[int, int]] = {}
        packed: dict[str, dict[str, list[int]]] = {}  # AWQ/GPTQ module -> qweight, scales
        for file in files:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    module, _, kind = key.rpartition(".")
                    if kind in ("qweight", "scales"):
                        packed.setdefault(module, {})[kind] = weights.get_slice(key).get_shape()
                    if not key.endswith(".weight"):
                        continue
                    module = key.removesuffix(".weight")
                    if module.rsplit(".", 1)[-1] in _NOT_LINEAR:
                        continue
                    shape = weights.get_slice(key).get_shape()
                    if len(shape) == 2:
                        linear[module] = (int(shape[0]), int(shape[1]))
        quantized = _quantized_linear_shapes(model_dir, packed, architecture)
        names = {str(model_dir), str(model_dir.resolve()), model_dir.name}
        marker = model_dir / MODEL_MARKER
        if marker.is_file():
            prepared = json.loads(marker.read_text(encoding="utf-8")).get("model")
            if isinstance(prepared, str):
                names.add(prepared)
        if architecture is not None and architecture.quant_method is not None:
            names |= {_QUANT_SUFFIX.sub("", name) for name in names}
        return cls(
            display_name=model_dir.name,
            names=frozenset(name.lower() for name in names),
            linear_modules=frozenset(linear) | frozenset(packed),
            linear_shapes={**{m: s for m, s in quantized.items() if s is not None}, **linear},
            architecture=architecture,
        )

    def matches(self, base_model_name_or_path: str) -> bool:
        """True if the adapter's base model names this model: the same path, or the
        same last path component (`google/gemma-3-270m` matches a `gemma-3-270m` folder)."""
        value = base_model_name_or_path.strip().rstrip("/").lower()
        return bool(value) and (value in self.names or value.rsplit("/", 1)[-1] in self.names)


@dataclass(frozen=True, slots=True)
class ValidatedAdapter:
    """An adapter that passed every check. `rank` is the largest LoRA rank in it."""

    path: Path
    version: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]


def adapter_version(path: Path) -> str:
    """An adapter's version: `version` from its `fastresp_card.json`, else the folder name."""
    card = path / ADAPTER_CARD
    if card.is_file():
        try:
            version = json.loads(card.read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        if isinstance(version, str) and version:
            return version
    return path.name


def validate_adapter(
    path: Path,
    base: BaseModelInfo,
    max_lora_rank: int,
    *,
    version: str | None = None,
    allow_base_model_mismatch: bool = False,
) -> ValidatedAdapter:
    """Run every check on the adapter folder at `path` (see the module docstring).

    Args:
        path: absolute path of a PEFT LoRA adapter folder.
        base: the served base model.
        max_lora_rank: the engine's `max_lora_rank`.
        version: the version to report; None: `adapter_version(path)`.
        allow_base_model_mismatch: skip the base-model check.

    Raises:
        AdapterRejected: a check failed; `error_type` names it.
    """
    if not path.is_absolute():
        raise AdapterRejected("adapter_not_found", f"adapter path must be absolute: {path}")
    if not path.is_dir():
        raise AdapterRejected("adapter_not_found", f"adapter path is not a folder: {path}")
    config = _read_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterRejected(
            "adapter_weights_missing",
            f"{path} has no {ADAPTER_WEIGHTS}"
            + (
                " (pickled adapter_model.bin is not accepted)"
                if (path / "adapter_model.bin").exists()
                else ""
            ),
        )
    base_model = str(config.get("base_model_name_or_path") or "")
    _check_architecture(path, base_model, base)
    if not allow_base_model_mismatch and not base.matches(base_model):
        raise AdapterRejected(
            "base_model_mismatch",
            f"adapter was trained on base model {base_model or '(not recorded)'!r}, "
            f"this engine serves {base.display_name!r}",
        )
    target_modules = _target_modules(config)
    if not _targets_any(config.get("target_modules"), base.linear_modules):
        raise AdapterRejected(
            "no_target_modules",
            f"target_modules {list(target_modules)} match none of the base model's linear layers",
        )
    tensor_ranks, changes_something = _check_weights(path, base)
    rank = max([_config_rank(config), *tensor_ranks])
    if rank > max_lora_rank:
        raise AdapterRejected(
            "rank_over_limit",
            f"adapter rank {rank} is over the engine's max_lora_rank {max_lora_rank}",
        )
    if not changes_something:
        raise AdapterRejected(
            "adapter_changes_nothing", "every lora_B tensor is zero: the adapter changes nothing"
        )
    return ValidatedAdapter(
        path=path,
        version=version or adapter_version(path),
        base_model=base_model,
        rank=rank,
        target_modules=target_modules,
    )


def adapter_base_architecture(path: Path, base_model: str) -> ModelArchitecture | None:
    """The architecture of the base the adapter at `path` was trained on: the
    `config.json` in the card's `base_model.path` (`fastresp_card.json`, written by
    `fastresp train`), else in `base_model` (its `base_model_name_or_path`) when that is
    a local folder; None when neither is on disk (a hub id, a moved training machine)."""
    candidates: list[str] = []
    try:
        card = json.loads((path / ADAPTER_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = None
    if isinstance(card, dict) and isinstance(card.get("base_model"), dict):
        card_path = card["base_model"].get("path")
        if isinstance(card_path, str) and card_path:
            candidates.append(card_path)
    if base_model:
        candidates.append(base_model)
    for candidate in candidates:
        folder = Path(candidate).expanduser()
        if folder.is_absolute() and (folder / "config.json").is_file():
            return ModelArchitecture.from_dir(folder)
    return None


def _check_architecture(path: Path, base_model: str, base: BaseModelInfo) -> None:
    """Refuse an adapter whose base model's architecture differs from the served base's
    (`base_architecture_mismatch`); quantization is not compared."""
    if base.architecture is None:
        return
    trained_on = adapter_base_architecture(path, base_model)
    if trained_on is None:
        return
    differences = trained_on.differences(base.architecture)
    if differences:
        raise AdapterRejected(
            "base_architecture_mismatch",
            f"adapter was trained on a {trained_on.describe()} base "
            f"({base_model or 'not recorded'}), this engine serves {base.display_name}, a "
            f"{base.architecture.describe()}: {'; '.join(differences)}",
        )


def _quantized_linear_shapes(
    model_dir: Path,
    packed: Mapping[str, Mapping[str, list[int]]],
    architecture: ModelArchitecture | None,
) -> dict[str, tuple[int, int] | None]:
    """(out_features, in_features) of the packed linear layers of an AWQ or GPTQ
    checkpoint, from `qweight` and `scales` (AutoAWQ packs qweight as in x out/pack, GPTQ
    as in/pack x out; pack = 32 / bits); None where the layout is unknown."""
    method = architecture.quant_method if architecture is not None else None
    bits = 4
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        bits = int(config["quantization_config"].get("bits", 4))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    pack = 32 // bits if bits in (2, 4, 8) else None
    shapes: dict[str, tuple[int, int] | None] = {}
    for module, parts in packed.items():
        qweight = parts.get("qweight")
        shape: tuple[int, int] | None = None
        if qweight is not None and len(qweight) == 2 and pack is not None:
            if method and method.startswith("awq"):
                scales = parts.get("scales")
                if scales is not None and len(scales) == 2:
                    shape = (int(scales[1]), int(qweight[0]))
            elif method and method.startswith("gptq"):
                shape = (int(qweight[1]), int(qweight[0]) * pack)
        shapes[module] = shape
    return shapes


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterRejected("adapter_config_missing", f"{path} has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRejected("adapter_config_invalid", f"{file} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRejected("adapter_config_invalid", f"{file} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterRejected(
            "adapter_config_invalid", f"{file}: peft_type {config.get('peft_type')!r} is not LORA"
        )
    return config


def _config_rank(config: dict[str, Any]) -> int:
    ranks = [config.get("r", 8)]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks.extend(pattern.values())
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise AdapterRejected(
            "adapter_config_invalid", f"adapter rank is not a positive integer: {ranks}"
        )
    return max(int(r) for r in ranks)


def _target_modules(config: dict[str, Any]) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return (targets,)
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    raise AdapterRejected(
        "adapter_config_invalid",
        f"target_modules must be a string or a list of strings: {targets!r}",
    )


def _targets_any(targets: object, modules: Iterable[str]) -> bool:
    """PEFT's matching rule: a string is a regex full match (or `all-linear`); a list
    entry matches a module name exactly or as its last dotted components."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error:
            return False
        return any(pattern.fullmatch(module) for module in modules)
    assert isinstance(targets, list)
    return any(
        module == target or module.endswith("." + target)
        for module in modules
        for target in targets
    )


def _check_weights(path: Path, base: BaseModelInfo) -> tuple[list[int], bool]:
    """(the LoRA rank of each lora_A tensor, whether any lora_B is non-zero).

    Raises AdapterRejected for unreadable or non-finite weights, LoRA tensors that
    target no linear layer of the base model, or that do not fit its shape
    (lora_A is rank x in_features, lora_B out_features x rank).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterRejected("weights_corrupt", f"cannot read {file}: {exc}") from None
    ranks: list[int] = []
    matched = False
    nonzero_b = False
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterRejected("weights_not_finite", f"{file}: tensor {key} holds NaN or inf")
        lora = _LORA_TENSOR.match(key)
        if lora is None:
            continue
        module = lora["module"]
        matched = matched or module in base.linear_modules
        expected = base.linear_shapes.get(module)
        if expected is not None and tensor.dim() == 2:
            out_features, in_features = expected
            fits = (
                tensor.shape[1] == in_features
                if lora["ab"] == "A"
                else tensor.shape[0] == out_features
            )
            if not fits:
                raise AdapterRejected(
                    "weights_shape_mismatch",
                    f"{file}: {key} has shape {list(tensor.shape)}, which does not fit "
                    f"{module} ({out_features} x {in_features}) of the base model",
                )
        if lora["ab"] == "A" and tensor.dim() == 2:
            ranks.append(int(tensor.shape[0]))
        elif lora["ab"] == "B" and bool(tensor.any()):
            nonzero_b = True
    if not matched:
        raise AdapterRejected(
            "no_target_modules",
            f"{file}: no LoRA tensor targets a linear layer of the base model",
        )
    return ranks, nonzero_b
