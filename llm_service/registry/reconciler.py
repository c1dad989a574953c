"""The reconciler: the one task that changes slots' states, by carrying out the lifecycle policy's actions."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable

import structlog

from llm_service.engines.base import Engine, EngineConfig
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry.memory import DeviceMemory, budget_share, held_share, record_footprint
from llm_service.registry.policy import (
    Action,
    Drain,
    Evict,
    Forget,
    GiveUp,
    LifecyclePolicy,
    Load,
    ShutDownDead,
    Snapshot,
    StopAll,
    Unload,
    Wait,
)
from llm_service.registry.slots import RegistryPolicy, Slot, SlotState
from llm_service.registry.swap import SlotView

log = structlog.get_logger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]


class Reconciler:
    """Runs the lifecycle: one action at a time, so two lifecycle changes never overlap and engines
    start one after another. Everyone else records facts on the slots and calls `wake()`;
    `changed` wakes whoever waits for a slot's state."""

    def __init__(
        self,
        slots: dict[str, Slot],
        budget: float,
        factory: EngineFactory,
        metrics: Metrics,
        timing: RegistryPolicy,
        clock: Callable[[], float],
        memory: DeviceMemory | None,
        on_settled: Callable[[Slot], None],
    ) -> None:
        self.slots = slots
        self.budget = budget
        self.policy = LifecyclePolicy(timing)
        self._factory = factory
        self._metrics = metrics
        self._clock = clock
        self._memory = memory
        self._on_settled = on_settled  # a slot's load ended (loaded or failed): the preload counts it
        self.closing = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None

    # --- facts and notifications ---------------------------------------------------------
    def wake(self) -> None:
        """A fact changed: the reconciler looks again (started on first use)."""
        self._wake.set()
        self.notify()
        if self._task is None and not self.closing:
            # A fresh context: background work must not log under the request id that started it.
            self._task = asyncio.create_task(self._run(), context=contextvars.Context())

    def notify(self) -> None:
        """Wake everything that waits for a change of a slot's state or demand."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_change(self, within: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._changed.wait()

    def engine_died(self, slot: Slot, engine: Engine, exc: BaseException) -> None:
        """A loaded engine died (its own signal, a request, or the health check): recorded at once,
        so its requests are refused; the reconciler shuts it down and marks the slot failed."""
        if slot.engine is not engine or slot.state is not SlotState.LOADED or slot.dead_engine is not None:
            return
        log.error("engine_dead", slot=slot.name, error=str(exc))
        self._metrics.engine_deaths.labels(model=slot.name).inc()
        slot.dead_engine = engine
        slot.error = f"engine died: {exc}"
        self._metrics.model_loaded.labels(model=slot.name).set(0)
        self.wake()

    async def close(self) -> None:
        """Stop every engine (a load in progress is cancelled), then end."""
        self.closing = True
        if self._starting is not None:
            self._starting.cancel()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), context=contextvars.Context())
        self._wake.set()
        await asyncio.shield(self._task)

    # --- the loop ------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        views = tuple(SlotView.of(s, self.budget) for s in self.slots.values())
        return Snapshot(views, self.budget, self._clock(), self.closing)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            action = self.policy.next_action(self.snapshot())
            if isinstance(action, Wait):
                self.notify()  # settled() callers look again
                # At least a microsecond: a wake-up a hair before `until` (float rounding) must not
                # turn into a loop of zero-length waits.
                within = None if action.until is None else max(1e-6, action.until - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(within):
                        await self._wake.wait()
                continue
            try:
                if await self._carry_out(action):
                    return
            except Exception:  # one failed action must not end the lifecycle for good
                log.exception("reconcile_failed", action=repr(action))
                await asyncio.sleep(1.0)
            finally:
                self.notify()

    async def _carry_out(self, action: Action) -> bool:
        """Do one action; True when the reconciler is done (shutdown)."""
        match action:
            case ShutDownDead(name):
                await self._shut_down_dead(self.slots[name])
            case StopAll():
                await self._stop_all()
                return True
            case Load(name):
                await self._load(self.slots[name])
            case Unload(name, reason):
                slot = self.slots[name]
                if reason == "idle":
                    self._metrics.idle_unloads.labels(model=name).inc()
                await self._unload(slot, reason)
                self._answer(slot, True)
            case Evict(names, for_slot):
                self._expect_load(self.slots[for_slot])
                for name in names:
                    log.info("model_evicting", slot=name, for_slot=for_slot)
                    self._metrics.evictions.labels(model=name).inc()
                    await self._unload(self.slots[name], "evicted")
            case Drain(names, for_slot):
                for name in names:
                    victim = self.slots[name]
                    victim.draining_since, victim.draining_for = self._clock(), for_slot
                    log.info("model_draining", slot=name, for_slot=for_slot)
            case GiveUp(name, reason):
                self._give_up(self.slots[name], reason)
                self._expected_load_refused(self.slots[name])
            case Forget(name):
                slot = self.slots[name]
                slot.state, slot.error = SlotState.UNLOADED, None
        return False

    # --- the early 503 --------------------------------------------------------------------
    def _expect_load(self, slot: Slot) -> None:
        """A load that evicts starts: when it is expected to end, so that a request whose wait
        bound ends sooner is answered 503 at once (Slot.refusal) with a Retry-After until then.
        The load is then wanted by itself: it goes on when those requests have left, and their
        retries find it loaded."""
        expected = slot.expected_load_seconds
        if not expected or slot.load_eta is not None:
            return
        now = self._clock()
        slot.load_eta = now + expected
        if not slot.wanted:
            slot.wanted, slot.wanted_since = True, now

    def _expected_load_refused(self, slot: Slot) -> None:
        """The room for an expected load is refused: no load to announce, nor to want unpinned."""
        if slot.load_eta is not None:
            slot.load_eta = None
            slot.wanted = slot.wanted and slot.pinned

    # --- the actions ---------------------------------------------------------------------
    def _answer(self, slot: Slot, result: bool | Exception) -> None:
        wish, slot.wish = slot.wish, None
        if wish is None or wish.answer.done():
            return
        if isinstance(result, Exception):
            wish.answer.set_exception(result)
        else:
            wish.answer.set_result(result)

    def _give_up(self, slot: Slot, reason: str | None) -> None:
        """End the drains made for `slot` (or of `slot`, for an admin unload); refuse with `reason`."""
        unloading = slot.wish is not None and slot.wish.kind == "unload"
        for other in self.slots.values():
            if other.draining_for == slot.name or (unloading and other is slot):
                other.draining_since = other.draining_for = None
        if unloading:
            error = ModelUnavailable(f"model {slot.name!r} {reason}", retry_after=5) if reason else None
            self._answer(slot, error or False)
            return
        if reason is None:
            return
        exc = ModelUnavailable(
            f"cannot load model {slot.name!r}: it needs a memory share of {budget_share(slot):.2f} and "
            f"{held_share(self.slots.values()):.2f} of the budget {self.budget:.2f} is held; {reason}",
            param="model",
            retry_after=max(5.0, self.policy.timing.eviction_wait),
        )
        now = self._clock()
        slot.load_refused = (now, exc)
        slot.wanted_since = now  # a pinned slot tries again, with the victims' fairness time anew
        self._answer(slot, exc)
        log.warning("model_load_refused", slot=slot.name, reason=exc.message)

    async def _load(self, slot: Slot) -> None:
        if self._memory is not None:
            await self._memory.wait_for(budget_share(slot), self.policy.timing.memory_wait, self._clock)
        slot.state = SlotState.LOADING
        self.notify()
        engine = self._factory(slot.config)
        self._metrics.model_loads.labels(model=slot.name).inc()
        started = self._clock()
        log.info("model_loading", slot=slot.name, model_id=slot.config.model_id,
                 memory_share=slot.config.memory_share, max_model_len=slot.config.max_model_len)
        # Its own task, so that close() can cancel a start without cancelling the reconciler.
        self._starting = asyncio.create_task(engine.start())
        try:
            await asyncio.wait([self._starting])
            self._starting.result()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await engine.shutdown()
            self._fail(slot, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._metrics.model_load_failures.labels(model=slot.name).inc()
            self._answer(slot, ModelUnavailable(f"model {slot.name!r} failed to load: {slot.error}", param="model"))
            self._on_settled(slot)
            return
        finally:
            self._starting = None
            slot.load_eta = None
        elapsed = self._clock() - started
        engine.on_dead(lambda exc: self.engine_died(slot, engine, exc))
        slot.engine = engine
        slot.state = SlotState.LOADED
        slot.error = None
        slot.failures = 0
        slot.wanted = False
        slot.load_refused = None
        slot.loaded_at = time.time()
        slot.loaded_since = slot.last_used = self._clock()
        slot.last_load_seconds = elapsed
        self._metrics.model_loaded.labels(model=slot.name).set(1)
        self._metrics.model_memory_share.labels(model=slot.name).set(slot.config.memory_share)
        record_footprint(slot, engine.memory_footprint(), self._memory, self._metrics)
        self._metrics.model_load_duration.labels(model=slot.name).observe(elapsed)
        log.info("model_loaded", slot=slot.name, seconds=round(elapsed, 2))
        self._answer(slot, True)
        self._on_settled(slot)

    def _fail(self, slot: Slot, error: str) -> None:
        """The slot is down: its requests are refused until a back-off that doubles with each
        failure in a row (bounded) is over; a pinned slot then loads again by itself."""
        slot.state = SlotState.FAILED
        slot.error = error
        slot.failures += 1
        delay = self.policy.timing.backoff(slot.failures)
        slot.retry_at = self._clock() + delay
        slot.wanted = slot.pinned and not self.closing
        slot.wanted_since = slot.retry_at
        log.error("model_failed", slot=slot.name, error=error, failures=slot.failures, retry_in=round(delay, 1))

    async def _shut_down_dead(self, slot: Slot) -> None:
        """The dead engine's share stays held until its processes are gone."""
        engine, slot.dead_engine = slot.dead_engine, None
        slot.state, slot.engine = SlotState.UNLOADING, None
        slot.draining_since = slot.draining_for = None
        self.notify()
        with contextlib.suppress(Exception):
            if engine is not None:
                await engine.shutdown()
        slot.loaded_at = None
        self._metrics.model_memory_share.labels(model=slot.name).set(0)
        self._fail(slot, slot.error or "engine died")
        if slot.wish is not None and slot.wish.kind == "unload":
            self._answer(slot, True)

    async def _unload(self, slot: Slot, reason: str) -> None:
        engine = slot.engine
        slot.state = SlotState.UNLOADING
        self.notify()
        started = self._clock()
        try:
            if engine is not None:
                await engine.shutdown()
        except Exception as exc:  # the engine is gone either way; keep the registry consistent
            log.warning("model_unload_error", slot=slot.name, error=str(exc))
        finally:
            slot.engine = None
            slot.loaded_at = None
            slot.draining_since = slot.draining_for = None
            slot.state = SlotState.UNLOADED
            self._metrics.model_loaded.labels(model=slot.name).set(0)
            self._metrics.model_memory_share.labels(model=slot.name).set(0)
        log.info("model_unloaded", slot=slot.name, reason=reason, seconds=round(self._clock() - started, 2))

    async def _stop_all(self) -> None:
        """Engines stop in parallel: each takes seconds, and the pod's grace period is finite."""
        loaded = [slot for slot in self.slots.values() if slot.engine is not None]
        await asyncio.gather(*(self._unload(slot, "shutdown") for slot in loaded))
        closed = ModelUnavailable("the service is shutting down", retry_after=5)
        for slot in self.slots.values():
            self._answer(slot, closed)

