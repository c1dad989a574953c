"""Typed dependencies: how handlers reach what the lifespan built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from llm_service.api.accounting import record_of
from llm_service.cache.store import NoCache, ResponseCache
from llm_service.config.settings import Settings
from llm_service.observability.metrics import Metrics
from llm_service.observability.tracing import NoTracer, Tracer
from llm_service.registry import ModelRegistry
from llm_service.serving.embeddings import EmbeddingService
from llm_service.serving.generation import GenerationService
from llm_service.serving.rerank import RerankService
from llm_service.traffic.api_keys import ApiKeys
from llm_service.traffic.drain import Drain
from llm_service.traffic.request_record import RequestRecord


@dataclass
class Resources:
    """Everything the lifespan owns, stored once on app.state.resources."""

    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    generation: GenerationService
    started_at: float
    cache: ResponseCache = field(default_factory=NoCache)
    tracer: Tracer = field(default_factory=NoTracer)
    embeddings: EmbeddingService | None = None  # None only in tests that build Resources by hand
    rerank: RerankService | None = None  # the same
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys(frozenset()))
    drain: Drain = field(default_factory=Drain)


# The getters are coroutines on purpose: FastAPI runs a plain-def dependency in its thread pool,
# a thread hop per dependency per request (measured: a fifth of a cache hit's CPU).
async def get_resources(request: Request) -> Resources:
    return _resources(request)


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


async def get_settings(request: Request) -> Settings:
    return _resources(request).settings


async def get_registry(request: Request) -> ModelRegistry:
    return _resources(request).registry


async def get_metrics(request: Request) -> Metrics:
    return _resources(request).metrics


async def get_generation(request: Request) -> GenerationService:
    return _resources(request).generation


async def get_request_id(request: Request) -> str:
    request_id: str = request.scope.get("state", {}).get("request_id") or ""
    return request_id


async def get_request_record(request: Request) -> RequestRecord:
    return record_of(request.scope)


ResourcesDep = Annotated[Resources, Depends(get_resources)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
GenerationDep = Annotated[GenerationService, Depends(get_generation)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
RequestRecordDep = Annotated[RequestRecord, Depends(get_request_record)]
