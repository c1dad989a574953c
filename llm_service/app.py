"""create_app: the FastAPI application; its lifespan owns every resource."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI

from llm_service import __version__
from llm_service.api import admin, embeddings, generate, health, openai, rerank
from llm_service.api.accounting import RequestAccounting, generation_paths
from llm_service.api.auth import ApiKeyDep
from llm_service.api.deps import Resources
from llm_service.api.errors import install_error_handlers
from llm_service.api.fast_path import FastPath
from llm_service.api.guard import RequestGuard
from llm_service.api.request_id import RequestIdMiddleware
from llm_service.cache.local import build_cache
from llm_service.cache.store import CachePolicy
from llm_service.config.engine_configs import build_slot_configs
from llm_service.config.frontend import with_frontend
from llm_service.config.settings import Settings
from llm_service.engines.base import EngineCapacity, EngineConfig
from llm_service.observability.metrics import Metrics
from llm_service.observability.tracing import build_tracer
from llm_service.registry import EngineFactory, ModelRegistry, RegistryPolicy, SlotState
from llm_service.registry.memory import DeviceMemory, FreeMemory
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.embeddings import EmbeddingService
from llm_service.serving.generation import GenerationService
from llm_service.serving.rerank import RerankService
from llm_service.traffic.admission import AdmissionController, AdmissionLimits, AdmissionPolicy
from llm_service.traffic.api_keys import ApiKeys
from llm_service.traffic.drain import Drain

log = structlog.get_logger(__name__)


def _no_host_args(config: EngineConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class EngineBackend:
    """How engines are made, and the device whose memory the budget divides."""

    factory: EngineFactory
    device: str
    device_memory: int | None
    free_memory: FreeMemory | None = None  # what a new engine could take now; None: not measured
    # Engine arguments this backend chooses for a slot on this host that change its outputs (the
    # CPU's dtype): written into the slot's configuration, so the cache key carries them.
    host_args: Callable[[EngineConfig], dict[str, Any]] = _no_host_args


def vllm_backend(device_setting: str) -> EngineBackend:
    """The real backend; importing it imports vLLM."""
    from llm_service.engines import vllm as vllm_engines

    device, problem = vllm_engines.choose_device(device_setting, vllm_engines.platform_facts())
    if problem is not None:
        # Every load fails with this reason too; said once here, where an operator looks first.
        log.error("device_unusable", device=device, reason=problem)
    return EngineBackend(
        vllm_engines.VLLMEngine,
        device,
        vllm_engines.device_memory_bytes(device),
        lambda: vllm_engines.free_memory_bytes(device),
        vllm_engines.cpu_dtype_args,
    )


def with_host_args(config: EngineConfig, backend: EngineBackend) -> EngineConfig:
    """The slot's configuration with what the backend chooses on this host made explicit: an entry
    written by a bf16 engine must not answer for a float32 one sharing the Redis."""
    chosen = backend.host_args(config)
    if not chosen:
        return config
    return dataclasses.replace(config, extra_args={**chosen, **config.extra_args})


def build_registry(settings: Settings, backend: EngineBackend, metrics: Metrics) -> ModelRegistry:
    llm = settings.llm
    policy = RegistryPolicy(
        load_wait=llm.load_wait_seconds,
        eviction_wait=llm.eviction_wait_seconds,
        retry_backoff=llm.load_retry_seconds,
        retry_backoff_max=llm.load_retry_max_seconds,
        idle_unload=llm.idle_unload_seconds,
        min_residency=llm.min_residency_seconds,
        swap_fairness=llm.swap_fairness_seconds,
        memory_wait=llm.memory_wait_seconds,
    )
    slots = with_frontend(build_slot_configs(llm, backend.device, backend.device_memory), settings)
    slots = [(with_host_args(config, backend), pinned) for config, pinned in slots]
    if not llm.load_on_startup:
        # Nothing is preloaded, so nothing is pinned against idle unloading either.
        slots = [(config, False) for config, _ in slots]
    memory = None
    if backend.free_memory is not None and backend.device_memory:
        memory = DeviceMemory(backend.device_memory, backend.free_memory)
    return ModelRegistry(slots, llm.gpu_memory_utilization, backend.factory, metrics, policy, memory=memory)


def build_admission(settings: Settings, registry: ModelRegistry, metrics: Metrics) -> AdmissionController:
    llm = settings.llm
    limits = AdmissionLimits(
        per_slot=llm.max_pending_per_slot,
        total=llm.max_pending_total,
        per_batch=llm.pending_per_batch,
        before_load=llm.max_pending_before_load,
    )

    def loaded_capacity(slot: str) -> EngineCapacity | None:
        loaded = registry.slot(slot)
        if loaded.state is not SlotState.LOADED or loaded.engine is None:
            return None
        return loaded.engine.capacity()

    return AdmissionController(registry.slot_names, AdmissionPolicy(limits), metrics, loaded_capacity)


def create_app(settings: Settings, backend: EngineBackend | None = None) -> FastAPI:
    """The application. Nothing heavy happens here; the lifespan builds the resources."""
    # Drain state exists before the lifespan: the request guard and the SIGTERM handler share it.
    drain = Drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chosen = backend or vllm_backend(settings.llm.device)
        metrics = Metrics()
        registry = build_registry(settings, chosen, metrics)
        cache = build_cache(settings, metrics)
        tracer = build_tracer(settings)
        coalescer = Coalescer(CachePolicy(settings.llm), cache, metrics)
        admission = build_admission(settings, registry, metrics)  # one for every surface
        app.state.resources = Resources(
            settings=settings,
            metrics=metrics,
            registry=registry,
            generation=GenerationService(
                registry,
                metrics,
                settings.llm.default_max_tokens,
                coalescer=coalescer,
                tracer=tracer,
                admission=admission,
            ),
            started_at=time.time(),
            cache=cache,
            tracer=tracer,
            embeddings=EmbeddingService(
                registry,
                metrics,
                cache,
                cache_enabled=settings.llm.cache_enabled,
                namespace=settings.llm.cache_namespace,
                ttl=settings.llm.cache_ttl_seconds,
                max_inputs=settings.llm.embedding_max_inputs,
                tracer=tracer,
                admission=admission,
            ),
            rerank=RerankService(
                registry, metrics, max_documents=settings.llm.rerank_max_documents, tracer=tracer, admission=admission
            ),
            api_keys=ApiKeys(settings.llm.api_key_set()),
            drain=drain,
        )
        log.info(
            "service_starting",
            version=__version__,
            device=chosen.device,
            budget=settings.llm.gpu_memory_utilization,
            slots=registry.snapshot(),
        )
        registry.start(preload=settings.llm.load_on_startup)
        await cache.start()
        try:
            yield
        finally:
            log.info("service_stopping")
            try:
                await coalescer.close()
                await registry.close()
            finally:
                await cache.close()
                await tracer.close()

    app = FastAPI(
        title="llm-service",
        version=__version__,
        description="Multi-model LLM inference on vLLM with a memory-budgeted model registry.",
        lifespan=lifespan,
    )
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.app.max_body_bytes, drain=drain)
    # Memory-tier hits and admission's refusals are answered before the guard and the router.
    fast_routes = {"/generate": generate.FAST_ROUTE, "/v1/chat/completions": openai.CHAT_FAST_ROUTE}
    app.add_middleware(FastPath, routes=fast_routes, max_body_bytes=settings.app.max_body_bytes, drain=drain)
    app.add_middleware(
        RequestAccounting, paths=generation_paths([generate.router, openai.router, embeddings.router, rerank.router]),
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(generate.router, dependencies=[ApiKeyDep])
    app.include_router(health.router)
    app.include_router(openai.router, dependencies=[ApiKeyDep])
    app.include_router(admin.router, dependencies=[ApiKeyDep])
    app.include_router(embeddings.router, dependencies=[ApiKeyDep])
    app.include_router(rerank.router, dependencies=[ApiKeyDep])
    return app
