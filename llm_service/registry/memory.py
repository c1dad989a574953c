"""The memory budget: what a slot counts against it, and waiting, before a load, until the device
memory an evicted or dead engine held is really free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from llm_service.observability.metrics import Metrics
from llm_service.registry.slots import HOLDING, Slot

log = structlog.get_logger(__name__)

def budget_share(slot: Slot) -> float:
    """The share of the budget the slot counts for: its planned memory share, or what its engine
    was measured to hold after its last start when that is more (kept across unloads, so the
    next load makes room for it)."""
    return max(slot.config.memory_share, slot.measured_share or 0.0)


def held_share(slots: Iterable[Slot]) -> float:
    """The budget held by slots whose engine is starting, serving, stopping, or dead and not yet shut down."""
    return sum(budget_share(s) for s in slots if s.state in HOLDING or s.dead_engine is not None)


# Bytes a new engine could take on the device now; None when the backend cannot tell.
FreeMemory = Callable[[], int | None]


@dataclass(frozen=True)
class DeviceMemory:
    """The device whose memory the budget divides: its size and a probe of what is free.

    vLLM refuses to start an engine whose share of the device is more than the memory free at
    that moment, and an engine that was shut down may still be releasing its memory (vLLM kills
    a slow engine core and does not wait for the driver to reclaim it).
    """

    total: int
    free: FreeMemory
    interval: float = 0.5  # seconds between probes

    async def wait_for(
        self,
        share: float,
        within: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Wait until `share` of the device is free, at most `within` seconds; True if it is."""
        need = int(share * self.total)
        deadline = clock() + within
        waited = False
        while True:
            free = self.free()
            if free is None or free >= need:
                if waited:
                    log.info("device_memory_free", need_bytes=need, free_bytes=free)
                return True
            remaining = deadline - clock()
            if remaining <= 0:
                log.warning("device_memory_still_held", need_bytes=need, free_bytes=free, waited_s=within)
                return False
            if not waited:
                log.info("device_memory_waiting", need_bytes=need, free_bytes=free)
                waited = True
            await asyncio.sleep(min(self.interval, remaining))


def record_footprint(slot: Slot, measured: int | None, memory: DeviceMemory | None, metrics: Metrics) -> None:
    """Keep what the slot's freshly started engine holds (None: not measured) and show it; a slot
    over its share is logged with both figures, and the budget counts the larger from now on."""
    device_memory = memory.total if memory is not None else None
    planned = int(slot.config.memory_share * device_memory) if device_memory else None
    if planned is not None:
        metrics.model_memory_planned.labels(model=slot.name).set(planned)
    if measured is None:
        return
    slot.measured_bytes = measured
    slot.measured_share = measured / device_memory if device_memory else None
    metrics.model_memory_measured.labels(model=slot.name).set(measured)
    if planned is not None and measured > planned:
        log.warning(
            "model_memory_over_share",
            slot=slot.name,
            planned_bytes=planned,
            measured_bytes=measured,
            share=slot.config.memory_share,
            measured_share=round(measured / device_memory, 4) if device_memory else None,
        )
    else:
        log.info("model_memory_measured", slot=slot.name, planned_bytes=planned, measured_bytes=measured)
