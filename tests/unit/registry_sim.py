"""A deterministic simulator of the registry: seeded schedules on fake engines and a virtual clock.

One schedule: a slot layout (the shipped GPU plans among them) and timing rules drawn from the
seed; then arrivals on every slot, long and short, some cancelled or given a deadline, engine
deaths (loaded, mid-request, mid-load, mid-drain), failed loads, admin loads and unloads; then a
quiet time, checks of where things settled, and shutdown. The invariants are checked after every
step of the event loop. Everything that happens is a line of the trace; a failure raises
`SimFailure` with the seed and the trace, and the seed alone replays it.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from llm_service.engines.base import EngineConfig, EngineDead, GenerationRequest, RenderedPrompt, SamplingOptions
from llm_service.engines.fake import FakeEngine
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy, SlotState

from .conftest import slot_config
from .virtual_loop import VirtualLoop

_EPS = 1e-9
TOKEN = 5.0  # seconds per token of a request: requests of 5 s to 2 minutes

# (name, shares, budget, pinned): the demo CPU set, rows of DEPLOYMENT.md's sizing table, the
# 40 GiB plan of issue 22, retrieval slots beside the generators, and the e2e swap layout.
LAYOUTS: list[tuple[str, dict[str, float], float, tuple[str, ...]]] = [
    ("cpu-demo", {"standard": 0.3, "longctx": 0.3, "multimodal": 0.3}, 0.6, ("standard",)),
    ("24GiB", {"standard": 0.34, "longctx": 0.48, "multimodal": 0.64}, 0.85, ("standard", "longctx")),
    ("22.5GiB", {"standard": 0.36, "longctx": 0.49, "multimodal": 0.68}, 0.85, ("standard", "longctx")),
    ("24GiB-guide", {"standard": 0.38, "longctx": 0.61, "multimodal": 0.64}, 0.75, ("standard",)),
    ("48GiB", {"standard": 0.19, "longctx": 0.41, "multimodal": 0.32}, 0.85, ("standard", "longctx")),
    ("80GiB", {"standard": 0.17, "longctx": 0.48, "multimodal": 0.19}, 0.85, ("standard", "longctx")),
    ("80GiB-guide", {"standard": 0.17, "longctx": 0.45, "multimodal": 0.27}, 0.90,
     ("standard", "longctx", "multimodal")),
    ("40GiB", {"standard": 0.23, "longctx": 0.50, "multimodal": 0.38}, 0.85, ("standard",)),
    ("retrieval", {"standard": 0.3, "longctx": 0.3, "multimodal": 0.3, "embedding": 0.05, "rerank": 0.08}, 0.7,
     ("standard", "embedding")),
    ("swap-e2e", {"standard": 0.15, "longctx": 0.15}, 0.2, ()),
    ("lazy-only", {"standard": 0.4, "longctx": 0.4, "multimodal": 0.2}, 0.6, ()),
]


class SimFailure(AssertionError):
    pass


class SimEngine(FakeEngine):
    """A fake engine that tells the simulator when it holds memory and when it starts or stops."""

    def __init__(self, sim: Simulation, config: EngineConfig, fail: bool, die_in_start: bool, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.sim, self.fail, self.die_in_start = sim, fail, die_in_start
        self.holding = False
        self.gone = False  # shut down, its memory back

    async def start(self) -> None:
        self.holding = True
        self.sim.begin(f"start {self.config.slot}")
        try:
            await asyncio.sleep(self.start_delay)
            if self.die_in_start or self.dead:
                raise EngineDead("the engine core died while loading")
            if self.fail:
                raise RuntimeError("weights missing")
            self.started = True
        finally:
            self.sim.end()

    async def shutdown(self) -> None:
        self.sim.begin(f"shutdown {self.config.slot}")
        try:
            await super().shutdown()
        finally:
            self.holding, self.gone = False, True
            self.sim.end()


@dataclass
class Request:
    slot: str
    tokens: int
    arrived: float
    deadline: float | None
    admitted: float | None = None
    ended: float | None = None
    outcome: str | None = None


@dataclass
class Simulation:
    seed: int
    trace: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    engines: list[SimEngine] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    admin_loads: dict[str, int] = field(default_factory=dict)
    faults: bool = True
    registry: ModelRegistry | None = None
    loop: VirtualLoop | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # --- bookkeeping ------------------------------------------------------------------------
    def log(self, line: str) -> None:
        assert self.loop is not None
        self.trace.append(f"{self.loop.time() - 1000.0:9.3f} {line}")

    def begin(self, what: str) -> None:
        self.in_progress.append(what)
        self.log(what)

    def end(self) -> None:
        self.in_progress.pop()

    def fail(self, message: str) -> None:
        tail = "\n".join(self.trace[-80:])
        replay = f"SIM_SEED={self.seed} pytest tests/unit/test_registry_sim.py"
        raise SimFailure(f"seed {self.seed}: {message}\n(replay: {replay})\n{tail}")

    def factory(self, config: EngineConfig) -> SimEngine:
        rng = self.rng
        fail = self.faults and rng.random() < 0.12
        die = self.faults and not fail and rng.random() < 0.05
        engine = SimEngine(self, config, fail, die, start_delay=rng.choice([0.5, 3.0, 20.0]),
                           shutdown_delay=rng.choice([0.0, 1.0, 5.0]), token_delay=TOKEN)
        self.engines.append(engine)
        return engine

    # --- invariants, after every step of the loop -------------------------------------------
    def check(self) -> None:
        registry = self.registry
        if registry is None:
            return
        held = sum(e.config.memory_share for e in self.engines if e.holding)
        if held > registry.budget + _EPS:
            self.fail(f"engines hold {held:.2f} of the budget {registry.budget:.2f}")
        closing = registry._reconciler.closing
        if len(self.in_progress) > 1 and not closing:
            self.fail(f"lifecycle changes overlap: {self.in_progress}")
        for slot in registry._slots.values():
            if slot.in_flight < 0:
                self.fail(f"{slot.name} has {slot.in_flight} in flight")

    def check_eviction(self, victims: tuple[str, ...], for_slot: str) -> None:
        """Nobody is evicted for a load that no request, admin or pinned slot waits for."""
        assert self.registry is not None and self.loop is not None
        slot = self.registry.slot(for_slot)
        waiting = any(r.slot == for_slot and r.admitted is None and r.ended is None for r in self.requests)
        if not (waiting or self.admin_loads.get(for_slot) or (slot.pinned and slot.wanted)):
            self.fail(f"{victims} evicted for {for_slot}, which nobody waits for")
        self.log(f"evict {victims} for {for_slot}")

    # --- the traffic --------------------------------------------------------------------------
    async def request(self, r: Request) -> None:
        assert self.registry is not None and self.loop is not None
        self.requests.append(r)
        try:
            async with asyncio.timeout(r.deadline):
                async with self.registry.acquire(r.slot) as engine:
                    r.admitted = self.loop.time()
                    sampling = SamplingOptions(max_tokens=r.tokens, ignore_eos=True)
                    async for _ in engine.generate(GenerationRequest("r", RenderedPrompt("a b", 2), sampling)):
                        pass
            r.outcome = "200"
        except ModelUnavailable as exc:
            r.outcome = f"503 {exc.message[:60]}"
        except EngineDead:
            r.outcome = "503 engine died"
        except TimeoutError:
            r.outcome = "504"
        except asyncio.CancelledError:
            r.outcome = "cancelled"
        finally:
            r.ended = self.loop.time()
            self.log(f"request {r.slot} ({r.tokens} tokens) -> {r.outcome}")

    async def admin(self, kind: str, slot: str) -> None:
        assert self.registry is not None
        self.log(f"admin {kind} {slot}")
        if kind == "load":
            self.admin_loads[slot] = self.admin_loads.get(slot, 0) + 1
        try:
            if kind == "load":
                await self.registry.load(slot)
            else:
                await self.registry.unload(slot)
            self.log(f"admin {kind} {slot} -> ok")
        except ModelUnavailable as exc:
            self.log(f"admin {kind} {slot} -> 503 {exc.message[:60]}")
        finally:
            if kind == "load":
                self.admin_loads[slot] -= 1

    def kill(self, slot: str, signal: bool) -> None:
        assert self.registry is not None
        live = [e for e in self.engines if e.config.slot == slot and not e.gone and not e.dead]
        if not live:
            return
        engine = live[-1]
        self.log(f"kill {slot} ({'signalled' if signal else 'silent'}, {'started' if engine.started else 'loading'})")
        if signal:
            engine.kill()
        else:
            engine.dead = True


def _timing(rng: random.Random) -> RegistryPolicy:
    backoff = rng.choice([1.0, 10.0, 30.0])
    return RegistryPolicy(
        load_wait=rng.choice([30.0, 120.0]),
        eviction_wait=rng.choice([2.0, 10.0]),
        retry_backoff=backoff,
        retry_backoff_max=backoff * rng.choice([1, 4]),
        idle_unload=rng.choice([0.0, 20.0, 120.0]),
        health_interval=10.0,
        min_residency=rng.choice([0.0, 5.0]),
        swap_fairness=rng.choice([0.0, 5.0, 30.0]),
    )


async def _traffic(sim: Simulation, horizon: float, events: int) -> tuple[list[asyncio.Task[None]], bool]:
    """Play the schedule's events; the tasks started and whether the registry was shut down mid-way."""
    assert sim.registry is not None and sim.loop is not None
    rng, loop, registry = sim.rng, sim.loop, sim.registry
    names = registry.slot_names
    tasks: list[asyncio.Task[None]] = []
    start = loop.time()
    for at in sorted(rng.uniform(0, horizon) for _ in range(events)):
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        roll, slot = rng.random(), rng.choice(names)
        if roll < 0.70:
            for _ in range(rng.choice([1, 1, 2, 4])):
                tokens = 1 if rng.random() < 0.6 else rng.randint(4, 24)
                deadline = rng.uniform(2, 90) if rng.random() < 0.15 else None
                r = Request(slot, tokens, loop.time(), deadline)
                task = asyncio.create_task(sim.request(r))
                tasks.append(task)
                if rng.random() < 0.1:
                    loop.call_later(rng.uniform(0, 60), task.cancel)
        elif roll < 0.80:
            sim.kill(slot, signal=rng.random() < 0.7)
        elif roll < 0.88:
            tasks.append(asyncio.create_task(sim.admin("load", slot)))
        elif roll < 0.96:
            tasks.append(asyncio.create_task(sim.admin("unload", slot)))
        elif roll < 0.97:
            sim.log("shutdown mid-way")
            await registry.close()
            return tasks, True
        else:
            await asyncio.sleep(rng.uniform(0, 30))
    return tasks, False


