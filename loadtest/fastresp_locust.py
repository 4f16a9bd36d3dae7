"""What the project's locustfiles share: options, the replayed turns, pacing, thresholds.

Imported by `locustfile.py` (the gateway) and `direct_locustfile.py` (the benchmark's
direct vLLM path) while Locust loads them (Locust puts this folder on `sys.path`), so
it runs inside the Locust process only: gevent monkey-patches that process, so neither
the gateway nor pytest ever imports this module.

Options added to Locust's own (each also an environment variable):

- `--data` (`FASTRESP_LOADTEST_DATA`): the Bridge JSON file whose triples are replayed;
  default `../shared/data/bridge/validation.json` beside the checkout.
- `--personalities` (`FASTRESP_LOADTEST_PERSONALITIES`): comma-separated names; empty:
  every personality the gateway lists at `GET /personalities` when the test starts.
- `--user-rps` (`FASTRESP_LOADTEST_USER_RPS`): requests per second per user, kept
  with Locust's `constant_throughput`; 0: no wait (each user sends its next request
  when the last one is answered).
- `--turns-per-session`: each user is one child in a lesson; after this many turns it
  starts a new session id.
- Thresholds: `--min-rps` (successful requests per second), `--max-p95-ms` (Locust's
  client-side P95 over every request), `--max-failure-ratio`. When the run quits,
  each set threshold is checked against Locust's aggregated stats; a miss is printed
  (name, measured, limit) and sets `environment.process_exit_code = 1`; with
  `--verdict-json PATH` the figures and misses are also written there as JSON.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.user.wait_time import constant_throughput
from pydantic import ValidationError
from thresholds import Limits, Measured, evaluate

from adapters.sources import load_triples
from service.schemas import FastResponseRequest

logger = logging.getLogger("fastresp.loadtest")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "bridge" / "validation.json"


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("fastresp", "Pika fast-response load test")
    group.add_argument(
        "--data",
        type=str,
        default=str(DEFAULT_DATA),
        env_var="FASTRESP_LOADTEST_DATA",
        help="Bridge JSON file of conversations to replay (default: %(default)s)",
    )
    group.add_argument(
        "--personalities",
        type=str,
        default="",
        env_var="FASTRESP_LOADTEST_PERSONALITIES",
        help="Comma-separated personalities; empty: all from GET /personalities",
    )
    group.add_argument(
        "--user-rps",
        type=float,
        default=0.0,
        env_var="FASTRESP_LOADTEST_USER_RPS",
        help="Requests per second per user (Locust constant_throughput); 0: no wait",
    )
    group.add_argument(
        "--turns-per-session",
        type=int,
        default=10,
        env_var="FASTRESP_LOADTEST_TURNS_PER_SESSION",
        help="Turns before a user starts a new session id",
    )
    group.add_argument(
        "--min-rps",
        type=float,
        default=None,
        env_var="FASTRESP_LOADTEST_MIN_RPS",
        help="Threshold: lowest acceptable requests per second over the run",
    )
    group.add_argument(
        "--max-p95-ms",
        type=float,
        default=None,
        env_var="FASTRESP_LOADTEST_MAX_P95_MS",
        help="Threshold: highest acceptable P95 response time, ms",
    )
    group.add_argument(
        "--max-failure-ratio",
        type=float,
        default=None,
        env_var="FASTRESP_LOADTEST_MAX_FAILURE_RATIO",
        help="Threshold: highest acceptable share of failed requests, 0..1",
    )
    group.add_argument(
        "--latency-log",
        type=str,
        default="",
        help="Write one CSV row per request (name, status, source, client_ms, server_ms) "
        "to this file when the run ends",
    )
    group.add_argument(
        "--verdict-json",
        type=str,
        default="",
        help="Also write the measured figures and missed thresholds to this JSON file",
    )


def limits_from(options: Any) -> Limits:
    """The thresholds given on Locust's command line."""
    return Limits(
        min_rps=options.min_rps,
        max_p95_ms=options.max_p95_ms,
        max_failure_ratio=options.max_failure_ratio,
    )


def load_turns(path: Path) -> list[dict[str, str]]:
    """The Bridge triples of `path` as request fields (pika_turn, user_turn,
    main_response; None omitted), keeping only those the API accepts.

    Raises:
        SystemExit: the file has no usable triple (the run cannot start).
    """
    turns: list[dict[str, str]] = []
    refused = 0
    for triple in load_triples("bridge", path):
        fields = {
            "pika_turn": triple.pika_turn,
            "user_turn": triple.user_turn,
            "main_response": triple.main_response,
        }
        fields = {key: value for key, value in fields.items() if value is not None}
        try:  # the wire schema itself decides, so no body is refused with 422 by design
            FastResponseRequest.model_validate({"personality": "x", **fields})
        except ValidationError:
            refused += 1
            continue
        turns.append(fields)
    if not turns:
        sys.exit(f"load test: no usable triples in {path}")
    logger.info("load test: %d turns from %s (%d over the API limits)", len(turns), path, refused)
    return turns


