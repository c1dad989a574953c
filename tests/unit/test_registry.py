"""ModelRegistry on fake engines: single loads, budget, eviction, idle unload, failures."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from llm_service.engines.fake import FakeEngine
from llm_service.errors import ModelNotFound, ModelUnavailable
from llm_service.registry import SlotState

from .conftest import FakeFactory


async def test_concurrent_first_requests_cause_one_load(make_registry):
    registry, factory = make_registry(factory=FakeFactory(start_delay=0.2))

    async def use() -> FakeEngine:
        async with registry.acquire("standard") as engine:
            return engine

    engines = await asyncio.gather(*(use() for _ in range(8)))
    assert len(factory.of("standard")) == 1
    assert all(e is engines[0] for e in engines)
    assert registry.slot("standard").state is SlotState.LOADED
    await registry.close()


async def test_waiters_past_the_bound_get_503_and_the_load_goes_on(make_registry):
    registry, factory = make_registry(factory=FakeFactory(start_delay=0.5), load_wait=0.05)
    with pytest.raises(ModelUnavailable) as info:
        async with registry.acquire("standard"):
            pass
    assert info.value.retry_after and "loading" in info.value.message
    assert registry.slot("standard").state is SlotState.LOADING
    await asyncio.sleep(0.6)
    assert registry.slot("standard").state is SlotState.LOADED
    assert len(factory.of("standard")) == 1
    await registry.close()


async def test_unknown_slot_lists_the_slots(make_registry):
    registry, _ = make_registry()
    with pytest.raises(ModelNotFound) as info:
        async with registry.acquire("nope"):
            pass
    assert "standard" in info.value.message and "longctx" in info.value.message
    await registry.close()


async def test_lru_slot_is_evicted_when_the_budget_is_full(make_registry):
    registry, factory = make_registry(budget=0.6)
    async with registry.acquire("standard"):
        pass
    await asyncio.sleep(0.01)
    async with registry.acquire("longctx"):
        pass
    await asyncio.sleep(0.01)
    async with registry.acquire("standard"):  # standard is now the most recently used
        pass
    async with registry.acquire("multimodal"):
        pass
    states = {name: registry.slot(name).state for name in registry.slot_names}
    assert states == {
        "standard": SlotState.LOADED,
        "longctx": SlotState.UNLOADED,
        "multimodal": SlotState.LOADED,
    }
    assert factory.of("longctx")[0].shutdowns == 1
    assert registry.used_share() <= registry.budget
    await registry.close()


async def test_slot_with_requests_in_flight_is_not_evicted(make_registry):
    registry, _ = make_registry(budget=0.3, eviction_wait=0.1)
    async with registry.acquire("standard"):
        with pytest.raises(ModelUnavailable) as info:
            async with registry.acquire("longctx"):
                pass
        assert "in flight" in info.value.message and "standard" in info.value.message
        assert info.value.retry_after
        assert registry.slot("standard").state is SlotState.LOADED
    assert registry.slot("longctx").state is SlotState.UNLOADED
    await registry.close()


async def test_eviction_waits_for_in_flight_requests_to_end(make_registry):
    registry, _ = make_registry(budget=0.3, eviction_wait=2.0)
    release = asyncio.Event()

    async def hold() -> None:
        async with registry.acquire("standard"):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    loader = asyncio.create_task(_use(registry, "longctx"))
    await asyncio.sleep(0.1)
    assert not loader.done()
    release.set()
    await asyncio.wait_for(loader, 2)
    await holder
    assert registry.slot("standard").state is SlotState.UNLOADED
    assert registry.slot("longctx").state is SlotState.LOADED
    await registry.close()


async def _use(registry, slot: str) -> None:
    async with registry.acquire(slot):
        pass


async def test_a_slot_larger_than_the_budget_is_refused_and_the_others_serve(make_registry):
    # Used to be a ValueError at start, which crash-looped the whole pod.
    registry, factory = make_registry(shares={"standard": 0.3, "longctx": 0.9}, budget=0.5)
    await _use(registry, "standard")
    with pytest.raises(ModelUnavailable, match="cannot be loaded on this device"):
        await _use(registry, "longctx")
    assert factory.of("longctx") == [] and registry.slot("standard").state is SlotState.LOADED
    await registry.close()


async def test_a_slot_the_plan_marks_unloadable_is_refused_without_evicting(make_registry):
    registry, factory = make_registry(budget=0.6)
    slot = registry.slot("longctx")
    slot.config = dataclasses.replace(slot.config, unloadable="needs 30.0 GiB")
    await _use(registry, "standard")
    with pytest.raises(ModelUnavailable, match=r"needs 30\.0 GiB") as info:
        await registry.load("longctx")
    assert info.value.status_code == 503
    assert factory.of("longctx") == [] and registry.slot("standard").state is SlotState.LOADED
    assert registry.snapshot()["longctx"]["error"] == "needs 30.0 GiB"
    await registry.close()


async def test_a_guide_alias_finds_its_slot(make_registry):
    registry, _ = make_registry()
    slot = registry.slot("standard")
    slot.config = dataclasses.replace(slot.config, aliases=("meta-llama/Llama-3.1-8B-Instruct-AWQ",))
    assert registry.find("meta-llama/Llama-3.1-8B-Instruct-AWQ") is slot
    await registry.close()


async def test_idle_unpinned_slots_unload_and_pinned_ones_stay(make_registry):
    registry, factory = make_registry(pinned=("standard",), idle_unload=0.05)
    registry.start(preload=True)
    await registry.wait_preloaded()
    async with registry.acquire("longctx"):
        pass
    await asyncio.sleep(0.1)
    await registry.reap()
    assert registry.slot("longctx").state is SlotState.UNLOADED
    assert registry.slot("standard").state is SlotState.LOADED
    assert factory.of("longctx")[0].shutdowns == 1
    await registry.close()


async def test_idle_unload_spares_slots_in_use(make_registry):
    registry, _ = make_registry(idle_unload=0.01)
    async with registry.acquire("longctx"):
        await asyncio.sleep(0.05)
        await registry.reap()
        assert registry.slot("longctx").state is SlotState.LOADED
    await registry.close()


async def test_failed_load_is_isolated_and_retried_after_backoff(make_registry):
    factory = FakeFactory()
    factory.per_slot["longctx"] = {"fail_start": RuntimeError("weights missing")}
    registry, _ = make_registry(factory=factory, retry_backoff=0.2)
    with pytest.raises(ModelUnavailable, match="weights missing"):
        await _use(registry, "longctx")
    slot = registry.slot("longctx")
    assert slot.state is SlotState.FAILED and "weights missing" in (slot.error or "")
    assert registry.snapshot()["longctx"]["error"] == slot.error
    # Within the back-off: refused at once, without a new load.
    with pytest.raises(ModelUnavailable) as info:
        await _use(registry, "longctx")
    assert info.value.retry_after and len(factory.of("longctx")) == 1
    # Other slots keep serving.
    await _use(registry, "standard")
    # After the back-off the load is tried again, and succeeds now.
    factory.per_slot.clear()
    await asyncio.sleep(0.25)
    await _use(registry, "longctx")
    assert slot.state is SlotState.LOADED and slot.error is None
    assert len(factory.of("longctx")) == 2
    await registry.close()


async def test_dead_engine_is_dropped_and_reloaded(make_registry):
    registry, factory = make_registry(retry_backoff=0.0)
    await _use(registry, "standard")
    first = factory.of("standard")[0]
    first.dead = True  # dead without a signal: the health check finds it
    await registry.reap()
    slot = registry.slot("standard")
    assert "died" in (slot.error or "")
    with pytest.raises(ModelUnavailable, match="died"):  # down: refused at once, not queued
        await _use(registry, "standard")
    for _ in range(100):  # it reloads by itself (back-off 0)
        if slot.state is SlotState.LOADED and slot.error is None:
            break
        await asyncio.sleep(0.01)
    await _use(registry, "standard")
    assert len(factory.of("standard")) == 2 and first.shutdowns == 1
    assert slot.state is SlotState.LOADED and slot.error is None
    await registry.close()


async def test_preload_loads_pinned_slots_and_readiness_follows(make_registry):
    registry, factory = make_registry(pinned=("standard", "longctx"))
    assert not registry.is_ready()
    registry.start(preload=True)
    await registry.wait_preloaded()
    assert registry.is_ready()
    assert [e.config.slot for e in factory.engines] == ["standard", "longctx"]
    await registry.close()
    assert all(e.shutdowns == 1 for e in factory.engines)


async def test_failed_preload_makes_the_service_not_ready(make_registry):
    factory = FakeFactory()
    factory.per_slot["standard"] = {"fail_start": RuntimeError("boom")}
    registry, _ = make_registry(factory=factory, pinned=("standard",))
    registry.start(preload=True)
    await registry.wait_preloaded()
    assert registry.preload_done and not registry.is_ready()
    await registry.close()


async def test_find_accepts_slot_name_or_model_id(make_registry):
    registry, _ = make_registry()
    assert registry.find("fake/longctx").name == "longctx"
    assert registry.find("standard").name == "standard"
    with pytest.raises(ModelNotFound):
        registry.find("fake/other")
    await registry.close()
