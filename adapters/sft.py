"""LoRA supervised fine-tuning of one personality's adapter (`fastresp train sft`).

`train_sft(config, progress)` trains a PEFT LoRA on the fast responses of one
personality with TRL's `SFTTrainer` and writes a folder the gateway can serve:

- **The prompt is the served prompt.** Each training row is rendered by
  `adapters.sft_format` with `service.prompts.build_prompt(..., "chat", tokenizer)`,
  the function the gateway calls for a personality served by an adapter, and
  tokenised as vLLM tokenises a text prompt. The loss covers only the answer and its
  end-of-turn marker (TRL pre-tokenized dataset with `completion_mask`,
  `completion_only_loss=True`), so the adapter learns to answer and to stop.
- **Long rows are dropped, never cut.** A row whose prompt plus answer is over
  `max_seq_length` tokens is left out and counted (progress and card): truncating it
  would cut away the answer, or teach a prompt the gateway never sends.
- **The best checkpoint is kept.** With validation rows, the validation loss is
  measured before training and every `eval_steps`; the adapter of the step with the
  lowest validation loss is the one saved (`load_best_model_at_end`).
- **Device.** CUDA when available, in bf16; otherwise the CPU in float32 (bf16 on a
  CPU without native support is emulated and slow).
- **Nothing half-written.** Training runs in a hidden sibling folder
  (`.<name>.partial-<pid>`, `adapters.training_output.partial_output_dir`); the
  finished adapter is renamed into `output_dir` at the end (a previous output there is
  replaced only with `overwrite`). On any failure the sibling is removed and
  `output_dir` is as it was. Work folders of killed runs are removed first.

The output folder holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`), `fastresp_card.json` (`CARD_FORMAT`; see `_card`; the
provenance fields shared with GRPO come from `adapters.training_output`),
`log_history.json` (the trainer's log) and `loss_curve.png`.

torch, transformers, peft, trl and datasets are imported inside `train_sft`: importing
this module stays cheap.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.sft_format import (
    TrainingDataError,
    read_training_rows,
    row_fast_response,
    row_turn,
    tokenize_example,
    training_completion,
    training_prompt,
)
from adapters.train_config import SFTConfig, check_output_dir, resolve_target_modules
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
from service.atomic_files import file_sha256, swap_into_place, umask
from service.personalities import Personality, load_personalities
from service.prompts import system_text

#: Version of `fastresp_card.json`'s layout.
CARD_FORMAT = 1
LOSS_CURVE = "loss_curve.png"
#: Evaluations per run when `eval_steps` is not set (about every 10%).
DEFAULT_EVALUATIONS = 10


@dataclass(frozen=True, slots=True)
class SplitData:
    """One data file, tokenised: the examples used and what was left out."""

    path: Path
    sha256: str
    examples: list[dict[str, list[int]]]
    rows_dropped_too_long: int
    rows_other_personality: int
    rows_other_system_text: int
    """Rows whose stored system message differs from the manifest's text now (the
    prompt is rendered from the manifest, as the gateway does)."""

    def card(self) -> dict[str, Any]:
        """The card's entry for this file."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "rows": len(self.examples),
            "rows_dropped_too_long": self.rows_dropped_too_long,
            "rows_other_personality": self.rows_other_personality,
            "rows_other_system_text": self.rows_other_system_text,
        }


