"""HTTP routes. Thin: parse, call the service, shape the response."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, BackgroundTasks, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST

from service.disconnect import CLIENT_CLOSED_REQUEST, until_disconnected
from service.engine import Engine
from service.errors import EngineUnavailable
from service.fast_response import FastResponseService
from service.feedback import FeedbackService, clean_comment
from service.metrics import Metrics
from service.schemas import (
    ErrorResponse,
    FastResponseRequest,
    FastResponseResponse,
    FeedbackRequest,
    FeedbackResponse,
    Health,
)
from service.streaming import DoneEvent, StreamEvent, to_sse

logger = logging.getLogger(__name__)


class RequestLogHook(Protocol):
    """What the routes call on the request log (`service.request_log.RequestLog`), which
    is `app.state.request_log` when the request log is on, else None."""

    def record_served(self, request: FastResponseRequest, response: FastResponseResponse) -> None:
        """Write one answered request."""
        ...

    def record_rating(self, request_id: str, rating: int, comment: str | None) -> None:
        """Write the rating of an answered request."""
        ...

    def close(self) -> None:
        """Flush and close the log files (at shutdown)."""
        ...


async def get_service(request: Request) -> FastResponseService:
    """The app's FastResponseService (set by the lifespan).

    The dependencies are `async def`: FastAPI runs a plain `def` dependency in its
    thread pool, a thread hop per request that was 12% of the gateway's CPU at 50 RPS
    (py-spy, BENCHMARKS.md)."""
    service: FastResponseService = request.app.state.service
    return service


async def get_engine(request: Request) -> Engine:
    """The app's engine (set by the lifespan)."""
    engine: Engine = request.app.state.engine
    return engine


async def get_metrics(request: Request) -> Metrics:
    """The app's metrics (set by the lifespan)."""
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_feedback(request: Request) -> FeedbackService:
    """The app's FeedbackService (set by the lifespan)."""
    feedback: FeedbackService = request.app.state.feedback
    return feedback


async def get_request_log(request: Request) -> RequestLogHook | None:
    """The app's request log, or None when it is off (set by the lifespan)."""
    request_log: RequestLogHook | None = getattr(request.app.state, "request_log", None)
    return request_log


ServiceDep = Annotated[FastResponseService, Depends(get_service)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
RequestLogDep = Annotated[RequestLogHook | None, Depends(get_request_log)]

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown personality."},
    413: {"model": ErrorResponse, "description": "Request body over 64 KB."},
    422: {"model": ErrorResponse, "description": "Bad input; `loc` names the field."},
}


@router.post("/fast-response", response_model=FastResponseResponse, responses=_ERRORS)
async def fast_response(
    body: FastResponseRequest,
    request: Request,
    background: BackgroundTasks,
    service: ServiceDep,
    feedback: FeedbackDep,
    request_log: RequestLogDep,
) -> FastResponseResponse | Response:
    """One short, warm reaction to the child's turn, within the deadline. The answer can
    be rated with `POST /feedback` by its `request_id`. A client that disconnects before
    the answer cancels the work, which aborts the engine request; it is counted with
    status 499 (`fastresp_requests_total{outcome="client_error"}`)."""
    # The session memory and the response cache are written after the answer is sent.
    response = await until_disconnected(request.receive, service.respond(body, background))
    if response is None:
        logger.info("request %s: the client disconnected; generation aborted", body.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    await _record_served(body, response, feedback, request_log)
    return response


async def _record_served(
    body: FastResponseRequest,
    response: FastResponseResponse,
    feedback: FeedbackService,
    request_log: RequestLogHook | None,
) -> None:
    """Remember a served answer for `POST /feedback` and write it to the request log
    (when on); a failing log is logged, never the child's problem."""
    await feedback.remember(response)
    if request_log is not None:
        try:
            request_log.record_served(body, response)
        except Exception:  # the child's answer does not depend on the log
            logger.exception("request log: could not record request %s", response.request_id)


@dataclass(frozen=True, slots=True)
class AdmittedStream:
    """A streamed request checked before its response starts: the body and its events."""

    body: FastResponseRequest
    events: AsyncGenerator[StreamEvent, None]


async def admit_stream(body: FastResponseRequest, service: ServiceDep) -> AdmittedStream:
    """Check a streamed request before the response starts, so that its errors (unknown
    personality: 404) are answered as JSON with their status, like `/fast-response`."""
    return AdmittedStream(body, service.respond_stream(body))


StreamDep = Annotated[AdmittedStream, Depends(admit_stream)]

_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'Server-Sent Events: `token` events (`{"text": ...}`, text to '
        "append), then one `done` event with the `/fast-response` answer, after an `error` "
        'event (`{"reason", "detail", "message"}`) when the fallback is served. '
        "See `service.streaming`."
    },
    # Errors come before the stream starts, as JSON (a `model` here would be documented
    # under the route's text/event-stream).
    **{
        status: {
            "description": spec["description"],
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            },
        }
        for status, spec in _ERRORS.items()
    },
}


