"""Domain exceptions and their one mapping to HTTP.

Routes and services raise these; `install_error_handlers` turns them (and
request-validation errors) into `ErrorResponse` bodies. Nothing classifies an
error by its message text.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class FastResponseError(Exception):
    """Base of the domain errors; `status_code` and `error_type` shape the response."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


class UnknownPersonality(FastResponseError):
    """The requested personality is not in the manifest (404)."""

    status_code = 404
    error_type = "unknown_personality"


class EngineUnavailable(FastResponseError):
    """The engine is not running or failed its health check (503)."""

    status_code = 503
    error_type = "engine_unavailable"


class EngineError(FastResponseError):
    """One generation failed inside the engine; the service answers with a fallback."""

    status_code = 502
    error_type = "engine_error"


class InvalidBody(FastResponseError):
    """The request body cannot be read as JSON text, e.g. invalid UTF-8 (422)."""

    status_code = 422
    error_type = "body_invalid"


class BodyTooLarge(FastResponseError):
    """The request body is over `max_body_bytes` (413)."""

    status_code = 413
    error_type = "body_too_large"


class RegistryUnavailable(FastResponseError):
    """The shared adapter registry (Redis) cannot be reached or is closed (503)."""

    status_code = 503
    error_type = "registry_unavailable"


class AdapterRejected(FastResponseError):
    """The adapter failed a check (422); `error_type` names the check, `loc` the field."""

    status_code = 422

    def __init__(self, check: str, message: str, loc: tuple[str | int, ...] = ("body", "path")):
        super().__init__(message, loc)
        self.error_type = check


class AdapterLoadFailed(FastResponseError):
    """The engine refused or failed to warm up a valid adapter (502); nothing changed."""

    status_code = 502
    error_type = "adapter_load_failed"


class CanaryConflict(FastResponseError):
    """The change conflicts with the personality's canary state (409): a swap or
    unload while a canary runs, or a promote/rollback without one."""

    status_code = 409
    error_type = "canary_conflict"


class AdminUnauthorized(FastResponseError):
    """No bearer token was sent (401)."""

    status_code = 401
    error_type = "unauthorized"


class AdminForbidden(FastResponseError):
    """The bearer token is wrong, or the admin API is disabled (403)."""

    status_code = 403
    error_type = "forbidden"


def _json_error(status: int, loc: list[str | int], msg: str, error_type: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"detail": [{"loc": loc, "msg": msg, "type": error_type}]}
    )


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FastResponseError)
    return _json_error(exc.status_code, list(exc.loc), exc.message, exc.error_type)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """422 naming each field, from `exc.errors()`; the input itself is never echoed."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _json_error(exc.status_code, [], str(exc.detail), "http_error")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json_error(500, [], "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers: domain errors, 422s, HTTP errors, then a last-resort 500."""
    app.add_exception_handler(FastResponseError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
