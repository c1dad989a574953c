"""ModelRegistry: what handlers and admin routes call; facts for the reconciler, which runs the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from llm_service.engines.base import AdapterConfig, Engine, EngineConfig, EngineDead
from llm_service.errors import InvalidRequest, ModelNotFound, ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry.memory import DeviceMemory, held_share
from llm_service.registry.reconciler import EngineFactory, Reconciler
from llm_service.registry.slots import RegistryPolicy, Slot, SlotState, Wish

log = structlog.get_logger(__name__)

__all__ = ["EngineFactory", "ModelRegistry"]


class ModelRegistry:
    """Loads, lazily loads, evicts and unloads the slots' engines within one memory budget.

    Handlers only call `acquire(slot)`. Requests, the reaper (health checks), engine-death
    callbacks and the admin routes only record facts on the slots and wake the reconciler
    (reconciler.py), the one task that changes a slot's state, one action at a time, as the
    lifecycle policy (policy.py) decides from a snapshot.
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
        self._metrics = metrics
        self._clock = clock
        self._memory = memory
        self._slots = {config.slot: Slot(config=config, pinned=pinned) for config, pinned in slots}
        # Whether slots fit is the sizing plan's decision (llm_service.sizing): a slot that cannot
        # load on this device is marked `unloadable` and answers 503, the others serve.
        for slot in self._slots.values():
            metrics.init_slot(slot.name)
        self._preload_pending: list[str] = []
        self._preload_done = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._reconciler = Reconciler(
            self._slots, budget, engine_factory, metrics, self.policy, clock, memory, on_settled=self._settled_load,
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
        return self.find_model(name_or_model_id)[0]

    def find_model(self, model: str) -> tuple[Slot, str | None]:
        """The slot a model name selects (its name, model id or an alias) and the adapter it names, if one."""
        for slot in self._slots.values():
            if any(adapter.name == model for adapter in slot.config.adapters):
                return slot, model
        if model in self._slots:
            return self._slots[model], None
        for slot in self._slots.values():
            if model == slot.config.model_id or model in slot.config.aliases:
                return slot, None
        return self.slot(model), None

    async def add_adapter(self, name: str, adapter: AdapterConfig) -> None:
        """Serve a LoRA adapter on a generate slot from now on (loaded into its engine at once when the
        engine runs, else with its next load); InvalidRequest if it cannot be."""
        slot = self.slot(name)
        if not slot.config.lora:
            raise InvalidRequest(
                f"model {name!r} was started without LoRA: list an adapter in its config to enable it", param="name"
            )
        if self._taken(adapter.name):
            raise InvalidRequest(f"the model name {adapter.name!r} is taken", param="name")
        if slot.state is SlotState.LOADED and slot.engine is not None:
            try:
                await slot.engine.add_adapter(adapter)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="path") from None
        # The engine's config is its start configuration: a reload starts with the adapter too.
        slot.config = dataclasses.replace(slot.config, adapters=(*slot.config.adapters, adapter))

    async def remove_adapter(self, name: str, adapter: str) -> None:
        slot = self.slot(name)
        if not any(a.name == adapter for a in slot.config.adapters):
            raise ModelNotFound(f"model {name!r} has no adapter {adapter!r}", param="adapter")
        slot.config = dataclasses.replace(
            slot.config, adapters=tuple(a for a in slot.config.adapters if a.name != adapter)
        )
        if slot.engine is not None:
            await slot.engine.remove_adapter(adapter)

    def _taken(self, model: str) -> bool:
        return any(
            model == s.name or model == s.config.model_id or model in s.config.aliases
            or any(a.name == model for a in s.config.adapters)
            for s in self._slots.values()
        )

    def used_share(self) -> float:
        return held_share(self._slots.values())

    @property
    def preload_done(self) -> bool:
        return self._preload_done.is_set()

    def is_ready(self) -> bool:
        """Every pinned slot has finished its first load, and none is down (failed, its engine
        died, or its preload is still waiting for room)."""
        if not self._preload_done.is_set():
            return False
        return not any(s.pinned and (s.error is not None or s.wanted) for s in self._slots.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        total = self._memory.total if self._memory is not None else None
        return {s.name: s.describe(now, total) for s in self._slots.values()}

    # --- lifecycle of the registry -------------------------------------------------------
    def start(self, preload: bool) -> None:
        """Start background work: the preload of pinned slots (one after another, by the
        reconciler) and the reaper's health checks."""
        if preload:
            for slot in self._slots.values():
                if slot.pinned and slot.state is not SlotState.LOADED:
                    slot.wanted, slot.wanted_since = True, 0.0
                    self._preload_pending.append(slot.name)
        if not self._preload_pending:
            self._preload_done.set()
        self._reconciler.wake()
        self._reaper = asyncio.create_task(self._reap_forever(), context=contextvars.Context())

    async def wait_preloaded(self) -> None:
        await self._preload_done.wait()

    def _settled_load(self, slot: Slot) -> None:
        if slot.name in self._preload_pending:
            self._preload_pending.remove(slot.name)
            if not self._preload_pending:
                self._preload_done.set()

    async def close(self) -> None:
        """Stop background work and shut down every engine (dead ones included)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        await self._reconciler.close()
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
            self._reconciler.engine_died(slot, engine, exc)
            raise
        finally:
            slot.in_flight -= 1
            slot.last_used = self._clock()
            slot.last_used_at = time.time()
            self._metrics.in_flight.labels(model=slot.name).dec()
            self._reconciler.wake()

    def _check_loadable(self, slot: Slot) -> None:
        """503 at once, without evicting anything, for a slot the sizing plan found no room for."""
        reason = slot.config.unloadable
        if reason is None and slot.config.memory_share > self.budget + 1e-9:
            reason = f"its memory share {slot.config.memory_share:.2f} is more than the budget {self.budget:.2f}"
        if reason is not None:
            raise ModelUnavailable(f"model {slot.name!r} cannot be loaded on this device: {reason}", param="model")
        if self._closed:
            raise ModelUnavailable("the service is shutting down", param="model", retry_after=5)

    async def _admit(self, slot: Slot) -> Engine:
        """The slot's engine, with the request counted in flight (in the same step as the check,
        so that no eviction comes in between)."""
        self._check_loadable(slot)
        arrived = self._clock()
        if slot.admits(arrived) and not slot.wait_starts:
            return self._take(slot)
        # Counted as waiting from now on: a slot with waiters is in demand and never idle, so the
        # reconciler loads it, and a slot loaded for them serves them before anything can evict it.
        slot.wait_starts.append(arrived)
        self._reconciler.wake()
        try:
            async with asyncio.timeout(self.policy.load_wait):
                while True:
                    if slot.admits(arrived):
                        return self._take(slot)
                    refusal = slot.refusal(arrived, self._clock(), self.policy)
                    if refusal is None and self._closed:
                        refusal = ModelUnavailable("the service is shutting down", param="model", retry_after=5)
                    if refusal is not None:
                        raise refusal
                    await self._reconciler.next_change()
        except TimeoutError:
            raise ModelUnavailable(
                f"model {slot.name!r} is loading or waiting for room in the memory budget; retry shortly",
                param="model",
                retry_after=10,
            ) from None
        finally:
            slot.wait_starts.remove(arrived)
            self._metrics.load_wait.labels(model=slot.name).observe(self._clock() - arrived)
            self._reconciler.wake()

    def _take(self, slot: Slot) -> Engine:
        assert slot.engine is not None
        slot.in_flight += 1
        return slot.engine

    # --- admin -----------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        """Load a slot now (admin), making room as a request would; returns when loaded, raises
        ModelUnavailable otherwise."""
        slot = self.slot(name)
        self._check_loadable(slot)
        if slot.state is SlotState.LOADED and slot.dead_engine is None:
            return
        await self._wish(slot, "load")

    async def unload(self, name: str) -> bool:
        """Unload a slot now (admin): it stops admitting and unloads once its requests end (503 if
        they do not within LLM_EVICTION_WAIT_SECONDS); False if it was not loaded."""
        slot = self.slot(name)
        if slot.state is not SlotState.LOADED or self._closed:
            return False
        return await self._wish(slot, "unload")

    async def _wish(self, slot: Slot, kind: str) -> bool:
        if slot.wish is not None and slot.wish.kind != kind:
            raise ModelUnavailable(f"model {slot.name!r} has an admin {slot.wish.kind} in progress", retry_after=5)
        if slot.wish is None:
            slot.wish = Wish(kind, self._clock(), asyncio.get_running_loop().create_future())
            self._reconciler.wake()
        return await asyncio.shield(slot.wish.answer)

    # --- background ----------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.policy.health_interval)
            try:
                await self.reap()
            except Exception:  # one bad pass must not end health checks for good
                log.exception("reap_failed")

    async def reap(self) -> None:
        """One pass of health checks: a dead engine is recorded for the reconciler (idle unloads
        are the reconciler's own: it waits until a slot's idle time is over)."""
        for slot in self._slots.values():
            engine = slot.engine
            if slot.state is SlotState.LOADED and engine is not None and slot.dead_engine is None:
                try:
                    await engine.check_health()
                except EngineDead as exc:
                    self._reconciler.engine_died(slot, engine, exc)
                except Exception as exc:
                    log.warning("health_check_error", slot=slot.name, error=str(exc))
        self._reconciler.wake()