def _check_settled(sim: Simulation, timing: RegistryPolicy, preload: bool) -> None:
    """Once traffic has stopped for long enough: counts and gauges are back to zero, pinned slots
    are up again, idle lazy slots are unloaded."""
    registry = sim.registry
    assert registry is not None
    metrics = registry._metrics
    for slot in registry._slots.values():
        name = slot.name
        gauges = {
            "in_flight": metrics.in_flight.labels(model=name)._value.get(),
            "loaded": metrics.model_loaded.labels(model=name)._value.get(),
            "share": metrics.model_memory_share.labels(model=name)._value.get(),
        }
        loaded = slot.state is SlotState.LOADED
        expected = {"in_flight": 0, "loaded": float(loaded), "share": slot.config.memory_share if loaded else 0.0}
        if slot.in_flight or slot.wait_starts or gauges != expected:
            sim.fail(f"{name} did not settle: in flight {slot.in_flight}, waiting {slot.waiting}, {gauges}")
        if slot.draining_since is not None or slot.wish is not None or slot.dead_engine is not None:
            sim.fail(f"{name} still has a drain, a wish or a dead engine")
        if loaded and not slot.pinned and timing.idle_unload > 0:
            sim.fail(f"{name} stayed loaded past its idle time")
    if preload and not registry.is_ready():
        sim.fail(f"not ready after the quiet time: {registry.snapshot()}")
    live = sum(e.config.memory_share for e in sim.engines if e.holding)
    if abs(live - registry.used_share()) > _EPS:
        sim.fail(f"engines hold {live:.2f}, the registry counts {registry.used_share():.2f}")


