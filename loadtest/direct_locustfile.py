"""Locust straight at a vLLM OpenAI server: the benchmark's "direct" path.

It replays `POST /v1/completions` bodies from `--bodies`, a JSON Lines file of
`{"name": personality, "body": {...}}`. `service.bench_gateway` writes that file with
the gateway's own code for the same Bridge turns: the prompt `service.prompts` builds
for the personality (chat template with its adapter, few-shot without), its sampling,
and the `model` name the gateway sends upstream (the adapter's name on the engine, or
the identity adapter's on the CPU). So the gateway and direct runs put the same work on
the same engine, and the difference is the gateway.

Each user takes the bodies in order from a random start and picks the personality at
random per request. The other options (`--user-rps`, thresholds, `--verdict-json`,
`--latency-log`): see `fastresp_locust.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar

from fastresp_locust import LATENCIES, Pacer, Sample, describe_response_error
from locust import events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

COMPLETIONS = "/v1/completions"


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("direct", "Direct vLLM path of the gateway benchmark")
    group.add_argument("--bodies", type=str, default="", help="JSON Lines of {name, body}")


class DirectCompletionUser(FastHttpUser):
    """The same turns as `FastResponseUser`, sent straight to vLLM."""

    bodies: ClassVar[dict[str, list[dict[str, Any]]]] = {}

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.pace = Pacer(options.user_rps if options is not None else 0.0)
        self.rng = random.Random()
        self.index = self.rng.randrange(1_000_000)

    def wait_time(self) -> float:
        return self.pace(self)

    @task
    def complete(self) -> None:
        name = self.rng.choice(sorted(self.bodies))
        self.index += 1
        body = self.bodies[name][self.index % len(self.bodies[name])]
        label = f"{COMPLETIONS} {name}"
        with self.client.post(COMPLETIONS, json=body, name=label, catch_response=True) as reply:
            if reply.status_code != 200:
                detail = reply.text if reply.status_code else repr(reply.error)
                reply.failure(describe_response_error(reply.status_code, detail))
            else:
                try:
                    answer: Any = reply.json()
                    text = answer["choices"][0]["text"]
                except (ValueError, KeyError, IndexError, TypeError):
                    text = None
                if not isinstance(text, str):
                    reply.failure("200 without a completion text")
            client_ms = float(reply.request_meta["response_time"])
            LATENCIES.add(Sample(label, reply.status_code, "", client_ms, None))


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.bodies:
        raise SystemExit("direct load test: --bodies is required")
    bodies: dict[str, list[dict[str, Any]]] = {}
    for line in Path(options.bodies).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            bodies.setdefault(record["name"], []).append(record["body"])
    if not bodies:
        raise SystemExit(f"direct load test: no bodies in {options.bodies}")
    DirectCompletionUser.bodies = bodies