@dataclass(frozen=True, slots=True)
class SFTResult:
    """What `train_sft` wrote: the adapter folder and its card (`fastresp_card.json`)."""

    output_dir: Path
    card: dict[str, Any] = field(repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        """train_loss, validation_loss, best_step, initial_validation_loss."""
        metrics: dict[str, Any] = self.card["metrics"]
        return metrics


def load_split(
    path: Path,
    personality: Personality,
    tokenizer: Any,
    max_seq_length: int,
) -> SplitData:
    """Read a training-rows file and tokenise the rows of `personality`.

    Raises:
        TrainingDataError: a malformed row (named), or a chat template that renders the
            answer's conversation differently from the prompt.
    """
    examples: list[dict[str, list[int]]] = []
    too_long = other = other_system = 0
    system = system_text(personality)
    for row in read_training_rows(path):
        if row.get("personality") != personality.name:
            other += 1
            continue
        turn = row_turn(row)
        answer = row_fast_response(row)
        messages = row.get("previous_conversation") or []
        if messages and messages[0].get("content") != system:
            other_system += 1
        prompt = training_prompt(personality, turn, tokenizer)
        completion = training_completion(personality, turn, answer, tokenizer)
        example = tokenize_example(prompt, completion, tokenizer)
        if len(example["input_ids"]) > max_seq_length:
            too_long += 1
            continue
        examples.append(example)
    return SplitData(path, file_sha256(path), examples, too_long, other, other_system)


def total_steps(config: SFTConfig, train_rows: int) -> int:
    """Optimiser steps of the run: `max_steps`, or epochs x steps per epoch (the
    trainer's count, transformers 5 `Trainer`: ceil(batches / accumulation), at least 1)."""
    if config.max_steps is not None:
        return config.max_steps
    assert config.epochs is not None  # the config requires one of the two
    batches = math.ceil(train_rows / config.batch_size)
    per_epoch = max(math.ceil(batches / config.gradient_accumulation_steps), 1)
    return max(math.ceil(config.epochs * per_epoch), 1)


def plot_loss_curve(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Train and validation loss against the optimiser step, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    valid = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if valid:
        axes.plot(*zip(*valid, strict=True), label="validation loss", marker="o")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("cross-entropy on the fast response (nats/token)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def _log_line(state: Any, logs: Mapping[str, Any]) -> str | None:
    """The progress line of a training log (without elapsed and ETA); None without a loss."""
    if "loss" not in logs:
        return None
    return (
        f"step {state.global_step}/{state.max_steps}  epoch {state.epoch or 0:.2f}  "
        f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0.0):.2e}"
    )


def _eval_line(state: Any, metrics: Mapping[str, Any]) -> str | None:
    """The progress line of an evaluation; None without a validation loss."""
    if "eval_loss" not in metrics:
        return None
    step = state.global_step
    where = f"step {step}/{state.max_steps}" if step else "before training"
    return f"eval  {where}  validation loss {metrics['eval_loss']:.4f}"


def _card(
    config: SFTConfig,
    *,
    target_modules: tuple[str, ...],
    train: SplitData,
    validation: SplitData | None,
    metrics: dict[str, Any],
    device: str,
    dtype: str,
    seconds: float,
) -> dict[str, Any]:
    """`fastresp_card.json`: what the adapter is, what it was trained on and how."""
    hyperparameters = config.model_dump(mode="json")
    hyperparameters["lora"]["target_modules"] = list(target_modules)
    return {
        "format": CARD_FORMAT,
        "kind": "sft",
        "personality": config.personality,
        "base_model": base_model_card(config.base_model),
        "data": {
            "train": train.card(),
            "validation": validation.card() if validation is not None else None,
        },
        "hyperparameters": hyperparameters,
        "metrics": metrics,
        **run_card_fields(device, dtype, seconds),
    }


def _rounded(value: object) -> object:
    """A loss for a progress line: 4 decimals (the card keeps the full value)."""
    return round(value, 4) if isinstance(value, float) else value


def _metrics(
    history: Sequence[dict[str, Any]], state: Any, initial: float | None
) -> dict[str, Any]:
    losses = [e["loss"] for e in history if "loss" in e]
    best_step: int | None = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    return {
        "train_loss": losses[-1] if losses else None,
        "validation_loss": state.best_metric,
        "best_step": best_step if best_step is not None else state.global_step,
        "initial_validation_loss": initial,
        "steps": state.global_step,
    }


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence the tqdm bars of datasets and transformers (weights loading, dataset
    maps) for the run; the progress callback reports instead. Restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = not datasets.utils.are_progress_bars_disabled()
    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _normalise_modes(directory: Path) -> None:
    """Files readable as the umask allows (safetensors writes 0600 temp files): a
    vLLM server running as another user must read the adapter."""
    mask = umask()
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~mask)


def train_sft(config: SFTConfig, progress: Progress) -> SFTResult:
    """Train the LoRA adapter `config` describes and write it to `config.output_dir`.

    Args:
        config: A checked config (`adapters.train_config.load_config`); the file
            checks run again here, before anything loads.
        progress: Receives one line per step of the setup, per logging step (step,
            epoch, loss, learning rate, elapsed, ETA) and per evaluation.

    Returns:
        The output folder and its card.

    Raises:
        TrainConfigError: a bad config (before any model loads).
        TrainingDataError: a malformed row, no usable training rows, or validation
            rows configured but none usable.
    """
    config.check_files()
    target_modules = resolve_target_modules(config.lora, config.base_model_info())
    personality = load_personalities(config.personalities_file)[config.personality]
    output_dir = config.output_dir
    with partial_output_dir(output_dir, progress) as workdir:
        with _no_progress_bars():
            result = _train(config, personality, target_modules, workdir, progress)
        _normalise_modes(workdir / "adapter")
        check_output_dir(output_dir, config.overwrite)  # again: it may have changed since
        swap_into_place(workdir / "adapter", output_dir, workdir)
        return SFTResult(output_dir=output_dir, card=result)


