"""Admission mechanism: per-slot counts and held work, the drain-rate meter, 429s and the gauges."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llm_service.engines.base import EngineCapacity
from llm_service.errors import Overloaded
from llm_service.observability.metrics import Metrics
from llm_service.traffic.admission.policy import (
    NO_WORK,
    AdmissionPolicy,
    DrainRate,
    Refusal,
    SlotLoad,
    Work,
    fits_at_once,
    queue_seconds,
)

DRAIN_HORIZON_SECONDS = 60.0  # busy seconds over which the drain rate forgets older requests


class DrainMeter:
    """Tokens and sequences a slot's engine releases per second of busy time (requests held),
    an exponentially decayed average over about `horizon` busy seconds."""

    def __init__(self, horizon: float = DRAIN_HORIZON_SECONDS) -> None:
        self._horizon = horizon
        self._tokens = 0.0
        self._sequences = 0.0
        self._busy = 0.0
        self._last: float | None = None

    def tick(self, now: float, busy: bool) -> None:
        """Account the time since the last event; `busy`: the slot held work all that time."""
        if self._last is not None and busy:
            elapsed = max(0.0, now - self._last)
            decay = math.exp(-elapsed / self._horizon)
            self._tokens *= decay
            self._sequences *= decay
            self._busy = self._busy * decay + elapsed
        self._last = now

    def release(self, work: Work) -> None:
        """`work` finished (tick first)."""
        self._tokens += work.tokens
        self._sequences += work.sequences

    def rate(self) -> DrainRate | None:
        if self._busy <= 0 or self._sequences <= 0:
            return None
        return DrainRate(self._tokens / self._busy, self._sequences / self._busy)


@dataclass
class _Held:
    work: Work  # a lower bound of the request's work until it starts, then its work
    least: Work  # the lower bound it was admitted with
    slack: float  # seconds it was expected to start before its deadline (math.inf: no deadline or estimate)
    started: bool = False  # given to the engine


@dataclass
class _SlotState:
    # Admitted and not finished, oldest first; changed only by `hold` and `drop` (they keep `total`).
    held: dict[int, _Held] = field(default_factory=dict)
    capacity: EngineCapacity | None = None
    drain: DrainMeter = field(default_factory=DrainMeter)
    total: Work = NO_WORK  # the work of all `held`: every arrival weighs it, in a flood too

    def hold(self, key: int, held: _Held) -> None:
        """Hold `held` for `key` (replacing what it held, in its place)."""
        previous = self.held.get(key)
        self.held[key] = held
        self.total = self.total + held.work - (previous.work if previous is not None else NO_WORK)

    def drop(self, key: int) -> _Held | None:
        held = self.held.pop(key, None)
        if held is not None:
            self.total = self.total - held.work
        return held

    def held_work(self, ahead_of: int | None = None) -> Work:
        """All the work held; with `ahead_of`, what the engine serves before that request once it
        starts: the requests admitted before it and those already started (vLLM serves in order of
        arrival), not the ones admitted after it that have yet to start."""
        if ahead_of is None:
            return self.total
        total = NO_WORK
        for key, held in self.held.items():
            if key != ahead_of and (key < ahead_of or held.started):
                total = total + held.work
        return total

    def busy(self) -> bool:
        return any(held.started for held in self.held.values())

    def running(self) -> int:
        """Sequences the engine runs now: the oldest started requests, as many as fit at once."""
        started = [held.work for held in self.held.values() if held.started]
        if self.capacity is None:
            return sum(work.sequences for work in started)
        running = NO_WORK
        for work in started:
            if not fits_at_once(self.capacity, running, work) and running.sequences:
                break
            running = running + work
        return running.sequences


class AdmissionController:
    """Admits requests per slot by the policy, refuses with 429 at once, and publishes the counts."""

    def __init__(
        self,
        slots: list[str],
        policy: AdmissionPolicy,
        metrics: Metrics,
        loaded_capacity: Callable[[str], EngineCapacity | None] = lambda slot: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._metrics = metrics
        # The capacity of the slot's engine while it is loaded (None otherwise); the last one seen
        # stands in while the slot is unloaded or reloading.
        self._loaded_capacity = loaded_capacity
        self._clock = clock
        self._slots = {name: _SlotState() for name in slots}
        self._ids = itertools.count()
        for name in slots:
            self._publish(name)

    def loads(self) -> dict[str, SlotLoad]:
        return {name: self._load(name, state) for name, state in self._slots.items()}

    def _load(self, slot: str, state: _SlotState, ahead_of: int | None = None) -> SlotLoad:
        capacity = self._loaded_capacity(slot)
        if capacity is not None:
            state.capacity = capacity
        held = state.held_work(ahead_of)
        return SlotLoad(held.sequences, held, state.capacity, state.drain.rate())

    def snapshot(self) -> dict[str, dict[str, int | float | None]]:
        """Per slot (for /health and tests): waiting and running requests, the tokens held, the
        engine's capacity, the measured drain rate and the count bound (None: bounded by work)."""
        figures: dict[str, dict[str, int | float | None]] = {}
        for name, state in self._slots.items():
            load = self._load(name, state)
            running = state.running()
            capacity, drain = load.capacity, load.drain
            figures[name] = {
                "waiting": load.pending - running,
                "running": running,
                "held_tokens": load.held.tokens,
                "kv_cache_tokens": capacity.kv_cache_tokens if capacity else None,
                "max_num_seqs": capacity.max_num_seqs if capacity else None,
                "drain_tokens_per_second": round(drain.tokens_per_second, 1) if drain else None,
                "bound": self.policy.slot_bound(load),
            }
        return figures

    def reserve(self, slot: str, least: Work, deadline: float | None = None) -> Reservation:
        """Decide on arrival as `admit` does (raise Overloaded, 429) and hold `least` for the request
        until `admit` adopts the reservation or it is released: a burst decided before the routes
        counts every request let through ahead of it."""
        slack = self.check(slot, least, deadline)
        state = self._slots[slot]  # its capacity as `check` last saw it
        waits = state.capacity is not None and not fits_at_once(state.capacity, state.held_work(), least)
        return Reservation(self, slot, self._hold(slot, least, slack), waits)

    def _hold(self, slot: str, least: Work, slack: float) -> int:
        key = next(self._ids)
        # Reserved, so that requests arriving meanwhile count it.
        self._slots[slot].hold(key, _Held(least, least, slack))
        self._publish(slot)
        return key

    def _release(self, slot: str, key: int) -> None:
        if self._slots[slot].drop(key) is not None:
            self._publish(slot)

    @contextlib.asynccontextmanager
    async def admit(
        self, slot: str, least: Work, deadline: float | None = None, reservation: Reservation | None = None
    ) -> AsyncIterator[Admission]:
        """Admit a request to wait for `slot`'s engine until the context exits, or raise Overloaded
        (429) at once: past a count bound, or when even `least` (a lower bound of its work, known
        before the engine renders it) could not start before `deadline` (event-loop time; None:
        none). A `reservation` of the slot still held is the request's admission already.
        `Admission.start` then decides on its exact work."""
        state = self._slots[slot]
        key = reservation.adopt(slot) if reservation is not None else None
        if key is None:
            key = self._hold(slot, least, self.check(slot, least, deadline))
        try:
            yield Admission(self, slot, key)
        finally:
            busy = state.busy()
            held = state.drop(key)
            assert held is not None  # only the admission holding it drops it
            if held.started:
                state.drain.tick(self._clock(), busy)
                state.drain.release(held.work)
            self._publish(slot)

    def check(self, slot: str, least: Work, deadline: float | None = None) -> float:
        """Raise Overloaded (429) when `admit` would refuse a request of at least `least` work now;
        reserves nothing. Cheap and synchronous: the fast path asks it before anything else. Else
        the seconds it is expected to start before its deadline (math.inf: no deadline or estimate)."""
        # Every slot's load only for a bound on the whole service; else this slot's.
        loads = self.loads() if self.policy.limits.total > 0 else {slot: self._load(slot, self._slots[slot])}
        seconds_left = _seconds_left(deadline)
        refusal = self.policy.arrival_refusal(slot, least.sequences, loads)
        if refusal is None:
            refusal = self.policy.work_refusal(slot, least, loads[slot], seconds_left)
        self._refuse(slot, refusal)
        wait = queue_seconds(loads[slot], least)
        return math.inf if wait is None else seconds_left - wait

    def _refuse(self, slot: str, refusal: Refusal | None) -> None:
        if refusal is not None:
            self._metrics.requests_refused.labels(model=slot, reason=refusal.reason).inc()
            raise Overloaded(refusal.message, param="model", retry_after=refusal.retry_after)

    def _start(self, slot: str, key: int, work: Work, capacity: EngineCapacity, deadline: float | None) -> None:
        state = self._slots[slot]
        state.capacity = capacity
        load = self._load(slot, state, ahead_of=key)
        seconds_left = _seconds_left(deadline)
        refusal = self.policy.work_refusal(slot, work, load, seconds_left)
        held = state.held[key]
        if refusal is not None and load.drain is not None:
            # Its deadline was weighed on arrival; what counts now is what its own work, known in full,
            # adds to its wait (a long prompt, many inputs), against the seconds it had to spare then.
            # The estimate of the rest moves by itself (the drain rate, prompts ahead now rendered,
            # the order in which routes reach the engine) and must not turn the last requests a
            # burst admitted into late 429s.
            before, after = queue_seconds(load, held.least), queue_seconds(load, work)
            if before is not None and after is not None and after - before < held.slack:
                refusal = None
        self._refuse(slot, refusal)
        state.drain.tick(self._clock(), state.busy())
        state.hold(key, dataclasses.replace(held, work=work, started=True))
        self._publish(slot)

    def _publish(self, slot: str) -> None:
        state = self._slots[slot]
        running = state.running()
        self._metrics.requests_waiting.labels(model=slot).set(state.held_work().sequences - running)
        self._metrics.requests_running.labels(model=slot).set(running)


