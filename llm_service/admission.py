"""Admission control: whom to admit to a slot (policy) and the per-slot counts it decides on (mechanism)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from llm_service.engines.base import EngineCapacity
from llm_service.errors import Overloaded
from llm_service.metrics import Metrics

# A refusal is momentary: a running request ends or a waiting one starts within about a second.
RETRY_AFTER_SECONDS = 1.0


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds of the policy, from the settings (0 = derive from the engine's capacity)."""

    per_slot: int = 0  # requests running in the engine plus waiting for it, per slot
    total: int = 0  # the same over every slot
    per_batch: float = 2.0  # a derived per-slot bound is this many times what the engine batches
    before_load: int = 64  # per-slot bound while the slot's engine capacity is unknown


@dataclass(frozen=True)
class SlotLoad:
    """What admission knows about one slot at one moment."""

    pending: int = 0  # admitted and not finished: waiting for the engine or running in it
    batch: int | None = None  # sequences the engine runs at once; None before its first load


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, for the client and the refusal metric."""

    reason: str  # "slot" or "total"
    message: str
    limit: int


class AdmissionPolicy:
    """Pure decisions over a snapshot of the slots' loads: the bound of a slot and whom to refuse."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits

    def slot_bound(self, load: SlotLoad) -> int:
        if self.limits.per_slot > 0:
            return self.limits.per_slot
        if load.batch is None:
            return self.limits.before_load
        return max(1, math.ceil(self.limits.per_batch * load.batch))

    def total_bound(self, loads: Mapping[str, SlotLoad]) -> int:
        if self.limits.total > 0:
            return self.limits.total
        return sum(self.slot_bound(load) for load in loads.values())

    def refusal(self, slot: str, weight: int, loads: Mapping[str, SlotLoad]) -> Refusal | None:
        """None to admit `weight` more sequences to `slot`, else why not."""
        load = loads[slot]
        bound = self.slot_bound(load)
        # A single request heavier than the bound still runs when the slot is idle.
        if load.pending and load.pending + weight > bound:
            return Refusal(
                "slot",
                f"model {slot!r} is at capacity ({load.pending} of {bound} requests running or waiting); "
                "retry shortly",
                bound,
            )
        total = sum(other.pending for other in loads.values())
        total_bound = self.total_bound(loads)
        if total and total + weight > total_bound:
            return Refusal(
                "total",
                f"the service is at capacity ({total} of {total_bound} requests running or waiting); retry shortly",
                total_bound,
            )
        return None


@dataclass
class _SlotCounts:
    waiting: int = 0  # admitted, no engine yet (the slot is loading, say)
    holding: int = 0  # holding the engine: running, or queued inside it beyond its batch
    capacity: EngineCapacity | None = None



class AdmissionController:
    """Counts admitted requests per slot, refuses past the policy's bounds, and publishes the counts."""

    def __init__(
        self,
        slots: list[str],
        policy: AdmissionPolicy,
        metrics: Metrics,
        loaded_capacity: Callable[[str], EngineCapacity | None] = lambda slot: None,
    ) -> None:
        self.policy = policy
        self._metrics = metrics
        # The capacity of the slot's engine while it is loaded (None otherwise); the last one seen
        # stands in while the slot is unloaded or reloading.
        self._loaded_capacity = loaded_capacity
        self._slots = {name: _SlotCounts() for name in slots}
        for name in slots:
            self._publish(name)

    def loads(self) -> dict[str, SlotLoad]:
        return {name: self._load(name, counts) for name, counts in self._slots.items()}

    def _load(self, slot: str, counts: _SlotCounts) -> SlotLoad:
        capacity = self._loaded_capacity(slot)
        if capacity is not None:
            counts.capacity = capacity
        batch = counts.capacity.batch if counts.capacity else None
        return SlotLoad(counts.waiting + counts.holding, batch)

    def snapshot(self) -> dict[str, dict[str, int | None]]:
        """Per slot: waiting, running, bound (for /health and tests)."""
        loads = self.loads()
        return {
            name: {
                "waiting": self._waiting(counts),
                "running": counts.holding - self._beyond_batch(counts),
                "bound": self.policy.slot_bound(loads[name]),
            }
            for name, counts in self._slots.items()
        }

    @contextlib.asynccontextmanager
    async def admit(self, slot: str, weight: int = 1) -> AsyncIterator[Admission]:
        """Admit `weight` sequences to `slot` until the context exits; raise Overloaded (429) at once
        when a bound would be passed."""
        counts = self._slots[slot]
        refusal = self.policy.refusal(slot, weight, self.loads())
        if refusal is not None:
            self._metrics.requests_refused.labels(model=slot, reason=refusal.reason).inc()
            raise Overloaded(refusal.message, param="model", retry_after=RETRY_AFTER_SECONDS)
        admission = Admission(self, slot, weight)
        counts.waiting += weight
        self._publish(slot)
        try:
            yield admission
        finally:
            if admission.running:
                counts.holding -= weight
            else:
                counts.waiting -= weight
            self._publish(slot)

    def _running(self, slot: str, weight: int, capacity: EngineCapacity) -> None:
        counts = self._slots[slot]
        counts.capacity = capacity
        counts.waiting -= weight
        counts.holding += weight
        self._publish(slot)

    @staticmethod
    def _beyond_batch(counts: _SlotCounts) -> int:
        batch = counts.capacity.batch if counts.capacity else None
        return 0 if batch is None else max(0, counts.holding - batch)

    def _waiting(self, counts: _SlotCounts) -> int:
        return counts.waiting + self._beyond_batch(counts)

    def _publish(self, slot: str) -> None:
        counts = self._slots[slot]
        waiting = self._waiting(counts)
        self._metrics.requests_waiting.labels(model=slot).set(waiting)
        self._metrics.requests_running.labels(model=slot).set(counts.holding - self._beyond_batch(counts))


class Admission:
    """One admitted request; `running(engine capacity)` once it holds the slot's engine."""

    def __init__(self, controller: AdmissionController, slot: str, weight: int) -> None:
        self._controller = controller
        self.slot = slot
        self.weight = weight
        self.running = False

    def start_running(self, capacity: EngineCapacity) -> None:
        if not self.running:
            self.running = True
            self._controller._running(self.slot, self.weight, capacity)
