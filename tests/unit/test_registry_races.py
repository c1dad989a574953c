"""Regressions of the concurrency bugs of the registry, the fan-out and the coalescer (fake engines)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llm_service.api.fanout import open_all
from llm_service.app import EngineBackend, create_app
from llm_service.cache.store import CachePolicy, NoCache
from llm_service.engines.base import EngineConfig, SamplingOptions
from llm_service.engines.fake import FakeEngine
from llm_service.errors import ServiceError
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, SlotState
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.generation import GenerationService, GenerationSpec

from .conftest import GIB, FakeFactory, fake_settings

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
HANG_GUARD = 10.0  # seconds: only stops a test that would otherwise hang


async def _use(registry: ModelRegistry, slot: str) -> None:
    async with registry.acquire(slot):
        await asyncio.sleep(0)


# --- 1. slots that do not fit together evicted each other until both requests failed -------
async def test_two_slots_that_do_not_fit_together_each_load_once_and_serve(make_registry):
    registry, factory = make_registry(
        shares={"standard": 0.4, "longctx": 0.4}, budget=0.6, factory=FakeFactory(start_delay=0.05), load_wait=3
    )
    results = await asyncio.gather(
        _use(registry, "standard"), _use(registry, "longctx"), return_exceptions=True
    )
    assert results == [None, None]
    assert len(factory.of("standard")) == 1 and len(factory.of("longctx")) == 1
    await registry.close()


async def test_two_lazy_slots_beside_a_busy_one_are_each_loaded_once(make_registry):
    """The shipped layout: three slots of 0.3 in a 0.6 budget, `standard` busy."""
    registry, factory = make_registry(factory=FakeFactory(start_delay=0.05), load_wait=3, eviction_wait=3)
    release = asyncio.Event()

    async def hold() -> None:
        async with registry.acquire("standard"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    results = await asyncio.gather(
        _use(registry, "longctx"), _use(registry, "multimodal"), return_exceptions=True
    )
    release.set()
    await holder
    assert results == [None, None]
    assert len(factory.of("longctx")) == 1 and len(factory.of("multimodal")) == 1
    assert len(factory.of("standard")) == 1
    await registry.close()


# --- 2. a streamed prompt list leaked its generations when the client went away at send -----
async def test_a_client_gone_at_send_aborts_every_stream_of_a_prompt_list() -> None:
    factory = FakeFactory(token_delay=0.02)
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    body = {"model": "standard", "prompt": ["one two three", "four five six"], "stream": True, "max_tokens": 50}
    bodies_sent = 0
    body_read = False
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        # As a server does: the body once, then nothing until the client disconnects.
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies_sent
        if message["type"] == "http.response.body":
            bodies_sent += 1
            if bodies_sent == 2:
                gone.set()
                raise OSError("the client went away")  # how uvicorn reports it under ASGI 2.4

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"fan")],
    }
    async with app.router.lifespan_context(app):
        registry = app.state.resources.registry
        await registry.wait_preloaded()
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        engine = factory.of("standard")[0]
        # Every engine request was stopped by the time the response ended, not run for nobody.
        assert len(engine.aborted) == 2 and all(rid.startswith("fan-") for rid in engine.aborted)
        assert registry.slot("standard").in_flight == 0


# --- 3. a dead engine's share was freed before the engine had stopped ------------------------
async def test_a_dead_engines_share_is_held_until_it_has_shut_down(make_registry):
    running_at_start: list[list[str]] = []
    fakes = FakeFactory(shutdown_delay=0.2)

    def factory(config: EngineConfig) -> FakeEngine:
        running_at_start.append([e.config.slot for e in fakes.engines if e.started])
        return fakes(config)

    registry, _ = make_registry(budget=0.3, factory=factory, retry_backoff=60)
    await _use(registry, "standard")
    dead = fakes.of("standard")[0]
    dead.kill()
    await registry.reap()
    assert registry.used_share() == pytest.approx(0.3)
    await _use(registry, "longctx")
    # longctx's engine started only once the dead engine had released its memory.
    assert running_at_start == [[], []]
    assert registry.slot("standard").state is SlotState.FAILED
    await registry.close()


# --- 4. coalesced readers waited forever when the shared generation was cancelled ------------
async def test_coalesced_readers_get_an_error_when_the_shared_generation_is_cancelled(make_registry):
    registry, _ = make_registry(factory=FakeFactory(token_delay=0.05))
    metrics = Metrics()
    coalescer = Coalescer(CachePolicy(fake_settings(cache_enabled=True).llm), NoCache(), metrics)
    service = GenerationService(registry, metrics, 16, coalescer=coalescer)

    def spec(request_id: str) -> GenerationSpec:
        return GenerationSpec(request_id, "standard", SamplingOptions(max_tokens=0, temperature=0.0), messages=CAPITAL)

    first = await service.open(spec("a"))
    second = await service.open(spec("b"))
    assert second.cache_status == "coalesced"

    async def read(stream: Any) -> str:
        return "".join([d.text async for d in stream])

    readers = [asyncio.create_task(read(s)) for s in (first, second)]
    await asyncio.sleep(0.01)
    await coalescer.close()  # as at shutdown
    done, pending = await asyncio.wait(readers, timeout=HANG_GUARD)
    assert not pending, "a coalesced reader is still waiting"
    for task in done:
        error = task.exception()
        assert isinstance(error, ServiceError) and error.status_code == 503
    await registry.close()


# --- also seen: cancellation, cleanup, the reaper, request ids --------------------------------
@pytest.mark.parametrize("turns", range(6))
async def test_a_request_cancelled_as_its_load_finishes_stays_cancelled(make_registry, turns: int):
    """Python 3.11's wait_for() returns the result when a cancellation arrives as it completes."""
    acquirer: asyncio.Task[None] | None = None

    class CancelsAtEnd(FakeEngine):
        async def start(self) -> None:
            await super().start()
            loop = asyncio.get_running_loop()

            def cancel_after(n: int) -> None:
                if n == 0:
                    assert acquirer is not None
                    acquirer.cancel()
                else:
                    loop.call_soon(cancel_after, n - 1)

            cancel_after(turns)

    registry, _ = make_registry(factory=CancelsAtEnd)

    async def use() -> None:
        async with registry.acquire("standard"):
            await asyncio.sleep(1.0)  # a lost cancellation lets this finish normally

    acquirer = asyncio.create_task(use())
    with contextlib.suppress(asyncio.CancelledError):
        await acquirer
    assert acquirer.cancelled()
    assert registry.slot("standard").in_flight == 0
    await registry.close()


