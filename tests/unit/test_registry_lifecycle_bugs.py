"""Regressions of the six lifecycle bugs of issue 22, on fake engines and a virtual clock.

Each test runs the registry on `VirtualLoop`: seconds of the scenario pass without any real wait,
and the same scenario gives the same times on every run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from llm_service.engines.base import EngineDead, GenerationRequest, RenderedPrompt, SamplingOptions
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy, SlotState

from .conftest import FakeFactory, slot_config
from .virtual_loop import run_virtual

THREE = {"standard": 0.3, "longctx": 0.3, "multimodal": 0.3}


def build(
    factory: FakeFactory, shares: dict[str, float] = THREE, budget: float = 0.6, pinned: tuple[str, ...] = (),
    **timing: Any,
) -> ModelRegistry:
    """A registry on the running (virtual) loop's clock."""
    slots = [(slot_config(name, share), name in pinned) for name, share in shares.items()]
    clock = asyncio.get_running_loop().time
    return ModelRegistry(slots, budget, factory, Metrics(), RegistryPolicy(**timing), clock=clock)


async def ask(registry: ModelRegistry, slot: str, tokens: int = 1) -> str:
    """One request of `tokens` tokens (a second each with the factories below); how it ended."""
    try:
        async with registry.acquire(slot) as engine:
            prompt = RenderedPrompt("one two three", 3)
            sampling = SamplingOptions(max_tokens=tokens, ignore_eos=True)
            async for _ in engine.generate(GenerationRequest(f"{slot}-r", prompt, sampling)):
                pass
        return "served"
    except ModelUnavailable as exc:
        return f"503 {exc.message}"
    except EngineDead:
        return "engine died"


