"""Swap policy: which loaded slots make room for a load, and when, so that slots in demand do not thrash.

A pure decision over a snapshot of the slots; the registry applies it (evicts, drains, waits)
and asks again whenever something changes or the decision's `recheck_at` comes.

The rules, for a slot that must be loaded and does not fit:
* idle slots that free enough (the fewest, then the least recently used) are evicted, once
  their minimum residency is over;
  otherwise victims are the slots already draining (a victim stays chosen until its drain ends
  or is given up) and the fewest more loaded slots that free the rest (of equal counts: fewer
  busy ones, then the least recently used);
* an idle slot is never evicted sooner than `min_residency` after its own load (its next
  request is usually on its way);
* a busy victim keeps admitting new requests for `fairness` seconds from when it was loaded or
  the waiting slot's first request arrived, whichever is later (so the slot that is loaded
  serves its queue in one go, and the waiting slot's requests are then served together after
  one load); after that it drains: it admits no new requests, and is evicted when the ones in
  flight have ended;
* a drain that lasts longer than `drain_timeout` gives up: the waiting requests get 503 and the
  victims admit again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llm_service.registry.memory import budget_share
from llm_service.registry.slots import HOLDING, Slot, SlotState

_EPS = 1e-9


@dataclass(frozen=True)
class SlotView:
    """What the policy sees of one slot."""

    name: str
    state: SlotState
    share: float
    in_flight: int
    waiting: int  # requests waiting that the slot must still admit (not those that came during a drain)
    last_used: float
    loaded_since: float
    draining_since: float | None = None
    draining_for: str | None = None
    waiting_since: float | None = None  # arrival of the oldest of the `waiting` requests
    pinned: bool = False
    dead: bool = False  # its engine died and is not shut down yet
    wanted_since: float | None = None  # to be loaded without a request (a pinned slot's preload or retry)
    wish: str | None = None  # an admin's "load" or "unload"
    wish_since: float = 0.0
    retry_at: float = 0.0
    loadable: bool = True  # fits the budget at all, and the sizing plan did not rule it out

    @classmethod
    def of(cls, slot: Slot, budget: float) -> SlotView:
        share = budget_share(slot)
        return cls(
            name=slot.name,
            state=slot.state,
            share=share,
            in_flight=slot.in_flight,
            waiting=slot.owed,
            last_used=slot.last_used,
            loaded_since=slot.loaded_since,
            draining_since=slot.draining_since,
            draining_for=slot.draining_for,
            waiting_since=slot.owed_since,
            pinned=slot.pinned,
            dead=slot.dead_engine is not None,
            wanted_since=slot.wanted_since if slot.wanted else None,
            wish=slot.wish.kind if slot.wish is not None else None,
            wish_since=slot.wish.since if slot.wish is not None else 0.0,
            retry_at=slot.retry_at,
            loadable=slot.config.unloadable is None and slot.config.memory_share <= budget + _EPS,
        )

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0


@dataclass(frozen=True)
class RoomDecision:
    """What to do for a load: it fits; or evict these now; or drain these and look again later;
    or give up with a reason."""

    fits: bool = False
    evict: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    recheck_at: float | None = None  # None: look again on the next change
    refuse: str | None = None


@dataclass(frozen=True)
class SwapPolicy:
    """The rules above, with their three time bounds (seconds)."""

    min_residency: float = 5.0
    fairness: float = 30.0
    drain_timeout: float = 10.0

    def make_room(
        self, slots: list[SlotView], loading: str, budget: float, waiting_since: float, now: float
    ) -> RoomDecision:
        """The decision for loading `loading` whose oldest request has waited since `waiting_since`."""
        target = next(s for s in slots if s.name == loading)
        others = [s for s in slots if s.name != loading]
        excess = sum(s.share for s in others if s.state in HOLDING) + target.share - budget
        if excess <= _EPS:
            return RoomDecision(fits=True)
        loaded = [s for s in others if s.state is SlotState.LOADED and not s.dead]
        idle = self._fewest([s for s in loaded if s.idle], excess)
        if idle is not None:  # idle slots free enough (a drain going on is then not needed)
            resident = [s.loaded_since + self.min_residency for s in idle if now < s.loaded_since + self.min_residency]
            if resident:
                return RoomDecision(recheck_at=min(resident))
            return RoomDecision(evict=tuple(s.name for s in idle))
        draining = [s for s in loaded if s.draining_since is not None]
        more = self._fewest(
            [s for s in loaded if s.draining_since is None], excess - sum(s.share for s in draining)
        )
        if more is None:
            return RoomDecision(refuse=f"{target.share:.2f} of the budget cannot be freed")
        victims = draining + more
        drain: list[str] = []
        times: list[float] = []
        for victim in victims:
            resident_until = victim.loaded_since + self.min_residency
            if victim.idle:
                if now < resident_until:
                    times.append(resident_until)
                continue
            if victim.draining_since is not None:
                give_up = victim.draining_since + self.drain_timeout
                if now >= give_up:
                    return RoomDecision(refuse=self._busy(victims))
                times.append(give_up)
                continue
            # Fairness counts from when both were true: the victim serving, the other slot waiting.
            admit_until = max(resident_until, max(victim.loaded_since, waiting_since) + self.fairness)
            if now >= admit_until:
                drain.append(victim.name)
                times.append(now + self.drain_timeout)
            else:
                times.append(admit_until)
        return RoomDecision(drain=tuple(drain), recheck_at=min(times) if times else None)

    @staticmethod
    def _fewest(candidates: list[SlotView], need: float) -> list[SlotView] | None:
        """The fewest of `candidates` that free `need` (of equal counts: fewer busy ones, then the
        least recently used, then the smaller share); None if all of them together do not."""
        for count in range(len(candidates) + 1):
            fitting = [c for c in itertools.combinations(candidates, count) if sum(s.share for s in c) >= need - _EPS]
            if fitting:
                return list(min(fitting, key=lambda c: (
                    sum(not s.idle for s in c), max((s.last_used for s in c), default=0.0), sum(s.share for s in c),
                )))
        return None

    @staticmethod
    def _busy(victims: list[SlotView]) -> str:
        holders = ", ".join(f"{s.name} ({s.share:.2f}, {s.in_flight} in flight)" for s in victims)
        return f"the budget is held by slots with requests in flight: {holders}"
