"""No route runs a plain `def` dependency or endpoint: FastAPI would run each in its thread pool,
a thread hop per request (three of them cost a cache hit about 2 ms of CPU on 2 cores)."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from llm_service.app import EngineBackend, create_app

from .conftest import GIB, FakeFactory, fake_settings


def _sync_calls(dependant: Dependant, seen: set[Any]) -> list[str]:
    found = []
    for sub in dependant.dependencies:
        call = sub.call
        if call is None or call in seen:
            continue
        seen.add(call)
        # A security scheme (HTTPBearer, say) is an instance whose __call__ is the dependency.
        target = call if inspect.isfunction(call) or inspect.ismethod(call) else type(call).__call__
        if not inspect.iscoroutinefunction(target):
            found.append(getattr(call, "__qualname__", repr(call)))
        found += _sync_calls(sub, seen)
    return found


def test_every_dependency_and_endpoint_is_async() -> None:
    app = create_app(fake_settings(), EngineBackend(FakeFactory(), "cpu", 8 * GIB))
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert routes
    sync = {}
    for route in routes:
        calls = _sync_calls(route.dependant, set())
        if not inspect.iscoroutinefunction(route.endpoint):
            calls.append(route.endpoint.__qualname__)
        if calls:
            sync[route.path] = calls
    assert sync == {}
