"""Pass/fail thresholds of a load test, as plain data: no Locust import here.

The Locust side (`fastresp_locust.py`) reads the measured figures off Locust's own
aggregated stats (`environment.stats.total`) when the run quits, calls `evaluate`, and
sets `environment.process_exit_code = 1` when anything is missed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """The thresholds; None means "not checked"."""

    min_rps: float | None = None
    """Lowest acceptable throughput, requests per second over the whole run."""
    max_p95_ms: float | None = None
    """Highest acceptable 95th percentile of the response time, in ms."""
    max_failure_ratio: float | None = None
    """Highest acceptable share of failed requests, 0..1."""

    def any(self) -> bool:
        """True when at least one threshold is set."""
        return any(v is not None for v in (self.min_rps, self.max_p95_ms, self.max_failure_ratio))


@dataclass(frozen=True, slots=True)
class Measured:
    """What Locust measured over the whole run (its "Aggregated" row)."""

    requests: int
    failures: int
    rps: float
    """Successful requests per second: Locust's `total_rps` (all requests / (last
    request time - start time)) times (1 - failure ratio), so failing fast never
    passes a throughput threshold."""
    p95_ms: float | None
    """Locust's `get_response_time_percentile(0.95)`: client-side, in ms, rounded the
    way Locust stores response times (whole ms under 100 ms, to 10 ms under 1 s, to
    100 ms under 10 s). None when no request was made."""

    @property
    def failure_ratio(self) -> float:
        """failures / requests; 1.0 when no request was made (nothing succeeded)."""
        return self.failures / self.requests if self.requests else 1.0


@dataclass(frozen=True, slots=True)
class Miss:
    """One threshold that was not met."""

    name: str
    """`min_rps`, `max_p95_ms`, `max_failure_ratio`, or `requests` (none were made)."""
    measured: float
    limit: float

    def describe(self) -> str:
        """`threshold missed: max_p95_ms: measured 123.00, limit 100.00`."""
        return f"threshold missed: {self.name}: measured {self.measured:.2f}, limit {self.limit:g}"


def evaluate(measured: Measured, limits: Limits) -> list[Miss]:
    """Every threshold of `limits` that `measured` misses, in a fixed order.

    A run without a single request misses every threshold that is set (its RPS is 0,
    its failure ratio 1, its P95 unknown), reported as one `requests` miss plus the
    RPS and failure-ratio misses.
    """
    misses: list[Miss] = []
    if measured.requests == 0 and limits.any():
        misses.append(Miss("requests", 0.0, 1.0))
    if limits.min_rps is not None and measured.rps < limits.min_rps:
        misses.append(Miss("min_rps", measured.rps, limits.min_rps))
    if limits.max_p95_ms is not None and (
        measured.p95_ms is not None and measured.p95_ms > limits.max_p95_ms
    ):
        misses.append(Miss("max_p95_ms", measured.p95_ms, limits.max_p95_ms))
    if limits.max_failure_ratio is not None and measured.failure_ratio > limits.max_failure_ratio:
        misses.append(Miss("max_failure_ratio", measured.failure_ratio, limits.max_failure_ratio))
    return misses
