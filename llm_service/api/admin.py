"""/admin: load and unload slots, add and remove LoRA adapters, purge the cache (operators; APP_ADMIN_TOKEN)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field

from llm_service.api.deps import RegistryDep, ResourcesDep, SettingsDep
from llm_service.api.responses import ErrorEnvelope, error_responses
from llm_service.config.slots import ADAPTER_NAME
from llm_service.engines.base import AdapterConfig
from llm_service.errors import CacheUnavailable, Forbidden, ModelNotFound, Unauthorized

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses=error_responses(ErrorEnvelope, 401, 403, 404, 413, 503),
)


async def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Allow the request only with `Authorization: Bearer <APP_ADMIN_TOKEN>`."""
    token = settings.app.admin_token
    if token is None:
        raise Forbidden("the admin API is disabled: set APP_ADMIN_TOKEN to enable it")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("a valid 'Authorization: Bearer <APP_ADMIN_TOKEN>' header is required")


AdminDep = Depends(require_admin)


@router.get("/models", dependencies=[AdminDep], summary="Every slot's state, share and error")
async def list_slots(registry: RegistryDep) -> dict[str, Any]:
    return {"budget": registry.budget, "used": registry.used_share(), "models": registry.snapshot()}


@router.post("/models/{slot}/load", dependencies=[AdminDep], summary="Load a slot now (evicting if needed)")
async def load_slot(slot: str, registry: RegistryDep) -> dict[str, Any]:
    await registry.load(slot)
    return {"model": slot, **registry.snapshot()[slot]}


@router.post("/models/{slot}/unload", dependencies=[AdminDep], summary="Unload a slot once its requests end")
async def unload_slot(slot: str, registry: RegistryDep) -> dict[str, Any]:
    unloaded = await registry.unload(slot)
    return {"model": slot, "unloaded": unloaded, **registry.snapshot()[slot]}


class AdapterBody(BaseModel):
    """A LoRA adapter to serve on a slot from now on."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME.pattern, description="Model name clients will ask for.")
    path: str = Field(min_length=1, description="Local folder or Hugging Face id of a PEFT LoRA adapter.")


@router.post("/models/{slot}/adapters", dependencies=[AdminDep], responses=error_responses(ErrorEnvelope, 400),
             summary="Add a LoRA adapter to a slot")
async def add_adapter(slot: str, body: AdapterBody, registry: RegistryDep) -> dict[str, Any]:
    await registry.add_adapter(slot, AdapterConfig(body.name, body.path))
    return {"model": slot, "adapters": [a.name for a in registry.slot(slot).config.adapters]}


@router.delete("/models/{slot}/adapters/{adapter}", dependencies=[AdminDep],
               responses=error_responses(ErrorEnvelope, 400), summary="Remove a LoRA adapter")
async def remove_adapter(slot: str, adapter: str, registry: RegistryDep) -> dict[str, Any]:
    await registry.remove_adapter(slot, adapter)
    return {"model": slot, "adapters": [a.name for a in registry.slot(slot).config.adapters]}


@router.post(
    "/cache/purge",
    dependencies=[AdminDep],
    summary="Delete cached responses and embeddings (one slot's with ?model=) in Redis and on every replica",
)
async def purge_cache(resources: ResourcesDep, model: str | None = None) -> dict[str, Any]:
    if model is not None and model not in resources.registry.slot_names:
        raise ModelNotFound(f"no slot named {model!r}", param="model")
    deleted = await resources.cache.purge(model)
    if deleted is None:
        raise CacheUnavailable("Redis could not be reached: nothing was purged", retry_after=5)
    return {"purged": deleted, "model": model}
