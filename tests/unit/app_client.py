"""An httpx client on the real app over fake engines, with settings and engine options of the test's choosing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import AppSettings, Settings

from .conftest import GIB, FakeFactory, fake_settings


def build_app(
    engine: dict[str, Any] | None = None, app: dict[str, Any] | None = None, **llm: Any
) -> tuple[FastAPI, FakeFactory]:
    factory = FakeFactory(**(engine or {}))
    settings = fake_settings(**llm)
    if app:
        settings = Settings(app=AppSettings(env="test", **app), llm=settings.llm)
    return create_app(settings, EngineBackend(factory, "cpu", 8 * GIB)), factory


@contextlib.asynccontextmanager
async def running(application: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running and preloading done, and a client on it."""
    async with application.router.lifespan_context(application):
        await application.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


@contextlib.asynccontextmanager
async def app_client(
    engine: dict[str, Any] | None = None, app: dict[str, Any] | None = None, **llm: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    application, factory = build_app(engine, app, **llm)
    async with running(application) as client:
        yield client, factory