def later(delay: float, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    async def run() -> Any:
        await asyncio.sleep(delay)
        return await coro

    return asyncio.create_task(run())


def evictions(registry: ModelRegistry, slot: str) -> float:
    return registry._metrics.evictions.labels(model=slot)._value.get()


# --- 1 ------------------------------------------------------------------------------------------
def test_bug1_a_pinned_slot_whose_retry_found_no_room_loads_once_room_exists() -> None:
    """standard (pinned) dies while the two lazy slots serve long requests; its retry finds no
    room and its drain gives up; once the lazy slots idle out it must load again by itself."""

    async def scenario() -> None:
        factory = FakeFactory(start_delay=1.0, token_delay=1.0)
        registry = build(
            factory, pinned=("standard",), retry_backoff=10, idle_unload=60, eviction_wait=10, swap_fairness=30,
            min_residency=5, load_wait=120,
        )
        registry.start(preload=True)
        await registry.wait_preloaded()
        assert registry.is_ready()
        factory.of("standard")[0].kill()
        await asyncio.sleep(1)
        busy = [asyncio.create_task(ask(registry, name, tokens=100)) for name in ("longctx", "multimodal")]
        assert await asyncio.gather(*busy) == ["served", "served"]
        await asyncio.sleep(400)  # the lazy slots idle out after 60 s; standard's back-off is 10 s
        assert registry.slot("standard").state is SlotState.LOADED
        assert registry.is_ready()
        await registry.close()

    run_virtual(scenario())


# --- 2 ------------------------------------------------------------------------------------------
def test_bug2_a_lazy_slots_retry_never_evicts_a_serving_slot() -> None:
    """longctx failed; when its back-off ends it fits, but a load queued ahead fills the budget
    first: the retry must then wait for a request, not make room."""

    async def scenario() -> None:
        factory = FakeFactory(start_delay=1.0, token_delay=1.0)
        factory.per_slot["longctx"] = {"fail_start": RuntimeError("transient")}
        registry = build(
            factory, retry_backoff=10, eviction_wait=10, swap_fairness=0, min_residency=0, load_wait=120,
        )
        assert (await ask(registry, "longctx")).startswith("503")  # failed at t0+1, retry at t0+11
        factory.per_slot.clear()
        standard = asyncio.create_task(ask(registry, "standard", tokens=200))
        await asyncio.sleep(3)
        admin = later(2, registry.unload("standard"))  # held up by standard's long request
        multimodal = later(4, ask(registry, "multimodal", tokens=5))  # asks before longctx's retry
        await asyncio.sleep(60)
        assert isinstance((await asyncio.gather(admin, return_exceptions=True))[0], ModelUnavailable)
        assert registry.slot("longctx").state is not SlotState.LOADED
        assert evictions(registry, "standard") == 0 and evictions(registry, "multimodal") == 0
        assert await asyncio.gather(standard, multimodal) == ["served", "served"]
        await registry.close()

    run_virtual(scenario())


# --- 3 ------------------------------------------------------------------------------------------
def test_bug3_a_drained_slot_whose_engine_dies_frees_its_share_for_the_waiting_load() -> None:
    async def scenario() -> None:
        factory = FakeFactory(start_delay=1.0, token_delay=1.0)
        registry = build(factory, eviction_wait=10, swap_fairness=0, min_residency=0, retry_backoff=300)
        standard = asyncio.create_task(ask(registry, "standard", tokens=100))
        await asyncio.sleep(2)
        longctx = asyncio.create_task(ask(registry, "longctx", tokens=100))
        await asyncio.sleep(2)
        multimodal = asyncio.create_task(ask(registry, "multimodal", tokens=3))
        await asyncio.sleep(1)
        assert registry.snapshot()["standard"]["draining"]  # the least recently used victim
        factory.of("standard")[0].kill()
        assert await multimodal == "served"
        assert await standard == "engine died"
        assert await longctx == "served"  # never drained, never evicted
        assert evictions(registry, "longctx") == 0 and factory.of("longctx")[0].shutdowns == 0
        await registry.close()

    run_virtual(scenario())


# --- 4 ------------------------------------------------------------------------------------------
def test_bug4_one_retry_schedule_per_slot_whatever_the_admin_does() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        starts: list[float] = []
        fakes = FakeFactory()

        def factory(config: Any) -> Any:
            starts.append(loop.time())
            engine = fakes(config)
            engine.fail_start = RuntimeError("always")
            return engine

        registry = build(factory, pinned=("standard",), retry_backoff=1, retry_backoff_max=4)  # type: ignore[arg-type]
        t0 = loop.time()
        registry.start(preload=True)
        await asyncio.sleep(0.5)
        try:
            await registry.load("standard")
        except ModelUnavailable:
            pass
        assert registry.snapshot()["standard"]["next_retry_seconds"] == 2.0
        await asyncio.sleep(11)
        await registry.close()
        return [round(s - t0, 3) for s in starts]

    # The preload, the admin load, then one back-off after each failure: 2, 4, 4 (the max).
    assert run_virtual(scenario()) == [0.0, 0.5, 2.5, 6.5, 10.5]


# --- 5 ------------------------------------------------------------------------------------------
def test_bug5_the_slot_chosen_to_drain_stays_the_only_one_drained() -> None:
    async def scenario() -> None:
        factory = FakeFactory(start_delay=1.0, token_delay=1.0)
        registry = build(factory, eviction_wait=10, swap_fairness=0, min_residency=0)
        standard = [asyncio.create_task(ask(registry, "standard", tokens=n)) for n in (3, 8)]
        await asyncio.sleep(1.5)
        longctx = asyncio.create_task(ask(registry, "longctx", tokens=30))
        await asyncio.sleep(1.5)
        multimodal = asyncio.create_task(ask(registry, "multimodal", tokens=1))
        drained: set[str] = set()
        while not multimodal.done():
            drained |= {name for name, s in registry.snapshot().items() if s["draining"]}
            await asyncio.sleep(0.25)
        assert await multimodal == "served"
        assert drained == {"standard"}
        assert await asyncio.gather(*standard, longctx) == ["served"] * 3
        assert evictions(registry, "longctx") == 0
        await registry.close()

    run_virtual(scenario())


# --- 6 ------------------------------------------------------------------------------------------
def test_bug6_the_fewest_victims_are_evicted() -> None:
    """A 40 GiB plan: loading multimodal needs 0.26 freed; longctx alone frees it."""

    async def scenario() -> None:
        factory = FakeFactory(start_delay=1.0)
        shares = {"standard": 0.23, "longctx": 0.50, "multimodal": 0.38}
        registry = build(factory, shares=shares, budget=0.85, min_residency=0)
        assert await ask(registry, "standard") == "served"
        await asyncio.sleep(1)
        assert await ask(registry, "longctx") == "served"
        await asyncio.sleep(1)
        assert await ask(registry, "multimodal") == "served"
        states = {name: s["state"] for name, s in registry.snapshot().items()}
        assert states == {"standard": "loaded", "longctx": "unloaded", "multimodal": "loaded"}
        await registry.close()

    run_virtual(scenario())
