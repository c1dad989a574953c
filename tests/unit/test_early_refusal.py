"""A load that evicts slots and is expected to outlast the wait bound answers its waiters 503 at once."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from llm_service.config.engine_configs import sizing_plan_with_sources, slot_inputs
from llm_service.config.settings import LLMSettings
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy, SlotState
from llm_service.sizing.estimate import GIB
from llm_service.sizing.load_time import load_time

from .conftest import FakeFactory, slot_config


def registry(expected: float | None, load_wait: float = 120.0) -> tuple[ModelRegistry, FakeFactory]:
    factory = FakeFactory(start_delay=0.2)
    multimodal = dataclasses.replace(slot_config("multimodal", 0.5), expected_load_seconds=expected)
    slots = [(slot_config("standard", 0.5), True), (multimodal, False)]
    policy = RegistryPolicy(min_residency=0.0, swap_fairness=0.0, load_wait=load_wait)
    return ModelRegistry(slots, 0.8, factory, Metrics(), policy), factory


async def test_a_long_evicting_load_refuses_its_waiter_at_once_and_goes_on() -> None:
    reg, _ = registry(expected=300.0)
    await reg.load("standard")
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as refused:
        async with reg.acquire("multimodal"):
            pass
    assert time.monotonic() - started < 5  # not the 120 s wait bound
    assert refused.value.retry_after is not None and 290 <= refused.value.retry_after <= 300
    assert "LLM_LOAD_WAIT_SECONDS" in refused.value.message
    # The load goes on without its waiter; the retry finds the slot loaded.
    for _ in range(50):
        if reg.slot("multimodal").state is SlotState.LOADED and reg.slot("multimodal").load_eta is None:
            break
        await asyncio.sleep(0.05)
    assert reg.slot("multimodal").state is SlotState.LOADED and reg.slot("multimodal").load_eta is None
    async with reg.acquire("multimodal"):
        pass


async def test_a_load_expected_within_the_bound_is_waited_for() -> None:
    reg, _ = registry(expected=30.0)
    await reg.load("standard")
    async with reg.acquire("multimodal") as engine:
        assert engine.config.slot == "multimodal"


async def test_the_measured_load_time_replaces_the_estimate() -> None:
    reg, _ = registry(expected=300.0)
    slot = reg.slot("multimodal")
    await reg.load("multimodal")
    assert slot.last_load_seconds is not None and slot.expected_load_seconds == slot.last_load_seconds
    await reg.load("standard")  # evicts multimodal, which now loads in well under the bound
    async with reg.acquire("multimodal"):
        pass


async def test_a_load_that_evicts_nothing_is_waited_for_whatever_its_estimate() -> None:
    reg, _ = registry(expected=300.0)
    async with reg.acquire("multimodal"):
        pass


def test_the_estimates_are_larger_cold_than_warm_and_the_cpu_has_no_compile() -> None:
    gib = GIB
    gpu = load_time(8 * gib, "cuda", enforce_eager=False, vision=True)
    assert gpu.cold > 120 > gpu.warm  # a cold multimodal load outlasts the default wait bound
    assert load_time(8 * gib, "cuda", enforce_eager=True, vision=False).warm < gpu.warm
    assert load_time(gib // 4, "cpu", enforce_eager=True, vision=False).warm < 30


def test_the_docs_load_times_are_the_estimates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # the bundled configs, not the developer's cache
    llm = LLMSettings()
    plan, _ = sizing_plan_with_sources(llm, "cuda", 80 * GIB, hub=False)
    docs = (Path(__file__).resolve().parents[2] / "DEPLOYMENT.md").read_text()
    for inputs, slot in zip(slot_inputs(llm, "cuda", hub=False), plan.slots, strict=True):
        assert slot.weights is not None and inputs.request.shape is not None
        vision = bool(inputs.request.shape.vision_params)
        estimate = load_time(slot.weights, "cuda", enforce_eager=False, vision=vision)
        row = f"| {slot.weights / GIB:.1f} GiB | ~{estimate.warm:.0f} s | ~{estimate.cold:.0f} s |"
        assert row in docs, row
