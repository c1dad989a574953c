"""Engine death, automatic retries with back-off, and waiting for device memory (fake engines)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest

from llm_service.app import EngineBackend, create_app
from llm_service.engines.base import EngineConfig, EngineDead, GenerationRequest, RenderedPrompt, SamplingOptions
from llm_service.engines.fake import FakeEngine
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy, SlotState
from llm_service.registry.memory import DeviceMemory

from .conftest import GIB, FakeFactory, fake_settings, slot_config

HANG_GUARD = 10.0  # seconds: only stops a test that would otherwise hang


async def until(predicate: Callable[[], bool], within: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def test_backoff_doubles_per_failure_up_to_the_max() -> None:
    policy = RegistryPolicy(retry_backoff=2, retry_backoff_max=10)
    assert [policy.backoff(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


async def test_a_killed_engine_is_noticed_at_once_and_its_requests_fail_at_once(make_registry):
    registry, factory = make_registry(
        pinned=("standard",), factory=FakeFactory(token_delay=0.05), retry_backoff=0.1
    )
    registry.start(preload=True)
    await registry.wait_preloaded()
    assert registry.is_ready()
    failure: list[BaseException] = []

    async def long_request() -> None:
        try:
            async with registry.acquire("standard") as engine:
                request = GenerationRequest("r", RenderedPrompt("one two three", 3), SamplingOptions(max_tokens=100))
                async for _ in engine.generate(request):
                    pass
        except EngineDead as exc:
            failure.append(exc)

    running = asyncio.create_task(long_request())
    await asyncio.sleep(0.01)
    factory.of("standard")[0].kill()
    await asyncio.sleep(0)  # the death signal arrives on the next turn of the loop, no poll needed
    await asyncio.sleep(0)
    slot = registry.slot("standard")
    assert slot.error and "died" in slot.error and not registry.is_ready()
    with pytest.raises(ModelUnavailable, match="died"):  # new requests: 503 at once
        async with registry.acquire("standard"):
            pass
    await asyncio.wait_for(running, HANG_GUARD)
    assert failure  # the request in flight ended with the engine's death, within a token
    # Without any request, the slot loads again after its back-off and readiness recovers.
    await until(registry.is_ready)
    assert slot.state is SlotState.LOADED and len(factory.of("standard")) == 2
    assert factory.of("standard")[0].shutdowns == 1
    await registry.close()


async def test_a_failed_preload_retries_by_itself_with_growing_backoff(make_registry):
    fakes = FakeFactory()
    starts: list[float] = []

    def factory(config: EngineConfig) -> FakeEngine:
        starts.append(time.monotonic())
        engine = fakes(config)
        if len(starts) <= 2:
            engine.fail_start = RuntimeError("transient download error")
        return engine

    registry, _ = make_registry(
        pinned=("standard",), factory=factory, retry_backoff=0.1, retry_backoff_max=0.2
    )
    registry.start(preload=True)
    await registry.wait_preloaded()
    assert not registry.is_ready() and registry.snapshot()["standard"]["next_retry_seconds"] is not None
    await until(registry.is_ready)
    assert len(starts) == 3
    first_gap, second_gap = starts[1] - starts[0], starts[2] - starts[1]
    assert first_gap >= 0.1 and second_gap >= 0.2
    assert registry.slot("standard").failures == 0 and registry.slot("standard").error is None
    await registry.close()


async def test_a_failed_lazy_slot_retries_only_if_it_fits_without_evicting(make_registry):
    fakes = FakeFactory()
    fakes.per_slot["longctx"] = {"fail_start": RuntimeError("out of memory")}
    registry, _ = make_registry(factory=fakes, retry_backoff=0.05)
    with pytest.raises(ModelUnavailable, match="out of memory"):
        async with registry.acquire("longctx"):
            pass
    for name in ("standard", "multimodal"):  # the budget is now full of serving slots
        async with registry.acquire(name):
            pass
    fakes.per_slot.clear()
    slot = registry.slot("longctx")
    await until(lambda: slot.state is not SlotState.FAILED)
    # Not worth evicting a serving slot for: the failure expires, the next request loads it.
    assert slot.state is SlotState.UNLOADED and slot.error is None
    assert len(fakes.of("longctx")) == 1
    assert {n: registry.slot(n).state for n in ("standard", "multimodal")} == {
        "standard": SlotState.LOADED, "multimodal": SlotState.LOADED,
    }
    await registry.close()


class ReleasingMemory:
    """A device whose memory comes back `lag` seconds after an engine's shutdown."""

    def __init__(self, factory: FakeFactory, lag: float) -> None:
        self.factory, self.lag = factory, lag
        self.shut_at: dict[int, float] = {}

    def free(self) -> int:
        now = time.monotonic()
        held = 0.0
        for engine in self.factory.engines:
            if engine.shutdowns and id(engine) not in self.shut_at:
                self.shut_at[id(engine)] = now
            released = id(engine) in self.shut_at and now - self.shut_at[id(engine)] >= self.lag
            if engine.started or (engine.shutdowns and not released):
                held += engine.config.memory_share
        return int((1.0 - held) * 10 * GIB)


