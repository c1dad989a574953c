"""A scripted workload for the swap policy: clients alternating between slots that do not fit together.

Times are those of a GPU deployment divided by 100: a load of 30 s is 0.3 s here, a request
of 6 s is 60 ms, `LLM_LOAD_WAIT_SECONDS=120` is 1.2 s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from llm_service.engines.base import GenerationRequest, RenderedPrompt, SamplingOptions
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy

from .conftest import FakeFactory, slot_config

SCALE = 0.01
LOAD, UNLOAD, TOKEN = 30 * SCALE, 5 * SCALE, 1 * SCALE
SLOTS = ("standard", "longctx")


@dataclass
class WorkloadResult:
    served: int = 0
    refused: int = 0
    loads: int = 0
    waits: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SLOTS})

    @property
    def max_wait(self) -> float:
        return max((w for waits in self.waits.values() for w in waits), default=0.0)


def alternating_registry(**policy: Any) -> tuple[ModelRegistry, FakeFactory]:
    """Two slots of 0.3 in a 0.5 budget, with the scaled default timings (or `policy`)."""
    timings = {
        "load_wait": 300 * SCALE,  # above the worst wait: two loads, the fairness time, a request
        "eviction_wait": 10 * SCALE,
        "min_residency": 5 * SCALE,
        "swap_fairness": 30 * SCALE,
        **policy,
    }
    factory = FakeFactory(start_delay=LOAD, shutdown_delay=UNLOAD, token_delay=TOKEN)
    slots = [(slot_config(name, 0.3), False) for name in SLOTS]
    return ModelRegistry(slots, 0.5, factory, Metrics(), RegistryPolicy(**timings)), factory


async def run_alternating(
    registry: ModelRegistry, factory: FakeFactory, clients: int = 4, requests: int = 100, pattern: str = "alternate"
) -> WorkloadResult:
    """`clients` closed-loop clients send `requests` in all. With pattern "alternate" each client
    switches slot on every request (client i starts on slot i % 2); with "sticky" client i always
    asks for slot i % 2."""
    result = WorkloadResult()
    per_client = requests // clients

    async def client(index: int) -> None:
        for turn in range(per_client):
            slot = SLOTS[(index + turn) % 2] if pattern == "alternate" else SLOTS[index % 2]
            started = time.monotonic()
            try:
                async with registry.acquire(slot) as engine:
                    result.waits[slot].append(time.monotonic() - started)
                    prompt = RenderedPrompt("one two three", 3)
                    request = GenerationRequest(f"c{index}-{turn}", prompt, SamplingOptions(max_tokens=16))
                    async for _ in engine.generate(request):
                        pass
                result.served += 1
            except ModelUnavailable:
                result.refused += 1
                await asyncio.sleep(TOKEN)  # a client that got 503 tries its next request a little later

    await asyncio.gather(*(client(i) for i in range(clients)))
    result.loads = len(factory.engines)
    return result