async def _schedule(sim: Simulation) -> None:
    rng, loop = sim.rng, sim.loop
    assert loop is not None
    layout, shares, budget, pinned = rng.choice(LAYOUTS)
    timing = _timing(rng)
    preload = rng.random() < 0.8
    sim.log(f"layout {layout}, budget {budget}, pinned {pinned}, preload {preload}, {timing}")
    slots = [(slot_config(name, share), name in pinned) for name, share in shares.items()]
    registry = ModelRegistry(slots, budget, sim.factory, Metrics(), timing, clock=loop.time)  # type: ignore[arg-type]
    sim.registry = registry
    reconciler = registry._reconciler
    carry_out = reconciler._carry_out

    async def watched(action: Any) -> bool:
        if type(action).__name__ == "Evict":
            sim.check_eviction(action.slots, action.for_slot)
        elif type(action).__name__ != "Wait":
            sim.log(repr(action))
        return await carry_out(action)

    reconciler._carry_out = watched  # type: ignore[method-assign]
    registry.start(preload)
    tasks, closed = await _traffic(sim, rng.choice([120.0, 300.0, 600.0]), rng.randint(8, 40))
    sim.faults = False
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in sim.requests:
        bound = timing.load_wait + r.tokens * TOKEN
        if r.outcome is None or r.ended is None or r.ended - r.arrived > bound + _EPS:
            sim.fail(f"a request for {r.slot} ended {r.outcome} after {(r.ended or 0) - r.arrived:.1f} s > {bound}")
        if r.admitted is not None and r.admitted - r.arrived > timing.load_wait + _EPS:
            sim.fail(f"a request for {r.slot} waited {r.admitted - r.arrived:.1f} s")
    if not closed:
        quiet = 2 * timing.retry_backoff_max + timing.idle_unload + timing.swap_fairness + 4 * timing.eviction_wait
        await asyncio.sleep(quiet + 200.0)
        _check_settled(sim, timing, preload)
        sim.log("shutdown")
        await registry.close()
    if any(e.holding for e in sim.engines) or registry.used_share() > _EPS:
        sim.fail("an engine is still running after shutdown")
    if reconciler._task is not None and not reconciler._task.done():
        sim.fail("the reconciler still runs after shutdown")


def run_schedule(seed: int) -> Simulation:
    """Run one schedule; raises SimFailure with the trace if an invariant breaks."""
    sim = Simulation(seed)
    loop = VirtualLoop()
    sim.loop = loop
    step = loop._run_once  # type: ignore[attr-defined]

    def checked_step() -> None:
        step()
        sim.check()

    loop._run_once = checked_step  # type: ignore[attr-defined]
    try:
        loop.run_until_complete(_schedule(sim))
    except SimFailure:
        raise
    except Exception as exc:
        sim.fail(f"{type(exc).__name__}: {exc}")
    finally:
        loop.close()
    return sim
