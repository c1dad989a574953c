"""Slot state and the registry's timing rules: plain data the mechanism and the policies share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from llm_service.engines.base import Engine, EngineConfig
from llm_service.errors import ModelUnavailable


class SlotState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


# States in which a slot's engine holds (or is about to hold) its memory share.
HOLDING = (SlotState.LOADING, SlotState.LOADED, SlotState.UNLOADING)


@dataclass(frozen=True)
class RegistryPolicy:
    """Timing rules of the registry (all seconds)."""

    load_wait: float = 120.0  # a request waits this long for its slot's load
    eviction_wait: float = 10.0  # a load waits this long for a draining slot's requests to end
    retry_backoff: float = 10.0  # first back-off before a failed slot is loaded again
    retry_backoff_max: float = 300.0  # the back-off doubles per failure in a row, up to this
    idle_unload: float = 0.0  # unpinned slots idle this long unload (0 = never)
    health_interval: float = 10.0  # how often loaded engines are checked for death
    min_residency: float = 5.0  # a loaded slot is not evicted sooner than this after its load
    swap_fairness: float = 30.0  # a slot in the way keeps admitting this long while another waits
    memory_wait: float = 30.0  # a load waits this long for the device memory to be free

    def backoff(self, failures: int) -> float:
        """Seconds before the next load of a slot that failed `failures` times in a row."""
        return min(self.retry_backoff_max, self.retry_backoff * 2 ** max(0, failures - 1))


@dataclass
class Wish:
    """An admin route's request, kept on the slot until the reconciler answers it."""

    kind: str  # "load" or "unload"
    since: float  # monotonic clock
    answer: asyncio.Future[bool] = field(repr=False)


@dataclass
class Slot:
    """One named slot: its engine configuration and live state.

    Only the reconciler changes `state`, `engine` and the lifecycle fields; requests, the reaper,
    engine-death callbacks and the admin routes record facts (`wait_starts`, `in_flight`,
    `last_used`, `dead_engine`, `wish`) and wake it.
    """

    config: EngineConfig
    pinned: bool
    state: SlotState = SlotState.UNLOADED
    engine: Engine | None = None
    in_flight: int = 0
    last_used: float = 0.0  # monotonic clock
    last_used_at: float | None = None  # wall clock, for /health
    loaded_at: float | None = None
    loaded_since: float = 0.0  # monotonic clock of the last successful load
    error: str | None = None  # set while the slot is down (failed, or its engine died)
    failures: int = 0  # failed loads and deaths in a row
    retry_at: float = 0.0  # monotonic clock of the next automatic load of a failed slot
    # Requests inside acquire() waiting for the slot (monotonic clock of each arrival): a slot
    # with waiters is in demand, never idle.
    wait_starts: list[float] = field(default_factory=list)
    draining_since: float | None = None  # stops admitting new requests so it can be evicted
    draining_for: str | None = None  # the slot it makes room for (None: an admin unload)
    load_refused: tuple[float, Exception] | None = None  # the last load that found no room
    dead_engine: Engine | None = field(default=None, repr=False)  # died, not yet shut down
    # What the engine held on its device after its last start, in bytes and as a share of the
    # device (None: not measured); kept across unloads, so the next load makes room for it.
    measured_bytes: int | None = None
    measured_share: float | None = None
    last_load_seconds: float | None = None  # how long its last successful load took
    # Monotonic clock at which a load that evicts other slots is expected to end (None: no such load).
    load_eta: float | None = None
    # Loaded without a request: a pinned slot's preload, and its loads again after a failure.
    wanted: bool = False
    wanted_since: float = 0.0
    wish: Wish | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.slot

    @property
    def expected_load_seconds(self) -> float | None:
        """How long a load of this slot takes: its last measured load, else the plan's estimate."""
        return self.last_load_seconds or self.config.expected_load_seconds

    @property
    def waiting(self) -> int:
        return len(self.wait_starts)

    def owes(self, arrived: float) -> bool:
        """A request that arrived then is still to be admitted: a draining slot serves the requests
        that were waiting for it before the drain began (it was loaded for them), not later ones;
        a request that arrived before the last refusal of room has its answer."""
        if self.load_refused is not None and arrived <= self.load_refused[0]:
            return False
        return self.draining_since is None or arrived <= self.draining_since

    @property
    def owed(self) -> int:
        return sum(1 for arrived in self.wait_starts if self.owes(arrived))

    @property
    def owed_since(self) -> float | None:
        """Arrival of the oldest request the slot still owes."""
        return min((arrived for arrived in self.wait_starts if self.owes(arrived)), default=None)

    def admits(self, arrived: float) -> bool:
        """A request that arrived then can take the slot's engine now."""
        return (
            self.state is SlotState.LOADED
            and self.engine is not None
            and self.dead_engine is None
            and (self.draining_since is None or arrived <= self.draining_since)
        )

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.owed == 0

    def refusal(self, arrived: float, now: float, policy: RegistryPolicy) -> Exception | None:
        """What a request that arrived then gets at once, because waiting cannot help: the last
        load found no room after it came; the engine just died; the slot failed and its back-off
        is not over. None: it may wait (or be served)."""
        if self.load_refused is not None and self.load_refused[0] >= arrived:
            return self.load_refused[1]
        if self.load_eta is not None and self.load_eta > arrived + policy.load_wait:
            # A load that evicts others and ends after this request's wait bound: say so now.
            return ModelUnavailable(
                f"model {self.name!r} is loading (evicting other models); the load is expected to take "
                f"about {self.expected_load_seconds or 0:.0f} s, longer than the wait bound of "
                f"{policy.load_wait:.0f} s (LLM_LOAD_WAIT_SECONDS); retry after it",
                param="model",
                retry_after=max(1.0, self.load_eta - now),
            )
        if self.dead_engine is not None or (self.state is SlotState.UNLOADING and self.error is not None):
            return ModelUnavailable(
                f"model {self.name!r} is down ({self.error}); it is being restarted",
                param="model",
                retry_after=policy.backoff(self.failures + 1),
            )
        wait = self.retry_at - now
        if self.state is SlotState.FAILED and wait > 0:
            return ModelUnavailable(
                f"model {self.name!r} failed to load: {self.error}; next try in {wait:.0f} s",
                param="model",
                retry_after=wait,
            )
        return None

    def describe(self, now: float, device_memory: int | None = None) -> dict[str, Any]:
        """The slot as /health and /admin show it."""
        planned = int(self.config.memory_share * device_memory) if device_memory else None
        return {
            "model_id": self.config.model_id,
            "kind": self.config.kind,
            "state": self.state.value,
            "pinned": self.pinned,
            "memory_share": self.config.memory_share,
            "memory_planned_bytes": planned,
            "memory_measured_bytes": self.measured_bytes,
            "last_load_seconds": None if self.last_load_seconds is None else round(self.last_load_seconds, 1),
            "max_model_len": self.config.max_model_len,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "draining": self.draining_since is not None,
            "last_used": self.last_used_at,
            "loaded_at": self.loaded_at,
            "error": self.error or self.config.unloadable,
            "next_retry_seconds": round(max(0.0, self.retry_at - now), 1) if self.state is SlotState.FAILED else None,
        }
