"""The sizing plan on simulated GPUs: shares, shortened contexts, unloadable slots, engine args."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog

from llm_service.app import EngineBackend, build_registry
from llm_service.config.engine_configs import build_slot_configs, sizing_plan_with_sources
from llm_service.config.settings import GUIDE_MODEL_ALIASES, PRODUCTION_MODELS, AppSettings, LLMSettings, Settings
from llm_service.errors import ModelUnavailable
from llm_service.observability.metrics import Metrics
from llm_service.sizing.estimate import GIB
from llm_service.sizing.plan import Device, SlotRequest, plan_slots

from .conftest import FakeFactory
from .test_sizing_estimate import shape_of


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own Hugging Face cache must not change what these tests see.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for slot in ("STANDARD", "LONGCTX", "MULTIMODAL"):
        for prefix in ("LLM_MODEL_", "LLM_MAX_MODEL_LEN_", "LLM_MEMORY_SHARE_", "LLM_ENGINE_ARGS_"):
            monkeypatch.delenv(prefix + slot, raising=False)


def llm(**values: Any) -> LLMSettings:
    return LLMSettings(**values)


def plan_on(gib: float, **values: Any):
    plan, _ = sizing_plan_with_sources(llm(**values), "cuda", int(gib * GIB), hub=False)
    return plan


def by_slot(plan) -> dict[str, Any]:
    return {p.slot: p for p in plan.slots}


@pytest.mark.parametrize("gib", [24, 48, 80])
def test_the_defaults_fit_on_24_48_and_80_gib(gib: int) -> None:
    plan = plan_on(gib)
    assert plan.fits
    assert plan.preloaded_share <= 0.85
    slots = by_slot(plan)
    assert slots["standard"].preload and slots["longctx"].preload and not slots["multimodal"].preload
    for slot in plan.slots:
        assert slot.unloadable is None
        assert slot.kv_bytes and slot.kv_tokens and slot.kv_tokens >= slot.max_model_len
        assert slot.share * gib * GIB >= slot.weights + slot.overhead + slot.kv_bytes - 1


def test_on_24_gib_longctx_shortens_its_context_instead_of_failing() -> None:
    slots = by_slot(plan_on(24))
    assert 4096 <= slots["longctx"].max_model_len < 32768 and slots["longctx"].requested_len == 32768
    assert slots["standard"].max_model_len == 8192


def test_on_48_and_80_gib_nothing_is_shortened() -> None:
    for gib in (48, 80):
        assert all(not slot.shrunk for slot in plan_on(gib).slots)


def test_the_guides_24_gib_recipe_fits() -> None:
    # LLM_GPU_MEMORY_UTILIZATION=0.75, LLM_PRELOAD_MODELS=standard: used to crash-loop, because the
    # per-slot check covered slots that are not preloaded too.
    plan = plan_on(24, gpu_memory_utilization=0.75, preload_models=["standard"])
    assert plan.fits
    assert all(slot.share <= 0.75 for slot in plan.slots)


def test_the_guides_80_gib_recipe_preloads_all_three() -> None:
    plan = plan_on(80, gpu_memory_utilization=0.90, preload_models=["standard", "longctx", "multimodal"])
    assert plan.fits and all(slot.preload for slot in plan.slots)


def test_a_context_the_operator_set_is_never_shortened() -> None:
    plan = plan_on(24, max_model_len_longctx=32768)
    slots = by_slot(plan)
    assert slots["longctx"].max_model_len == 32768
    # It cannot sit beside standard at that length: it loads on demand, and the plan says so.
    assert not slots["longctx"].preload and slots["longctx"].unloadable is None
    assert slots["standard"].preload and not plan.fits


def test_a_slot_that_cannot_fit_even_at_the_floor_is_unloadable_and_the_others_serve() -> None:
    plan = plan_on(12, min_model_len=4096)
    slots = by_slot(plan)
    assert slots["standard"].unloadable is None and slots["standard"].preload
    for name in ("longctx", "multimodal"):
        assert slots[name].unloadable and "budget" in slots[name].unloadable
        assert not slots[name].preload
    assert not plan.fits


def test_the_floor_is_a_setting() -> None:
    assert by_slot(plan_on(14, min_model_len=4096))["longctx"].unloadable is None
    assert by_slot(plan_on(14, min_model_len=16384))["longctx"].unloadable is not None


def test_an_operators_share_is_kept_and_the_kv_cache_is_what_it_leaves() -> None:
    slots = by_slot(plan_on(48, memory_share_standard=0.3))
    standard = slots["standard"]
    assert standard.share == 0.3
    assert standard.kv_bytes == int(0.3 * 48 * GIB) - standard.weights - standard.overhead


def test_an_operators_share_above_the_budget_is_reported_by_name() -> None:
    standard = by_slot(plan_on(48, memory_share_standard=0.9))["standard"]
    assert standard.unloadable == (
        "LLM_MEMORY_SHARE_STANDARD=0.90 is more than the budget LLM_GPU_MEMORY_UTILIZATION=0.85"
    )


def test_a_share_too_small_for_one_sequence_is_reported() -> None:
    standard = by_slot(plan_on(48, memory_share_standard=0.12, max_model_len_standard=131072))["standard"]
    assert standard.unloadable and "sequence" in standard.unloadable


def test_tensor_parallel_two_halves_the_weights_per_gpu() -> None:
    one = by_slot(plan_on(48))
    two = by_slot(plan_on(48, tensor_parallel_size=2))
    for slot in ("standard", "longctx", "multimodal"):
        assert two[slot].weights == pytest.approx(one[slot].weights / 2, rel=0.01)
        assert two[slot].needed < 0.6 * one[slot].needed


def test_spare_budget_goes_to_the_preloaded_slots_kv_cache_leaving_room_for_on_demand_ones() -> None:
    slots = by_slot(plan_on(80))
    standard, longctx, multimodal = slots["standard"], slots["longctx"], slots["multimodal"]
    for slot in (standard, longctx):
        assert slot.kv_bytes > 2 * (slot.needed - slot.weights - slot.overhead)  # well past two sequences
    assert standard.share + longctx.share + multimodal.share <= 0.85 + 1e-9
    # A share the operator set stays as set.
    assert by_slot(plan_on(80, memory_share_standard=0.2))["standard"].share == 0.2


def test_cpu_shares_do_not_grow() -> None:
    # vLLM's CPU worker refuses to start unless node 0 has the whole share free.
    shape = shape_of("standard")
    request = SlotRequest(slot="standard", model_id="m", shape=shape, max_model_len=4096, preload=True)
    alone = plan_slots([request], Device("cpu", 64 * GIB, 0.85)).slots[0]
    assert alone.share < 0.3


def test_no_spare_budget_no_growth() -> None:
    slots = by_slot(plan_on(48))
    assert slots["standard"].kv_tokens < 3 * 8192 and slots["longctx"].kv_tokens < 3 * 32768


def test_text_only_multimodal_slot_leaves_out_the_vision_tower() -> None:
    with_images = by_slot(plan_on(48))["multimodal"]
    text_only = by_slot(plan_on(48, multimodal_images=False))["multimodal"]
    assert text_only.weights < with_images.weights - 0.7 * GIB
    assert text_only.share < with_images.share


def test_unknown_model_falls_back_to_a_guessed_share() -> None:
    request = SlotRequest(slot="standard", model_id="org/unknown", shape=None, max_model_len=4096, preload=True)
    plan = plan_slots([request], Device("cuda", 24 * GIB, 0.85))
    assert plan.slots[0].share == 0.4 and plan.slots[0].weights is None and plan.fits


def test_preloaded_slots_that_cannot_shrink_leave_the_last_one_on_demand() -> None:
    shape = shape_of("standard")
    requests = [
        SlotRequest(slot=name, model_id="m", shape=shape, max_model_len=8192, preload=True, share=0.4)
        for name in ("standard", "longctx", "multimodal")
    ]
    plan = plan_slots(requests, Device("cuda", 48 * GIB, 0.85))
    assert [slot.preload for slot in plan.slots] == [True, True, False]
    assert not plan.fits


def settings(**values: Any) -> Settings:
    return Settings(app=AppSettings(env="test"), llm=LLMSettings(**values))


def configs(gib: int, **values: Any) -> dict[str, Any]:
    return {config.slot: (config, pinned) for config, pinned in
            build_slot_configs(llm(**values), "cuda", gib * GIB, hub=False)}


def test_gpu_engines_get_an_explicit_kv_cache_from_the_plan() -> None:
    plan = by_slot(plan_on(48))
    built = configs(48)
    for slot, (config, pinned) in built.items():
        assert config.extra_args["kv_cache_memory_bytes"] == plan[slot].kv_bytes
        assert config.memory_share == plan[slot].share and config.max_model_len == plan[slot].max_model_len
        assert pinned == plan[slot].preload


def test_the_operators_engine_args_win_over_the_plans() -> None:
    config, _ = configs(48, engine_args_standard={"kv_cache_memory_bytes": 123})["standard"]
    assert config.extra_args["kv_cache_memory_bytes"] == 123


def test_cpu_engines_keep_vllms_own_kv_sizing(tmp_path: Path) -> None:
    built = build_slot_configs(
        llm(model_standard=str(tmp_path), model_longctx=str(tmp_path), model_multimodal=str(tmp_path),
            memory_share_standard=0.2, memory_share_longctx=0.2, memory_share_multimodal=0.2,
            max_model_len_standard=512, max_model_len_longctx=512, max_model_len_multimodal=512),
        "cpu", 8 * GIB, hub=False,
    )
    assert all("kv_cache_memory_bytes" not in config.extra_args for config, _ in built)


def test_a_text_only_multimodal_slot_asks_vllm_for_no_images() -> None:
    assert configs(48, multimodal_images=False)["multimodal"][0].extra_args["limit_mm_per_prompt"] == {"image": 0}
    assert "limit_mm_per_prompt" not in configs(48)["multimodal"][0].extra_args
    assert "limit_mm_per_prompt" not in configs(48, multimodal_images=False)["standard"][0].extra_args


def test_the_guides_model_ids_are_aliases_of_published_builds() -> None:
    values = {f"model_{slot}": alias for alias, target in GUIDE_MODEL_ALIASES.items()
              for slot, model in PRODUCTION_MODELS.items() if model == target}
    with structlog.testing.capture_logs() as logs:
        built = configs(48, **values)
    for slot, (config, _) in built.items():
        assert config.model_id == PRODUCTION_MODELS[slot]
        assert values[f"model_{slot}"] in config.aliases
    assert sum(1 for entry in logs if entry["event"] == "model_alias_resolved") == 3


async def test_a_registry_built_from_an_overfull_plan_serves_what_fits() -> None:
    # 12 GiB: only standard fits. The service used to refuse to start (ValueError in the registry).
    factory = FakeFactory()
    registry = build_registry(settings(), EngineBackend(factory, "cuda", 12 * GIB), Metrics())
    async with registry.acquire("standard"):
        pass
    with pytest.raises(ModelUnavailable, match="cannot be loaded on this device"):
        async with registry.acquire("longctx"):
            pass
    assert [engine.config.slot for engine in factory.engines] == ["standard"]
    await registry.close()


def test_the_api_processs_cuda_context_has_its_own_term() -> None:
    plan = plan_on(22.05)
    assert plan.device.outside_engines == GIB // 2
    assert plan.device.headroom == int(22.05 * GIB * 0.15) - GIB // 2
    assert by_slot(plan)["longctx"].max_model_len == 6144  # an L4's 22.05 GiB, not 22.5
    # A budget that leaves the context no room does not fit, whatever the slots.
    assert not plan_on(22.05, gpu_memory_utilization=0.99, preload_models=["standard"]).fits
    assert plan_on(22.05, gpu_memory_utilization=0.97, preload_models=["standard"]).fits
    cpu, _ = sizing_plan_with_sources(llm(), "cpu", 8 * GIB, hub=False)
    assert cpu.device.outside_engines == 0


def test_each_gpu_slot_carries_the_plans_load_estimate() -> None:
    built = configs(80)
    # Nothing cached here: every estimate is the cold one, and the multimodal one outlasts the bound.
    assert built["multimodal"][0].expected_load_seconds == 190
    assert all(config.expected_load_seconds for config, _ in built.values())