@router.post(
    "/fast-response/stream", response_class=EventSourceResponse, responses=_STREAM_RESPONSES
)
async def fast_response_stream(
    stream: StreamDep, feedback: FeedbackDep, request_log: RequestLogDep
) -> AsyncIterator[ServerSentEvent]:
    """`/fast-response` as a stream, so speech can start on the first words: `token`
    events with the guarded text as it is generated, then a `done` event with the same
    JSON as `/fast-response`. Once streaming, a deadline or engine error gives an `error`
    event and a fallback `done`; a client that disconnects aborts the generation. The
    answer is remembered for `POST /feedback` and the request log like `/fast-response`."""
    async with aclosing(stream.events) as events:
        async for event in events:
            if isinstance(event, DoneEvent):
                await _record_served(stream.body, event.response, feedback, request_log)
            yield to_sse(event)


_FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorResponse,
        "description": "No fast response was served with this request_id within the "
        "feedback TTL (`FASTRESP_FEEDBACK_TTL_S`, default 7 days).",
    },
    413: {"model": ErrorResponse, "description": "Request body over 64 KB."},
    422: {"model": ErrorResponse, "description": "Bad input; `loc` names the field."},
    503: {"model": ErrorResponse, "description": "The feedback store cannot be reached."},
}


@router.post("/feedback", response_model=FeedbackResponse, responses=_FEEDBACK_ERRORS)
async def feedback(
    body: FeedbackRequest, feedback: FeedbackDep, request_log: RequestLogDep
) -> FeedbackResponse:
    """Rate one served fast response from 1 to 5, with an optional comment. A second
    rating of the same request replaces the first."""
    stored = await feedback.rate(body)
    if request_log is not None:
        try:
            request_log.record_rating(body.request_id, stored.rating, clean_comment(body.comment))
        except Exception:  # the rating is stored; the log is secondary
            logger.exception("request log: could not record the rating of %s", body.request_id)
    return stored


@router.get("/personalities")
async def personalities(service: ServiceDep) -> dict[str, list[dict[str, Any]]]:
    """The served personalities, with their description and adapter version."""
    return {
        "personalities": [
            {
                "name": p.name,
                "description": p.description,
                "adapter_version": service.adapter_version(p.name),
            }
            for p in service.personalities.values()
        ]
    }


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(request: Request, engine: EngineDep) -> Response:
    """Liveness: the process answers and its engine is not dead. A dead in-process vLLM
    engine core never recovers, so this fails and the orchestrator restarts the process.
    In remote-engine mode (`engine_urls`) the upstreams are not checked here: restarting
    the gateway cannot mend a vLLM server, and the gateway uses one again as soon as it
    answers; `/readyz` reports them."""
    if request.app.state.settings.engine_urls:
        return JSONResponse(status_code=200, content=Health(status="ok").model_dump())
    try:
        await engine.check_health()
    except EngineUnavailable as exc:
        health = Health(status="unavailable", checks={"engine": exc.message})
        return JSONResponse(status_code=503, content=health.model_dump())
    return JSONResponse(status_code=200, content=Health(status="ok").model_dump())


#: How `/readyz` starts the Redis check's text while Redis does not answer: the gateway
#: stays ready without it (no session memory, response cache or shared-registry updates
#: meanwhile; the client reconnects by itself).
REDIS_DEGRADED = "degraded: "


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request, engine: EngineDep) -> Response:
    """Readiness: the engine answers its health check and the gateway is not draining
    (after SIGTERM: 503, so load balancers stop sending). Redis (if configured) is pinged
    and reported, `"degraded: <error>"` when it does not answer, without making the
    gateway unready: requests are answered without it."""
    checks: dict[str, str] = {}
    try:
        await engine.check_health()
        checks["engine"] = "ok"
    except EngineUnavailable as exc:
        checks["engine"] = exc.message
    redis_client = request.app.state.redis
    if redis_client is not None:
        try:
            await redis_client.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # Redis is optional: degraded, still ready
            checks["redis"] = f"{REDIS_DEGRADED}{type(exc).__name__}: {exc}"
    if request.app.state.admission.draining:
        checks["admission"] = "draining: shutting down (SIGTERM)"
    ok = all(value == "ok" for name, value in checks.items() if name != "redis")
    health = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(status_code=200 if ok else 503, content=health.model_dump())


@router.get("/metrics")
async def metrics(metrics: MetricsDep, feedback: FeedbackDep) -> Response:
    """Prometheus exposition. One process: the gateway's `fastresp_*` collectors, then
    the in-process vLLM engine's `vllm:*` collectors (which vLLM registers on the default
    registry). Several workers (`fastresp serve --workers N`): the `fastresp_*` totals
    of all workers together. `fastresp_feedback_rating` is read from the feedback store
    at each scrape."""
    await feedback.refresh_metrics()
    return Response(content=metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
