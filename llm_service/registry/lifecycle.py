"""ModelRegistry: the mechanism that loads, evicts and unloads the slots' engines within one budget."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from llm_service.engines.base import Engine, EngineConfig, EngineDead
from llm_service.errors import ModelNotFound, ModelUnavailable
from llm_service.metrics import Metrics
from llm_service.registry.slots import HOLDING, RegistryPolicy, Slot, SlotState

log = structlog.get_logger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]


class ModelRegistry:
    """Loads, lazily loads, evicts and unloads the slots' engines within one memory budget.

    Handlers only call `acquire(slot)`; every lifecycle change happens here, one at a time
    (engines that start together miscount free GPU memory).
    """

    def __init__(
        self,
        slots: list[tuple[EngineConfig, bool]],
        budget: float,
        engine_factory: EngineFactory,
        metrics: Metrics,
        policy: RegistryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.policy = policy or RegistryPolicy()
        self._factory = engine_factory
        self._metrics = metrics
        self._clock = clock
        self._slots = {config.slot: Slot(config=config, pinned=pinned) for config, pinned in slots}
        for slot in self._slots.values():
            if slot.config.memory_share > budget + 1e-9:
                raise ValueError(
                    f"slot {slot.name!r} needs a memory share of {slot.config.memory_share:.2f}, more than "
                    f"the whole budget LLM_GPU_MEMORY_UTILIZATION={budget:.2f}; lower "
                    f"LLM_MEMORY_SHARE_{slot.name.upper()} or LLM_MAX_MODEL_LEN_{slot.name.upper()}"
                )
            metrics.init_slot(slot.name)
        pinned_share = sum(s.config.memory_share for s in self._slots.values() if s.pinned)
        if pinned_share > budget + 1e-9:
            raise ValueError(
                f"the preloaded slots need a memory share of {pinned_share:.2f} together, more than "
                f"LLM_GPU_MEMORY_UTILIZATION={budget:.2f}; preload fewer (LLM_PRELOAD_MODELS) or "
                "lower their LLM_MEMORY_SHARE_* / LLM_MAX_MODEL_LEN_*"
            )
        # One lifecycle change (load, unload, eviction) at a time.
        self._lifecycle_lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._preload_done = asyncio.Event()
        self._closed = False

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
            if slot.config.model_id == name_or_model_id:
                return slot
        return self.slot(name_or_model_id)

    def used_share(self) -> float:
        return sum(s.config.memory_share for s in self._slots.values() if s.state in HOLDING)

    @property
    def preload_done(self) -> bool:
        return self._preload_done.is_set()

    def is_ready(self) -> bool:
        """Every pinned slot has finished its first load, and none is failed."""
        if not self._preload_done.is_set():
            return False
        return not any(s.pinned and s.state is SlotState.FAILED for s in self._slots.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            s.name: {
                "model_id": s.config.model_id,
                "state": s.state.value,
                "pinned": s.pinned,
                "memory_share": s.config.memory_share,
                "max_model_len": s.config.max_model_len,
                "in_flight": s.in_flight,
                "last_used": s.last_used_at,
                "loaded_at": s.loaded_at,
                "error": s.error,
            }
            for s in self._slots.values()
        }

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
        await asyncio.gather(*(self._unload(slot, reason="shutdown") for slot in loaded))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _preload(self, preload: bool) -> None:
        try:
            if preload:
                for slot in self._slots.values():
                    if slot.pinned:
                        try:
                            await self._ensure_load_task(slot)
                        except Exception as exc:  # kept on the slot; the other slots go on
                            log.error("preload_failed", slot=slot.name, error=str(exc))
        finally:
            self._preload_done.set()

    # --- serving -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Yield a loaded engine for the slot, loading (and evicting) as needed.

        Raises ModelNotFound for an unknown slot and ModelUnavailable (503) when the slot is
        failed, still loading past the wait bound, or cannot fit in the budget.
        """
        slot = self.slot(name)
        engine = await self._ready_engine(slot)
        slot.in_flight += 1
        self._metrics.in_flight.labels(model=slot.name).inc()
        try:
            yield engine
        except EngineDead as exc:
            self._engine_died(slot, engine, exc)
            raise
        finally:
            slot.in_flight -= 1
            slot.last_used = self._clock()
            slot.last_used_at = time.time()
            self._metrics.in_flight.labels(model=slot.name).dec()
            self._released.set()

    async def _ready_engine(self, slot: Slot) -> Engine:
        deadline = self._clock() + self.policy.load_wait
        while True:
            if slot.state is SlotState.LOADED and slot.engine is not None:
                return slot.engine
            if slot.state is SlotState.FAILED and slot.load_task is None:
                wait = slot.failed_at + self.policy.retry_backoff - self._clock()
                if wait > 0:
                    raise ModelUnavailable(
                        f"model {slot.name!r} failed to load: {slot.error}; next try in {wait:.0f} s",
                        param="model",
                        retry_after=wait,
                    )
            task = self._ensure_load_task(slot)
            remaining = deadline - self._clock()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                raise ModelUnavailable(
                    f"model {slot.name!r} is loading; retry shortly", param="model", retry_after=10
                ) from None
            if slot.state is SlotState.FAILED:
                raise ModelUnavailable(
                    f"model {slot.name!r} failed to load: {slot.error}",
                    param="model",
                    retry_after=self.policy.retry_backoff,
                )

    def _ensure_load_task(self, slot: Slot) -> asyncio.Task[None]:
        """The one load task of the slot; concurrent callers share it."""
        if slot.load_task is None:
            task = asyncio.create_task(self._load(slot))
            slot.load_task = task

            def _done(t: asyncio.Task[None]) -> None:
                slot.load_task = None
                if not t.cancelled():
                    t.exception()  # retrieved here; awaiters see it through the shield

            task.add_done_callback(_done)
        return slot.load_task

    # --- loading, eviction, unloading ----------------------------------------------------
    async def load(self, name: str) -> None:
        """Load a slot now (admin); returns when loaded, raises ModelUnavailable otherwise."""
        slot = self.slot(name)
        await asyncio.shield(self._ensure_load_task(slot))
        if slot.state is not SlotState.LOADED:
            raise ModelUnavailable(f"model {name!r} failed to load: {slot.error}", param="model")

    async def unload(self, name: str) -> bool:
        """Unload a slot now (admin) once its requests end; False if it was not loaded."""
        slot = self.slot(name)
        async with self._lifecycle_lock:
            if slot.state is not SlotState.LOADED:
                return False
            await self._wait_idle([slot], self.policy.eviction_wait)
            if slot.in_flight:
                raise ModelUnavailable(f"model {name!r} still has requests in flight", retry_after=5)
            await self._unload(slot, reason="admin")
            return True

    async def _load(self, slot: Slot) -> None:
        async with self._lifecycle_lock:
            if slot.state is SlotState.LOADED:
                return
            await self._make_room(slot)
            slot.state = SlotState.LOADING
            engine = self._factory(slot.config)
            started = self._clock()
            log.info("model_loading", slot=slot.name, model_id=slot.config.model_id,
                     memory_share=slot.config.memory_share, max_model_len=slot.config.max_model_len)
            try:
                await engine.start()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await asyncio.shield(engine.shutdown())
                slot.state = SlotState.FAILED
                slot.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                slot.failed_at = self._clock()
                self._metrics.model_load_failures.labels(model=slot.name).inc()
                log.error("model_load_failed", slot=slot.name, error=slot.error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            elapsed = self._clock() - started
            slot.engine = engine
            slot.state = SlotState.LOADED
            slot.error = None
            slot.loaded_at = time.time()
            slot.last_used = self._clock()
            self._metrics.model_loaded.labels(model=slot.name).set(1)
            self._metrics.model_memory_share.labels(model=slot.name).set(slot.config.memory_share)
            self._metrics.model_load_duration.labels(model=slot.name).observe(elapsed)
            log.info("model_loaded", slot=slot.name, seconds=round(elapsed, 2))

    async def _make_room(self, slot: Slot) -> None:
        """Evict least recently used idle slots until `slot` fits; the lifecycle lock is held."""
        need = slot.config.memory_share
        deadline = self._clock() + self.policy.eviction_wait
        while self.used_share() + need > self.budget + 1e-9:
            loaded = sorted(
                (s for s in self._slots.values() if s.state is SlotState.LOADED and s is not slot),
                key=lambda s: s.last_used,
            )
            idle = [s for s in loaded if s.in_flight == 0]
            if idle:
                victim = idle[0]
                log.info("model_evicting", slot=victim.name, for_slot=slot.name)
                self._metrics.evictions.labels(model=victim.name).inc()
                await self._unload(victim, reason="evicted")
                continue
            remaining = deadline - self._clock()
            if not loaded or remaining <= 0:
                holders = ", ".join(
                    f"{s.name} ({s.config.memory_share:.2f}, {s.in_flight} in flight)" for s in loaded
                ) or "none"
                raise ModelUnavailable(
                    f"cannot load model {slot.name!r}: it needs a memory share of {need:.2f}, "
                    f"{self.used_share():.2f} of the budget {self.budget:.2f} is held by slots "
                    f"with requests in flight: {holders}",
                    param="model",
                    retry_after=max(5.0, self.policy.eviction_wait),
                )
            await self._wait_idle(loaded, remaining)

    async def _wait_idle(self, slots: list[Slot], within: float) -> None:
        """Wait until one of `slots` has no request in flight, or `within` seconds pass."""
        deadline = self._clock() + within
        while all(s.in_flight for s in slots):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), remaining)

    async def _unload(self, slot: Slot, reason: str) -> None:
        engine = slot.engine
        slot.state = SlotState.UNLOADING
        started = self._clock()
        try:
            if engine is not None:
                await engine.shutdown()
        except Exception as exc:  # the engine is gone either way; keep the registry consistent
            log.warning("model_unload_error", slot=slot.name, error=str(exc))
        finally:
            slot.engine = None
            slot.loaded_at = None
            slot.state = SlotState.UNLOADED
            self._metrics.model_loaded.labels(model=slot.name).set(0)
            self._metrics.model_memory_share.labels(model=slot.name).set(0)
        log.info("model_unloaded", slot=slot.name, reason=reason, seconds=round(self._clock() - started, 2))

    def _engine_died(self, slot: Slot, engine: Engine, exc: BaseException) -> None:
        """Drop a dead engine: the slot goes to failed; a request after the back-off reloads it."""
        if slot.engine is not engine or slot.state is not SlotState.LOADED:
            return
        log.error("engine_dead", slot=slot.name, error=str(exc))
        slot.state = SlotState.FAILED
        slot.error = f"engine died: {exc}"
        slot.failed_at = self._clock()
        slot.engine = None
        self._metrics.model_loaded.labels(model=slot.name).set(0)
        self._metrics.model_memory_share.labels(model=slot.name).set(0)
        self._spawn(self._shutdown_quietly(engine))

    @staticmethod
    async def _shutdown_quietly(engine: Engine) -> None:
        with contextlib.suppress(Exception):
            await engine.shutdown()

    # --- background ----------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        interval = self.policy.health_interval
        if self.policy.idle_unload > 0:
            interval = min(interval, max(0.5, self.policy.idle_unload / 4))
        while not self._closed:
            await asyncio.sleep(interval)
            await self.reap()

    async def reap(self) -> None:
        """One pass: drop dead engines, unload idle unpinned slots."""
        for slot in self._slots.values():
            engine = slot.engine
            if slot.state is SlotState.LOADED and engine is not None:
                try:
                    await engine.check_health()
                except EngineDead as exc:
                    self._engine_died(slot, engine, exc)
                    continue
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
            and slot.in_flight == 0
            and self._clock() - slot.last_used >= idle_after
        )
