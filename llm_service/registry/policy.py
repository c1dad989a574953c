"""The lifecycle policy: given a snapshot of every slot, the reconciler's next action. Pure.

The reconciler (reconciler.py) takes a snapshot, asks `LifecyclePolicy.next_action`, carries the
action out and asks again; `Wait` ends a turn until a fact changes or its time comes. The order
of the rules is the order of the checks below:

1. a dead engine is shut down first (its share comes back; also while a drain is waited on);
2. at shutdown, every engine is stopped;
3. an admin unload: unload an idle slot, else drain it, and give up after the drain timeout;
4. idle unpinned slots unload after `idle_unload`;
5. a drain whose slot no longer needs loading is abandoned (the victims admit again);
6. loads, oldest demand first. Demand is: requests waiting, an admin load, a pinned slot to
   (re)load. A failed slot loads again only once its back-off is over (an admin load does not
   wait for it). The oldest demand asks the swap policy (swap.py) to fit, evict, drain or give
   up; later ones wait for it. A failed lazy slot with no demand retries only if it fits as
   things are, else its failure expires (it never evicts for a load nobody waits for);
7. otherwise wait, until the earliest time a rule above could change its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.registry.slots import HOLDING, RegistryPolicy, SlotState
from llm_service.registry.swap import SlotView, SwapPolicy

_EPS = 1e-9


@dataclass(frozen=True)
class Snapshot:
    """What the policy sees: every slot, the budget, the time, whether the registry is closing."""

    slots: tuple[SlotView, ...]
    budget: float
    now: float
    closing: bool = False


@dataclass(frozen=True)
class ShutDownDead:
    slot: str


@dataclass(frozen=True)
class StopAll:
    """Shutdown: stop every engine, then end."""


@dataclass(frozen=True)
class Load:
    slot: str


@dataclass(frozen=True)
class Unload:
    slot: str
    reason: str  # "idle" or "admin"


@dataclass(frozen=True)
class Evict:
    slots: tuple[str, ...]
    for_slot: str


@dataclass(frozen=True)
class Drain:
    slots: tuple[str, ...]
    for_slot: str | None  # None: an admin unload


@dataclass(frozen=True)
class GiveUp:
    """End the drains for `for_slot` (the victims admit again); with a reason, refuse its load."""

    for_slot: str
    reason: str | None


@dataclass(frozen=True)
class Forget:
    """A failed lazy slot's back-off is over and it does not fit: it turns unloaded."""

    slot: str


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: until a fact changes


Action = ShutDownDead | StopAll | Load | Unload | Evict | Drain | GiveUp | Forget | Wait


@dataclass(frozen=True)
class LifecyclePolicy:
    timing: RegistryPolicy

    @property
    def swap(self) -> SwapPolicy:
        t = self.timing
        return SwapPolicy(min_residency=t.min_residency, fairness=t.swap_fairness, drain_timeout=t.eviction_wait)

    def next_action(self, snap: Snapshot) -> Action:
        now, slots = snap.now, snap.slots
        times: list[float] = []
        for s in slots:
            if s.dead:
                return ShutDownDead(s.name)
        if snap.closing:
            return StopAll()
        for s in slots:
            if s.wish == "unload" and s.state is not SlotState.LOADED:
                return GiveUp(s.name, None)
            if s.wish == "unload":
                if s.idle:
                    return Unload(s.name, "admin")
                if s.draining_since is None:
                    return Drain((s.name,), None)
                give_up = s.draining_since + self.timing.eviction_wait
                if now >= give_up:
                    return GiveUp(s.name, "still has requests in flight")
                times.append(give_up)
        idle_after = self.timing.idle_unload
        for s in slots:
            if idle_after > 0 and not s.pinned and s.state is SlotState.LOADED and s.idle and s.wish is None \
                    and s.draining_since is None:
                if now >= s.last_used + idle_after:
                    return Unload(s.name, "idle")
                times.append(s.last_used + idle_after)
        demand = self._demand(slots, now, times)
        for s in slots:
            if s.draining_for is not None and s.draining_for not in demand:
                return GiveUp(s.draining_for, None)
        waiting_for_room = False
        for name, since in sorted(demand.items(), key=lambda item: item[1]):
            # The oldest demand only: a later one would take room the first one is waiting for.
            decision = self.swap.make_room(list(slots), name, snap.budget, since, now)
            if decision.fits:
                return Load(name)
            if decision.evict:
                return Evict(decision.evict, name)
            if decision.drain:
                return Drain(decision.drain, name)
            if decision.refuse is not None:
                return GiveUp(name, decision.refuse)
            if decision.recheck_at is not None:
                times.append(decision.recheck_at)
            waiting_for_room = True
            break
        for s in slots:
            if s.state is SlotState.FAILED and s.name not in demand and s.loadable:
                if now < s.retry_at:
                    times.append(s.retry_at)
                elif not waiting_for_room:
                    return Load(s.name) if self._fits(slots, s, snap.budget) else Forget(s.name)
        return Wait(min(times) if times else None)

    @staticmethod
    def _demand(slots: tuple[SlotView, ...], now: float, times: list[float]) -> dict[str, float]:
        """Slots to load, each with the time since when it is in demand."""
        demand: dict[str, float] = {}
        for s in slots:
            if s.state not in (SlotState.UNLOADED, SlotState.FAILED) or not s.loadable:
                continue
            since = [t for t in (s.waiting_since, s.wanted_since) if t is not None]
            if s.wish == "load":
                since.append(s.wish_since)
            if not since:
                continue
            if s.state is SlotState.FAILED and s.wish != "load" and now < s.retry_at:
                times.append(s.retry_at)
                continue
            start = min(since)
            if s.state is SlotState.FAILED:
                start = max(start, min(s.retry_at, now))
            demand[s.name] = start
        return demand

    @staticmethod
    def _fits(slots: tuple[SlotView, ...], target: SlotView, budget: float) -> bool:
        held = sum(s.share for s in slots if s.name != target.name and (s.state in HOLDING or s.dead))
        return held + target.share <= budget + _EPS
