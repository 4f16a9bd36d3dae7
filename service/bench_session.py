"""Benchmark: anti-repetition over one session, and the response cache's hit rate
(issue 8, parts 1 and 2). Both on the real model (default: the prepared gemma-3-270m),
through the real gateway app in this process (httpx's ASGI transport, one vLLM engine
shared by every configuration).

1. **repetition**: one session of `--turns` (20) turns, the first Bridge validation
   triples in file order, sent one after another with one `session_id`, with session
   memory on (`FASTRESP_SESSION_MEMORY_TURNS`, 5) and, side by side in the same run, off
   (0). Reported per configuration: answers repeated within the session (normalised text
   seen before), the most common opener's share (first two words,
   `service.text_checks.opener`; target <= 30%), distinct answers, sources and fallback
   reasons, and the gateway's latency P50/P95.
2. **cache**: every Bridge validation triple asked by `--sessions` (5) sessions (round r
   asks all triples, each with the session id `r<r>-<n>`), with the response cache on a
   real Redis (`--redis-url`, or a `redis-server` started on a free port). Reported: the
   hit rate (answers with `source: "cache"`), per round, and the latency P50/P95 of
   cache hits against model answers in the same run.

Run (from the repository root; about 10 min on 2 CPU cores):

    python -m service.bench_session --out docs/benchmarks/session.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.sources import Triple, read_bridge
from service.benchmarks import BRIDGE_VALIDATION, machine, percentile, print_and_write, today
from service.engine import Engine
from service.session_state import normalise
from service.settings import Settings
from service.text_checks import opener


def _body(triple: Triple, personality: str, session: str) -> dict[str, str]:
    body = {
        "personality": personality,
        "pika_turn": triple.pika_turn,
        "user_turn": triple.user_turn,
        "main_response": triple.main_response,
        "session_id": session,
    }
    return {k: v for k, v in body.items() if v is not None}


def _latency(values: list[float]) -> dict[str, float | None]:
    return {
        "p50_ms": round(percentile(values, 50), 1) if values else None,
        "p95_ms": round(percentile(values, 95), 1) if values else None,
    }


@contextlib.contextmanager
def _redis(url: str | None) -> Iterator[str]:
    """`url`, or a throwaway redis-server on a free port (stopped afterwards)."""
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: pass --redis-url or install it")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-session-redis-") as tmp:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.05)
            else:
                raise SystemExit(f"redis-server on port {port} did not start within 10 s")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


async def _ask(client: httpx.AsyncClient, body: dict[str, str]) -> dict[str, Any]:
    response = await client.post("/fast-response", json=body)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def _repetition(
    settings: Settings, engine: Engine, triples: list[Triple], personality: str
) -> dict[str, Any]:
    from service.app import create_app

    app = create_app(settings, engine=engine)
    answers: list[dict[str, Any]] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            for i, triple in enumerate(triples, 1):
                answer = await _ask(client, _body(triple, personality, "bench-session"))
                answers.append(answer)
                print(f"  turn {i:2d} [{answer['source']}] {answer['fast_response']}", flush=True)
    texts = [a["fast_response"] for a in answers]
    seen: set[str] = set()
    repeated = 0
    for text in texts:
        repeated += normalise(text) in seen
        seen.add(normalise(text))
    openers = Counter(opener(t) for t in texts)
    top, top_count = openers.most_common(1)[0]
    return {
        "turns": len(texts),
        "repeated_answers": repeated,
        "distinct_answers": len(seen),
        "top_opener": top,
        "top_opener_share": round(top_count / len(texts), 3),
        "sources": dict(Counter(a["source"] for a in answers)),
        "latency": _latency([a["latency_ms"] for a in answers]),
        "answers": texts,
    }


async def _cache(
    settings: Settings, engine: Engine, triples: list[Triple], personality: str, sessions: int
) -> dict[str, Any]:
    from service.app import create_app

    app = create_app(settings, engine=engine)
    rounds: list[dict[str, Any]] = []
    hit_ms: list[float] = []
    model_ms: list[float] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            for r in range(1, sessions + 1):
                sources: Counter[str] = Counter()
                for n, triple in enumerate(triples):
                    answer = await _ask(client, _body(triple, personality, f"r{r}-{n}"))
                    sources[answer["source"]] += 1
                    if answer["source"] == "cache":
                        hit_ms.append(answer["latency_ms"])
                    elif answer["source"] == "model":
                        model_ms.append(answer["latency_ms"])
                rounds.append({"round": r, "sources": dict(sources)})
                print(f"  round {r}: {dict(sources)}", flush=True)
    total = len(triples) * sessions
    hits = sum(r["sources"].get("cache", 0) for r in rounds)
    return {
        "triples": len(triples),
        "sessions_per_triple": sessions,
        "requests": total,
        "hit_rate": round(hits / total, 3),
        "hit_rate_after_first_round": round(hits / (total - len(triples)), 3),
        "rounds": rounds,
        "cache_hit_latency": _latency(hit_ms),
        "model_latency": _latency(model_ms),
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from service.vllm_engine import VLLMEngine

    base: dict[str, Any] = {"warm_up": True}
    if args.model is not None:
        base["model"] = args.model
    triples = list(read_bridge(args.bridge))
    engine = await VLLMEngine.start(Settings(**base))
    try:
        results: dict[str, Any] = {"repetition": {}}
        for name, turns in (("memory_off", 0), ("memory_on", args.memory_turns)):
            print(f"repetition, {name}: {args.turns} turns of one session", flush=True)
            settings = Settings(**base, session_memory_turns=turns)
            results["repetition"][name] = await _repetition(
                settings, engine, triples[: args.turns], args.personality
            )
        with _redis(args.redis_url) as url:
            print(f"cache: {len(triples)} triples x {args.sessions} sessions ({url})", flush=True)
            settings = Settings(**base, redis_url=url, redis_key_prefix=f"bench{time.time_ns()}")
            results["cache"] = await _cache(
                settings, engine, triples, args.personality, args.sessions
            )
        return results
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.bench_session",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Anti-repetition over one 20-turn session (memory on vs off) and the "
        "response cache's hit rate on Bridge validation asked by 5 sessions, on the real "
        "model through the gateway app.",
    )
    parser.add_argument(
        "--model", type=Path, help="Model directory (default: the prepared gemma-3-270m)."
    )
    parser.add_argument("--bridge", type=Path, default=BRIDGE_VALIDATION, help="Bridge JSON file.")
    parser.add_argument("--personality", default="cheerful", help="Personality to ask.")
    parser.add_argument("--turns", type=int, default=20, help="Turns of the one session.")
    parser.add_argument("--memory-turns", type=int, default=5, help="Answers remembered.")
    parser.add_argument("--sessions", type=int, default=5, help="Sessions asking each triple.")
    parser.add_argument("--redis-url", help="Redis to use (default: start a redis-server).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if not args.bridge.is_file():
        parser.error(f"--bridge: {args.bridge} does not exist")
    results = asyncio.run(_run(args))
    report = {
        "command": "python -m service.bench_session " + " ".join(sys.argv[1:] or argv or []),
        "machine": machine(),
        "date": today(),
        "model": str(args.model or "gemma-3-270m (fastresp model prepare)"),
        "personality": args.personality,
        **results,
    }
    print_and_write(report, args.out)


if __name__ == "__main__":
    main()
