"""Admin API: hot-swap the LoRA adapter of a personality. Bearer token required.

- `PUT /admin/personalities/{name}/adapter` `{path, version?, allow_base_model_mismatch?}`
- `DELETE /admin/personalities/{name}/adapter`: back to the base model
- `PUT /admin/personalities/{name}/canary` `{path, weight, version?, allow_base_model_mismatch?}`:
  serve another version to `weight` percent of the sessions (again with the same
  version: change the weight)
- `POST /admin/personalities/{name}/canary/promote`: the canary becomes the stable version
- `POST /admin/personalities/{name}/canary/rollback`: drop the canary
- `GET /admin/adapters`: every personality's adapter and canary, and the engine's LoRA slots

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


class CanaryRequest(AdapterLoadRequest):
    """`PUT /admin/personalities/{name}/canary` body."""

    weight: float = Field(gt=0, lt=100, allow_inf_nan=False)
    """Percent of the personality's sessions the canary serves; a session keeps its
    version while the weight stays (a hash of session id and personality decides)."""


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token."},
    403: {"model": ErrorResponse, "description": "Wrong token, or admin API disabled."},
    404: {"model": ErrorResponse, "description": "Unknown personality."},
    422: {"model": ErrorResponse, "description": "Adapter refused; `type` names the check."},
    409: {"model": ErrorResponse, "description": "Conflicts with the canary state."},
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


def _canary_dict(registry: AdapterRegistry, name: str) -> dict[str, Any] | None:
    canary = registry.canary(name)
    if canary is None:
        return None
    adapter, weight = canary
    return {**adapter.as_dict(), "weight": weight}


@router.put("/personalities/{name}/canary", responses=_ERRORS)
async def put_canary(
    name: str, body: CanaryRequest, registry: RegistryDep, request: Request
) -> dict[str, Any]:
    """Serve the adapter at `path` to `weight` percent of `name`'s sessions beside the
    stable version (`active`, null: the base model). The same version again only
    changes the weight; another version replaces the running canary."""
    logger.info(
        "admin: canary %s at %g%% for %s (from %s)", body.path, body.weight, name, _client(request)
    )
    await registry.start_canary(
        name,
        Path(os.path.normpath(body.path)),  # noqa: ASYNC240 - a pure string operation
        body.weight,
        body.version,
        allow_base_model_mismatch=body.allow_base_model_mismatch,
    )
    active = registry.active(name)
    return {
        "active": active.as_dict() if active else None,
        "canary": _canary_dict(registry, name),
    }


@router.post("/personalities/{name}/canary/promote", responses=_ERRORS)
async def promote_canary(name: str, registry: RegistryDep, request: Request) -> dict[str, Any]:
    """Make the canary `name`'s stable version for every session (`active`)."""
    logger.info("admin: promote the canary of %s (from %s)", name, _client(request))
    active = await registry.promote(name)
    return {"active": active.as_dict()}


@router.post("/personalities/{name}/canary/rollback", responses=_ERRORS)
async def rollback_canary(name: str, registry: RegistryDep, request: Request) -> dict[str, Any]:
    """Drop `name`'s canary (`rolled_back`); new requests get the stable version (`active`)."""
    logger.info("admin: roll back the canary of %s (from %s)", name, _client(request))
    dropped = await registry.rollback(name)
    active = registry.active(name)
    return {"rolled_back": dropped.as_dict(), "active": active.as_dict() if active else None}


@router.get("/adapters", responses=_ERRORS)
async def list_adapters(registry: RegistryDep, request: Request) -> dict[str, Any]:
    """Every personality's active adapter (null: base model), the running canaries
    (personality -> adapter and `weight`) and the engine's LoRA capacity: `max_loras`
    adapters per batch, `max_cpu_loras` in vLLM's CPU-side LRU."""
    settings: Settings = request.app.state.settings
    return {
        "personalities": {
            name: active.as_dict() if active else None
            for name, active in registry.snapshot().items()
        },
        "canaries": {
            name: canary
            for name in registry.snapshot()
            if (canary := _canary_dict(registry, name)) is not None
        },
        "engine": {
            "loaded_adapters": sorted(await request.app.state.engine.loaded_adapters()),
            "max_lora_rank": settings.max_lora_rank,
            "max_loras": settings.max_loras,
            "max_cpu_loras": settings.max_cpu_loras,
        },
    }
