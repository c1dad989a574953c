"""`python -m llm_service plan`: each slot's share, context and KV cache on a device, before a rollout."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, TextIO

import structlog

from llm_service.config.engine_configs import sizing_plan_with_sources
from llm_service.config.settings import SettingsError, load_settings
from llm_service.sizing.estimate import GIB
from llm_service.sizing.plan import Plan, SlotPlan
from llm_service.traffic.admission import requests_at_once

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
          "g": GIB, "gi": GIB, "gib": GIB, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4}


def parse_size(text: str) -> int:
    """Bytes of '24GiB', '24G', '80GB' (decimal), '1.5TiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (examples: 24GiB, 80GB, 25769803776)")
    return int(float(match.group(1)) * _UNITS[unit])


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


# Requests (prompt plus output tokens) whose concurrency the plan shows: a chat turn, a RAG request.
REQUEST_SIZES = (1000, 4000)


def admitted_at_once(slot: SlotPlan) -> dict[int, int] | None:
    """How many requests of each of REQUEST_SIZES tokens admission lets run at once on the slot
    (what its KV cache and batch hold); None when the KV cache is unknown."""
    if slot.kv_tokens is None or slot.unloadable:
        return None
    return {size: requests_at_once(slot.kv_tokens, slot.max_num_seqs, size) for size in REQUEST_SIZES}


def _status(slot: SlotPlan, plan: Plan) -> str:
    if slot.unloadable:
        return f"NOT LOADABLE: {slot.unloadable}"
    notes = []
    if slot.preload_requested and not slot.preload:
        notes.append("NOT PRELOADED: does not fit beside the other preloaded slots; loads on demand")
    elif not slot.preload:
        room = plan.device.budget - plan.preloaded_share
        notes.append("on demand" + ("" if slot.share <= room + 1e-9 else ", evicts an idle slot to load"))
    if slot.shrunk:
        notes.append(f"context shortened from {slot.requested_len}")
    if slot.weights is None:
        notes.append("no config.json: share is a guess")
    elif slot.sequences == 1:
        notes.append("KV for one full-length sequence")
    return "; ".join(notes) or "ok"


def render(plan: Plan, sources: dict[str, str], out: TextIO) -> None:
    """The plan as a table with a verdict line."""
    device = plan.device
    memory = _gib(device.memory) if device.memory else "unknown memory"
    out.write(
        f"Device: {device.kind}, {memory} per device, tensor parallel {device.tensor_parallel}; "
        f"budget LLM_GPU_MEMORY_UTILIZATION={device.budget:.2f}"
        + (f" ({_gib(int(device.budget * device.memory))})\n" if device.memory else "\n")
    )
    rows = [("SLOT", "MODEL", "CONFIG", "PRELOAD", "SHARE", "MAX_MODEL_LEN", "WEIGHTS", "OVERHEAD", "KV CACHE",
             "KV TOKENS", *(f"AT ONCE {size // 1000}K" for size in REQUEST_SIZES), "STATUS")]
    for slot in plan.slots:
        at_once = admitted_at_once(slot)
        rows.append((
            slot.slot, slot.model_id, sources.get(slot.slot, "?"), "yes" if slot.preload else "no",
            f"{slot.share:.2f}", str(slot.max_model_len), _gib(slot.weights), _gib(slot.overhead),
            _gib(slot.kv_bytes), "?" if slot.kv_tokens is None else str(slot.kv_tokens),
            *("?" if at_once is None else str(at_once[size]) for size in REQUEST_SIZES), _status(slot, plan),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        out.write("  ".join(cells) + "  " + row[-1] + "\n")
    out.write(
        "AT ONCE: requests of 1,000 and 4,000 tokens (prompt plus output) a slot runs at once, all admitted; "
        "more queue while they can start before their deadline.\n"
    )
    preloaded = [s.slot for s in plan.slots if s.preload_requested]
    verdict = "every slot can load and the preloaded ones fit" if plan.fits else "this configuration DOES NOT FIT"
    if device.headroom is not None and device.outside_engines:
        out.write(
            f"Outside the budget: the API process's CUDA context (~{_gib(device.outside_engines)}) and "
            f"{_gib(device.headroom)} of headroom for engines that hold more than planned.\n"
        )
    out.write(
        f"Preloaded slots ({', '.join(preloaded) or 'none'}): {plan.preloaded_share:.2f} of the budget "
        f"{device.budget:.2f}; {verdict}.\n"
    )


def as_json(plan: Plan, sources: dict[str, str]) -> dict[str, Any]:
    return {
        "device": {
            "kind": plan.device.kind,
            "memory_bytes": plan.device.memory,
            "budget": plan.device.budget,
            "tensor_parallel": plan.device.tensor_parallel,
            "api_context_bytes": plan.device.outside_engines,
            "headroom_bytes": plan.device.headroom,
        },
        "fits": plan.fits,
        "preloaded_share": round(plan.preloaded_share, 4),
        "slots": [
            {
                "slot": s.slot,
                "model_id": s.model_id,
                "config_source": sources.get(s.slot),
                "preload": s.preload,
                "preload_requested": s.preload_requested,
                "share": s.share,
                "max_model_len": s.max_model_len,
                "requested_max_model_len": s.requested_len,
                "kv_sequences": s.sequences,
                "weights_bytes": s.weights,
                "overhead_bytes": s.overhead,
                "kv_cache_bytes": s.kv_bytes,
                "kv_tokens": s.kv_tokens,
                "max_num_seqs": s.max_num_seqs,
                "admitted_at_once": {str(k): v for k, v in (admitted_at_once(s) or {}).items()} or None,
                "unloadable": s.unloadable,
            }
            for s in plan.slots
        ],
    }


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_service plan",
        description="Show, without starting an engine, each slot's model, memory share, context length, "
        "weights and KV cache on a device for the current settings (LLM_* variables). Exit status 1 "
        "when a slot cannot load or the preloaded slots do not fit, 2 for invalid settings.",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: LLM_DEVICE")
    parser.add_argument(
        "--device-memory", type=parse_size, help="memory of one device, e.g. 24GiB (default: the real device)"
    )
    network = parser.add_mutually_exclusive_group()
    network.add_argument(
        "--online",
        action="store_true",
        help="also ask the Hugging Face Hub for configs the local folder and cache lack (one short attempt "
        "per model); by default the plan uses the local cache and the bundled configs only",
    )
    network.add_argument("--offline", action="store_true", help="the default: never ask the Hub")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    # Log lines (a Hub lookup that failed) go to stderr: stdout is the plan, JSON with --json.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        settings = load_settings()
        device = args.device or settings.llm.device
        memory = args.device_memory
        if device == "auto" or memory is None:
            # Only now: detecting the device imports vLLM and torch.
            from llm_service.engines import vllm as vllm_engines

            device, problem = vllm_engines.choose_device(device, vllm_engines.platform_facts())
            if problem is not None:
                sys.stderr.write(f"llm-service plan: {problem}\n")
            memory = memory or vllm_engines.device_memory_bytes(device)
        plan, sources = sizing_plan_with_sources(settings.llm, device, memory, hub=args.online)
    except SettingsError as exc:
        sys.stderr.write(f"llm-service plan: {exc}\n")
        return 2
    if args.json:
        out.write(json.dumps(as_json(plan, sources), indent=2) + "\n")
    else:
        render(plan, sources, out)
    return 0 if plan.fits else 1
