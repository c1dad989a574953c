"""GET /health (with dependencies), /health/live, /health/ready and /metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from llm_service import __version__
from llm_service.api.deps import MetricsDep, RegistryDep, ResourcesDep
from llm_service.registry import ModelRegistry

router = APIRouter(tags=["health"])


def overall_status(registry: ModelRegistry, dependencies: dict[str, dict[str, Any]]) -> str:
    """unhealthy: a preloaded slot is down (failed, or its engine died and it is reloading);
    degraded: loading, a lazy slot is down, or a dependency (Redis, Langfuse) is down; healthy
    otherwise."""
    slots = registry.snapshot()
    if any(s["pinned"] and s["error"] is not None for s in slots.values()):
        return "unhealthy"
    if not registry.preload_done or any(s["error"] is not None for s in slots.values()):
        return "degraded"
    if any(dep.get("status") == "down" for dep in dependencies.values()):
        return "degraded"
    return "healthy"


@router.get(
    "/health",
    summary="Service status with every slot and dependency",
    responses={503: {"description": "Unhealthy: a preloaded slot is down (the same body, status `unhealthy`)"}},
)
async def health(resources: ResourcesDep) -> JSONResponse:
    registry = resources.registry
    services: dict[str, dict[str, Any]] = {
        "redis": await resources.cache.health(),
        "langfuse": resources.tracer.health(),
    }
    status = overall_status(registry, services)
    body = {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(time.time() - resources.started_at, 1),
        "ready": registry.is_ready(),
        "memory": {"budget": registry.budget, "used": round(registry.used_share(), 4)},
        "admission": resources.generation.admission.snapshot() if resources.generation.admission else {},
        "dependencies": {"models": registry.snapshot(), **services},
    }
    return JSONResponse(body, status_code=503 if status == "unhealthy" else 200)


@router.get("/health/live", summary="Liveness: the process serves HTTP")
async def live() -> dict[str, str]:
    return {"status": "alive"}


NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Not ready: preloading, a preloaded model is down, or the service is shutting down",
        "content": {"application/json": {"example": {"status": "not_ready", "reason": "preloading models"}}},
    }
}


@router.get(
    "/health/ready", summary="Readiness: every preloaded slot is loaded and none failed", responses=NOT_READY
)
async def ready(registry: RegistryDep, resources: ResourcesDep) -> JSONResponse:
    if resources.drain.draining:
        return JSONResponse({"status": "not_ready", "reason": "shutting down"}, status_code=503)
    if registry.is_ready():
        return JSONResponse({"status": "ready"})
    reason = "preloading models" if not registry.preload_done else "a preloaded model is down"
    return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(collectors: MetricsDep, registry: RegistryDep) -> Response:
    for name in registry.slot_names:  # the engines' own counts, read now
        engine = registry.slot(name).engine
        collectors.engine_requests.labels(model=name).set(engine.num_requests() if engine is not None else 0)
        usage = engine.kv_cache_usage() if engine is not None else None
        collectors.engine_kv_cache_usage.labels(model=name).set(usage or 0.0)
    collectors.event_loop_tasks.set(len(asyncio.all_tasks()))
    return Response(collectors.render(), media_type=collectors.content_type)