def _seconds_left(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline - asyncio.get_running_loop().time()


class Reservation:
    """Work held for a request decided on arrival, until `admit` adopts it or `release` drops it.
    `waits`: the engine could not start it at once (it waits behind the work held before it)."""

    def __init__(self, controller: AdmissionController, slot: str, key: int, waits: bool = False) -> None:
        self._controller = controller
        self.slot = slot
        self._key: int | None = key
        self.waits = waits

    def adopt(self, slot: str) -> int | None:
        """The held work's key for `admit` on `slot` (None: released, adopted, or another slot)."""
        key, self._key = self._key, None
        if key is not None and slot != self.slot:
            self._controller._release(self.slot, key)
            return None
        return key

    def release(self) -> None:
        """Drop the held work unless `admit` adopted it (the request never reached the engine)."""
        key, self._key = self._key, None
        if key is not None:
            self._controller._release(self.slot, key)


class Admission:
    """One request admitted to wait for a slot; `start(work, ...)` once its work is known and it
    holds the slot's engine."""

    def __init__(self, controller: AdmissionController, slot: str, key: int) -> None:
        self._controller = controller
        self.slot = slot
        self._key = key
        self.started = False

    def start(self, work: Work, capacity: EngineCapacity, deadline: float | None = None) -> None:
        """Give the engine `work`, or raise Overloaded (429): past the queue bound while no drain rate
        is measured, or when `work` adds more to its expected wait than it had to spare before
        `deadline` (event-loop time; None: no deadline) when it was admitted."""
        if not self.started:
            self._controller._start(self.slot, self._key, work, capacity, deadline)
            self.started = True