def _train(
    config: SFTConfig,
    personality: Personality,
    target_modules: tuple[str, ...],
    workdir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Train in `workdir`; returns the card. The adapter ends up in `workdir/adapter`."""
    started = time.monotonic()
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl.trainer.sft_config import SFTConfig as TRLSFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    progress(f"tokenizer: {config.base_model}")
    tokenizer = AutoTokenizer.from_pretrained(str(config.base_model))
    train = load_split(config.data.train, personality, tokenizer, config.max_seq_length)
    validation = (
        load_split(config.data.validation, personality, tokenizer, config.max_seq_length)
        if config.data.validation is not None
        else None
    )
    for name, split in (("train", train), ("validation", validation)):
        if split is None:
            continue
        progress(
            f"data.{name}: {len(split.examples)} rows of {config.personality!r}, "
            f"{split.rows_dropped_too_long} dropped (over {config.max_seq_length} tokens), "
            f"{split.rows_other_personality} of other personalities"
        )
        if split.rows_other_system_text:
            progress(
                f"data.{name}: note: {split.rows_other_system_text} rows were built with another "
                "system text than the manifest's now; training uses the manifest's (as served)"
            )
        if not split.examples:
            raise TrainingDataError(
                f"data.{name}: no usable rows of personality {config.personality!r} in {split.path}"
            )

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    steps = total_steps(config, len(train.examples))
    eval_steps = config.eval_steps or max(steps // DEFAULT_EVALUATIONS, 1)
    progress(
        f"model: {config.base_model} on {device} ({str(dtype).removeprefix('torch.')}), "
        f"LoRA rank {config.lora.rank} on {', '.join(target_modules)}; {steps} steps"
    )
    transformers.set_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(str(config.base_model), dtype=dtype)
    lora = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    with_validation = validation is not None
    args = TRLSFTConfig(
        **trainer_arguments(config, workdir, cuda),
        per_device_eval_batch_size=config.batch_size,
        max_length=config.max_seq_length,
        completion_only_loss=True,
        eval_strategy="steps" if with_validation else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if with_validation else "no",
        save_steps=eval_steps,
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=with_validation,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train.examples),
        eval_dataset=Dataset.from_list(validation.examples) if validation is not None else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[progress_callback(progress, _log_line, _eval_line)],
    )
    # disable_tqdm=True makes the trainer print every log dict; the callback reports.
    trainer.remove_callback(PrinterCallback)
    initial: float | None = None
    before: list[dict[str, Any]] = []
    if with_validation:
        measured = trainer.evaluate()
        initial = float(measured["eval_loss"])
        # train() starts a fresh log history; keep this evaluation as its step 0.
        before = [{**measured, "epoch": 0.0, "step": 0}]
    trainer.train()
    history = before + list(trainer.state.log_history)
    metrics = _metrics(history, trainer.state, initial)
    progress(
        f"done: train loss {_rounded(metrics['train_loss'])}, best validation loss "
        f"{_rounded(metrics['validation_loss'])} at step {metrics['best_step']}"
    )

    adapter = workdir / "adapter"
    trained: Any = trainer.model  # the PEFT model, best checkpoint loaded
    trained.save_pretrained(str(adapter), safe_serialization=True)
    # The base folder's absolute path: the gateway's check (`BaseModelInfo.matches`)
    # accepts it, and on another machine its folder name still matches.
    set_base_model_name(adapter, str(config.base_model))
    card = _card(
        config,
        target_modules=target_modules,
        train=train,
        validation=validation,
        metrics=metrics,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        seconds=time.monotonic() - started,
    )
    write_log_history(adapter, history)
    plot_loss_curve(
        history, adapter / LOSS_CURVE, f"SFT {config.personality}: {card['base_model']['name']}"
    )
    write_card(adapter, card)
    return card
