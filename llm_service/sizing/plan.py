"""The sizing policy: which share and context length each slot gets on a device, and what cannot fit.

Pure functions over plain data (no I/O): `plan_slots(requests, device)` returns one SlotPlan per
slot. Rules, in order:

1. A slot's share covers its weights and runtime overhead (times a 5 % margin) plus KV cache for
   two sequences of its full context, rounded up to 0.01 of the device.
2. A slot that does not fit the budget alone first keeps KV for one full sequence (vLLM's
   minimum), then shortens its context in steps of 1024 tokens down to the floor. A context or a
   share the operator set is never changed. Below the floor the slot is not loadable on this
   device; the other slots serve regardless.
3. While the preloaded slots do not fit together, the one with the largest KV cache shrinks a step
   the same way; when none can shrink any more, the last preloaded slot is loaded on demand instead.
4. On a GPU, what the budget leaves beside the preloaded slots and the largest on-demand slot goes
   to the preloaded slots' KV cache (those whose share the operator did not set), in proportion to it:
   on a large GPU the always-loaded slots serve more concurrent requests, and any on-demand slot
   still loads without evicting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llm_service.sizing.estimate import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    GIB,
    ModelShape,
)

KV_SEQUENCES = 2  # full-length sequences of KV cache a slot is sized for
MARGIN = 1.05  # on weights and overhead: allocator fragmentation, kernel workspaces
SHARE_STEP = 0.01
LENGTH_STEP = 1024
FALLBACK_SHARE = 0.4  # a model whose config cannot be read
# Runtime memory besides weights, KV cache and activations: on CUDA the process's non-torch
# allocations (cuBLAS/NCCL workspaces) and CUDA graphs; on the CPU the worker process itself
# (torch and vLLM, about 1.1 GiB measured), since there the share bounds its whole resident memory.
CUDA_BASE_OVERHEAD = GIB // 2
CUDA_GRAPHS = GIB // 2
VISION_PROFILE = GIB // 2  # encoder profiling and cache of a vision tower
# The API process's own CUDA context: torch opens one when the service reads the GPU's size and
# free memory (get_device_properties, mem_get_info). It is in no engine's share, so it comes out
# of what the budget leaves free (0.3-0.5 GiB with CUDA's lazy module loading; measured at start).
API_CUDA_CONTEXT = GIB // 2
CPU_OVERHEAD = 3 * GIB // 2


@dataclass(frozen=True)
class Device:
    """The memory the budget divides: one GPU (each of `tensor_parallel` GPUs) or CPU node 0."""

    kind: str  # "cuda" or "cpu"
    memory: int | None  # bytes; None when unknown
    budget: float  # LLM_GPU_MEMORY_UTILIZATION
    tensor_parallel: int = 1

    @property
    def outside_engines(self) -> int:
        """Bytes of the device held by no engine: the API process's CUDA context on a GPU."""
        return API_CUDA_CONTEXT if self.kind == "cuda" else 0

    @property
    def headroom(self) -> int | None:
        """What the budget and the API process leave free: all that absorbs engines holding more
        than planned (vLLM refuses a start while less than its share is free). None: unknown memory."""
        if not self.memory:
            return None
        return int(self.memory * (1 - self.budget)) - self.outside_engines


@dataclass(frozen=True)
class SlotRequest:
    """What the settings ask for one slot."""

    slot: str
    model_id: str
    shape: ModelShape | None
    max_model_len: int
    preload: bool
    length_fixed: bool = False  # LLM_MAX_MODEL_LEN_<SLOT> set: never shortened
    share: float | None = None  # LLM_MEMORY_SHARE_<SLOT>
    min_model_len: int = 4096
    vision: bool = True  # the vision tower (if any) is loaded and profiled
    kv_dtype_bytes: int = 2
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    enforce_eager: bool = False
    lora_bytes: int = 0  # LoRA buffers vLLM allocates (max_loras x max_lora_rank over every layer)


