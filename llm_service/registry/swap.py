"""Swap policy: which loaded slots make room for a load, and when, so that slots in demand do not thrash.

A pure decision over a snapshot of the slots; the registry applies it (evicts, drains, waits)
and asks again whenever something changes or the decision's `recheck_at` comes.

The rules, for a slot that must be loaded and does not fit:
* victims are the loaded slots in the way, idle ones first, then least recently used;
* an idle victim is evicted at once, but never sooner than `min_residency` after its own load
  (its next request is usually on its way);
* a busy victim keeps admitting new requests for `fairness` seconds from when it was loaded or
  the waiting slot's first request arrived, whichever is later (so the slot that is loaded
  serves its queue in one go, and the waiting slot's requests are then served together after
  one load); after that it drains: it admits no new requests, and is evicted when the ones in
  flight have ended;
* a drain that lasts longer than `drain_timeout` gives up: the waiting requests get 503 and the
  victims admit again.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def of(cls, slot: Slot) -> SlotView:
        return cls(
            name=slot.name,
            state=slot.state,
            share=slot.held_share,
            in_flight=slot.in_flight,
            waiting=slot.owed,
            last_used=slot.last_used,
            loaded_since=slot.loaded_since,
            draining_since=slot.draining_since,
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
        victims = self._victims(others, excess)
        if victims is None:
            return RoomDecision(refuse=f"{target.share:.2f} of the budget cannot be freed")
        if all(s.idle and now >= s.loaded_since + self.min_residency for s in victims):
            return RoomDecision(evict=tuple(s.name for s in victims))
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
    def _victims(others: list[SlotView], excess: float) -> list[SlotView] | None:
        """The fewest loaded slots, idle first and then least recently used, that free `excess`."""
        loaded = sorted(
            (s for s in others if s.state is SlotState.LOADED), key=lambda s: (not s.idle, s.last_used)
        )
        chosen: list[SlotView] = []
        freed = 0.0
        for slot in loaded:
            if freed >= excess - _EPS:
                break
            chosen.append(slot)
            freed += slot.share
        return chosen if freed >= excess - _EPS else None

    @staticmethod
    def _busy(victims: list[SlotView]) -> str:
        holders = ", ".join(f"{s.name} ({s.share:.2f}, {s.in_flight} in flight)" for s in victims)
        return f"the budget is held by slots with requests in flight: {holders}"
