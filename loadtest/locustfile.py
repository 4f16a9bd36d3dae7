"""Locust load test of the gateway: real Bridge conversations against POST /fast-response.

Each Locust user is one child in a lesson: it takes Bridge validation turns (Pika's
question, the child's answer, Pika's main response) one after another, with its own
session id (a new one every `--turns-per-session` turns), and sends each to a
personality picked at random from `--personalities`, or from every personality the
gateway lists at `GET /personalities` when the test starts. A response that is not
200 with a `fast_response` text is a failure.

Run it headless with thresholds through `fastresp loadtest` (see the README), or
directly:

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 20 -r 5 -t 60s --user-rps 1 --min-rps 15 --max-p95-ms 500

Options and thresholds: see `fastresp_locust.py`.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from fastresp_locust import (
    LATENCIES,
    Conversation,
    Pacer,
    Sample,
    describe_response_error,
    load_turns,
    split_names,
)
from gevent import GreenletExit
from locust import events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

FAST_RESPONSE = "/fast-response"


def fetch_personalities(host: str, timeout_s: float = 10.0) -> list[str]:
    """The personality names the gateway at `host` serves (`GET /personalities`)."""
    with urllib.request.urlopen(f"{host.rstrip('/')}/personalities", timeout=timeout_s) as reply:
        payload = json.load(reply)
    return [item["name"] for item in payload["personalities"]]


class FastResponseUser(FastHttpUser):
    """One child talking to Pika through the gateway."""

    turns: ClassVar[list[dict[str, str]]] = []
    personalities: ClassVar[list[str]] = []

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.pace = Pacer(options.user_rps if options is not None else 0.0)
        self.conversation = Conversation(
            self.turns,
            self.personalities,
            options.turns_per_session if options is not None else 10,
        )

    def wait_time(self) -> float:
        return self.pace(self)

    @task
    def fast_response(self) -> None:
        personality, fields = self.conversation.next_fields()
        body = {"personality": personality, **fields}
        name = f"{FAST_RESPONSE} {personality}"
        started = time.time()
        try:
            self._post(body, name)
        except GreenletExit:
            # The run ended and Locust killed this user after --stop-timeout with the
            # request still unanswered (a hung gateway): count it as a failure, or a
            # gateway that stops answering mid-run would pass with no failure at all.
            self.environment.events.request.fire(
                request_type="POST",
                name=name,
                response_time=(time.time() - started) * 1000,
                response_length=0,
                response=None,
                context={},
                exception=TimeoutError("no answer before the run ended (--stop-timeout)"),
                start_time=started,
                url=FAST_RESPONSE,
            )
            raise

    def _post(self, body: dict[str, str], name: str) -> None:
        with self.client.post(FAST_RESPONSE, json=body, name=name, catch_response=True) as reply:
            source, server_ms = "", None
            if reply.status_code != 200:
                detail = reply.text if reply.status_code else repr(reply.error)
                reply.failure(describe_response_error(reply.status_code, detail))
            else:
                try:
                    answer: Any = reply.json()
                except ValueError:
                    answer = None
                if isinstance(answer, dict) and isinstance(answer.get("fast_response"), str):
                    source = str(answer.get("source", ""))
                    latency = answer.get("latency_ms")
                    server_ms = float(latency) if isinstance(latency, int | float) else None
                else:
                    reply.failure("200 without a JSON body holding a fast_response text")
            client_ms = float(reply.request_meta["response_time"])
            LATENCIES.add(Sample(name, reply.status_code, source, client_ms, server_ms))


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Read the turns and settle the personalities before the test starts; a problem
    ends Locust with its message (exit code 1)."""
    options = environment.parsed_options
    if options is None or environment.host is None:
        raise SystemExit("load test: --host is required")
    FastResponseUser.turns = load_turns(Path(options.data))
    names = split_names(options.personalities)
    if not names:
        try:
            names = fetch_personalities(environment.host)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # OSError: not reachable; ValueError: not an http(s) URL, or an answer that is
            # not JSON; KeyError, TypeError: JSON that is not a gateway's personality list
            raise SystemExit(
                f"load test: cannot list personalities at {environment.host}/personalities: "
                f"{exc!r} (is the gateway running? or pass --personalities)"
            ) from None
    if not names:
        raise SystemExit(f"load test: {environment.host} serves no personalities")
    FastResponseUser.personalities = names
    print(f"load test: personalities {', '.join(names)}; {len(FastResponseUser.turns)} turns")
