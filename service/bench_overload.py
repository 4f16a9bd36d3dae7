"""Benchmark: admission control at 10x the sustainable rate (issue 8, part 4, "Overload").

One real gateway (`fastresp serve`, in-process vLLM engine) with `FASTRESP_MAX_IN_FLIGHT`
= `--cap`, and an open-loop client in this process (httpx; request i is sent at
t0 + i / rate whatever the answers, as real children do):

1. **capacity**: `--cap` clients in a closed loop for `--seconds`: the answers per
   second the gateway completes with the cap full (nothing is refused: never more than
   the cap in flight);
2. **sustainable**: open loop at `--load` x capacity (default 0.8) for `--seconds`;
3. **overload**: open loop at `--factor` x the sustainable rate (default 10) for
   `--seconds`.

Each open-loop phase reports its answers by status, the admitted (200) requests'
latency P50/P95 and the refused (503) ones' P50/P95/max (target: under 10 ms), all
client side, in milliseconds. The gateway, its engine and this client share the
machine's cores, so absolute figures compare only within one run.

Run (from the repository root):

    python -m service.bench_overload --model tiny --seconds 20 --out docs/benchmarks/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.benchmarks import machine, percentile, print_and_write, today

FASTRESP = str(Path(sys.executable).parent / "fastresp")

#: Short answers, so the tiny model's capacity is the gateway's and the engine's, not
#: the length of its noise.
MANIFEST = """version: 1
personalities:
  cheerful:
    description: Bubbly and playful.
    style: Short and upbeat.
    max_words: 12
    sampling: {max_tokens: 8, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}
    fallback_phrases: ["Ooh, let me think!"]
"""
BODY = {
    "personality": "cheerful",
    "pika_turn": "What did you eat for breakfast?",
    "user_turn": "I ate pho with my dad",
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_gateway(
    model: Path, workdir: Path, port: int, cap: int
) -> tuple[subprocess.Popen[bytes], Path]:
    manifest = workdir / "personalities.yaml"
    manifest.write_text(MANIFEST)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "FASTRESP_CPU_KV_CACHE_GIB": "0.5",
        "FASTRESP_ENFORCE_EAGER": "true",
        "FASTRESP_DEADLINE_MS": "10000",
        "FASTRESP_MAX_IN_FLIGHT": str(cap),
        "FASTRESP_CACHE_DIR": str(workdir / "cache"),
        "FASTRESP_ADAPTER_STORE": str(workdir / "no-adapters"),
        "FASTRESP_LOG_LEVEL": "warning",
    }
    command = [FASTRESP, "serve", "--model", str(model), "--port", str(port)]
    command += ["--personalities-file", str(manifest)]
    log = workdir / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, log


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"fastresp serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"fastresp serve not ready in {timeout_s:g} s:\n{log.read_text()[-3000:]}")


async def _one(client: httpx.AsyncClient) -> tuple[int, float]:
    """(status or 0 for a transport error, latency in ms) of one request."""
    start = time.perf_counter()
    try:
        response = await client.post("/fast-response", json=BODY)
        status = response.status_code
    except httpx.TransportError:
        status = 0
    return status, (time.perf_counter() - start) * 1000


async def _capacity(client: httpx.AsyncClient, clients: int, seconds: float) -> float:
    """Answers per second with `clients` closed-loop clients for `seconds`."""
    done = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < end:
            status, _ = await _one(client)
            done += status == 200

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return done / (time.perf_counter() - start)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "max_ms": round(max(values), 2),
    }


async def _open_loop(client: httpx.AsyncClient, rate: float, seconds: float) -> dict[str, Any]:
    """Send `rate` requests per second for `seconds`, on schedule; wait for every answer."""
    total = max(1, round(rate * seconds))
    tasks: list[asyncio.Task[tuple[int, float]]] = []
    start = time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client)))
    sent_s = time.perf_counter() - start
    results = await asyncio.gather(*tasks)
    by_status: dict[str, int] = {}
    for status, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    return {
        "target_rps": round(rate, 2),
        "sent_rps": round(total / sent_s, 2) if sent_s > 0 else None,
        "requests": total,
        "by_status": by_status,
        "admitted": _stats([ms for status, ms in results if status == 200]),
        "rejected": _stats([ms for status, ms in results if status == 503]),
    }


async def _run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for _ in range(10):  # warm-up: prefix cache, first-call costs
            await _one(client)
        print(f"capacity: {args.cap} closed-loop clients, {args.seconds:g} s", flush=True)
        capacity = await _capacity(client, args.cap, args.seconds)
        sustainable = capacity * args.load
        print(f"  {capacity:.1f} answers/s; sustainable {sustainable:.1f} RPS", flush=True)
        phases: dict[str, Any] = {}
        for name, rate in (("sustainable", sustainable), ("overload", sustainable * args.factor)):
            print(f"{name}: {rate:.1f} RPS for {args.seconds:g} s", flush=True)
            phases[name] = await _open_loop(client, rate, args.seconds)
            print(f"  {json.dumps(phases[name])}", flush=True)
        metrics = (await client.get("/metrics")).text
    in_flight_after = next(
        line.split()[-1]
        for line in metrics.splitlines()
        if line.startswith("fastresp_in_flight_requests ")
    )
    return {
        "capacity_rps": round(capacity, 2),
        "sustainable_rps": round(sustainable, 2),
        "phases": phases,
        "in_flight_after": float(in_flight_after),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.bench_overload",
        description="Admission control at 10x the sustainable rate: admitted P95 and "
        "rejected latency against a run at the sustainable rate (real fastresp serve).",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (build the tiny test model in a temp folder) or a model directory.",
    )
    parser.add_argument("--cap", type=int, default=4, help="FASTRESP_MAX_IN_FLIGHT (default 4).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each phase.")
    parser.add_argument(
        "--load", type=float, default=0.8, help="Sustainable rate as a fraction of capacity."
    )
    parser.add_argument(
        "--factor", type=float, default=10.0, help="Overload rate / sustainable rate."
    )
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        workdir = Path(tmp)
        if args.model == "tiny":
            from service.model_prep import build_tiny_model

            model = build_tiny_model(workdir / "tiny", seed=0)
        else:
            model = Path(args.model)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"starting fastresp serve on {model} (cap {args.cap})", flush=True)
        process, log = _start_gateway(model, workdir, port, args.cap)
        try:
            _wait_ready(url, process, log, 420)
            results = asyncio.run(_run(url, args))
        finally:
            process.terminate()
            process.wait(timeout=60)
    report = {
        "command": "python -m service.bench_overload " + " ".join(sys.argv[1:] or argv or []),
        "machine": machine(),
        "date": today(),
        "model": "tiny test model" if args.model == "tiny" else str(args.model),
        "cap": args.cap,
        **results,
    }
    print_and_write(report, args.out)


if __name__ == "__main__":
    main()
