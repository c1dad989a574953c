"""Turns settings into one EngineConfig per slot: model, context length, memory share, engine args."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from llm_service.config.settings import GUIDE_MODEL_ALIASES, LLMSettings, SettingsError, SlotSettings
from llm_service.config.slots import BUILTIN, DEMO_MODEL_DIR
from llm_service.engines.base import AdapterConfig, EngineConfig
from llm_service.sizing.estimate import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    kv_dtype_bytes,
    model_shape,
)
from llm_service.sizing.load_time import load_time
from llm_service.sizing.model_files import ModelMetadata, layout_engine_args, length_limit, model_metadata
from llm_service.sizing.plan import Device, Plan, SlotPlan, SlotRequest, plan_slots

log = structlog.get_logger(__name__)
# Context length of a slot that is not built in and sets none (capped at the model's own limit).
DEFAULT_MAX_MODEL_LEN = 8192


def model_for_slot(llm: LLMSettings, slot: str, device: str) -> str:
    """The configured model; unset (a built-in slot) means its production build on a GPU, its demo on CPU.

    The deployment guide's ids resolve to the published builds they stand for.
    """
    configured = llm.slot(slot).model
    if configured:
        resolved = GUIDE_MODEL_ALIASES.get(configured, configured)
        if resolved != configured:
            log.info("model_alias_resolved", slot=slot, alias=configured, model_id=resolved)
        return resolved
    builtin = BUILTIN[slot]
    if device == "cuda" and builtin.production_model:
        return builtin.production_model
    demo = builtin.demo_model.resolve()
    if demo != DEMO_MODEL_DIR.resolve() and not (demo / "config.json").exists():
        log.warning("demo_model_missing", slot=slot, path=str(demo), hint="make setup; the text demo serves meanwhile")
        demo = DEMO_MODEL_DIR.resolve()
    if not (demo / "config.json").exists():
        raise SettingsError(
            f"LLM_MODEL_{slot.upper()} is not set and there is no GPU, so the demo model is used, "
            f"but {demo} does not exist: build it with `python -m llm_service.tools.demo_model` (or `make setup`)"
        )
    return str(demo)


@dataclass(frozen=True)
class SlotInputs:
    """One slot's settings with its model's metadata, ready to plan."""

    request: SlotRequest
    meta: ModelMetadata
    engine_args: dict[str, Any]  # the operator's LLM_ENGINE_ARGS_<SLOT>, revision taken out
    revision: str | None


def _default_length(llm: LLMSettings, slot: str, meta: ModelMetadata) -> int:
    """The slot default, capped at the model's own limit."""
    builtin = BUILTIN.get(slot)
    default = builtin.max_model_len if builtin else DEFAULT_MAX_MODEL_LEN
    shape = model_shape(meta.config) if meta.config else None
    limit = length_limit(meta, shape.max_position_embeddings if shape else None)
    return limit if limit is not None and limit < default else default


def slot_inputs(llm: LLMSettings, device: str, *, hub: bool | None = None) -> list[SlotInputs]:
    """Every slot's model, metadata and sizing request from the settings."""
    enforce_eager = llm.enforce_eager if llm.enforce_eager is not None else device == "cpu"
    inputs = []
    for slot in llm.enabled_slots():
        model_id = model_for_slot(llm, slot, device)
        settings = llm.slot(slot)
        extra = dict(settings.engine_args)
        revision = extra.pop("revision", None)
        configured_len = settings.max_model_len or extra.get("max_model_len")
        share = settings.memory_share
        needs_metadata = share is None or configured_len is None or device == "cuda"
        meta = model_metadata(model_id, revision, hub=hub) if needs_metadata else ModelMetadata(model_id, None, "none")
        request = SlotRequest(
            slot=slot,
            model_id=model_id,
            shape=model_shape(meta.config) if meta.config else None,
            max_model_len=int(configured_len or _default_length(llm, slot, meta)),
            preload=settings.preload,
            length_fixed=configured_len is not None,
            share=share,
            min_model_len=llm.min_model_len,
            vision=llm.multimodal_images,
            kv_dtype_bytes=kv_dtype_bytes(extra),
            max_num_batched_tokens=int(extra.get("max_num_batched_tokens") or DEFAULT_MAX_NUM_BATCHED_TOKENS),
            max_num_seqs=int(extra.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS),
            enforce_eager=enforce_eager,
            lora_bytes=_lora_bytes(settings, meta),
        )
        inputs.append(SlotInputs(request, meta, extra, revision))
    return inputs


def _lora_bytes(settings: SlotSettings, meta: ModelMetadata) -> int:
    """The adapter memory of a slot with adapters (0 without, or when the model's shape is unknown)."""
    shape = model_shape(meta.config) if meta.config and settings.adapters else None
    return shape.lora_bytes(settings.max_loras, settings.max_lora_rank) if shape else 0


