"""Every Prometheus collector of the gateway, in one place.

Names use the `fastresp_` prefix and base units (seconds). Labels are bounded:
personality (from the manifest), source, outcome and reason; never a session,
user or request id. Each `Metrics` owns its registry, so every app (and every
test) starts from zero.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets in seconds, dense between 10 and 250 ms around the 100 ms P95
#: goal, with a tail for the CPU model's 1-3 s answers and the 3 s CPU deadline.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1,
    0.11, 0.125, 0.15, 0.175, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip


class Metrics:
    """The gateway's collectors, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.request_duration = Histogram(
            "fastresp_request_duration_seconds",
            "Time from the start of handling (body parsed) to the response, in seconds.",
            ["personality", "source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine_duration = Histogram(
            "fastresp_engine_duration_seconds",
            "Time spent waiting for the engine's generation, in seconds.",
            ["personality"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "fastresp_requests_total",
            "Fast-response requests answered, by personality, source and outcome.",
            ["personality", "source", "outcome"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "fastresp_fallbacks_total",
            "Fallback phrases served, by reason (deadline, engine_error, guard).",
            ["personality", "reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fastresp_in_flight_requests",
            "Fast-response requests being handled now.",
            registry=self.registry,
        )
        self.adapter_swaps = Counter(
            "fastresp_adapter_swaps_total",
            "Adapter activations (admin API or another replica), by personality and outcome "
            "(ok, or the error class: AdapterRejected, AdapterLoadFailed, RegistryUnavailable).",
            ["personality", "outcome"],
            registry=self.registry,
        )
        self.adapter_swap_duration = Histogram(
            "fastresp_adapter_swap_duration_seconds",
            "Time to validate, load, warm up and switch to a new adapter version, in seconds.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
