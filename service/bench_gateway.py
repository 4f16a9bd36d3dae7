"""Benchmark: the gateway's latency overhead under load, against the same vLLM engine.

One vLLM OpenAI server (`fastresp engine serve`, its worker bound to core 0) and one
gateway (`fastresp serve` in remote-engine mode, pointed at that server). Locust
(`loadtest/`, as its own process, constant throughput: `--user-rps` per user) then
drives, one after the other in the same run, each for `--seconds`:

- **direct**: `loadtest/direct_locustfile.py`, `POST /v1/completions` on the engine
  with the very body the gateway sends upstream (same few-shot prompt from
  `service.prompts`, same sampling, same `model`: the gateway's identity adapter on the
  CPU);
- **gateway**: `loadtest/locustfile.py`, `POST /fast-response` on the gateway.

Both replay the same Bridge validation turns with the same personalities. Figures are
Locust's (client side): achieved RPS, P50/P95/P99, failures; the number to read is the
ratio gateway P95 / direct P95 (target: at most 1.15, no failures). The gateway may call
the engine twice for one request (one resample when its guard rejects the text), so the
engine's own request counter (`vllm:request_success_total`) is read around each phase
and reported as engine calls per request.

`--model tiny` builds the tiny test model in a temp folder; `--model gemma` uses the
prepared gemma-3-270m. `--rps` may be given several times: each rate is run in turn,
and with `--find-max` the ladder stops at the first rate the gateway does not sustain
(achieved RPS under 95% of the target, or any failure); the direct path then runs at
the highest sustained rate (the first rate when none was sustained). Locust, the
gateway and the engine share this machine's cores: absolute figures are for comparison
within one run only.

Run (from the repository root, with the `dev` extra):

    python -m service.bench_gateway --model tiny --rps 50 --seconds 60
    python -m service.bench_gateway --model gemma --rps 1 --rps 2 --rps 3 --rps 4 --find-max
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import yaml

from service.benchmarks import machine, today, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
FASTRESP = str(Path(sys.executable).parent / "fastresp")
GATEWAY_LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
DIRECT_LOCUSTFILE = REPO_ROOT / "loadtest" / "direct_locustfile.py"

#: Personalities of the benchmark (cheerful, calm); greedy, so both paths do the same
#: work for the same turn. See `write_manifest`.
PERSONALITIES: dict[str, dict[str, Any]] = {
    "cheerful": {
        "description": "Bubbly and playful.",
        "style": "Short and upbeat.",
        "fallback_phrases": ["Ooh, let me think!"],
        "few_shot": [
            {
                "pika_turn": "What is your favourite colour?",
                "user_turn": "Red!",
                "fast_response": "Ooh, red like a fire truck!",
            }
        ],
    },
    "calm": {
        "description": "Quiet and gentle.",
        "style": "Short and soft.",
        "fallback_phrases": ["Mm, I hear you."],
        "few_shot": [
            {
                "pika_turn": "What did you eat today?",
                "user_turn": "Pho with my dad.",
                "fast_response": "Mm, pho with your dad sounds lovely.",
            }
        ],
    },
}


def write_manifest(path: Path, max_tokens: int, adapters: dict[str, Path] | None) -> None:
    """The benchmark's personalities manifest.

    With `adapters` (the tiny model): each personality is served through its signature
    adapter (`tests/signature_adapters.py`: the tiny model then answers "alpha alpha" or
    "beta beta", which the guard accepts, where its base output is punctuation the guard
    rejects: the gateway would resample and fall back, doing twice the engine work of the
    direct path). Without (gemma-3-270m): the base model with the few-shot prompt, one
    line (stop on newline).
    """
    stop: list[str] = [] if adapters else ["\n"]
    manifest: dict[str, Any] = {"version": 1, "personalities": {}}
    for name, fields in PERSONALITIES.items():
        entry = {
            **fields,
            "max_words": 40,
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stop": stop},
        }
        if adapters:
            entry["adapter"] = str(adapters[name])
        manifest["personalities"][name] = entry
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def write_bodies(path: Path, model: Path, manifest: Path, engine_url: str, data: Path) -> int:
    """The direct path's `/v1/completions` bodies, one per (turn, personality), built with
    the gateway's code: the prompt `FastResponseService.prompt_for` builds (chat template
    with an adapter, few-shot without), the personality's sampling, and the `model` the
    gateway's RemoteEngine sends (its adapter's name on the engine, or the identity
    adapter's); returns how many were written.
    """
    from transformers import AutoTokenizer

    from adapters.sources import load_triples
    from service.personalities import load_personalities
    from service.prompts import ChatTokenizer, PromptMode, Turn, build_prompt
    from service.schemas import FastResponseRequest

    personalities = load_personalities(manifest)
    tokenizer = cast("ChatTokenizer", AutoTokenizer.from_pretrained(str(model)))
    served = [m for m in httpx.get(f"{engine_url}/v1/models", timeout=10).json()["data"]]
    adapters = [str(m["id"]) for m in served if m.get("parent")]
    identity = [a for a in adapters if a.startswith("fastresp-base-identity")]
    base = identity[0] if identity else str(next(m["id"] for m in served if not m.get("parent")))
    count = 0
    with path.open("w") as out:
        for triple in load_triples("bridge", data):
            fields = {"pika_turn": triple.pika_turn, "user_turn": triple.user_turn}
            fields["main_response"] = triple.main_response
            try:  # the load test skips the same turns (loadtest/fastresp_locust.py)
                FastResponseRequest.model_validate({"personality": "x", **fields})
            except ValueError:
                continue
            turn = Turn(triple.pika_turn, triple.user_turn, triple.main_response)
            for name, personality in personalities.items():
                own = [a for a in adapters if a.startswith(f"{name}-")]
                if personality.adapter is not None and not own:
                    raise SystemExit(f"no adapter of {name!r} on the engine: {adapters}")
                mode: PromptMode = "chat" if personality.adapter is not None else "few_shot"
                sampling = personality.sampling
                body = {
                    "model": own[0] if personality.adapter is not None else base,
                    "prompt": build_prompt(personality, turn, mode, tokenizer),
                    "max_tokens": sampling.max_tokens,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "stop": list(sampling.stop),
                }
                out.write(json.dumps({"name": name, "body": body}) + "\n")
                count += 1
    return count


@dataclass
class Phase:
    """One Locust run: what it aimed at and what Locust measured."""

    path: str
    target_rps: float
    users: int
    verdict: dict[str, Any]
    engine_calls: float
    sources: dict[str, int] = field(default_factory=dict)
    locust_cpu_warning: bool = False
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per request of the gateway process and of the vLLM API server
    process (not its engine core) during this phase."""

    @property
    def total(self) -> dict[str, Any]:
        total: dict[str, Any] = self.verdict["total"]
        return total

    @property
    def rps(self) -> float:
        return float(self.total["rps"])

    @property
    def failures(self) -> int:
        return int(self.total["failures"])

    @property
    def requests(self) -> int:
        return int(self.total["requests"])

    def ms(self, key: str) -> float:
        value = self.total[key]
        return float(value) if value is not None else float("nan")

    def sustained(self) -> bool:
        """Achieved at least 95% of the target rate, with no failed request."""
        return self.requests > 0 and self.failures == 0 and self.rps >= 0.95 * self.target_rps


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{url}: process exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready in {timeout_s:g} s (log: {log})")
        time.sleep(0.5)


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc; 0.0 when unknown).
    Fields 14 and 15 of /proc/PID/stat, in clock ticks."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _engine_requests(engine_url: str) -> float:
    """vLLM's finished-request counter, summed over its labels."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    pattern = re.compile(r"^vllm:request_success_total\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


def _locust(
    locustfile: Path,
    host: str,
    users: int,
    user_rps: float,
    seconds: float,
    out: Path,
    extra: list[str],
) -> tuple[dict[str, Any], bool]:
    """One headless Locust run; returns (verdict.json, whether Locust warned about its
    own CPU use)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless"]
    argv += ["--host", host, "--users", str(users), "--spawn-rate", str(users)]
    argv += ["--run-time", f"{int(seconds)}s", "--stop-timeout", "30", "--only-summary"]
    argv += ["--csv", str(out / "locust"), "--html", str(out / "report.html")]
    argv += ["--verdict-json", str(out / "verdict.json"), "--latency-log", str(out / "latency.csv")]
    argv += ["--user-rps", f"{user_rps:g}", "--exit-code-on-error", "0", *extra]
    log = out / "locust.log"
    with log.open("w") as sink:
        subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, check=False, cwd=REPO_ROOT)
    verdict_file = out / "verdict.json"
    if not verdict_file.is_file():
        raise SystemExit(f"Locust wrote no verdict: {log}")
    verdict: dict[str, Any] = json.loads(verdict_file.read_text())
    return verdict, "CPU usage above" in log.read_text()