async def test_open_all_closes_what_it_opened_when_cancelled(make_registry):
    fakes = FakeFactory()
    fakes.per_slot["longctx"] = {"start_delay": 5.0}
    registry, _ = make_registry(factory=fakes)
    service = GenerationService(registry, Metrics(), 16)
    specs = [
        GenerationSpec(f"r{i}", slot, SamplingOptions(max_tokens=4), prompt="one two")
        for i, slot in enumerate(["standard", "longctx"])
    ]
    opening = asyncio.create_task(open_all(service, specs))
    for _ in range(100):
        if registry.slot("standard").in_flight:
            break
        await asyncio.sleep(0.01)
    assert registry.slot("standard").in_flight == 1  # standard's stream is open, longctx loading
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    assert registry.slot("standard").in_flight == 0
    assert [rid.split("-")[0] for rid in fakes.of("standard")[0].aborted] == ["r0"]
    await registry.close()


async def test_the_reaper_survives_an_unexpected_error(make_registry):
    registry, factory = make_registry(idle_unload=0.05, health_interval=0.01)
    await _use(registry, "longctx")
    engine = factory.of("longctx")[0]
    calls = 0

    async def flaky_health() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("unexpected")

    engine.check_health = flaky_health  # type: ignore[method-assign]
    registry.start(preload=False)
    for _ in range(int(HANG_GUARD / 0.01)):
        if registry.slot("longctx").state is SlotState.UNLOADED:
            break
        await asyncio.sleep(0.01)
    assert calls >= 2 and registry.slot("longctx").state is SlotState.UNLOADED
    await registry.close()


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    factory = FakeFactory(token_delay=0.01)
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, factory


async def test_requests_that_reuse_a_request_id_get_distinct_engine_ids(app_client) -> None:
    client, factory = app_client
    body = {"model": "standard", "prompt": "one two three"}
    responses = await asyncio.gather(
        *(client.post("/generate", json=body, headers={"X-Request-ID": "same"}) for _ in range(2))
    )
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.headers["x-request-id"] for r in responses] == ["same", "same"]
    ids = factory.of("standard")[0].request_ids
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("same-") for i in ids)
