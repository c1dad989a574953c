"""Fixtures for fast tests on the fake engine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import AppSettings, LLMSettings, Settings
from llm_service.engines.base import EngineConfig
from llm_service.engines.fake import FakeEngine
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy

GIB = 1024**3

# Unit tests never ask the Hugging Face Hub: model metadata comes from local folders, a test's own
# cache directory or the configs shipped with the package.
os.environ["HF_HUB_OFFLINE"] = "1"


class FakeFactory:
    """Makes FakeEngines and remembers them, per slot."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.engine_kwargs = engine_kwargs
        self.per_slot: dict[str, dict[str, Any]] = {}
        self.engines: list[FakeEngine] = []

    def __call__(self, config: EngineConfig) -> FakeEngine:
        kwargs = {**self.engine_kwargs, **self.per_slot.get(config.slot, {})}
        engine = FakeEngine(config, **kwargs)
        self.engines.append(engine)
        return engine

    def of(self, slot: str) -> list[FakeEngine]:
        return [e for e in self.engines if e.config.slot == slot]


def slot_config(slot: str, share: float = 0.3, max_model_len: int = 512) -> EngineConfig:
    return EngineConfig(
        slot=slot, model_id=f"fake/{slot}", max_model_len=max_model_len, memory_share=share,
        device="cpu", enforce_eager=True,
    )


@pytest.fixture
def make_registry() -> Callable[..., tuple[ModelRegistry, FakeFactory]]:
    def make(
        shares: dict[str, float] | None = None,
        budget: float = 0.6,
        pinned: tuple[str, ...] = (),
        factory: FakeFactory | None = None,
        **policy: Any,
    ) -> tuple[ModelRegistry, FakeFactory]:
        shares = shares or {"standard": 0.3, "longctx": 0.3, "multimodal": 0.3}
        factory = factory or FakeFactory()
        slots = [(slot_config(name, share), name in pinned) for name, share in shares.items()]
        # Swap without delays unless a test asks for them: these tests are about the mechanism.
        policy = {"min_residency": 0.0, "swap_fairness": 0.0, **policy}
        registry = ModelRegistry(slots, budget, factory, Metrics(), RegistryPolicy(**policy))
        return registry, factory

    return make


def fake_settings(**llm: Any) -> Settings:
    base = {
        "model_standard": "fake/standard",
        "model_longctx": "fake/longctx",
        "model_multimodal": "fake/multimodal",
        "memory_share_standard": 0.3,
        "memory_share_longctx": 0.3,
        "memory_share_multimodal": 0.3,
        "max_model_len_standard": 512,
        "max_model_len_longctx": 1024,
        "max_model_len_multimodal": 512,
        "gpu_memory_utilization": 0.6,
        "preload_models": ["standard"],
        "cache_enabled": False,  # the cache suites turn it on against their own redis-server
    }
    base.update(llm)
    return Settings(app=AppSettings(env="test"), llm=LLMSettings(**base))


@pytest.fixture
async def fake_app() -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    """The real app on fake engines, lifespan running, with an httpx client."""
    factory = FakeFactory()
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        registry = app.state.resources.registry
        await registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, factory


@contextlib.asynccontextmanager
async def admin_client_for(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    """The real app on fake engines with APP_ADMIN_TOKEN=s3cret, preloads done, and an httpx client."""
    factory = FakeFactory()
    settings = settings.model_copy(update={"app": AppSettings(env="test", admin_token=SecretStr("s3cret"))})
    app = create_app(settings, EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client, factory
