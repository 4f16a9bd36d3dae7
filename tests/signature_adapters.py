"""Signature LoRA adapters: a test oracle for which adapter produced a response.

`train_signature_adapter` trains a PEFT LoRA on the tiny test model
(`service.model_prep.build_tiny_model`) so that, for any chat-mode prompt the gateway
builds for an adapter personality (`service.prompts.build_prompt(..., "chat",
tokenizer)`), greedy decoding answers one known string, e.g. "beta beta", then
`<|im_end|>`. The base model never says it, so a response's text tells which adapter
(version) served it.

`signature_adapter_set` trains several into a folder and reuses earlier results there
while the base model, the prompt format and this trainer are unchanged.

How it trains, and why (measured on the 2-core test machine):

- A plain PyTorch loop over PEFT, float32, one thread, seeded. TRL took about 1.5 s a
  step here. Two threads were 2-5x slower than one whenever other processes shared
  the cores, because the worker threads wait on each other.
- The tiny model's prompts are long (300-1000 tokens: its tokenizer is almost
  character-level), so a full forward and backward pass costs about 0.3 s a step.
  Instead, each example's prompt is split: the key/value cache of the long prefix is
  computed without gradient, and the gradient step runs only the last
  `SUFFIX_TOKENS` prompt tokens plus the answer (about 60 ms a step). The prefix
  caches are recomputed with the current adapter every `REFRESH_EVERY` steps; with
  caches that stayed those of the base model, or with a suffix of 8 tokens, the
  adapter did not learn.
- The tied output embedding is not adapted and its rows are small, so the logits
  stay within a few units and cross-entropy never goes below about 3.4: the easy
  answer tokens kept most of the gradient and the hard one (after "gamma", a space
  the first time, end-of-answer the second) stayed wrong. Scaling the logits by
  `LOGIT_SCALE` in the loss fixed that; greedy decoding is unaffected by the scale.
- 64 examples: half from the test and shipped manifests, half synthetic personalities
  with other names, descriptions and word limits; random turns of 1-120 words, some
  without Pika's question or main answer. Learning rate 5e-3 (1e-2 did not converge),
  decayed linearly to 0; LoRA alpha twice the rank, on all linear layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from service.personalities import Personality, load_personalities
from service.prompts import Turn, build_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Written into every adapter folder: the gateway reads the version from it.
CARD_FILE = "fastresp_card.json"
#: The cache key of an adapter trained by `signature_adapter_set`.
KEY_FILE = "signature_key.json"

#: The manifests whose personalities the training prompts use (with synthetic ones).
PERSONALITY_MANIFESTS = (
    REPO_ROOT / "tests" / "data" / "personalities.yaml",
    REPO_ROOT / "adapters" / "personalities.yaml",
)

DEFAULT_STEPS = 120
NUM_EXAMPLES = 64
BATCH_SIZE = 6
LEARNING_RATE = 5e-3
ALPHA_RATIO = 2
LOGIT_SCALE = 3.0
SUFFIX_TOKENS = 32
REFRESH_EVERY = 40
KV_BATCH = 16

_WORD_TEXT = (
    "a the I you we it my your is are was am can do did like see have go went "
    "red blue green yellow big small happy sad dog cat bird fish apple banana "
    "mom dad sister brother friend school teacher book ball play run jump eat "
    "pizza rice water milk sun moon star tree flower rain snow hot cold yes no "
    "maybe because and but so what why how where when who one two three four "
    "five ten twenty half plus minus equals answer number fraction add subtract "
    "multiply divide times zero hundred count shape circle square triangle "
    "word letter sound read write draw sing song dance park zoo elephant lion "
    "monkey tiger today yesterday tomorrow morning night think know guess try "
    "again good great nice fun funny silly okay sorry please thank thanks hello "
    "um uh hmm oh wow yay ooh really very much more less first next last then "
    "ate saw made got want need love hate help find tell say said ask asked"
)
_WORDS = _WORD_TEXT.split()
_PUNCT = (".", ".", ".", "!", "?", ",", "...", "")
_NAME_STEMS = ("pika", "tutor", "buddy", "sunny", "robo", "owl", "tiger", "pixie")


def _sentence(rng: random.Random, pieces: list[str], lo: int, hi: int) -> str:
    """Random text: mostly common words, some numbers and raw tokenizer pieces."""
    words = []
    for _ in range(rng.randint(lo, hi)):
        roll = rng.random()
        if roll < 0.75:
            word = rng.choice(_WORDS)
        elif roll < 0.85:
            word = str(rng.randint(0, 1000))
        else:
            word = rng.choice(pieces).strip() or rng.choice(_WORDS)
        words.append(word.capitalize() if rng.random() < 0.1 else word)
    text = " ".join(words)
    return text[:1].upper() + text[1:] + rng.choice(_PUNCT)


def _length(rng: random.Random) -> tuple[int, int]:
    """Word-count range of one text: mostly short, sometimes long, as real turns are."""
    roll = rng.random()
    if roll < 0.6:
        return 1, 15
    if roll < 0.9:
        return 10, 50
    return 40, 120


def _synthetic_personality(rng: random.Random, pieces: list[str]) -> Personality:
    return Personality(
        name=f"{rng.choice(_NAME_STEMS)}{rng.choice(['', '-', '_'])}{rng.randint(0, 99)}",
        description=_sentence(rng, pieces, 2, 25),
        style=_sentence(rng, pieces, 2, 30),
        max_words=rng.randint(3, 40),
        fallback_phrases=("Hm.",),
    )


def training_prompts(tokenizer: Any, count: int, seed: int) -> list[str]:
    """`count` chat-mode prompts as the gateway builds them, with varied personalities
    (half from `PERSONALITY_MANIFESTS`, half synthetic) and random turns."""
    rng = random.Random(seed)
    pieces = [
        tokenizer.convert_tokens_to_string([token])
        for token in sorted(tokenizer.get_vocab())
        if not token.startswith("<|")
    ]
    known = [p for path in PERSONALITY_MANIFESTS for p in load_personalities(path).values()]
    prompts = []
    for _ in range(count):
        if rng.random() < 0.5:
            personality = rng.choice(known)
        else:
            personality = _synthetic_personality(rng, pieces)
        pika_turn = None if rng.random() < 0.25 else _sentence(rng, pieces, *_length(rng))
        user_turn = _sentence(rng, pieces, *_length(rng))
        main = None if rng.random() < 0.35 else _sentence(rng, pieces, *_length(rng))
        turn = Turn(pika_turn, user_turn, main)
        prompts.append(build_prompt(personality, turn, "chat", tokenizer))
    return prompts


def _prefix_caches(model: Any, prefixes: list[list[int]], pad: int) -> list[Any]:
    """The key/value cache of each prefix, without gradient: per prefix, a list of
    ``(key, value)`` per layer, each ``[1, kv_heads, len(prefix), head_dim]``."""
    import torch

    result: list[Any] = [None] * len(prefixes)
    by_length = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    with torch.no_grad():
        for start in range(0, len(by_length), KV_BATCH):
            chunk = by_length[start : start + KV_BATCH]
            width = max(len(prefixes[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: positions stay 0, 1, 2...
                input_ids[row, : len(prefixes[i])] = torch.tensor(prefixes[i])
                mask[row, : len(prefixes[i])] = 1
            cache = model(input_ids=input_ids, attention_mask=mask, use_cache=True).past_key_values
            layers = [(keys, values) for keys, values, *_ in cache]
            for row, i in enumerate(chunk):
                n = len(prefixes[i])
                result[i] = [(k[row : row + 1, :, :n], v[row : row + 1, :, :n]) for k, v in layers]
    return result


def train_signature_adapter(
    base_model: Path,
    out_dir: Path,
    signature: str,
    *,
    version: str,
    rank: int = 8,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> Path:
    """Train a LoRA that makes `base_model` answer `signature` to any chat-mode prompt.

    About 10-20 s on two shared cores (one thread). Deterministic for a given seed,
    thread count and library versions.

    Args:
        base_model: The tiny test model directory (`build_tiny_model`).
        out_dir: Where the PEFT adapter (safetensors) and `fastresp_card.json` go;
            created if needed; files already there are overwritten.
        signature: The answer the adapter must give, e.g. "beta beta". It must
            tokenize the same on its own as after the prompt (true for plain words).
        version: Written to `fastresp_card.json` as ``{"version": version}``.
        rank: LoRA rank (all linear layers, alpha twice the rank).
        steps: Optimiser steps of `BATCH_SIZE` examples.
        seed: Seeds the examples, the LoRA initialisation and the batch order.

    Returns:
        `out_dir`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        pad = tokenizer.pad_token_id or 0
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        target = [*tokenizer.encode(signature, add_special_tokens=False), eos]
        examples = [
            tokenizer.encode(prompt, add_special_tokens=False)
            for prompt in training_prompts(tokenizer, NUM_EXAMPLES, seed)
        ]
        prefixes = [ids[:-SUFFIX_TOKENS] for ids in examples]
        tails = torch.tensor([ids[-SUFFIX_TOKENS:] + target for ids in examples])
        answer = torch.tensor(target)

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        config = LoraConfig(
            r=rank,
            lora_alpha=ALPHA_RATIO * rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        order = random.Random(seed + 1)
        caches: dict[int, tuple[int, Any]] = {}  # example -> (step computed, prefix cache)
        for step in range(steps):
            batch = order.sample(range(NUM_EXAMPLES), BATCH_SIZE)
            stale = [i for i in batch if i not in caches or step - caches[i][0] >= REFRESH_EVERY]
            if stale:
                peft_model.eval()
                fresh = _prefix_caches(peft_model, [prefixes[i] for i in stale], pad)
                caches.update((i, (step, cache)) for i, cache in zip(stale, fresh, strict=True))
                peft_model.train()

            # Left-pad the prefix caches so every row's suffix starts at the same column.
            width = max(len(prefixes[i]) for i in batch)
            layers = []
            for layer in range(len(caches[batch[0]][1])):
                keys, values = [], []
                for i in batch:
                    k, v = caches[i][1][layer]
                    gap = width - k.shape[2]
                    keys.append(torch.nn.functional.pad(k, (0, 0, gap, 0)))
                    values.append(torch.nn.functional.pad(v, (0, 0, gap, 0)))
                layers.append((torch.cat(keys), torch.cat(values)))
            mask = torch.ones((BATCH_SIZE, width + tails.shape[1]), dtype=torch.long)
            for row, i in enumerate(batch):
                mask[row, : width - len(prefixes[i])] = 0
            lengths = torch.tensor([len(prefixes[i]) for i in batch])
            positions = lengths[:, None] + torch.arange(tails.shape[1])[None, :]

            logits = peft_model(
                input_ids=tails[batch],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=DynamicCache(ddp_cache_data=layers),
            ).logits[:, SUFFIX_TOKENS - 1 : -1]  # the positions that predict the answer
            loss = torch.nn.functional.cross_entropy(
                (LOGIT_SCALE * logits).flatten(0, 1), answer.repeat(BATCH_SIZE)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * (1 - step / steps)
            optimizer.step()

        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
        (out_dir / CARD_FILE).write_text(json.dumps({"version": version}), encoding="utf-8")
        return out_dir
    finally:
        torch.set_num_threads(threads)


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _inputs_digest(base_model: Path) -> str:
    """What the trained weights depend on besides the arguments: the base model's
    weights and tokenizer, the prompt builder, the manifests, this file, the libraries."""
    files = sorted(
        p for p in base_model.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file()
    )
    files = [p for p in files if not p.name.startswith("fastresp_")]  # build marker: has a time
    files += [REPO_ROOT / "service" / "prompts.py", *PERSONALITY_MANIFESTS, Path(__file__)]
    versions = ",".join(f"{d}={metadata.version(d)}" for d in ("torch", "peft", "transformers"))
    return _digest(files) + ";" + versions


def signature_adapter_set(
    base_model: Path,
    root: Path,
    signatures: Mapping[str, str],
    *,
    ranks: Mapping[str, int] | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> dict[str, Path]:
    """Signature adapters ``root/<version>``, trained unless an identical one is there.

    Args:
        base_model: The tiny test model directory.
        root: Cache folder, e.g. a pytest cache or tmp directory; created if needed.
        signatures: version -> signature, e.g. ``{"beta": "beta beta"}``.
        ranks: version -> LoRA rank for the versions that are not rank 8.
        steps, seed: As for `train_signature_adapter`.

    Returns:
        version -> adapter folder, in the order of `signatures`.

    An adapter is reused when its `KEY_FILE` matches: same signature, version, rank,
    steps, seed, base model files, prompt builder, manifests, trainer source and
    library versions. A new one is trained in a temporary folder and renamed into
    place, so concurrent sessions never see a half-written adapter.
    """
    root.mkdir(parents=True, exist_ok=True)
    inputs = _inputs_digest(base_model)
    result = {}
    for version, signature in signatures.items():
        rank = (ranks or {}).get(version, 8)
        key = {
            "signature": signature,
            "version": version,
            "rank": rank,
            "steps": steps,
            "seed": seed,
            "inputs": inputs,
        }
        target = root / version
        key_file = target / KEY_FILE
        if key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) == key:
            result[version] = target
            continue
        partial = root / f".{version}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        train_signature_adapter(
            base_model, partial, signature, version=version, rank=rank, steps=steps, seed=seed
        )
        (partial / KEY_FILE).write_text(json.dumps(key), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        try:
            partial.rename(target)
        except OSError:  # another session renamed its identical adapter first
            shutil.rmtree(partial, ignore_errors=True)
        result[version] = target
    return result
