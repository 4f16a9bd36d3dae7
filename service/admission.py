"""Admission control and draining: the gateway refuses work it cannot start now.

`AdmissionControl` (ASGI middleware) caps the requests in flight on `POST /fast-response`
and `POST /fast-response/stream` together (one counter; every other route is never
limited). A request over the cap is answered at once, before its body is read and
without touching the engine: 503 with `Retry-After` and the project's error body
(`type` `overloaded`). There is no queue: a waiting child is better served by the
client's own fallback at once than by a late answer.

503, not 429: the gateway is out of capacity for everyone (RFC 9110 15.6.4), not
limiting one client's rate (429, RFC 6585); load balancers and clients treat a 503 as
"try another replica", and it counts as `server_error` in `fastresp_requests_total`,
so overload shows on the error-rate alert.

On SIGTERM (`drain_on_sigterm`) the gateway starts draining: `/readyz` answers 503 and
new fast-response requests get 503 (`type` `draining`) with `Retry-After`, while the
server (uvicorn) finishes the requests in flight; see `fastresp serve`.

The cap is per process: with `fastresp serve --workers N` the service admits up to
N x `max_in_flight`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The routes admission control limits (method POST).
LIMITED_PATHS = ("/fast-response", "/fast-response/stream")


class Admission:
    """The admission state of one gateway process, shared by the middleware, `/readyz`
    and the SIGTERM handler.

    Attributes:
        max_in_flight: the cap on fast-response requests in flight (>= 1).
        retry_after_s: the `Retry-After` value of a refusal, in whole seconds (>= 1).
        in_flight: fast-response requests admitted and not finished now.
        peak_in_flight: the most requests in flight at once since the start.
        admitted: requests admitted since the start.
        rejected: requests refused since the start, by reason (`overloaded`, `draining`).
        draining: True once shutdown began (SIGTERM): every new request is refused.

    Raises:
        ValueError: `max_in_flight` or `retry_after_s` below 1.
    """

    def __init__(self, max_in_flight: int, retry_after_s: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if retry_after_s < 1:
            raise ValueError(f"retry_after_s must be at least 1, got {retry_after_s}")
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.peak_in_flight = 0
        self.admitted = 0
        self.rejected: dict[str, int] = {"overloaded": 0, "draining": 0}
        self.draining = False

    def try_enter(self) -> str | None:
        """Admit one request (None) or say why not (`overloaded` or `draining`).
        An admitted request must call `leave` once it is finished."""
        if self.draining:
            reason = "draining"
        elif self.in_flight >= self.max_in_flight:
            reason = "overloaded"
        else:
            self.in_flight += 1
            self.admitted += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return None
        self.rejected[reason] += 1
        return reason

    def leave(self) -> None:
        """One admitted request finished (answered, failed or cancelled)."""
        self.in_flight -= 1

    def start_draining(self) -> None:
        """Refuse every new request from now on (shutdown began)."""
        self.draining = True


class AdmissionControl:
    """ASGI middleware: admit at most `admission.max_in_flight` fast-response requests
    at once; refuse the others at once with 503 and `Retry-After` (see the module doc).

    Refusals are counted in `fastresp_rejected_requests_total{reason}` (and, by
    `RequestOutcomes` outside this middleware, in `fastresp_requests_total` as
    `server_error` with personality `_unknown`: the body is never read).
    """

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in LIMITED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        reason = self.admission.try_enter()
        if reason is not None:
            await self._refuse(scope, send, reason)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()

    async def _refuse(self, scope: Scope, send: Send, reason: str) -> None:
        metrics = getattr(scope["app"].state, "metrics", None)
        if metrics is not None:
            metrics.rejected_requests.labels(reason).inc()
        if reason == "draining":
            message = "the gateway is shutting down; retry on another replica"
        else:
            message = (
                f"over capacity: {self.admission.max_in_flight} requests in flight "
                "(FASTRESP_MAX_IN_FLIGHT); retry later"
            )
        response = JSONResponse(
            status_code=503,
            content={"detail": [{"loc": [], "msg": message, "type": reason}]},
            headers={"Retry-After": str(self.admission.retry_after_s)},
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


@contextlib.contextmanager
def drain_on_sigterm(admission: Admission) -> Iterator[None]:
    """While open, a SIGTERM first calls `admission.start_draining()`, then the handler
    installed before (uvicorn's, which starts its graceful shutdown). The previous
    handler is put back on exit.

    Does nothing outside the main thread (Python allows signal handlers only there,
    e.g. a gateway run in a test's thread) or when no Python handler is installed
    (no server that shuts down gracefully).
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def handle(sig: int, frame: FrameType | None) -> None:
        admission.start_draining()
        previous(sig, frame)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handle:
            signal.signal(signal.SIGTERM, previous)
