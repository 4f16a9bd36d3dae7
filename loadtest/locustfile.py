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
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

FAST_RESPONSE = "/fast-response"

_ENDING = (STATE_STOPPING, STATE_CLEANUP, STATE_STOPPED)
"""Runner states in which the run is ending: a user sends no new request."""


class RunEnd:
    """When this Locust process's run began to stop (`test_stopping`), and how many
    requests the stop cut off before `--stop-timeout` had passed."""

    stopping_at: float | None = None
    cut_off = 0

    @classmethod
    def unanswered_in_time(cls, stop_timeout_s: float) -> bool:
        """True when a killed request had the whole `--stop-timeout` to answer: a hung
        gateway. False when the kill came sooner, which Locust does to a user it found
        waiting between requests that had already started its next one (gevent delivers
        the kill at the user's next switch, inside the new request)."""
        if cls.stopping_at is None:
            return True
        return time.time() - cls.stopping_at >= max(0.0, stop_timeout_s - 0.25)


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
        runner = self.environment.runner
        if runner is not None and runner.state in _ENDING:
            raise StopUser()  # the run is ending: a request now would only be cut off
        personality, fields = self.conversation.next_fields()
        body = {"personality": personality, **fields}
        name = f"{FAST_RESPONSE} {personality}"
        started = time.time()
        try:
            self._post(body, name)
        except GreenletExit:
            if not RunEnd.unanswered_in_time(self.environment.stop_timeout or 0.0):
                RunEnd.cut_off += 1  # killed at the stop, not after waiting: no verdict
                raise
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


@events.test_stopping.add_listener
def _note_stopping(**_: Any) -> None:
    RunEnd.stopping_at = time.time()


@events.quitting.add_listener
def _report_cut_off(**_: Any) -> None:
    if RunEnd.cut_off:
        print(
            f"load test: {RunEnd.cut_off} requests cut off by the stop before "
            "--stop-timeout passed (not counted)",
            flush=True,
        )


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
