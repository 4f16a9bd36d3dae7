"""Every Prometheus collector of the gateway, in one place.

Names use the `fastresp_` prefix and base units (seconds, tokens). Labels are bounded:
personality (a manifest name, or `_unknown`), source, outcome, reason, result, and the
active adapter's folder name and version; never a session, user or request id.

Two modes:

- **Single process** (the default): each `Metrics` owns its registry, so every app
  (and every test) starts from zero, and `/metrics` shows it followed by the default
  registry (the in-process vLLM engine's `vllm:*` collectors).
- **Multi-process** (`fastresp serve --workers N`): the environment variable
  `PROMETHEUS_MULTIPROC_DIR` names a directory, set before any worker starts. That
  variable makes prometheus-client keep every value in per-process files there, and
  `/metrics` then sums the files of all workers (`MultiProcessCollector`), so any
  worker answers with the totals of all of them. One `Metrics` per process.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

#: The environment variable that switches prometheus-client to multi-process mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Latency buckets in seconds, dense between 10 and 250 ms around the 100 ms P95
#: goal, with a tail for the CPU model's 1-3 s answers and the 5 s CPU deadline.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1,
    0.11, 0.125, 0.15, 0.175, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip

#: Output-token buckets: every count up to 6, then coarser up to 64 (a fast response is
#: about 5-15 tokens; personalities cap `max_tokens`, 256 at most in the test manifest).
TOKEN_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)

#: The personality label of a request whose personality is not a manifest name (unknown,
#: missing, or a body that does not parse), so the label stays bounded.
UNKNOWN_PERSONALITY = "_unknown"

#: The source label of a request answered with an error status.
NO_SOURCE = "none"

#: `fastresp_active_adapter_info` labels of a personality served by the base model.
BASE_ADAPTER = "none"
BASE_VERSION = "base"

#: The ratings `POST /feedback` accepts, which are also the buckets of
#: `fastresp_feedback_rating` (one bucket per rating, then +Inf).
RATINGS = (1, 2, 3, 4, 5)

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def multiprocess_dir() -> Path | None:
    """The multi-process directory (`PROMETHEUS_MULTIPROC_DIR`), or None in single-process mode.

    prometheus-client reads the same variable once, when it is first imported, to choose
    how values are stored; set it before that (the CLI does) or not at all.
    """
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir(configured: Path | None) -> Path:
    """A directory for multi-process metrics, empty of values from earlier runs.

    Args:
        configured: a directory to use (created if missing); its `*.db` files, left by an
            earlier run, are deleted, since their counters would otherwise be added to
            this run's totals. Other files are left alone. None: a fresh temporary
            directory (the caller removes it at exit).

    Returns:
        the directory, to be put into `PROMETHEUS_MULTIPROC_DIR` before workers start.

    Raises:
        OSError: the directory cannot be created or a stale file cannot be deleted.
    """
    if configured is None:
        return Path(tempfile.mkdtemp(prefix="fastresp-metrics-"))
    configured.mkdir(parents=True, exist_ok=True)
    for stale in configured.glob("*.db"):
        stale.unlink()
    return configured


def mark_dead_workers(directory: Path) -> list[int]:
    """Drop the live-gauge files (`fastresp_in_flight_requests`,
    `fastresp_active_adapter_info`) of worker processes that no longer exist.

    A worker that exits cleanly drops its own (`Metrics.close`); this catches one that
    crashed, which uvicorn replaces with a new process. Counters and histograms of dead
    workers are kept: they are part of the totals.

    Returns:
        the pids whose files were dropped.
    """
    pids: set[int] = set()
    for path in glob.glob(str(directory / "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
        if match is not None:
            pids.add(int(match.group(1)))
    dropped = sorted(pid for pid in pids if pid != os.getpid() and not _alive(pid))
    for pid in dropped:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def outcome_of(status_code: int) -> str:
    """The `outcome` label for an HTTP status: `ok` (2xx and 3xx), `client_error` (4xx)
    or `server_error` (5xx)."""
    if status_code >= 500:
        return "server_error"
    if status_code >= 400:
        return "client_error"
    return "ok"


def personality_of(body: bytes, known: Collection[str]) -> str:
    """The `personality` label of a request body: its `personality` field if that is a
    name in `known`, else `UNKNOWN_PERSONALITY` (unknown name, missing field, or a body
    that is not a JSON object; deep nesting included)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return UNKNOWN_PERSONALITY
    name = parsed.get("personality") if isinstance(parsed, dict) else None
    return name if isinstance(name, str) and name in known else UNKNOWN_PERSONALITY


