"""Training configs (`fastresp train sft|grpo --config FILE.yaml`), checked before anything loads.

A training run takes minutes to hours and starts by loading a model, so a typo found
after the load wastes that time. `load_config` reads the YAML file into a pydantic
model (unknown keys refused) and then checks everything it can from the file system
alone, without loading a model:

- the data files exist;
- the base model folder has `config.json` and `*.safetensors` weights; LoRA target
  modules are checked against the linear layers named in the safetensors headers
  (`service.adapter_validation.BaseModelInfo.from_dir` reads headers, not weights);
- the personality is in the personality manifest;
- the output folder would not overwrite something: it may be missing or empty, or,
  with `overwrite: true` (`--force`), a previous adapter output (it holds
  `fastresp_card.json`). A non-empty folder that is not an adapter output is always
  refused, so a wrong path never deletes unrelated files.

Every problem is raised as a `TrainConfigError` whose message starts with the dotted
path of the field, e.g. ``data.train: file not found: /x/train.jsonl``.

Relative paths in the YAML file resolve against the file's folder (so a config and
its data can move together); ``~`` is expanded. `base_model: default` is the
prepared gemma-3-270m (`fastresp model prepare`, `Settings.default_model_dir`).

Only pydantic, PyYAML and the service's manifest and safetensors-header code are
imported here: no training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from service.adapter_validation import ADAPTER_CARD, ADAPTER_CONFIG, BaseModelInfo
from service.personalities import ManifestError, PersonalityName, load_personalities
from service.settings import default_personalities_file

#: Projections a LoRA targets by default: every attention and MLP projection of the
#: Llama/Qwen/Gemma layout that the base model has.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

#: Largest LoRA rank a config may ask for (vLLM's largest `max_lora_rank`).
MAX_LORA_RANK = 256

#: `base_model` value meaning the prepared default model.
DEFAULT_BASE_MODEL = "default"


class TrainConfigError(ValueError):
    """A training config is unusable; the message starts with the field's dotted path."""


def _expand_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ``~`` and resolve a relative path against the config file's folder
    (``info.context["base_dir"]``; the working directory when there is none)."""
    path = value.expanduser()
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir")
        path = (Path(base) if base is not None else Path.cwd()) / path
    return path


def _default_base_model(value: object) -> object:
    """`default` -> the prepared gemma-3-270m directory, where the gateway looks for it
    (`Settings.default_model_dir`; FASTRESP_CACHE_DIR applies)."""
    if isinstance(value, str) and value.strip() == DEFAULT_BASE_MODEL:
        from service.settings import Settings

        try:
            return Settings().default_model_dir()
        except ValidationError as exc:
            raise ValueError(
                f"'default' reads the FASTRESP_* settings, which are invalid: {error_lines(exc)}"
            ) from None
    return value


#: A path from the config file: ``~`` expanded, relative to the file's folder.
ConfigPath = Annotated[Path, AfterValidator(_expand_path)]


class LoraSettings(BaseModel):
    """The LoRA adapter's shape (PEFT `LoraConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=16, ge=1, le=MAX_LORA_RANK)
    """LoRA rank `r`. The serving engine must allow it (`FASTRESP_MAX_LORA_RANK`, default 16)."""
    alpha: int = Field(default=32, ge=1)
    """LoRA `lora_alpha`; the update is scaled by alpha / rank."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """LoRA `lora_dropout` during training."""
    target_modules: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Last name components of the linear layers to adapt, e.g. ``[q_proj, v_proj]``.
    None: every attention and MLP projection of the base model (`DEFAULT_TARGET_MODULES`
    that it has)."""


class DataPaths(BaseModel):
    """The training data: `fastresp data build` output files (JSON Lines training rows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: ConfigPath
    """Training rows (`train.jsonl`)."""
    validation: ConfigPath | None = None
    """Validation rows (`validation.jsonl`); None: no evaluation, the last step is kept."""


class JudgeSettings(BaseModel):
    """An LLM judge behind an OpenAI-compatible API (GRPO reward)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: HttpUrl
    """API root, e.g. ``http://127.0.0.1:8100/v1``."""
    model: str = Field(min_length=1)
    """Model name as the server knows it."""
    api_key_env: str | None = Field(default=None, min_length=1)
    """Environment variable holding the API key; None: no key (a local vLLM server)."""
    weight: float = 1.0
    """Weight of the judge's reward."""
    timeout_s: float = Field(default=30.0, gt=0.0)
    """Limit per judge request, in seconds."""