@dataclass(frozen=True)
class SlotPlan:
    """The decision for one slot. Byte figures are per GPU and None when the model is unknown."""

    slot: str
    model_id: str
    max_model_len: int
    requested_len: int
    share: float
    preload: bool
    preload_requested: bool
    sequences: int = KV_SEQUENCES
    weights: int | None = None
    overhead: int | None = None
    kv_bytes: int | None = None  # KV cache the engine gets (its share minus weights and overhead)
    kv_tokens: int | None = None  # tokens that KV cache holds at full-length requests
    needed: int | None = None  # bytes for weights, overhead and the KV target (`sequences` requests)
    unloadable: str | None = None  # why the slot cannot load on this device
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # sequences its engine batches at most

    @property
    def shrunk(self) -> bool:
        return self.max_model_len < self.requested_len


@dataclass(frozen=True)
class Plan:
    device: Device
    slots: tuple[SlotPlan, ...]

    @property
    def preloaded_share(self) -> float:
        return sum(p.share for p in self.slots if p.preload)

    @property
    def fits(self) -> bool:
        """Every slot can load, every slot asked to be preloaded is, within the budget, and the
        budget leaves the API process's CUDA context room on the device."""
        room = self.device.headroom
        return (room is None or room >= 0) and all(
            p.unloadable is None and p.preload == p.preload_requested for p in self.slots
        )


def _fixed_bytes(request: SlotRequest, device: Device) -> int | None:
    """Weights plus runtime overhead on one GPU, margin included."""
    shape = request.shape
    if shape is None:
        return None
    tp = device.tensor_parallel
    weights = shape.weight_bytes(tp, vision=request.vision)
    if device.kind == "cpu":
        overhead = CPU_OVERHEAD
    else:
        overhead = CUDA_BASE_OVERHEAD + shape.activation_bytes(tp, request.max_num_batched_tokens, request.max_num_seqs)
        overhead += 0 if request.enforce_eager else CUDA_GRAPHS
        overhead += VISION_PROFILE if request.vision and shape.vision_params else 0
    return math.ceil((weights + overhead + request.lora_bytes) * MARGIN)


def _kv_per_request(request: SlotRequest, device: Device, length: int) -> int:
    assert request.shape is not None
    return request.shape.kv_bytes_per_request(
        length, device.tensor_parallel, request.kv_dtype_bytes, request.max_num_batched_tokens
    )


def _evaluate(request: SlotRequest, device: Device, length: int, sequences: int, preload: bool) -> SlotPlan:
    """The plan of one slot at a given context length and KV target."""
    base = SlotPlan(
        slot=request.slot,
        model_id=request.model_id,
        max_model_len=length,
        requested_len=request.max_model_len,
        share=request.share or FALLBACK_SHARE,
        preload=preload,
        preload_requested=request.preload,
        sequences=sequences,
        max_num_seqs=request.max_num_seqs,
    )
    fixed = _fixed_bytes(request, device)
    if fixed is None or not device.memory:
        return base
    assert request.shape is not None
    per_request = _kv_per_request(request, device, length)
    share = request.share
    if share is None:
        share = math.ceil((fixed + sequences * per_request) / device.memory / SHARE_STEP - 1e-9) * SHARE_STEP
        share = round(min(1.0, share), 2)
    kv_bytes = int(share * device.memory) - fixed
    unloadable = None
    if kv_bytes < per_request:
        unloadable = (
            f"needs {(fixed + per_request) / GIB:.1f} GiB for weights, overhead and one {length}-token "
            f"sequence; its share {share:.2f} is {share * device.memory / GIB:.1f} GiB"
        )
    return replace(
        base,
        share=share,
        weights=request.shape.weight_bytes(device.tensor_parallel, vision=request.vision),
        overhead=fixed - request.shape.weight_bytes(device.tensor_parallel, vision=request.vision),
        kv_bytes=max(0, kv_bytes),
        kv_tokens=max(0, kv_bytes) * length // per_request,
        needed=fixed + sequences * per_request,
        unloadable=unloadable,
    )


