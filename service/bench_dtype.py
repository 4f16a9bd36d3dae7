"""Benchmark: vLLM prefill and decode time in bfloat16 against float32 on this machine.

Why the CPU default dtype is float32 (`Settings.dtype`). Both dtypes run in one
process, one after the other, on the same prompts, so the ratio between them is
what to read; absolute times on a shared machine are noisy.

Run:  python -m service.bench_dtype [--model DIR] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Literal

from service.benchmarks import machine, today, write_section

Dtype = Literal["bfloat16", "float32"]

PROMPT = "Pika asked: What did you eat?\nChild said: I ate pho with my dad\nPika's quick reaction:"
LONG_PROMPT = "The child is learning English with Pika, a friendly tutor. " * 30 + PROMPT


def measure(model: Path, dtype: Dtype, repeats: int) -> dict[str, float]:
    """Mean ms for a ~360-token prefill (1 output token) and for 16 decoded tokens."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        enforce_eager=True,  # no torch.compile: as the service runs on the CPU (mode NONE)
    )
    decode = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prefill = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([PROMPT], decode, use_tqdm=False)  # warm-up
    result = {}
    for name, prompt, params in (("prefill", LONG_PROMPT, prefill), ("decode16", PROMPT, decode)):
        started = time.perf_counter()
        for _ in range(repeats):
            llm.generate([prompt], params, use_tqdm=False)
        result[name] = (time.perf_counter() - started) / repeats * 1000
    del llm  # shuts its engine core down before the next dtype starts
    gc.collect()
    return result


def main() -> None:
    """Measure both dtypes, print a table and replace its section in `--out`."""
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Settings().default_model_dir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    dtypes: tuple[Dtype, ...] = ("bfloat16", "float32")
    rows = {dtype: measure(args.model, dtype, args.repeats) for dtype in dtypes}
    lines = [
        "## vLLM CPU dtype: bfloat16 against float32",
        "",
        f"Command: `python -m service.bench_dtype --repeats {args.repeats}` on "
        f"{args.model.name}; machine: {machine()}; "
        f"date: {today()}. Mean of {args.repeats} runs per cell.",
        "",
        "| dtype | ~360-token prefill, ms | 16 decoded tokens, ms |",
        "|---|---|---|",
    ]
    for dtype, row in rows.items():
        lines.append(f"| {dtype} | {row['prefill']:.0f} | {row['decode16']:.0f} |")
    bf16, fp32 = rows["bfloat16"], rows["float32"]
    lines.append(
        f"| ratio bf16/fp32 | {bf16['prefill'] / fp32['prefill']:.2f} | "
        f"{bf16['decode16'] / fp32['decode16']:.2f} |"
    )
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(args.out, section)


if __name__ == "__main__":
    main()