class RatingHistogram(Collector):
    """`fastresp_feedback_rating{personality, adapter_version}`: the satisfaction ratings
    of served fast responses, one per rated request (its latest rating), from 1 to 5.

    Not observed as ratings arrive: a rating that replaces an earlier one must move the
    request from one bucket to another, which a prometheus-client `Histogram` cannot.
    The values are the feedback store's counts (`FeedbackStore.rating_counts`), set with
    `update` before each exposition, so in multi-worker mode every worker shows the same
    totals of the shared store. `_count` only grows (new rated requests); `_sum` and the
    buckets may also fall when a rating is replaced by a lower one, so query them as
    gauges (`_sum / _count` is the mean rating), not through `rate()`.

    `adapter_version` is the version of the adapter that answered, or `base` for the
    base model. Labels never hold a request id, a comment or any child text.
    """

    name = "fastresp_feedback_rating"
    documentation = (
        "Satisfaction ratings (1-5) of served fast responses from POST /feedback, by "
        "personality and the adapter version that answered (base: the base model); each "
        "rated request counts once, with its latest rating. Computed from the feedback "
        "store at scrape time: use _sum / _count, not rate()."
    )

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], list[int]] = {}

    def update(self, counts: Mapping[tuple[str, str | None, int], int]) -> None:
        """Replace the values with `counts`: (personality, adapter version or None for
        the base model, rating 1-5) -> number of requests with that rating.

        Raises:
            ValueError: a rating outside 1-5 or a negative count (nothing is changed).
        """
        fresh: dict[tuple[str, str], list[int]] = {}
        for (personality, version, rating), count in counts.items():
            if rating not in RATINGS or count < 0:
                raise ValueError(
                    f"rating counts: rating {rating!r} with count {count!r} "
                    f"(ratings are 1-5, counts >= 0)"
                )
            label = (personality, version if version is not None else BASE_VERSION)
            fresh.setdefault(label, [0] * len(RATINGS))[rating - 1] += count
        self._counts = fresh

    def collect(self) -> Iterable[Metric]:
        """The histogram family: cumulative buckets `le` 1..5 and +Inf, `_sum`, `_count`."""
        family = HistogramMetricFamily(
            self.name, self.documentation, labels=["personality", "adapter_version"]
        )
        for (personality, version), per_rating in sorted(self._counts.items()):
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for rating, count in zip(RATINGS, per_rating, strict=True):
                cumulative += count
                buckets.append((str(float(rating)), cumulative))
            buckets.append(("+Inf", cumulative))
            total = sum(r * c for r, c in zip(RATINGS, per_rating, strict=True))
            family.add_metric([personality, version], buckets, total)
        yield family

    def describe(self) -> Iterable[Metric]:
        """The family without samples, so the registry reserves its names."""
        yield HistogramMetricFamily(
            self.name, self.documentation, labels=["personality", "adapter_version"]
        )


