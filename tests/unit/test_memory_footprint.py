"""Measured footprints on a simulated GPU: the fake engine reports what it holds after its start."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from structlog.testing import capture_logs

from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy, SlotState
from llm_service.registry.memory import DeviceMemory

from .conftest import FakeFactory, slot_config

GIB = 1 << 30
DEVICE = 100 * GIB  # round figures: a share of 0.30 is 30 GiB


def registry(measured: dict[str, int], budget: float = 0.7) -> tuple[ModelRegistry, FakeFactory, Metrics]:
    factory = FakeFactory()
    for slot, held in measured.items():
        factory.per_slot[slot] = {"measured_bytes": held}
    metrics = Metrics()
    slots = [(slot_config(name, 0.3), False) for name in ("standard", "longctx")]
    policy = RegistryPolicy(min_residency=0.0, swap_fairness=0.0)
    memory = DeviceMemory(DEVICE, free=lambda: None)
    return ModelRegistry(slots, budget, factory, metrics, policy, memory=memory), factory, metrics


def gauge(metrics: Metrics, name: str, slot: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(f'{name}{{model="{slot}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {slot} not exported")


async def test_a_slot_over_its_share_is_logged_shown_and_counted_at_its_measured_size() -> None:
    reg, _, metrics = registry({"standard": 45 * GIB})
    with capture_logs() as logs:
        await reg.load("standard")
    over = [e for e in logs if e["event"] == "model_memory_over_share"]
    assert over and over[0]["planned_bytes"] == 30 * GIB and over[0]["measured_bytes"] == 45 * GIB
    described: dict[str, Any] = reg.snapshot()["standard"]
    assert described["memory_planned_bytes"] == 30 * GIB and described["memory_measured_bytes"] == 45 * GIB
    assert gauge(metrics, "llm_model_memory_planned_bytes", "standard") == 30 * GIB
    assert gauge(metrics, "llm_model_memory_measured_bytes", "standard") == 45 * GIB
    assert reg.used_share() == 0.45


async def test_the_next_load_makes_room_for_the_measured_figure() -> None:
    # Planned, 0.3 + 0.3 fit the budget of 0.7; measured, standard holds 0.45 and longctx evicts it.
    reg, factory, _ = registry({"standard": 45 * GIB})
    await reg.load("standard")
    await reg.load("longctx")
    assert reg.slot("standard").state is SlotState.UNLOADED
    assert factory.of("standard")[0].shutdowns == 1
    # Unloaded, the slot keeps its measured size: loading it again evicts longctx.
    await reg.load("standard")
    assert reg.slot("longctx").state is SlotState.UNLOADED


async def test_a_slot_within_its_share_counts_its_planned_share() -> None:
    reg, _, metrics = registry({"standard": 20 * GIB, "longctx": 29 * GIB})
    with capture_logs() as logs:
        await reg.load("standard")
        await reg.load("longctx")
    assert not [e for e in logs if e["event"] == "model_memory_over_share"]
    assert reg.slot("standard").state is SlotState.LOADED and reg.used_share() == 0.6
    assert gauge(metrics, "llm_model_memory_measured_bytes", "longctx") == 29 * GIB


async def test_an_engine_that_measures_nothing_keeps_the_plan() -> None:
    reg, _, _ = registry({})
    await reg.load("standard")
    assert reg.snapshot()["standard"]["memory_measured_bytes"] is None
    assert reg.used_share() == 0.3
