"""The app factory. Its lifespan owns every resource: engine, adapters, Redis client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import admin, child_safety
from service.adapter_registry import AdapterRegistry
from service.adapter_store import apply_published
from service.adapter_validation import BaseModelInfo
from service.admission import Admission, AdmissionControl, drain_on_sigterm
from service.engine import Engine
from service.errors import BodyTooLarge, FastResponseError, InvalidBody, install_error_handlers
from service.fast_response import FastResponseService
from service.feedback import (
    FeedbackService,
    FeedbackStore,
    FeedbackUnavailable,
    UnavailableFeedbackStore,
    open_feedback_store,
)
from service.guard import check_tone_fit
from service.logs import configure_logging
from service.metrics import NO_SOURCE, UNKNOWN_PERSONALITY, Metrics, outcome_of, personality_of
from service.personalities import load_personalities
from service.registry_store import open_registry_store
from service.routes import RequestLogHook, router
from service.session_state import (
    InMemorySessionMemory,
    RedisSessionMemory,
    ResponseCache,
    SessionMemory,
)
from service.session_state import redis_client as redis_client_for
from service.settings import Settings

logger = logging.getLogger(__name__)


class RequestBodyLimits:
    """ASGI middleware: check a request body before any route parses it.

    - over `max_bytes` (by Content-Length, or counted as a chunked body arrives): 413;
    - not valid UTF-8 (JSON must be UTF-8, RFC 8259): 422 naming `body`.

    The body (at most `max_bytes`) is buffered and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLarge(f"request body is over {self.max_bytes} bytes", loc=("body",))
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, send, too_large)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = InvalidBody(f"request body is not valid UTF-8 (byte {exc.start})", ("body",))
            await self._refuse(scope, send, error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, exc: FastResponseError) -> None:
        response = JSONResponse(
            status_code=exc.status_code,
            content={
                "detail": [{"loc": list(exc.loc), "msg": exc.message, "type": exc.error_type}]
            },
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class RequestOutcomes:
    """ASGI middleware: count `POST /fast-response` and `POST /fast-response/stream`
    requests that end in an error status
    in `fastresp_requests_total{personality, source="none", outcome}`.

    Answered requests (200) are counted by `FastResponseService.respond`, which knows
    their source. This counts the rest, wherever they end: 413 and undecodable bodies
    (`RequestBodyLimits`), 422 and 400 (request validation), 404 (unknown personality),
    429/503 and 500 (an unhandled exception, which Starlette's outermost middleware turns
    into 500 after it passes through here). The personality label is the body's
    `personality` if it is a manifest name, else `_unknown`; the body read by the app
    (at most `max_bytes`) is kept for that and parsed only for an error. A request
    whose client went away before any response (a cancellation) is not counted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in ("/fast-response", "/fast-response/stream")
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        status: int | None = None

        async def keep_body() -> Message:
            nonlocal size
            message = await receive()
            chunk = message.get("body", b"") if message["type"] == "http.request" else b""
            if chunk and size <= self.max_bytes:
                chunks.append(chunk)
                size += len(chunk)
            return message

        async def note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, keep_body, note_status)
        except Exception:
            if status is None:
                status = 500
            raise
        finally:
            if status is not None and status >= 400:
                body = b"".join(chunks) if size <= self.max_bytes else b""
                self._count(scope, status, body)

    @staticmethod
    def _count(scope: Scope, status: int, body: bytes) -> None:
        state = scope["app"].state
        metrics: Metrics | None = getattr(state, "metrics", None)
        service: FastResponseService | None = getattr(state, "service", None)
        if metrics is None:
            return  # the lifespan has not started (or failed)
        known = service.personalities if service is not None else ()
        personality = personality_of(body, known) if known else UNKNOWN_PERSONALITY
        metrics.requests.labels(personality, NO_SOURCE, outcome_of(status), NO_SOURCE).inc()


def open_request_log(settings: Settings) -> RequestLogHook | None:
    """The request log (`service.request_log`) for `settings`, or None when it is off
    (`request_log_dir` unset). Imported on first use: most gateways run without it."""
    from service.request_log import RequestLog

    request_log: RequestLogHook | None = RequestLog.from_settings(settings)
    return request_log


async def start_engine(settings: Settings) -> Engine:
    """Connect to the remote vLLM servers in `settings.engine_urls`, or, when there are
    none, start the in-process vLLM engine on `settings.resolved_model()` (imports vLLM).

    Raises:
        EngineUnavailable: the engine could not start, or no upstream answered.
    """
    if settings.engine_urls:
        from service.remote_engine import RemoteEngine

        return await RemoteEngine.start(settings)
    from service.vllm_engine import VLLMEngine

    return await VLLMEngine.start(settings)


async def _open_feedback_store(settings: Settings) -> FeedbackStore:
    """`open_feedback_store(settings)`, or, when it cannot be opened, an
    `UnavailableFeedbackStore` after one logged error: the gateway serves without it."""
    try:
        return await open_feedback_store(settings)
    except FeedbackUnavailable as exc:
        logger.error(
            "feedback store unavailable, serving without it (POST /feedback answers 503 "
            "until a restart): %s",
            exc.message,
        )
        return UnavailableFeedbackStore(f"feedback store unavailable since startup: {exc.message}")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the gateway.

    Args:
        settings: the service settings.
        engine: an engine that is already running (tests share one); the caller
            keeps ownership. None: the lifespan starts the in-process vLLM engine
            and stops it on shutdown.

    Raises (at startup, from the lifespan):
        ManifestError: bad personalities file.
        PublishedStoreError: the published-adapter store's `published.json` is
            unreadable or invalid (service/adapter_store.py).
        AdapterRejected, AdapterLoadFailed: a configured adapter (from the manifest,
            the published-adapter store or the shared registry) failed validation or
            loading.

    A feedback store (SQLite, without Redis) that cannot be created or opened does not
    stop the start: the error is logged once, answers go on, and `POST /feedback`
    answers 503 naming the store (`UnavailableFeedbackStore`).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            personalities = load_personalities(settings.personalities_file)
            # Before the engine starts: a bad published.json fails startup at once.
            personalities, origins = await asyncio.to_thread(
                apply_published, personalities, settings.resolved_adapter_store()
            )
            running = engine
            if running is None:
                running = await start_engine(settings)
                stack.push_async_callback(running.close)
            base_model = await asyncio.to_thread(BaseModelInfo.from_dir, settings.resolved_model())
            metrics = Metrics()
            stack.callback(metrics.close)
            stack.enter_context(drain_on_sigterm(admission))
            feedback = FeedbackService(await _open_feedback_store(settings), metrics)
            stack.push_async_callback(feedback.close)
            request_log = await asyncio.to_thread(open_request_log, settings)
            if request_log is not None:
                stack.callback(request_log.close)
            redis_client = None
            memory: SessionMemory | None = None
            cache: ResponseCache | None = None
            if settings.redis_url:
                redis_client = redis_client_for(settings)
                stack.push_async_callback(redis_client.aclose)
                prefix = settings.redis_key_prefix
                memory = RedisSessionMemory(
                    redis_client,
                    settings.session_memory_turns,
                    settings.session_memory_ttl_s,
                    prefix=prefix,
                    metrics=metrics,
                )
                if settings.response_cache:
                    cache = ResponseCache(
                        redis_client,
                        settings.response_cache_size,
                        settings.response_cache_ttl_s,
                        prefix=prefix,
                        metrics=metrics,
                    )
            else:
                memory = InMemorySessionMemory(
                    settings.session_memory_turns,
                    settings.session_memory_ttl_s,
                    settings.session_memory_max_sessions,
                )
            store = open_registry_store(settings)
            stack.push_async_callback(store.close)
            registry = AdapterRegistry(
                running,
                personalities,
                base_model,
                settings.max_lora_rank,
                store,
                metrics,
                origins=origins,
            )
            # An engine the gateway does not own (shared in tests, or remote upstreams)
            # outlives it, so the gateway unloads its adapters from it on shutdown.
            owns_engine = engine is None and not settings.engine_urls
            stack.push_async_callback(registry.close, not owns_engine)
            await registry.start()
            deadline_ms = settings.resolved_deadline_ms(running.device)
            app.state.settings = settings
            app.state.engine = running
            app.state.redis = redis_client
            app.state.metrics = metrics
            app.state.feedback = feedback
            app.state.request_log = request_log
            app.state.registry = registry
            app.state.service = FastResponseService(
                running,
                personalities,
                registry,
                metrics,
                deadline_s=deadline_ms / 1000,
                base_prompt_mode=settings.base_prompt_mode,
                tone_guard=settings.tone_guard,
                memory=memory if settings.session_memory_turns else None,
                cache=cache,
                log_text=settings.log_text,
                cache_context=(
                    f"{settings.resolved_model()}|{settings.base_prompt_mode}"
                    f"|tone_guard={settings.tone_guard}"
                ),
            )
            # Loads the profanity list and libphonenumber's metadata (about 50 ms).
            await asyncio.to_thread(child_safety.warm_up)
            if settings.tone_guard:
                check_tone_fit("Hi.", "Hi.")  # loads VADER's lexicon (10-15 ms) before traffic
            if settings.warm_up:
                seconds = await app.state.service.warm_up()
                logger.info("warmed up %d personalities in %.1f s", len(personalities), seconds)
            logger.info(
                "serving %s on %s, deadline %d ms, personalities: %s; Redis: %s; session "
                "memory: %s; response cache: %s",
                settings.resolved_model(),
                running.device,
                deadline_ms,
                ", ".join(personalities),
                "on" if settings.redis_url else "off",
                f"{settings.session_memory_turns} answers"
                + (" in Redis" if settings.redis_url else " in this process")
                if settings.session_memory_turns
                else "off",
                "on" if cache is not None else "off",
            )
            if settings.log_text:
                logger.warning(
                    "FASTRESP_LOG_TEXT is on: debug log lines hold the children's words "
                    "(names, phone numbers); for debugging only"
                )
            yield {}

    app = FastAPI(
        title="Pika fast response",
        version="0.1.0",
        lifespan=lifespan,
        responses={422: {"description": "Bad input; `detail[].loc` names the field."}},
    )
    admission = Admission(settings.resolved_max_in_flight(), settings.retry_after_s)
    app.state.admission = admission
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin.router)
    app.add_middleware(RequestBodyLimits, max_bytes=settings.max_body_bytes)
    # Outside RequestBodyLimits: a refusal reads no body. Inside RequestOutcomes: its 503s
    # are counted there.
    app.add_middleware(AdmissionControl, admission=admission)
    # Outermost (added last): it sees the statuses RequestBodyLimits answers itself.
    app.add_middleware(RequestOutcomes, max_bytes=settings.max_body_bytes)
    return app


def create_worker_app() -> FastAPI:
    """The app of one `fastresp serve --workers N` worker process (uvicorn's factory).

    Settings come from the `FASTRESP_*` environment, where the CLI has put its options,
    and the metrics from the `PROMETHEUS_MULTIPROC_DIR` it prepared; each worker starts
    its own engine client and logging.

    Raises:
        pydantic.ValidationError: bad settings (the CLI checked them already).
    """
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