def split_names(text: str) -> list[str]:
    """`a, b,,c` -> ["a", "b", "c"]."""
    return [name.strip() for name in text.split(",") if name.strip()]


class Pacer:
    """Per-user wait time: Locust's `constant_throughput(rps)`, or none for rps <= 0."""

    def __init__(self, rps: float) -> None:
        self._wait: Callable[[Any], float] | None = constant_throughput(rps) if rps > 0 else None

    def __call__(self, user: Any) -> float:
        return self._wait(user) if self._wait is not None else 0.0


class Conversation:
    """One simulated child: a session id, turns taken in a random order, and the
    personality to talk to chosen at random per turn."""

    def __init__(
        self, turns: list[dict[str, str]], personalities: list[str], turns_per_session: int
    ) -> None:
        self._turns = turns
        self._personalities = personalities
        self._per_session = max(1, turns_per_session)
        self._rng = random.Random()
        self._index = self._rng.randrange(len(turns))
        self._count = 0
        self._session = ""

    def next_fields(self) -> tuple[str, dict[str, str]]:
        """(personality, fields): the next turn with its session id."""
        if self._count % self._per_session == 0:
            self._session = f"load-{uuid.uuid4().hex[:16]}"
        self._count += 1
        self._index = (self._index + 1) % len(self._turns)
        personality = self._rng.choice(self._personalities)
        return personality, {**self._turns[self._index], "session_id": self._session}


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as both sides timed it."""

    name: str
    status: int
    source: str
    """The gateway's `source` (model, cache, fallback); empty when not a gateway answer."""
    client_ms: float
    """Locust's response time: request sent to response body read, in ms (unrounded)."""
    server_ms: float | None
    """The gateway's own `latency_ms` from the response body; None when absent."""


class LatencyLog:
    """Every request's timings, kept in memory and written as CSV when the run quits."""

    FIELDS = ("name", "status", "source", "client_ms", "server_ms")

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def write(self, path: Path) -> None:
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(self.FIELDS)
            for s in self.samples:
                server = "" if s.server_ms is None else f"{s.server_ms:.3f}"
                writer.writerow([s.name, s.status, s.source, f"{s.client_ms:.3f}", server])


LATENCIES = LatencyLog()
"""This Locust process's request timings (`--latency-log`)."""


def describe_response_error(status: int, text: str | None) -> str:
    """A short failure message for Locust's error table (status and body head)."""
    head = (text or "").strip().replace("\n", " ")[:160]
    return f"HTTP {status}: {head}" if status else f"no response: {head}"


def entry_figures(entry: Any) -> dict[str, float | int | None]:
    """Requests, failures, RPS and P50/P95/P99 (ms, Locust-rounded) of a StatsEntry."""
    done = entry.num_requests > 0
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": entry.total_rps,
        "p50_ms": entry.get_response_time_percentile(0.50) if done else None,
        "p95_ms": entry.get_response_time_percentile(0.95) if done else None,
        "p99_ms": entry.get_response_time_percentile(0.99) if done else None,
        "avg_ms": entry.avg_response_time if done else None,
    }


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    """Check the thresholds on Locust's aggregated stats; a miss sets exit code 1."""
    options = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner) or options is None:
        return
    total = environment.stats.total
    measured = Measured(
        requests=total.num_requests,
        failures=total.num_failures,
        rps=total.total_rps * (1.0 - total.fail_ratio),
        p95_ms=total.get_response_time_percentile(0.95) if total.num_requests else None,
    )
    limits = limits_from(options)
    misses = evaluate(measured, limits)
    p95 = "n/a" if measured.p95_ms is None else f"{measured.p95_ms:.0f} ms"
    print(
        f"load test result: {measured.requests} requests, {measured.failures} failed "
        f"(ratio {measured.failure_ratio:.4f}), {measured.rps:.2f} successful RPS, P95 {p95}",
        flush=True,
    )
    for miss in misses:
        print(miss.describe(), file=sys.stderr, flush=True)
    if options.latency_log:
        LATENCIES.write(Path(options.latency_log))
    if options.verdict_json:
        verdict = {
            "passed": not misses,
            "limits": asdict(limits),
            "measured": {**asdict(measured), "failure_ratio": measured.failure_ratio},
            "misses": [asdict(miss) for miss in misses],
            "by_name": {
                entry.name: entry_figures(entry) for entry in environment.stats.entries.values()
            },
            "total": entry_figures(total),
        }
        Path(options.verdict_json).write_text(json.dumps(verdict, indent=2) + "\n")
    if misses:
        environment.process_exit_code = 1
    elif limits.any():
        print("thresholds passed", flush=True)
        if limits.max_failure_ratio is not None:
            # failures within the allowed ratio: Locust would otherwise exit 1 on any failure
            environment.process_exit_code = 0