def _sources(latency_csv: Path) -> dict[str, int]:
    import csv

    counts: dict[str, int] = {}
    with latency_csv.open() as f:
        for row in csv.DictReader(f):
            key = row["source"] or f"http {row['status']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def run_phase(
    path: str,
    rps: float,
    args: argparse.Namespace,
    urls: dict[str, str],
    workdir: Path,
    bodies: Path,
    pids: dict[str, int | None],
) -> Phase:
    """Drive one path at `rps` for `args.seconds`; `pids` are the processes whose CPU
    time per request is recorded (gateway, vLLM API server)."""
    users = max(1, round(rps * args.user_period_s))
    user_rps = rps / users
    out = workdir / f"{path}-{rps:g}rps-{time.monotonic_ns()}"
    common = ["--data", str(args.data)]
    before = _engine_requests(urls["engine"])
    cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
    if path == "gateway":
        verdict, cpu = _locust(
            GATEWAY_LOCUSTFILE, urls["gateway"], users, user_rps, args.seconds, out, common
        )
    else:
        extra = ["--bodies", str(bodies)]
        verdict, cpu = _locust(
            DIRECT_LOCUSTFILE, urls["engine"], users, user_rps, args.seconds, out, extra
        )
    calls = _engine_requests(urls["engine"]) - before
    requests = int(verdict["total"]["requests"]) or 1
    cpu_ms = {
        name: 1000 * (_cpu_s(pid) - cpu_before[name]) / requests for name, pid in pids.items()
    }
    phase = Phase(
        path, rps, users, verdict, calls / requests, _sources(out / "latency.csv"), cpu, cpu_ms
    )
    p95 = phase.ms("p95_ms")
    print(
        f"{path:8s} target {rps:g} RPS ({users} users): {phase.rps:.1f} RPS, P95 {p95:.0f} ms, "
        f"{phase.failures} failed of {phase.requests}, engine calls/request "
        f"{phase.engine_calls:.2f}, sources {phase.sources}, CPU ms/request "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in cpu_ms.items()),
        flush=True,
    )
    return phase