def _shrink(request: SlotRequest, current: SlotPlan, device: Device) -> SlotPlan | None:
    """One step smaller (fewer KV sequences, then a shorter context), or None at the floor."""
    if request.shape is None or not device.memory:
        return None
    if current.sequences > 1 and request.share is None:
        return _evaluate(request, device, current.max_model_len, 1, current.preload)
    floor = min(request.min_model_len, request.max_model_len)
    if request.length_fixed or current.max_model_len <= floor:
        return None
    length = max(floor, (current.max_model_len - 1) // LENGTH_STEP * LENGTH_STEP)
    return _evaluate(request, device, length, current.sequences, current.preload)


def _fit_alone(request: SlotRequest, device: Device) -> SlotPlan:
    plan = _evaluate(request, device, request.max_model_len, KV_SEQUENCES, request.preload)
    while plan.unloadable is not None or plan.share > device.budget + 1e-9:
        smaller = _shrink(request, plan, device)
        if smaller is None:
            if request.share is not None and plan.share > device.budget + 1e-9:
                plan = replace(
                    plan,
                    unloadable=f"LLM_MEMORY_SHARE_{request.slot.upper()}={plan.share:.2f} is more than the "
                    f"budget LLM_GPU_MEMORY_UTILIZATION={device.budget:.2f}",
                )
            elif request.share is None:
                needed = f"{plan.needed / GIB:.1f} GiB" if plan.needed else f"a share of {plan.share:.2f}"
                plan = replace(
                    plan,
                    unloadable=f"needs {needed} for weights, overhead and one {plan.max_model_len}-token "
                    f"sequence, more than the budget {device.budget:.2f}"
                    + (f" of {device.memory / GIB:.1f} GiB" if device.memory else ""),
                )
            return replace(plan, preload=False)
        plan = smaller
    return plan


def plan_slots(requests: list[SlotRequest], device: Device) -> Plan:
    """Each slot's share and context on `device`; see the module's rules."""
    by_slot = {r.slot: r for r in requests}
    plans = {r.slot: _fit_alone(r, device) for r in requests}
    while True:
        preloaded = [p for p in plans.values() if p.preload]
        if sum(p.share for p in preloaded) <= device.budget + 1e-9:
            break
        for candidate in sorted(preloaded, key=lambda p: p.kv_bytes or 0, reverse=True):
            smaller = _shrink(by_slot[candidate.slot], candidate, device)
            if smaller is not None:
                plans[candidate.slot] = smaller
                break
        else:
            last = preloaded[-1]
            plans[last.slot] = replace(last, preload=False)
    _grow(plans, by_slot, device)
    return Plan(device, tuple(plans[r.slot] for r in requests))


def _grow(plans: dict[str, SlotPlan], requests: dict[str, SlotRequest], device: Device) -> None:
    """Rule 4: the budget's spare room to the preloaded slots' KV cache (in place)."""
    # On the CPU a share is also the memory vLLM checks is free at start: a larger one could only
    # make an engine refuse to start on a busy machine.
    if not device.memory or device.kind != "cuda":
        return
    on_demand = [p.share for p in plans.values() if not p.preload and p.unloadable is None]
    room = device.budget - sum(p.share for p in plans.values() if p.preload) - max(on_demand, default=0.0)
    growing = [p for p in plans.values() if p.preload and p.kv_bytes and requests[p.slot].share is None]
    total_kv = sum(p.kv_bytes or 0 for p in growing)
    if room < SHARE_STEP or not total_kv:
        return
    for slot in growing:
        extra = math.floor(room * (slot.kv_bytes or 0) / total_kv / SHARE_STEP + 1e-9) * SHARE_STEP
        if extra <= 0:
            continue
        share = round(slot.share + extra, 2)
        kv_bytes = (slot.kv_bytes or 0) + int(share * device.memory) - int(slot.share * device.memory)
        per_token = (slot.kv_bytes or 0) / (slot.kv_tokens or 1)
        plans[slot.slot] = replace(slot, share=share, kv_bytes=kv_bytes, kv_tokens=int(kv_bytes / per_token))
