"""ModelRegistry: the mechanism that loads, evicts and unloads the slots' engines within one budget."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from llm_service.engines.base import Engine, EngineConfig, EngineDead
from llm_service.errors import ModelNotFound, ModelUnavailable
from llm_service.metrics import Metrics
from llm_service.registry.memory import DeviceMemory, record_footprint
from llm_service.registry.recovery import Recovery
from llm_service.registry.slots import HOLDING, RegistryPolicy, Slot, SlotState
from llm_service.registry.swap import SlotView, SwapPolicy

log = structlog.get_logger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]


class ModelRegistry:
    """Loads, lazily loads, evicts and unloads the slots' engines within one memory budget.

    Handlers only call `acquire(slot)`; every lifecycle change happens here, one at a time
    (engines that start together miscount free GPU memory). Which slots make room for a load,
    and when, is the swap policy's decision (swap.py); this class applies it.
    """

    def __init__(
        self,
        slots: list[tuple[EngineConfig, bool]],
        budget: float,
        engine_factory: EngineFactory,
        metrics: Metrics,
        policy: RegistryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: DeviceMemory | None = None,
    ) -> None:
        self.budget = budget
        self.policy = policy or RegistryPolicy()
        p = self.policy
        self.swap = SwapPolicy(min_residency=p.min_residency, fairness=p.swap_fairness, drain_timeout=p.eviction_wait)
        self._memory = memory
        self._factory = engine_factory
        self._metrics = metrics
        self._clock = clock
        self._slots = {config.slot: Slot(config=config, pinned=pinned) for config, pinned in slots}
        # Whether slots fit is the sizing plan's decision (llm_service.sizing): a slot that cannot
        # load on this device is marked `unloadable` and answers 503, the others serve.
        for slot in self._slots.values():
            metrics.init_slot(slot.name)
        # One lifecycle change (load, unload, eviction, dropping a dead engine) at a time.
        self._lifecycle_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._preload_done = asyncio.Event()
        self._closed = False
        self._recovery = Recovery(
            self.policy, metrics, clock, self._lifecycle_lock, notify=self._notify, spawn=self._spawn,
            reload=self._retry_load, closed=lambda: self._closed,
        )

    # --- introspection -------------------------------------------------------------------
    @property
    def slot_names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise ModelNotFound(
                f"unknown model {name!r}; available: {', '.join(self._slots)}", param="model"
            ) from None

    def find(self, name_or_model_id: str) -> Slot:
        """A slot by its name or by the model id it serves."""
        if name_or_model_id in self._slots:
            return self._slots[name_or_model_id]
        for slot in self._slots.values():
            if name_or_model_id == slot.config.model_id or name_or_model_id in slot.config.aliases:
                return slot
        return self.slot(name_or_model_id)

    def used_share(self) -> float:
        return sum(s.held_share for s in self._slots.values() if s.state in HOLDING)

    @property
    def preload_done(self) -> bool:
        return self._preload_done.is_set()

    def is_ready(self) -> bool:
        """Every pinned slot has finished its first load, and none is down (failed, or its engine
        died and it has not been loaded again yet)."""
        if not self._preload_done.is_set():
            return False
        return not any(s.pinned and s.error is not None for s in self._slots.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        total = self._memory.total if self._memory is not None else None
        return {s.name: s.describe(now, total) for s in self._slots.values()}

    # --- lifecycle of the registry -------------------------------------------------------
    def start(self, preload: bool) -> None:
        """Start background work: the preload of pinned slots (one after another) and the reaper."""
        self._spawn(self._preload(preload))
        self._spawn(self._reap_forever())

    async def wait_preloaded(self) -> None:
        await self._preload_done.wait()

    async def close(self) -> None:
        """Stop background work and shut down every engine."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for slot in self._slots.values():
            if slot.load_task is not None:
                slot.load_task.cancel()
                with contextlib.suppress(BaseException):
                    await slot.load_task
        # Engines stop in parallel: each takes seconds, and the pod's grace period is finite.
        loaded = [slot for slot in self._slots.values() if slot.engine is not None]
        await asyncio.gather(
            *(self._unload(slot, reason="shutdown") for slot in loaded),
            *(self._recovery.shutdown_dead(slot) for slot in self._slots.values()),
        )

    def _spawn(self, coro: Any) -> None:
        # A fresh context: background work must not log under the request id that started it.
        task = asyncio.create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _notify(self) -> None:
        """Wake everything that waits for a change of a slot's state or demand."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _next_change(self, within: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._changed.wait()

    async def _preload(self, preload: bool) -> None:
        try:
            if preload:
                for slot in self._slots.values():
                    if slot.pinned:
                        try:
                            await asyncio.shield(self._ensure_load_task(slot))
                        except Exception as exc:  # kept on the slot; the other slots go on
                            log.error("preload_failed", slot=slot.name, error=str(exc))
        finally:
            self._preload_done.set()

    # --- serving -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Yield a loaded engine for the slot, loading (and making room) as needed.

        Raises ModelNotFound for an unknown slot and ModelUnavailable (503) when the slot is
        down, still loading past the wait bound, or cannot get room in the budget.
        """
        slot = self.slot(name)
        engine = await self._admit(slot)
        self._metrics.in_flight.labels(model=slot.name).inc()
        try:
            yield engine
        except EngineDead as exc:
            self._recovery.engine_died(slot, engine, exc)
            raise
        finally:
            slot.in_flight -= 1
            slot.last_used = self._clock()
            slot.last_used_at = time.time()
            self._metrics.in_flight.labels(model=slot.name).dec()
            self._notify()

    def _check_loadable(self, slot: Slot) -> None:
        """503 at once, without evicting anything, for a slot the sizing plan found no room for."""
        reason = slot.config.unloadable
        if reason is None and slot.config.memory_share > self.budget + 1e-9:
            reason = f"its memory share {slot.config.memory_share:.2f} is more than the budget {self.budget:.2f}"
        if reason is not None:
            raise ModelUnavailable(f"model {slot.name!r} cannot be loaded on this device: {reason}", param="model")

    async def _admit(self, slot: Slot) -> Engine:
        """The slot's engine, with the request counted in flight (in the same step as the check,
        so that no eviction comes in between)."""
        self._check_loadable(slot)
        arrived = self._clock()
        if slot.admits(arrived) and not slot.wait_starts:
            return self._take(slot)
        # Counted as waiting from now on: a slot with waiters is never idle, so a slot loaded
        # for them serves them before anything can evict it.
        slot.wait_starts.append(arrived)
        self._notify()
        try:
            async with asyncio.timeout(self.policy.load_wait):
                while True:
                    if slot.admits(arrived):
                        return self._take(slot)
                    refusal = slot.refusal(arrived, self._clock(), self.policy)
                    if refusal is not None:
                        raise refusal
                    if slot.state in (SlotState.UNLOADED, SlotState.FAILED):
                        self._ensure_load_task(slot)
                    await self._next_change()
        except TimeoutError:
            raise ModelUnavailable(
                f"model {slot.name!r} is loading or waiting for room in the memory budget; retry shortly",
                param="model",
                retry_after=10,
            ) from None
        finally:
            slot.wait_starts.remove(arrived)
            self._metrics.load_wait.labels(model=slot.name).observe(self._clock() - arrived)
            self._notify()

    def _take(self, slot: Slot) -> Engine:
        assert slot.engine is not None
        slot.in_flight += 1
        return slot.engine

    def _ensure_load_task(self, slot: Slot) -> asyncio.Task[None]:
        """The one load task of the slot; concurrent callers share it."""
        if slot.load_task is None:
            task = asyncio.create_task(self._load(slot))
            slot.load_task = task

            def _done(t: asyncio.Task[None]) -> None:
                slot.load_task = None
                slot.load_eta = None
                if not t.cancelled():
                    t.exception()  # retrieved here; awaiters see it through the shield
                self._notify()

            task.add_done_callback(_done)
        return slot.load_task

    # --- loading, eviction, unloading ----------------------------------------------------
    async def load(self, name: str) -> None:
        """Load a slot now (admin); returns when loaded, raises ModelUnavailable otherwise."""
        slot = self.slot(name)
        self._check_loadable(slot)
        started = self._clock()
        await asyncio.shield(self._ensure_load_task(slot))
        if slot.load_refused is not None and slot.load_refused[0] >= started:
            raise slot.load_refused[1]
        if slot.state is not SlotState.LOADED:
            raise ModelUnavailable(f"model {name!r} failed to load: {slot.error}", param="model")

    async def unload(self, name: str) -> bool:
        """Unload a slot now (admin) once its requests end; False if it was not loaded."""
        slot = self.slot(name)
        async with self._lifecycle_lock:
            if slot.state is not SlotState.LOADED:
                return False
            deadline = self._clock() + self.policy.eviction_wait
            while slot.in_flight and self._clock() < deadline:
                await self._next_change(deadline - self._clock())
            if slot.in_flight:
                raise ModelUnavailable(f"model {name!r} still has requests in flight", retry_after=5)
            await self._unload(slot, reason="admin")
            return True

    async def _load(self, slot: Slot) -> None:
        async with self._lifecycle_lock:
            if slot.state is SlotState.LOADED:
                return
            for other in self._slots.values():
                await self._recovery.shutdown_dead(other)  # a dead engine's memory is back before a load
            try:
                await self._make_room(slot)
            except ModelUnavailable as exc:
                slot.load_refused = (self._clock(), exc)
                log.warning("model_load_refused", slot=slot.name, reason=exc.message)
                return
            if self._memory is not None:
                await self._memory.wait_for(slot.config.memory_share, self.policy.memory_wait, self._clock)
            slot.state = SlotState.LOADING
            self._notify()
            engine = self._factory(slot.config)
            self._metrics.model_loads.labels(model=slot.name).inc()
            started = self._clock()
            log.info("model_loading", slot=slot.name, model_id=slot.config.model_id,
                     memory_share=slot.config.memory_share, max_model_len=slot.config.max_model_len)
            try:
                await engine.start()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await asyncio.shield(engine.shutdown())
                self._recovery.failed(slot, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                self._metrics.model_load_failures.labels(model=slot.name).inc()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            elapsed = self._clock() - started
            engine.on_dead(lambda exc: self._recovery.engine_died(slot, engine, exc))
            slot.engine = engine
            slot.state = SlotState.LOADED
            slot.error = None
            slot.failures = 0
            slot.loaded_at = time.time()
            slot.loaded_since = slot.last_used = self._clock()
            slot.last_load_seconds = elapsed
            self._metrics.model_loaded.labels(model=slot.name).set(1)
            self._metrics.model_memory_share.labels(model=slot.name).set(slot.config.memory_share)
            record_footprint(slot, engine.memory_footprint(), self._memory, self._metrics)
            self._metrics.model_load_duration.labels(model=slot.name).observe(elapsed)
            log.info("model_loaded", slot=slot.name, seconds=round(elapsed, 2))
            self._notify()

    async def _make_room(self, slot: Slot) -> None:
        """Apply the swap policy until `slot` fits; the lifecycle lock is held."""
        since = min(slot.wait_starts, default=self._clock())
        drained: list[Slot] = []
        try:
            while True:
                now = self._clock()
                views = [SlotView.of(s) for s in self._slots.values()]
                decision = self.swap.make_room(views, slot.name, self.budget, since, now)
                if decision.fits:
                    return
                if decision.refuse is not None:
                    raise ModelUnavailable(
                        f"cannot load model {slot.name!r}: it needs a memory share of "
                        f"{slot.config.memory_share:.2f} and {self.used_share():.2f} of the budget "
                        f"{self.budget:.2f} is held; {decision.refuse}",
                        param="model",
                        retry_after=max(5.0, self.policy.eviction_wait),
                    )
                if decision.evict and slot.expected_load_seconds:
                    slot.load_eta = now + slot.expected_load_seconds  # refusal() answers its waiters
                for name in decision.evict:
                    victim = self._slots[name]
                    log.info("model_evicting", slot=name, for_slot=slot.name)
                    self._metrics.evictions.labels(model=name).inc()
                    await self._unload(victim, reason="evicted")
                for name in decision.drain:
                    victim = self._slots[name]
                    victim.draining_since = now
                    drained.append(victim)
                    log.info("model_draining", slot=name, for_slot=slot.name)
                if decision.evict:
                    continue
                within = self.policy.eviction_wait if decision.recheck_at is None else decision.recheck_at - now
                await self._next_change(max(0.0, within))
        finally:
            for victim in drained:
                victim.draining_since = None
            self._notify()

    async def _unload(self, slot: Slot, reason: str) -> None:
        engine = slot.engine
        slot.state = SlotState.UNLOADING
        self._notify()
        started = self._clock()
        try:
            if engine is not None:
                await engine.shutdown()
        except Exception as exc:  # the engine is gone either way; keep the registry consistent
            log.warning("model_unload_error", slot=slot.name, error=str(exc))
        finally:
            slot.engine = None
            slot.loaded_at = None
            slot.draining_since = None
            slot.state = SlotState.UNLOADED
            self._metrics.model_loaded.labels(model=slot.name).set(0)
            self._metrics.model_memory_share.labels(model=slot.name).set(0)
            self._notify()
        log.info("model_unloaded", slot=slot.name, reason=reason, seconds=round(self._clock() - started, 2))

    def _retry_load(self, slot: Slot) -> None:
        """A failed slot's back-off is over: load it again, unless that would evict a serving slot
        for a lazily loaded one (its failure then expires, and its next request loads it)."""
        if slot.pinned or self.used_share() + slot.held_share <= self.budget + 1e-9:
            log.info("model_retrying", slot=slot.name, failures=slot.failures)
            self._ensure_load_task(slot)
        else:
            slot.state, slot.error = SlotState.UNLOADED, None
            self._notify()

    # --- background ----------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        interval = self.policy.health_interval
        if self.policy.idle_unload > 0:
            interval = min(interval, max(0.5, self.policy.idle_unload / 4))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # one bad pass must not end health checks and idle unloads for good
                log.exception("reap_failed")

    async def reap(self) -> None:
        """One pass: drop dead engines, unload idle unpinned slots."""
        for slot in self._slots.values():
            engine = slot.engine
            if slot.state is SlotState.LOADED and engine is not None:
                try:
                    await engine.check_health()
                except EngineDead as exc:
                    self._recovery.engine_died(slot, engine, exc)
                    continue
                except Exception as exc:
                    log.warning("health_check_error", slot=slot.name, error=str(exc))
            if self._is_idle(slot):
                async with self._lifecycle_lock:
                    if self._is_idle(slot):
                        self._metrics.idle_unloads.labels(model=slot.name).inc()
                        await self._unload(slot, reason="idle")

    def _is_idle(self, slot: Slot) -> bool:
        idle_after = self.policy.idle_unload
        return (
            idle_after > 0
            and not slot.pinned
            and slot.state is SlotState.LOADED
            and slot.idle
            and self._clock() - slot.last_used >= idle_after
        )
