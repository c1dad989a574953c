"""Recovery: a slot that goes down (a failed load, a dead engine) is refused, then loaded again by
itself after a back-off; a dead engine keeps its memory share until its processes are gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from llm_service.engines.base import Engine
from llm_service.metrics import Metrics
from llm_service.registry.slots import RegistryPolicy, Slot, SlotState

log = structlog.get_logger(__name__)


class Recovery:
    """The registry's failure paths; the registry owns the slots, the lock and the loads."""

    def __init__(
        self,
        policy: RegistryPolicy,
        metrics: Metrics,
        clock: Callable[[], float],
        lifecycle_lock: asyncio.Lock,
        *,
        notify: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        reload: Callable[[Slot], None],
        closed: Callable[[], bool],
    ) -> None:
        self.policy = policy
        self._metrics = metrics
        self._clock = clock
        self._lock = lifecycle_lock
        self._notify = notify
        self._spawn = spawn
        self._reload = reload
        self._closed = closed

    def failed(self, slot: Slot, error: str) -> None:
        """The slot is down: refuse its requests and load it again after a back-off that doubles
        with each failure in a row (bounded)."""
        slot.state = SlotState.FAILED
        slot.error = error
        slot.failures += 1
        delay = self.policy.backoff(slot.failures)
        slot.retry_at = self._clock() + delay
        log.error("model_failed", slot=slot.name, error=error, failures=slot.failures, retry_in=round(delay, 1))
        self._notify()
        if not self._closed():
            self._spawn(self._retry_after(slot, delay))

    async def _retry_after(self, slot: Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        if slot.state is SlotState.FAILED and slot.load_task is None:
            self._reload(slot)

    def engine_died(self, slot: Slot, engine: Engine, exc: BaseException) -> None:
        """A loaded engine died (its own signal, a request, or the health check): refuse the slot's
        requests at once; its memory share stays held until the engine is shut down."""
        if slot.engine is not engine or slot.state is not SlotState.LOADED:
            return
        log.error("engine_dead", slot=slot.name, error=str(exc))
        self._metrics.engine_deaths.labels(model=slot.name).inc()
        slot.state = SlotState.UNLOADING
        slot.error = f"engine died: {exc}"
        slot.engine = None
        slot.dead_engine = engine
        slot.draining_since = None
        self._metrics.model_loaded.labels(model=slot.name).set(0)
        self._notify()
        self._spawn(self._drop(slot))

    async def _drop(self, slot: Slot) -> None:
        async with self._lock:
            await self.shutdown_dead(slot)

    async def shutdown_dead(self, slot: Slot) -> None:
        """Shut the slot's dead engine down (once), then mark the slot failed. The caller holds the
        lifecycle lock (a load does this first, so it never waits for a share that is on its way back)."""
        engine, slot.dead_engine = slot.dead_engine, None
        if engine is None:
            return
        with contextlib.suppress(Exception):
            await engine.shutdown()
        slot.loaded_at = None
        self._metrics.model_memory_share.labels(model=slot.name).set(0)
        self.failed(slot, slot.error or "engine died")
