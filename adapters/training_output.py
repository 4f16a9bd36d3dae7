"""What `fastresp train sft` and `fastresp train grpo` write alike, in one place.

Both trainers (`adapters.sft`, `adapters.grpo`) produce an adapter folder the gateway
can serve, and share how it is made and described:

- **Nothing half-written.** Training runs in a hidden sibling folder of the output
  (`partial_output_dir`: ``.<name>.partial-<pid>``, removed on exit whatever happens);
  the finished adapter is renamed into place (`service.atomic_files.swap_into_place`).
  Files in it are written with `service.atomic_files.write_synced` and the card last
  (`write_card`).
- **The card's provenance.** Every `fastresp_card.json` names its base model
  (`base_model_card`: name, path, config.json sha256) and ends with the same run
  fields (`run_card_fields`: prompt version, library versions, git commit, device,
  dtype, training time, creation time, version).
- **Progress lines.** `progress_callback` prints one line per logging step ending in
  ``elapsed H:MM:SS  eta H:MM:SS`` (`clock`); each trainer says what comes before.
- **Trainer arguments** both trainers set alike (`trainer_arguments`): the schedule,
  the seed, logging, the device and no reporting or tqdm.

transformers is imported inside `progress_callback` only: importing this module stays
cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from adapters.train_config import TrainingCommon
from service.adapter_validation import ADAPTER_CARD, ADAPTER_CONFIG, MODEL_MARKER
from service.atomic_files import file_sha256, fsync_dir, write_synced
from service.prompts import PROMPT_VERSION

Progress = Callable[[str], None]

LOG_HISTORY = "log_history.json"
"""The trainer's log history (a JSON list), in every adapter folder."""
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets")
"""Libraries whose versions go into the card."""

REPO_ROOT = Path(__file__).resolve().parents[1]


def model_name(model_dir: Path) -> str:
    """The prepared model's name (its marker's `model`), else the folder's name."""
    marker = model_dir / MODEL_MARKER
    if marker.is_file():
        try:
            name = json.loads(marker.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            return name
    return model_dir.name


def base_model_card(model_dir: Path) -> dict[str, str]:
    """The card's ``base_model`` entry: name (`model_name`), path, sha256 of config.json."""
    return {
        "name": model_name(model_dir),
        "path": str(model_dir),
        "config_sha256": file_sha256(model_dir / "config.json"),
    }


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from; None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def library_versions() -> dict[str, str | None]:
    """The installed version of each of `LIBRARIES`; None for one that is missing."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_card_fields(device: str, dtype: str, seconds: float) -> dict[str, Any]:
    """The card's closing fields, in order: prompt_version, libraries, git_commit,
    device, dtype (``float32``), training_seconds (rounded to 0.1 s), created_utc (ISO
    8601, seconds) and version (None until `fastresp adapters publish` sets it)."""
    return {
        "prompt_version": PROMPT_VERSION,
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "device": device,
        "dtype": dtype,
        "training_seconds": round(seconds, 1),
        "created_utc": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "version": None,
    }


def clock(seconds: float) -> str:
    """`seconds` as ``M:SS``, or ``H:MM:SS`` from an hour on (negative counts as 0)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def trainer_arguments(config: TrainingCommon, workdir: Path, cuda: bool) -> dict[str, Any]:
    """Keyword arguments of TRL's SFT and GRPO configs that both trainers set alike.

    Checkpoints go to ``workdir/checkpoints``; ``max_steps`` overrides ``epochs``;
    bf16 on CUDA, float32 on the CPU; no gradient checkpointing, no reporting, no
    tqdm (the progress callback reports), no dataloader workers.
    """
    return {
        "output_dir": str(workdir / "checkpoints"),
        "num_train_epochs": config.epochs or 1.0,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "use_cpu": not cuda,
        "bf16": cuda,
        "fp16": False,
        "gradient_checkpointing": False,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def progress_callback(
    progress: Progress,
    log_line: Callable[[Any, Mapping[str, Any]], str | None],
    eval_line: Callable[[Any, Mapping[str, Any]], str | None] | None = None,
) -> Any:
    """A transformers `TrainerCallback` that reports the run as lines.

    Args:
        progress: Receives the lines.
        log_line: ``(state, logs) -> text``, called at each log; the line printed is
            ``text  elapsed H:MM:SS  eta H:MM:SS`` (eta ``?`` before the first step).
            None: that log is not reported.
        eval_line: ``(state, metrics) -> line``, called at each evaluation; None (the
            function or its result): nothing is printed.
    """
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            text = log_line(state, logs or {})
            if text is None:
                return
            step, total = state.global_step, state.max_steps
            elapsed = time.monotonic() - self.started
            eta = clock(elapsed / step * (total - step)) if step else "?"
            progress(f"{text}  elapsed {clock(elapsed)}  eta {eta}")

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
        ) -> None:
            line = eval_line(state, metrics or {}) if eval_line is not None else None
            if line is not None:
                progress(line)

    return ProgressLines()


@contextlib.contextmanager
def partial_output_dir(output_dir: Path, progress: Progress) -> Iterator[Path]:
    """A fresh work folder ``.<name>.partial-<pid>`` beside `output_dir` (whose parent
    is created), removed with everything left in it when the block ends. Work folders
    of earlier killed runs for `output_dir` are removed first (`remove_stale_workdirs`)."""
    remove_stale_workdirs(output_dir, progress)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    workdir = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_stale_workdirs(output_dir: Path, progress: Progress) -> None:
    """Delete work folders of earlier runs for `output_dir` whose process is gone (a
    killed run cannot clean up after itself)."""
    prefix = f".{output_dir.name}.partial-"
    for workdir in output_dir.parent.glob(f"{prefix}*"):
        pid = workdir.name.removeprefix(prefix)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            progress(f"removing the work folder of a run that ended without cleaning up: {workdir}")
            shutil.rmtree(workdir, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def set_base_model_name(adapter: Path, name: str | None) -> None:
    """Set ``base_model_name_or_path`` in the adapter's ``adapter_config.json``."""
    file = adapter / ADAPTER_CONFIG
    config = json.loads(file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = name
    write_synced(file, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def write_log_history(adapter: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """The trainer's log history as `LOG_HISTORY` (JSON, indent 1), fsynced."""
    write_synced(adapter / LOG_HISTORY, json.dumps(history, indent=1).encode())


def write_card(adapter: Path, card: Mapping[str, Any]) -> None:
    """The card as ``fastresp_card.json`` (JSON, indent 2), fsynced, then the folder
    fsynced: the last write of an adapter folder before it is renamed into place."""
    write_synced(adapter / ADAPTER_CARD, (json.dumps(card, indent=2) + "\n").encode())
    fsync_dir(adapter)