@pytest.mark.parametrize(("lag", "memory_wait", "released_first"), [(0.2, 5.0, True), (5.0, 0.2, False)])
async def test_a_load_after_an_eviction_waits_for_the_memory_to_come_back(
    lag: float, memory_wait: float, released_first: bool
) -> None:
    fakes = FakeFactory()
    device = ReleasingMemory(fakes, lag)
    free_at_start: list[int] = []

    def factory(config: EngineConfig) -> FakeEngine:
        free_at_start.append(device.free())
        return fakes(config)

    registry = ModelRegistry(
        [(slot_config("standard", 0.9), False), (slot_config("longctx", 0.9), False)],
        0.9,
        factory,
        Metrics(),
        RegistryPolicy(min_residency=0, swap_fairness=0, memory_wait=memory_wait),
        memory=DeviceMemory(10 * GIB, device.free, interval=0.01),
    )
    for name in ("standard", "longctx"):  # the second evicts the first
        async with registry.acquire(name):
            pass
    need = int(0.9 * 10 * GIB)
    # Bounded: when the memory does not come back in time, the load goes ahead (and vLLM decides).
    assert (free_at_start[1] >= need) is released_first
    assert registry.slot("longctx").state is SlotState.LOADED
    await registry.close()


async def test_unknown_free_memory_does_not_wait() -> None:
    assert await DeviceMemory(GIB, lambda: None).wait_for(0.5, within=60)


async def test_readiness_and_streams_follow_an_engine_death_through_the_app() -> None:
    factory = FakeFactory(token_delay=0.05)
    app = create_app(fake_settings(load_retry_seconds=0.2), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health/ready")).status_code == 200
            body = {"model": "standard", "prompt": "one two three four five six", "stream": True}

            async def kill_mid_stream() -> None:
                await asyncio.sleep(0.12)  # two of the six tokens are out
                factory.of("standard")[0].kill()

            killer = asyncio.create_task(kill_mid_stream())
            r = await client.post("/generate", json=body)  # ASGITransport reads the whole stream
            await killer
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[0]["type"] == "delta" and events[-1]["type"] == "error"
            assert events[-1]["error"]["type"] == "engine_error"
            ready = await client.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "a preloaded model is down"
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
            refused = await client.post("/generate", json={"model": "standard", "prompt": "hi"})
            assert refused.status_code == 503 and "retry-after" in refused.headers
            deadline = time.monotonic() + HANG_GUARD
            while (await client.get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert (await client.post("/generate", json={"model": "standard", "prompt": "hi"})).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'llm_engine_deaths_total{model="standard"} 1.0' in metrics
            assert 'llm_model_loads_total{model="standard"} 2.0' in metrics
