"""Benchmark: time to hot-swap a LoRA adapter, and /fast-response latency during swaps.

One process runs the in-process vLLM engine and the gateway app (called through
httpx's ASGI transport, so no network is measured). A personality served by a LoRA
adapter gets `--clients` concurrent clients. Phases alternate, `--rounds` times:
`--phase-s` seconds with no swaps, then `--phase-s` seconds with a swap (PUT
/admin/personalities/bench/adapter, between two adapter versions) every
`--swap-every-s` seconds. The ratio of the two P95s is what to read: absolute times
on a shared machine are noisy.

The two versions are the test suite's signature adapters (`tests/signature_adapters.py`,
rank 8, trained on the tiny test model in about 15 s each, cached under
`<cache_dir>/bench-adapters`): each answers its own string, so every answer is a model
answer the guard accepts and no fallback distorts the latencies. The model is the tiny
test model, built in a temp folder. Needs the `dev` extra; run from the repository root.

Run:  python -m service.bench_swap [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.benchmarks import machine, percentile, today, write_section

MANIFEST = """personalities:
  bench:
    description: Benchmark personality.
    style: Short.
    max_words: 40
    sampling: {max_tokens: 12, temperature: 0.0, top_p: 1.0, stop: []}
    fallback_phrases: [Hm.]
"""
TURN = {"personality": "bench", "pika_turn": "What did you eat?", "user_turn": "I ate pho!"}


@dataclass
class Phase:
    """Request latencies (s) of one kind of phase, and what went wrong."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0


async def _load(client: httpx.AsyncClient, clients: int, seconds: float, phase: Phase) -> None:
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await client.post("/fast-response", json=TURN)
            phase.latencies.append(time.perf_counter() - started)
            if response.status_code != 200 or response.json()["source"] != "model":
                phase.failures += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))


async def _swapper(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    adapters: list[Path],
    seconds: float,
    every_s: float,
    swap_times: list[float],
    counter: list[int],
) -> None:
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() + every_s < stop_at:
        await asyncio.sleep(every_s)
        counter[0] += 1
        body = {"path": str(adapters[counter[0] % 2]), "version": f"v{counter[0]}"}
        started = time.perf_counter()
        response = await client.put(
            "/admin/personalities/bench/adapter", json=body, headers=headers
        )
        swap_times.append(time.perf_counter() - started)
        response.raise_for_status()


async def run(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    """Measure; returns the figures (seconds)."""
    from service.app import create_app
    from service.settings import Settings
    from service.vllm_engine import VLLMEngine
    from tests.signature_adapters import signature_adapter_set

    print("training (or reusing) the two signature adapters", flush=True)
    trained = signature_adapter_set(
        model,
        Settings().cache_dir / "bench-adapters",
        {"alpha": "alpha alpha", "beta": "beta beta"},
    )
    adapters = list(trained.values())
    manifest = workdir / "personalities.yaml"
    manifest.write_text(MANIFEST)
    token = secrets.token_urlsafe(16)
    settings = Settings(
        model=model,
        personalities_file=manifest,
        admin_token=token,
        deadline_ms=30_000,
        cpu_kv_cache_gib=0.5,
        enforce_eager=True,
    )
    headers = {"Authorization": f"Bearer {token}"}
    engine = await VLLMEngine.start(settings)
    phases = {"no_swaps": Phase(), "swaps": Phase()}
    swap_times: list[float] = []
    counter = [0]
    try:
        app = create_app(settings, engine=engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                first = {"path": str(adapters[0]), "version": "v0"}
                put = "/admin/personalities/bench/adapter"
                (await client.put(put, json=first, headers=headers)).raise_for_status()
                await _load(client, args.clients, 2.0, Phase())  # warm-up, not counted
                for round_ in range(args.rounds):
                    print(f"round {round_ + 1}/{args.rounds}: no swaps", flush=True)
                    await _load(client, args.clients, args.phase_s, phases["no_swaps"])
                    print(f"round {round_ + 1}/{args.rounds}: swaps", flush=True)
                    await asyncio.gather(
                        _load(client, args.clients, args.phase_s, phases["swaps"]),
                        _swapper(
                            client,
                            headers,
                            adapters,
                            args.phase_s,
                            args.swap_every_s,
                            swap_times,
                            counter,
                        ),
                    )
    finally:
        await engine.close()
    return {"phases": phases, "swap_times": swap_times}


def main() -> None:
    """Measure, print a table and replace its section in `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="no-swap/swap phase pairs")
    parser.add_argument("--swap-every-s", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        workdir = Path(tmp)
        from service.model_prep import build_tiny_model

        model = build_tiny_model(workdir / "tiny", seed=0)
        result = asyncio.run(run(args, model, workdir))
    phases: dict[str, Phase] = result["phases"]
    swaps: list[float] = result["swap_times"]
    quiet, busy = phases["no_swaps"], phases["swaps"]
    p95_quiet, p95_busy = percentile(quiet.latencies, 95), percentile(busy.latencies, 95)
    command = (
        f"python -m service.bench_swap --clients {args.clients} --phase-s {args.phase_s:g} "
        f"--rounds {args.rounds} --swap-every-s {args.swap_every_s:g}"
    )
    lines = [
        "## Adapter hot swap",
        "",
        f"Command: `{command}` on the tiny test model, "
        f"in-process vLLM engine, gateway through httpx's ASGI transport; machine: "
        f"{machine()}; date: {today()}. Rank-8 signature adapters; {args.clients} clients; "
        f"{args.rounds} rounds of {args.phase_s:g} s without swaps then {args.phase_s:g} s "
        f"with a swap every {args.swap_every_s:g} s.",
        "",
        "| Hot swap (PUT: validate, load, warm up, switch) | swaps | P50 ms | max ms |",
        "|---|---|---|---|",
        f"| time to swap | {len(swaps)} | {percentile(swaps, 50) * 1e3:.0f} "
        f"| {max(swaps) * 1e3:.0f} |",
        "",
        "| /fast-response | requests | failed | P50 ms | P95 ms |",
        "|---|---|---|---|---|",
    ]
    for name, phase in (("without swaps", quiet), ("during swaps", busy)):
        lines.append(
            f"| {name} | {len(phase.latencies)} | {phase.failures} "
            f"| {percentile(phase.latencies, 50) * 1e3:.0f} "
            f"| {percentile(phase.latencies, 95) * 1e3:.0f} |"
        )
    lines += ["", f"P95 ratio, during swaps / without: **{p95_busy / p95_quiet:.2f}**."]
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(args.out, section)


if __name__ == "__main__":
    main()