def sizing_plan_with_sources(
    llm: LLMSettings, device: str, device_memory: int | None, *, hub: bool | None = None
) -> tuple[Plan, dict[str, str]]:
    """The plan of every slot on the device, and where each slot's config.json came from."""
    inputs = slot_inputs(llm, device, hub=hub)
    return _plan(llm, inputs, device, device_memory), {i.request.slot: i.meta.source for i in inputs}


def _plan(llm: LLMSettings, inputs: list[SlotInputs], device: str, device_memory: int | None) -> Plan:
    return plan_slots(
        [i.request for i in inputs],
        Device(device, device_memory, llm.gpu_memory_utilization, llm.tensor_parallel_size),
    )


def _engine_args(inputs: SlotInputs, plan: SlotPlan, device: str) -> dict[str, Any]:
    """The operator's engine args over the defaults sizing chooses for this slot."""
    defaults: dict[str, Any] = layout_engine_args(inputs.meta)
    shape = inputs.request.shape
    if shape is not None and shape.vision_params and not inputs.request.vision:
        defaults["limit_mm_per_prompt"] = {"image": 0}
    if device == "cuda" and plan.kv_bytes:
        # GPU-only: a KV cache of a known size instead of vLLM's profile of device-wide free
        # memory, which other slots' engines change while they serve.
        defaults["kv_cache_memory_bytes"] = plan.kv_bytes
    return {**defaults, **inputs.engine_args}


def _expected_load_seconds(inputs: SlotInputs, plan: SlotPlan, device: str) -> float | None:
    """The plan's estimate of one start: warm when the weights are on disk, else cold."""
    request = inputs.request
    if plan.weights is None or request.shape is None:
        return None
    vision = request.vision and bool(request.shape.vision_params)
    estimate = load_time(plan.weights, device, enforce_eager=request.enforce_eager, vision=vision)
    return estimate.warm if inputs.meta.weights_on_disk else estimate.cold


def build_slot_configs(
    llm: LLMSettings, device: str, device_memory: int | None, *, hub: bool | None = None
) -> list[tuple[EngineConfig, bool]]:
    """One (EngineConfig, pinned) per slot; pinned slots are the preloaded ones that fit."""
    inputs = slot_inputs(llm, device, hub=hub)
    plan = _plan(llm, inputs, device, device_memory)
    configs = []
    for slot_inputs_, slot_plan in zip(inputs, plan.slots, strict=True):
        _log_plan(slot_plan, slot_inputs_.meta)
        config = EngineConfig(
            slot=slot_plan.slot,
            model_id=slot_plan.model_id,
            max_model_len=slot_plan.max_model_len,
            memory_share=slot_plan.share,
            device=device,
            enforce_eager=slot_inputs_.request.enforce_eager,
            tensor_parallel_size=llm.tensor_parallel_size,
            revision=slot_inputs_.revision,
            extra_args=_engine_args(slot_inputs_, slot_plan, device),
            unloadable=slot_plan.unloadable,
            aliases=(
                *llm.slot(slot_plan.slot).aliases,
                *(alias for alias, target in GUIDE_MODEL_ALIASES.items() if target == slot_plan.model_id),
            ),
            kind=llm.slot(slot_plan.slot).kind,
            **_lora_fields(llm.slot(slot_plan.slot)),
            expected_load_seconds=_expected_load_seconds(slot_inputs_, slot_plan, device),
        )
        configs.append((config, slot_plan.preload))
    return configs


def _lora_fields(settings: SlotSettings) -> dict[str, Any]:
    """EngineConfig's LoRA fields: LoRA on when the slot lists adapters."""
    return {
        "lora": bool(settings.adapters),
        "adapters": tuple(AdapterConfig(a.name, a.path) for a in settings.adapters),
        "max_loras": settings.max_loras,
        "max_lora_rank": settings.max_lora_rank,
    }


def _log_plan(plan: SlotPlan, meta: ModelMetadata) -> None:
    if meta.config is None and plan.share:
        log.warning("memory_estimate_unknown", slot=plan.slot, model_id=plan.model_id, share=plan.share)
    if plan.unloadable:
        log.error("slot_not_loadable", slot=plan.slot, model_id=plan.model_id, reason=plan.unloadable)
    elif plan.shrunk:
        log.warning(
            "slot_context_shortened", slot=plan.slot, max_model_len=plan.max_model_len, requested=plan.requested_len
        )
    if plan.preload_requested and not plan.preload and not plan.unloadable:
        log.error("slot_not_preloaded", slot=plan.slot, reason="the preloaded slots do not fit together")
