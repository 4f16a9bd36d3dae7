"""Admin API: hot-swap the LoRA adapter of a personality. Bearer token required.

- `PUT /admin/personalities/{name}/adapter` `{path, version?, allow_base_model_mismatch?}`
- `DELETE /admin/personalities/{name}/adapter`: back to the base model
- `GET /admin/adapters`: every personality's adapter and the engine's LoRA slots

No token configured (`FASTRESP_ADMIN_TOKEN` unset): every admin call gets 403. A
missing token gets 401, a wrong one 403; the comparison takes constant time and
the token is never logged.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from service.adapter_registry import AdapterRegistry
from service.errors import AdminForbidden, AdminUnauthorized
from service.schemas import ErrorResponse, Identifier
from service.settings import Settings

logger = logging.getLogger(__name__)


_bearer = HTTPBearer(auto_error=False)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Check `Authorization: Bearer <FASTRESP_ADMIN_TOKEN>`.

    Raises:
        AdminUnauthorized: no bearer token (401).
        AdminForbidden: a wrong token, or no token configured (403).
    """
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise AdminForbidden("the admin API is disabled: set FASTRESP_ADMIN_TOKEN to enable it")
    if credentials is None:
        raise AdminUnauthorized("missing bearer token (Authorization: Bearer <token>)")
    expected = settings.admin_token.get_secret_value().encode("utf-8")
    if not secrets.compare_digest(credentials.credentials.encode("utf-8"), expected):
        logger.warning("admin call with a wrong token from %s", _client(request))
        raise AdminForbidden("wrong bearer token")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def get_registry(request: Request) -> AdapterRegistry:
    """The app's AdapterRegistry (set by the lifespan)."""
    registry: AdapterRegistry = request.app.state.registry
    return registry


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


class AdapterLoadRequest(BaseModel):
    """`PUT /admin/personalities/{name}/adapter` body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")
    """Absolute path of the PEFT LoRA adapter folder, readable by the engine; no control
    characters. Stored normalised (`/a/./b/../c` is `/a/c`)."""
    version: Identifier | None = None
    """Version reported in responses; default: the adapter's `fastresp_card.json`
    version, else its folder name."""
    allow_base_model_mismatch: bool = False
    """Serve it even if its `base_model_name_or_path` names another base model."""


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token."},
    403: {"model": ErrorResponse, "description": "Wrong token, or admin API disabled."},
    404: {"model": ErrorResponse, "description": "Unknown personality."},
    422: {"model": ErrorResponse, "description": "Adapter refused; `type` names the check."},
    502: {"model": ErrorResponse, "description": "The engine refused the adapter."},
    503: {"model": ErrorResponse, "description": "The shared registry (Redis) is down."},
}


@router.put("/personalities/{name}/adapter", responses=_ERRORS)
async def put_adapter(
    name: str, body: AdapterLoadRequest, registry: RegistryDep, request: Request
) -> dict[str, Any]:
    """Validate, load and switch `name` to a new adapter version. The old version
    keeps serving until the switch, and whenever the new one is refused."""
    logger.info("admin: load %s for %s (from %s)", body.path, name, _client(request))
    active = await registry.activate(
        name,
        Path(os.path.normpath(body.path)),  # noqa: ASYNC240 - a pure string operation
        body.version,
        allow_base_model_mismatch=body.allow_base_model_mismatch,
    )
    return {"active": active.as_dict()}


@router.delete("/personalities/{name}/adapter", responses=_ERRORS)
async def delete_adapter(name: str, registry: RegistryDep, request: Request) -> dict[str, Any]:
    """Serve `name` with the base model; `previous` is the adapter that was active."""
    logger.info("admin: unload the adapter of %s (from %s)", name, _client(request))
    previous = await registry.deactivate(name)
    return {"previous": previous.as_dict() if previous else None}


@router.get("/adapters", responses=_ERRORS)
async def list_adapters(registry: RegistryDep, request: Request) -> dict[str, Any]:
    """Every personality's active adapter (null: base model) and the engine's LoRA
    capacity: `max_loras` adapters per batch, `max_cpu_loras` in vLLM's CPU-side LRU."""
    settings: Settings = request.app.state.settings
    return {
        "personalities": {
            name: active.as_dict() if active else None
            for name, active in registry.snapshot().items()
        },
        "engine": {
            "loaded_adapters": sorted(await request.app.state.engine.loaded_adapters()),
            "max_lora_rank": settings.max_lora_rank,
            "max_loras": settings.max_loras,
            "max_cpu_loras": settings.max_cpu_loras,
        },
    }
