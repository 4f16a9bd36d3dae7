"""`fastresp train ...`: fine-tune per-personality LoRA adapters.

The training stack (torch, transformers, peft, trl, datasets) is imported inside each
command, never at import time: `fastresp --help` and the gateway stay light. A bad
config exits with code 2 and a one-line message naming the field, before any model
loads (`adapters.train_config`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from service.cli_common import fail, progress

if TYPE_CHECKING:
    from adapters.train_config import TrainingCommon

app = typer.Typer(
    rich_markup_mode=None,
    help="Fine-tune per-personality LoRA adapters on the training data.",
    no_args_is_help=True,
)


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace output_dir if it holds a previous adapter (same as overwrite: true).",
    ),
]

C = TypeVar("C", bound="TrainingCommon")
R = TypeVar("R")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _train(
    config: Path,
    kind: type[C],
    force: bool,
    train: Callable[[C, Callable[[str], None]], R],
) -> R:
    """Load and check the config, then train with progress lines on stderr.

    A bad config, or a config or data problem found while training, exits with code 2
    and the one-line message (nothing is written). SIGTERM (a CI timeout, `kill`)
    unwinds like Ctrl-C while training, so the run's work folder is
    removed and nothing half-written is left.
    """
    from adapters.sft_format import TrainingDataError
    from adapters.train_config import TrainConfigError, load_config

    try:
        settings = load_config(config, kind, {"overwrite": True} if force else None)
    except TrainConfigError as exc:
        fail(str(exc))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return train(settings, progress)
    except (TrainConfigError, TrainingDataError) as exc:
        fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def sft(
    config: Annotated[
        Path,
        typer.Option(
            help="SFT config YAML (see adapters/configs/sft-gemma-calm.yaml); relative "
            "paths in it are relative to the file."
        ),
    ],
    force: ForceOption = False,
) -> None:
    """Supervised LoRA fine-tuning of one personality's adapter (TRL SFTTrainer + PEFT).

    Trains on the fast responses only, with the prompt the gateway sends, evaluates on
    the validation rows and keeps the best checkpoint. Writes a PEFT adapter folder
    with fastresp_card.json, log_history.json and loss_curve.png. Progress lines and
    an ETA go to stderr.

    Exit code: 0 done; 2 bad config or training data (nothing is written).
    """
    from adapters.sft import train_sft
    from adapters.train_config import SFTConfig

    result = _train(config, SFTConfig, force, train_sft)
    metrics = result.metrics
    typer.echo(f"adapter: {result.output_dir}")
    loss = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    typer.echo(
        f"train loss {loss['train_loss']}, validation loss {loss['validation_loss']} "
        f"(best step {loss['best_step']}, before training {loss['initial_validation_loss']})"
    )


@app.command()
def grpo(
    config: Annotated[
        Path,
        typer.Option(
            help="GRPO config YAML (see adapters/configs/grpo-gemma-calm.yaml); relative "
            "paths in it are relative to the file."
        ),
    ],
    force: ForceOption = False,
) -> None:
    """GRPO on top of an SFT adapter (TRL GRPOTrainer), with the serving rules as rewards.

    Samples several fast responses per training prompt, scores each with the rule
    rewards (length, kid-safe, no leak, no praise before a correction, no question when
    the main response asks one, a diverse opener) and the optional LLM judge, and
    trains the adapter towards the better ones. Writes a PEFT adapter folder with
    fastresp_card.json, log_history.json and reward_curve.png. One progress line per
    logging step (each reward's mean, ETA) goes to stderr.

    Exit code: 0 done; 2 bad config or training data (nothing is written).
    """
    from adapters.grpo import GRPOTrainConfig, train_grpo

    # No SIGTERM handler here: the grpo command has never installed one.
    result = _train(config, GRPOTrainConfig, force, train_grpo)
    rewards = result.rewards
    typer.echo(f"adapter: {result.output_dir}")
    for name, last in rewards["last_step"].items():
        typer.echo(f"{name}: {rewards['first_step'].get(name, float('nan')):.3f} -> {last:.3f}")
    judge = rewards["judge"]
    if judge is not None:
        typer.echo(f"judge: {judge['failures']} of {judge['calls']} calls failed (scored 0.0)")