class Metrics:
    """The gateway's collectors, registered on `registry`.

    Build one per app (single process) or per worker process (multi-process mode,
    decided by `PROMETHEUS_MULTIPROC_DIR` when this is built).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir()
        self._active_labels: dict[str, tuple[str, str]] = {}  # personality -> (adapter, version)
        self.request_duration = Histogram(
            "fastresp_request_duration_seconds",
            "Time from the start of handling (body parsed) to a 200 response, in seconds, "
            "by personality, source (model, cache, fallback) and adapter_version (the "
            "version that answered; base: the base model).",
            ["personality", "source", "adapter_version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine_duration = Histogram(
            "fastresp_engine_duration_seconds",
            "Time spent waiting for the engine's generation (all attempts of one request), "
            "in seconds.",
            ["personality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "fastresp_time_to_first_token_seconds",
            "Time from submitting one generation to the engine to its first output token, "
            "in seconds, as the gateway sees it.",
            ["personality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.output_tokens = Histogram(
            "fastresp_output_tokens",
            "Tokens generated by one finished engine generation.",
            ["personality"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        # POST /fast-response/stream (service.streaming): when the child can start hearing
        # the answer, and when the whole answer is known.
        self.stream_first_token = Histogram(
            "fastresp_stream_first_token_seconds",
            "Streamed requests: time from the start of handling (body parsed) to the first "
            "`token` event sent, in seconds; streams that send no token are not observed.",
            ["personality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_done = Histogram(
            "fastresp_stream_done_seconds",
            "Streamed requests: time from the start of handling (body parsed) to the `done` "
            "event, in seconds (model and fallback answers alike).",
            ["personality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "fastresp_requests_total",
            "POST /fast-response and /fast-response/stream requests by personality (a "
            "manifest name or _unknown), "
            "source (model, cache, fallback; none for errors), outcome (ok, "
            "client_error, server_error) and adapter_version (base: the base model; none "
            "for errors).",
            ["personality", "source", "outcome", "adapter_version"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "fastresp_fallbacks_total",
            "Fallback phrases served, by reason (deadline, engine_error, guard, repeat: "
            "every sample repeated the session's last answers; unsafe_input: a neutral "
            "acknowledgement of an unsafe child turn) and "
            "adapter_version (the version whose generation failed; base: the base model).",
            ["personality", "reason", "adapter_version"],
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "fastresp_cache_lookups_total",
            "Response-cache lookups by result (hit: a stored answer was served; miss: "
            "none stored, or all repeat the session's last answers or fail the safety "
            "check; skipped: the turn holds personal details, never cached; error: Redis "
            "failed).",
            ["personality", "result"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "fastresp_redis_errors_total",
            "Failed hot-path Redis calls by operation (session_read, session_write, "
            "cache_read, cache_write); the request went on without Redis.",
            ["operation"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fastresp_in_flight_requests",
            "Fast-response requests being generated now (all workers together).",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        # Admission control (service/admission.py): requests refused before any work.
        self.rejected_requests = Counter(
            "fastresp_rejected_requests_total",
            "Fast-response requests refused at once with 503 by admission control, by "
            "reason (overloaded: over FASTRESP_MAX_IN_FLIGHT; draining: shutting down). "
            "Also counted in fastresp_requests_total as server_error.",
            ["reason"],
            registry=self.registry,
        )
        self.adapter_swaps = Counter(
            "fastresp_adapter_swaps_total",
            "Adapter changes (swaps, canary start, promote and rollback; admin API or another "
            "replica), by personality and outcome (ok, or the error class: AdapterRejected, "
            "AdapterLoadFailed, RegistryUnavailable, CanaryConflict).",
            ["personality", "outcome"],
            registry=self.registry,
        )
        self.adapter_swap_duration = Histogram(
            "fastresp_adapter_swap_duration_seconds",
            "Time to validate, load, warm up and switch to a new adapter version, in seconds.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.active_adapter = Gauge(
            "fastresp_active_adapter_info",
            "1 for the adapter serving each personality now: adapter is the adapter "
            "folder's name and version its version (none and base: the base model).",
            ["personality", "adapter", "version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.canary_weight = Gauge(
            "fastresp_canary_weight_percent",
            "Percent of a personality's sessions served by its canary adapter version "
            "(adapter: folder name, version: its version); absent without a canary.",
            ["personality", "adapter", "version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self._canary_labels: dict[str, tuple[str, str]] = {}  # personality -> (adapter, version)
        self.feedback_ratings = RatingHistogram()
        self.registry.register(self.feedback_ratings)

    def set_active_adapter(self, personality: str, adapter: str, version: str) -> None:
        """Make (`adapter`, `version`) the one `fastresp_active_adapter_info` series of
        `personality`, with value 1; the personality's previous series is removed.

        In multi-process mode prometheus-client cannot remove a series, so the previous
        one is set to 0 instead; select `fastresp_active_adapter_info == 1`.
        """
        previous = self._active_labels.get(personality)
        new = (adapter, version)
        if previous == new:
            return
        if previous is not None:
            if self.multiprocess_dir is None:
                self.active_adapter.remove(personality, *previous)
            else:
                self.active_adapter.labels(personality, *previous).set(0)
        self.active_adapter.labels(personality, *new).set(1)
        self._active_labels[personality] = new

    def set_canary(self, personality: str, canary: tuple[str, str] | None, weight: float) -> None:
        """Set `fastresp_canary_weight_percent` of `personality`: `canary` is (adapter
        folder name, version), None to remove the series (set to 0 in multi-process
        mode, where prometheus-client cannot remove one); `weight` in percent."""
        previous = self._canary_labels.pop(personality, None)
        if previous is not None and previous != canary:
            if self.multiprocess_dir is None:
                self.canary_weight.remove(personality, *previous)
            else:
                self.canary_weight.labels(personality, *previous).set(0)
        if canary is not None:
            self.canary_weight.labels(personality, *canary).set(weight)
            self._canary_labels[personality] = canary

    def exposition(self) -> bytes:
        """The Prometheus text exposition for `/metrics`.

        Single process: this registry, then the default registry (the in-process vLLM
        engine's collectors). Multi-process: the sum over every worker's files (dead
        workers' live gauges dropped first); vLLM runs remotely there and exposes its own.
        Both include `fastresp_feedback_rating` as last set by `feedback_ratings.update`
        (computed from the shared feedback store, so not summed over workers).
        """
        if self.multiprocess_dir is None:
            return _generate_latest(self.registry) + _generate_latest(REGISTRY)
        mark_dead_workers(self.multiprocess_dir)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        registry.register(self.feedback_ratings)
        return _generate_latest(registry)

    def close(self) -> None:
        """At a worker's shutdown (multi-process mode): drop its live gauges from the
        totals (`mark_process_dead`). Nothing to do in single-process mode."""
        if self.multiprocess_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                mark_process_dead(os.getpid(), str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
