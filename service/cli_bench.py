"""`fastresp bench`: the engine configuration matrix of issue 11 (`service.bench_engine`).

vLLM is imported only when the command runs.
"""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from service.cli_common import fail, load_settings, progress

_SWITCH = {"on": True, "off": False}


def parse_switches(option: str, text: str) -> list[bool]:
    """`on,off` -> [True, False]; `on` -> [True].

    Raises:
        ValueError: empty, or a value other than on/off (the message names `option`).
    """
    values = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not values or any(value not in _SWITCH for value in values):
        raise ValueError(f"{option}: give on, off or on,off; got {text!r}")
    return [_SWITCH[value] for value in dict.fromkeys(values)]


def parse_counts(option: str, text: str) -> list[int]:
    """`1,8,32` -> [1, 8, 32].

    Raises:
        ValueError: empty, or a value that is not a whole number >= 1 (names `option`).
    """
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or not all(value.isdigit() and int(value) >= 1 for value in values):
        raise ValueError(f"{option}: give whole numbers >= 1 separated by commas; got {text!r}")
    return list(dict.fromkeys(int(value) for value in values))


def bench(
    model: Annotated[
        Path | None,
        typer.Option(
            help="Base model directory. Default: the prepared gemma-3-270m "
            "(`fastresp model prepare`). On a GPU, a 4B model folder; the device comes "
            "from the installed vLLM, every other engine setting from FASTRESP_* variables."
        ),
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="Requests in flight at once, comma-separated: the batch-size curve.")
    ] = "1,8,32",
    requests: Annotated[
        int,
        typer.Option(
            min=1,
            help="Measured requests per configuration; a configuration sends at least its "
            "concurrency.",
        ),
    ] = 16,
    max_tokens: Annotated[
        int,
        typer.Option(min=1, max=256, help="Output tokens per request (exactly: EOS is ignored)."),
    ] = 12,
    prefix_caching: Annotated[
        str,
        typer.Option(help="vLLM prefix caching: on, off or on,off (one engine start each)."),
    ] = "on,off",
    streaming: Annotated[
        str,
        typer.Option(
            help="on: stream tokens (TTFT and end-to-end); off: one output at the end "
            "(end-to-end only); or on,off."
        ),
    ] = "on,off",
    lora: Annotated[
        str,
        typer.Option(
            help="Serve through a random LoRA adapter (on), the base model (off), or both."
        ),
    ] = "off,on",
    lora_rank: Annotated[
        int, typer.Option(min=1, help="Rank of the random LoRA (at most FASTRESP_MAX_LORA_RANK).")
    ] = 16,
    personality: Annotated[
        str | None,
        typer.Option(help="Personality whose few-shot prompt is sent. Default: the first."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the JSON result here (the recorded run: "
            "docs/benchmarks/engine_bench.json). Default: none.",
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(
            help="Also put the table, with machine, date and command, into this Markdown "
            "file (e.g. BENCHMARKS.md), replacing its section of the same heading."
        ),
    ] = None,
) -> None:
    """Benchmark the in-process vLLM engine over a configuration matrix.

    Every combination of prefix caching, streaming, concurrency and LoRA runs in one
    process: TTFT and end-to-end P50/P95/P99, output tokens per second, vLLM's
    prefix-cache hit rate, and each configuration's end-to-end P95 over the fastest's.
    Prints the Markdown section (table with machine, date, command and engine settings)
    on stdout, progress and vLLM's logs on stderr; --json and --markdown also write it.
    A benchmark, not a test: nothing passes or fails. Exit codes: 0 done, 1 the engine
    failed (nothing written), 2 bad options.
    """
    import os

    # vLLM logs to stdout by default; keep stdout for the table.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from service.bench_engine import matrix, run_bench, write_json
    from service.benchmarks import write_section
    from service.vllm_engine import knob_hint

    try:
        configs = matrix(
            prefix_caching=parse_switches("--prefix-caching", prefix_caching),
            streaming=parse_switches("--streaming", streaming),
            concurrency=parse_counts("--concurrency", concurrency),
            lora=parse_switches("--lora", lora),
        )
    except ValueError as exc:
        fail(str(exc))
    settings = load_settings(model=model)
    if not (settings.resolved_model() / "config.json").is_file():
        fail(
            f"--model: {settings.resolved_model()} is not a model folder; "
            "run `fastresp model prepare`"
        )
    parts = ["fastresp", "bench"]
    if model is not None:
        parts += ["--model", str(model)]
    parts += ["--concurrency", concurrency, "--requests", str(requests)]
    parts += ["--max-tokens", str(max_tokens), "--prefix-caching", prefix_caching]
    parts += ["--streaming", streaming, "--lora", lora, "--lora-rank", str(lora_rank)]
    if personality is not None:
        parts += ["--personality", personality]
    progress(f"{len(configs)} configurations")
    with tempfile.TemporaryDirectory(prefix="fastresp-bench-") as tmp:
        try:
            report = asyncio.run(
                run_bench(
                    settings,
                    configs,
                    requests=requests,
                    max_tokens=max_tokens,
                    personality=personality,
                    lora_rank=lora_rank,
                    workdir=Path(tmp),
                    command=shlex.join(parts),
                    progress=progress,
                )
            )
        except ValueError as exc:
            fail(f"{exc}{knob_hint(settings)}")
        except (OSError, RuntimeError) as exc:  # weights missing, engine start failed
            fail(
                f"the engine failed on {settings.resolved_model()}{knob_hint(settings)}: "
                f"{type(exc).__name__}: {exc}; nothing was written",
                code=1,
            )
    section = report.markdown_section()
    typer.echo(section)
    if json_out is not None:
        write_json(report, json_out)
        progress(f"wrote {json_out}")
    if markdown is not None:
        write_section(markdown, section)
        progress(f"wrote its section in {markdown}")


if __name__ == "__main__":  # `python -m service.cli_bench`: the same command without the CLI
    typer.run(bench)