def measure(
    args: argparse.Namespace, model: Path, workdir: Path, adapters: dict[str, Path] | None
) -> list[Phase]:
    """Start the engine and the gateway, run the phases, stop both."""
    manifest = workdir / "personalities.yaml"
    write_manifest(manifest, args.max_tokens, adapters)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    engine_port, gateway_port = free_port(), free_port()
    urls = {
        "engine": f"http://127.0.0.1:{engine_port}",
        "gateway": f"http://127.0.0.1:{gateway_port}",
    }
    engine_cmd = [FASTRESP, "engine", "serve", "--model", str(model), "--port", str(engine_port)]
    engine_cmd += ["--cpu-kv-cache-gib", "0.5", "--max-model-len", "2048", "--enforce-eager"]
    engine_cmd += ["--max-num-seqs", str(args.max_num_seqs), "--", "--disable-uvicorn-access-log"]
    engine_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": args.engine_cores}
    gateway_env = {
        **env,
        "FASTRESP_ENGINE_URLS": urls["engine"],
        "FASTRESP_ENGINE_DEVICE": "cpu",
        "FASTRESP_DEADLINE_MS": str(args.deadline_ms),
        "FASTRESP_CACHE_DIR": str(workdir / "cache"),
        "FASTRESP_LOG_LEVEL": "warning",
    }
    gateway_cmd = [FASTRESP, "serve", "--model", str(model), "--port", str(gateway_port)]
    gateway_cmd += ["--personalities-file", str(manifest)]
    print(f"engine: {' '.join(engine_cmd)}", flush=True)
    engine = _start(engine_cmd, workdir / "engine.log", engine_env)
    gateway: subprocess.Popen[bytes] | None = None
    phases: list[Phase] = []
    try:
        _wait_http(f"{urls['engine']}/health", engine, workdir / "engine.log", 600)
        gateway = _start(gateway_cmd, workdir / "gateway.log", gateway_env)
        _wait_http(f"{urls['gateway']}/readyz", gateway, workdir / "gateway.log", 600)
        pids: dict[str, int | None] = {"gateway": gateway.pid, "vllm api server": engine.pid}
        bodies = workdir / "bodies.jsonl"
        count = write_bodies(bodies, model, manifest, urls["engine"], args.data)
        print(f"direct path: {count} request bodies in {bodies}", flush=True)
        first = args.rps[0]
        print(f"warm-up: {args.warmup_s:g} s per path at {first:g} RPS (not recorded)", flush=True)
        warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup_s})
        for path in ("direct", "gateway"):
            run_phase(path, first, warm, urls, workdir, bodies, pids)
        best: float | None = None
        for rps in args.rps:
            for _ in range(args.rounds):
                for path in ("direct", "gateway") if not args.find_max else ("gateway",):
                    phases.append(run_phase(path, rps, args, urls, workdir, bodies, pids))
            if args.find_max:
                if not phases[-1].sustained():
                    break
                best = rps
        if args.find_max:  # the direct path at the highest sustained rate, else the lowest
            compare = best if best is not None else args.rps[0]
            for _ in range(args.rounds):
                phases.append(run_phase("direct", compare, args, urls, workdir, bodies, pids))
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(engine)
    return phases