class TrainingCommon(BaseModel):
    """Fields shared by SFT and GRPO configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: Annotated[ConfigPath, BeforeValidator(_default_base_model)]
    """Base model folder: config.json, *.safetensors and the tokenizer (with its chat
    template). `default`: the prepared gemma-3-270m (`fastresp model prepare`)."""
    personality: PersonalityName
    """The personality the adapter is for; its prompt text comes from `personalities_file`."""
    personalities_file: ConfigPath = Field(default_factory=default_personalities_file)
    """The personality manifest (default: the shipped adapters/personalities.yaml). Use the
    one the gateway serves: the training prompt is rendered from it."""
    data: DataPaths
    output_dir: ConfigPath
    """Where the adapter folder is written (atomically, when training ends)."""
    overwrite: bool = False
    """Replace `output_dir` if it holds a previous adapter output (`--force`)."""
    epochs: float | None = Field(default=1.0, gt=0.0)
    """Passes over the training rows; ignored when `max_steps` is set."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimiser steps; overrides `epochs` when set."""
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=1, ge=1)
    """Rows per device batch."""
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    """Batches per optimiser step (effective batch: batch_size x this)."""
    max_seq_length: int = Field(default=512, ge=16)
    """Longest prompt plus answer, in tokens; longer rows are dropped and counted."""
    seed: int = 0
    logging_steps: int = Field(default=5, ge=1)
    """Optimiser steps between progress lines."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Optimiser steps between validation runs; None: about every 10% of the run."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainingCommon:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("epochs: set epochs or max_steps")
        return self

    def check_files(self) -> None:
        """Every check that needs the file system but no model load.

        Raises:
            TrainConfigError: naming the field.
        """
        _check_file("data.train", self.data.train)
        if self.data.validation is not None:
            _check_file("data.validation", self.data.validation)
        _check_personality(self.personalities_file, self.personality)
        self.base_model_info()
        check_output_dir(self.output_dir, self.overwrite)

    def base_model_info(self) -> BaseModelInfo:
        """The base model's names and linear layers, from its files' headers.

        Raises:
            TrainConfigError: no config.json or no safetensors weights (`base_model`).
        """
        model = self.base_model
        if not model.is_dir():
            raise TrainConfigError(f"base_model: not a folder: {model}")
        if not (model / "config.json").is_file():
            raise TrainConfigError(f"base_model: {model} has no config.json (not a model folder)")
        try:
            return BaseModelInfo.from_dir(model)
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise TrainConfigError(f"base_model: {exc}") from None


class SFTConfig(TrainingCommon):
    """`fastresp train sft`: LoRA supervised fine-tuning on the fast responses."""

    lora: LoraSettings = LoraSettings()

    def check_files(self) -> None:
        """`TrainingCommon.check_files`, plus the LoRA target modules against the base model."""
        super().check_files()
        resolve_target_modules(self.lora, self.base_model_info())


class GRPOConfig(TrainingCommon):
    """`fastresp train grpo`: reinforcement learning on top of an SFT adapter."""

    sft_adapter: ConfigPath
    """An SFT adapter folder (adapter_config.json + fastresp_card.json) to start from."""
    num_generations: int = Field(default=4, ge=2)
    """Completions sampled per prompt (GRPO's group size)."""
    max_completion_length: int = Field(default=16, ge=1)
    """Longest sampled completion, in tokens."""
    temperature: float = Field(default=1.0, gt=0.0, le=2.0)
    """Sampling temperature of the completions."""
    beta: float = Field(default=0.0, ge=0.0)
    """KL penalty against the starting policy; 0 disables it."""
    reward_weights: dict[str, float] = Field(default_factory=dict)
    """Reward name -> weight; rewards not named keep their default weight."""
    judge: JudgeSettings | None = None
    """An LLM judge reward; None: automatic rewards only."""

    def check_files(self) -> None:
        """`TrainingCommon.check_files`, plus the SFT adapter folder's files."""
        super().check_files()
        adapter = self.sft_adapter
        if not adapter.is_dir():
            raise TrainConfigError(f"sft_adapter: not a folder: {adapter}")
        for name in (ADAPTER_CONFIG, ADAPTER_CARD):
            if not (adapter / name).is_file():
                raise TrainConfigError(
                    f"sft_adapter: {adapter} has no {name} (not a `fastresp train sft` output)"
                )


def _check_file(field: str, path: Path) -> None:
    if not path.exists():
        raise TrainConfigError(f"{field}: file not found: {path}")
    if not path.is_file():
        raise TrainConfigError(f"{field}: not a file: {path}")


def _check_personality(manifest: Path, name: str) -> None:
    try:
        personalities = load_personalities(manifest)
    except ManifestError as exc:
        raise TrainConfigError(f"personalities_file: {exc}") from None
    if name not in personalities:
        raise TrainConfigError(
            f"personality: unknown personality {name!r} in {manifest}; "
            f"known: {', '.join(personalities)}"
        )


def is_adapter_output(path: Path) -> bool:
    """True if `path` is a folder written by a previous training run (it has the card)."""
    return (path / ADAPTER_CARD).is_file()


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an output folder that would overwrite something (module docstring).

    Raises:
        TrainConfigError: naming `output_dir`.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise TrainConfigError(f"output_dir: exists and is not a folder: {path}")
    if not any(path.iterdir()):
        return
    if not is_adapter_output(path):
        raise TrainConfigError(
            f"output_dir: {path} is not empty and is not a previous adapter output "
            f"(no {ADAPTER_CARD}); refusing to replace it"
        )
    if not overwrite:
        raise TrainConfigError(
            f"output_dir: {path} holds a previous adapter; set overwrite: true (or --force) "
            "to replace it"
        )


def base_module_names(info: BaseModelInfo) -> set[str]:
    """Last name components of the base model's linear layers (`q_proj`, `lm_head`, ...)."""
    return {module.rsplit(".", 1)[-1] for module in info.linear_modules}


def resolve_target_modules(lora: LoraSettings, info: BaseModelInfo) -> tuple[str, ...]:
    """The target modules a run uses: the configured ones, or the default projections
    the base model has.

    Raises:
        TrainConfigError: a configured module is not a linear layer of the base model,
            or (default) the base model has none of the default projections
            (`lora.target_modules`).
    """
    available = base_module_names(info)
    if lora.target_modules is None:
        found = tuple(name for name in DEFAULT_TARGET_MODULES if name in available)
        if not found:
            raise TrainConfigError(
                "lora.target_modules: the base model has none of the default projections "
                f"({', '.join(DEFAULT_TARGET_MODULES)}); name them. It has: "
                f"{', '.join(sorted(available))}"
            )
        return found
    for name in lora.target_modules:
        if name not in available:
            raise TrainConfigError(
                f"lora.target_modules: unknown module {name!r}; the base model has: "
                f"{', '.join(sorted(available))}"
            )
    return tuple(dict.fromkeys(lora.target_modules))


def error_lines(exc: ValidationError) -> str:
    """`field.path: message` for each pydantic error (never the input value)."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        # A model-level check names its field itself ("epochs: ...").
        problems.append(f"{loc}: {message}" if loc else message)
    return "; ".join(problems)


T = TypeVar("T", bound=TrainingCommon)


def load_config(path: Path, kind: type[T], overrides: Mapping[str, Any] | None = None) -> T:
    """Read and check a training config.

    Args:
        path: The YAML file; relative paths in it resolve against its folder.
        kind: `SFTConfig`, `GRPOConfig` or a subclass.
        overrides: Top-level fields set over the file's (e.g. ``{"overwrite": True}``
            for ``--force``).

    Returns:
        The config, with every path absolute.

    Raises:
        TrainConfigError: unreadable file or YAML, an unknown key, a bad value, or a
            failed file-system check; the message starts with the field's dotted path
            (``config`` for the file itself). Nothing heavy has been loaded.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise TrainConfigError(f"config: {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config: {path} must hold a mapping of fields")
    raw = {**raw, **(overrides or {})}
    try:
        config = kind.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise TrainConfigError(error_lines(exc)) from None
    config.check_files()
    return config
