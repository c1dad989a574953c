"""Slot state and the registry's timing rules: plain data the mechanism and the policies share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

from llm_service.engines.base import Engine, EngineConfig


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
    eviction_wait: float = 10.0  # a load waits this long for an LRU slot's requests to end
    retry_backoff: float = 30.0  # a failed slot is not loaded again before this
    idle_unload: float = 0.0  # unpinned slots idle this long unload (0 = never)
    health_interval: float = 10.0  # how often loaded engines are checked for death


@dataclass
class Slot:
    """One named slot: its engine configuration and live state."""

    config: EngineConfig
    pinned: bool
    state: SlotState = SlotState.UNLOADED
    engine: Engine | None = None
    in_flight: int = 0
    last_used: float = 0.0  # monotonic clock
    last_used_at: float | None = None  # wall clock, for /health
    loaded_at: float | None = None
    error: str | None = None
    failed_at: float = 0.0
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.slot