def _row(phase: Phase) -> str:
    sources = ", ".join(f"{k} {v}" for k, v in sorted(phase.sources.items()))
    return (
        f"| {phase.path} | {phase.target_rps:g} | {phase.users} | {phase.rps:.1f} "
        f"| {phase.ms('p50_ms'):.0f} | {phase.ms('p95_ms'):.0f} | {phase.ms('p99_ms'):.0f} "
        f"| {phase.failures} / {phase.requests} | {phase.engine_calls:.2f} "
        f"| {sources if phase.path == 'gateway' else '-'} "
        f"| {phase.cpu_ms.get('gateway', float('nan')):.1f} "
        f"| {phase.cpu_ms.get('vllm api server', float('nan')):.1f} |"
    )


def render(args: argparse.Namespace, phases: list[Phase], command: str) -> str:
    """The BENCHMARKS.md section for this run."""
    model = "the tiny test model" if args.model == "tiny" else "gemma-3-270m"
    lines = [
        f"## Gateway overhead under load: {model}",
        "",
        f"Command: `{command}`; machine: {machine()}; date: {today()}. One vLLM OpenAI "
        f"server (`fastresp engine serve`, worker on core(s) {args.engine_cores}, "
        f"max_num_seqs {args.max_num_seqs}) and one gateway in remote-engine mode pointed "
        "at it; Locust (FastHttpUser, `constant_throughput`) on the same machine, "
        f"{args.seconds:g} s per row after a {args.warmup_s:g} s warm-up per path. direct: "
        "`POST /v1/completions` with the body the gateway sends upstream (same prompt: "
        "chat template with the personality's adapter, few-shot without; "
        f"max_tokens {args.max_tokens}, greedy, same model name); gateway: "
        f"`POST /fast-response` (deadline {args.deadline_ms} ms). Same Bridge validation "
        "turns, personalities cheerful and calm. Times are Locust's, client side, in ms. "
        "CPU ms per request: user + system CPU time of the gateway process and of the vLLM "
        "API server process (/proc/PID/stat; not the engine core) over the row, divided by "
        "its requests.",
        "",
        "| path | target RPS | users | achieved RPS | P50 | P95 | P99 | failed / requests "
        "| engine calls per request | gateway sources | gateway CPU ms per request "
        "| vLLM API server CPU ms per request |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(phase) for phase in phases),
        "",
    ]
    for rps in sorted({p.target_rps for p in phases}):
        direct = [p for p in phases if p.path == "direct" and p.target_rps == rps]
        gateway = [p for p in phases if p.path == "gateway" and p.target_rps == rps]
        if direct and gateway:
            ratio = gateway[-1].ms("p95_ms") / direct[-1].ms("p95_ms")
            failures = sum(p.failures for p in (*direct, *gateway))
            verdict = "met" if ratio <= 1.15 and failures == 0 else "missed"
            lines.append(
                f"At {rps:g} RPS: P95 ratio gateway / direct **{ratio:.2f}** "
                f"(target at most 1.15 with no failures: {verdict})."
            )
    if args.find_max:
        sustained = [p.target_rps for p in phases if p.path == "gateway" and p.sustained()]
        best = f"{max(sustained):g} RPS" if sustained else "none of the rates tried"
        lines.append(
            f"Highest rate sustained through the gateway (achieved at least 95% of the "
            f"target, no failure; each user paced at one request every "
            f"{args.user_period_s:g} s): **{best}**."
        )
    if any(p.locust_cpu_warning for p in phases):
        lines.append("Locust warned that its own CPU use went above 90% in some rows.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure, print the table and replace its section in `--out`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    parser.add_argument("--rps", type=float, action="append", help="target RPS (repeatable)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per measured row")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="warm-up seconds per path")
    parser.add_argument("--rounds", type=int, default=1, help="direct/gateway pairs per rate")
    parser.add_argument(
        "--user-period-s",
        type=float,
        default=1.0,
        help="seconds between one user's requests: users = RPS x this",
    )
    parser.add_argument("--find-max", action="store_true", help="stop at the first unsustained")
    parser.add_argument("--max-tokens", type=int, default=12, help="output tokens at most")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vLLM batch size")
    parser.add_argument("--deadline-ms", type=int, default=30_000, help="gateway deadline")
    parser.add_argument("--engine-cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "bridge" / "validation.json",
    )
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--keep", type=Path, default=None, help="keep Locust reports here")
    args = parser.parse_args()
    args.rps = args.rps or [50.0]
    command = "python -m service.bench_gateway " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.model == "tiny":
            from service.model_prep import build_tiny_model
            from service.settings import Settings
            from tests.signature_adapters import signature_adapter_set

            model = build_tiny_model(workdir / "tiny", seed=0)
            print("training (or reusing) the signature adapters", flush=True)
            trained = signature_adapter_set(
                model,
                Settings().cache_dir / "bench-adapters",
                {"alpha": "alpha alpha", "beta": "beta beta"},
            )
            adapters: dict[str, Path] | None = dict(
                zip(PERSONALITIES, trained.values(), strict=True)
            )
        else:
            from service.settings import Settings

            model = Settings().default_model_dir()
            adapters = None
        phases = measure(args, model, workdir, adapters)
    section = render(args, phases, command)
    print(section)
    write_section(args.out, section)


if __name__ == "__main__":
    main()
