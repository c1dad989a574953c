"""Turns settings into one EngineConfig per slot: model, context length and memory share."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import structlog

from llm_service.engines.base import EngineConfig
from llm_service.settings import (
    DEFAULT_MAX_MODEL_LEN,
    DEMO_MODEL_DIR,
    DEMO_MULTIMODAL_DIR,
    PRODUCTION_MODELS,
    SLOTS,
    LLMSettings,
    SettingsError,
)

log = structlog.get_logger(__name__)

GIB = 1024**3
# Memory an engine needs beyond weights and KV cache: on CUDA the context, activations and
# graphs; on the CPU the worker process itself (torch and vLLM, about 1.1 GiB measured), since
# there the share bounds the worker's whole resident memory.
_OVERHEAD = {"cuda": 2 * GIB, "cpu": 3 * GIB // 2}
_FALLBACK_SHARE = 0.4


def model_for_slot(llm: LLMSettings, slot: str, device: str) -> str:
    """The configured model; unset means the production default on a GPU, the demo model on CPU."""
    configured = llm.model_for(slot)
    if configured:
        return configured
    if device == "cuda":
        return PRODUCTION_MODELS[slot]
    multimodal_demo = DEMO_MULTIMODAL_DIR.resolve()
    if slot == "multimodal":
        if (multimodal_demo / "config.json").exists():
            return str(multimodal_demo)
        log.warning(
            "multimodal_demo_missing",
            path=str(multimodal_demo),
            hint="python -m llm_service.demo_model --multimodal; until then the slot takes no images",
        )
    demo = DEMO_MODEL_DIR.resolve()
    if not (demo / "config.json").exists():
        raise SettingsError(
            f"LLM_MODEL_{slot.upper()} is not set and there is no GPU, so the demo model is used, "
            f"but {demo} does not exist: build it with `python -m llm_service.demo_model` (or `make setup`)"
        )
    return str(demo)


def model_config(model_id: str, revision: str | None = None) -> dict[str, Any] | None:
    """The model's config.json from a local folder or the Hugging Face cache (never the network)."""
    path: Path | None = Path(model_id) / "config.json"
    if path is None or not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        except Exception:
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config["_folder"] = str(path.parent)
    return config


def weights_bytes(model_id: str, config: dict[str, Any] | None) -> int | None:
    """Size of the weights on disk, else a guess from the parameter count in the name."""
    if config is not None:
        folder = Path(config["_folder"])
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files)
    match = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model_id)
    if not match:
        return None
    params = float(match.group(1)) * 1e9
    lowered = model_id.lower()
    if any(q in lowered for q in ("awq", "gptq", "int4", "4bit", "w4a16")):
        bytes_per_param = 0.55
    elif any(q in lowered for q in ("fp8", "int8", "8bit", "w8a8")):
        bytes_per_param = 1.05
    else:
        bytes_per_param = 2.0
    return int(params * bytes_per_param)


def kv_bytes_per_token(config: dict[str, Any] | None) -> int | None:
    if config is None:
        return None
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    return 2 * layers * kv_heads * head_dim * 2  # K and V, bf16


def estimate_share(
    model_id: str, max_model_len: int, device: str, device_memory: int | None, revision: str | None = None
) -> float:
    """Fraction of device memory a slot needs: weights, two full-length sequences of KV cache,
    and runtime overhead, rounded up to 0.05. Falls back to 0.4 when the model is unknown."""
    config = model_config(model_id, revision)
    weights = weights_bytes(model_id, config)
    kv = kv_bytes_per_token(config)
    if not device_memory or weights is None:
        log.warning("memory_share_unknown", model_id=model_id, fallback=_FALLBACK_SHARE)
        return _FALLBACK_SHARE
    kv_total = (kv or 128 * 1024) * max_model_len * 2
    needed = weights * 1.1 + kv_total + _OVERHEAD.get(device, GIB)
    share = math.ceil(needed / device_memory * 20) / 20
    return min(1.0, max(0.05, share))


def context_length(llm: LLMSettings, slot: str, model_id: str, revision: str | None = None) -> int:
    """The configured max_model_len, else the slot default capped at the model's own limit."""
    configured = llm.max_model_len_for(slot)
    if configured:
        return configured
    default = DEFAULT_MAX_MODEL_LEN[slot]
    config = model_config(model_id, revision)
    if config is not None:
        text = config.get("text_config") or config
        limit = text.get("max_position_embeddings")
        if isinstance(limit, int) and 0 < limit < default:
            return limit
    return default


def build_slot_configs(
    llm: LLMSettings, device: str, device_memory: int | None
) -> list[tuple[EngineConfig, bool]]:
    """One (EngineConfig, pinned) per slot; pinned slots are the preloaded ones."""
    enforce_eager = llm.enforce_eager if llm.enforce_eager is not None else device == "cpu"
    configs = []
    for slot in SLOTS:
        model_id = model_for_slot(llm, slot, device)
        extra = llm.engine_args_for(slot)
        revision = extra.pop("revision", None)
        max_model_len = context_length(llm, slot, model_id, revision)
        share = llm.memory_share_for(slot) or estimate_share(
            model_id, max_model_len, device, device_memory, revision
        )
        config = EngineConfig(
            slot=slot,
            model_id=model_id,
            max_model_len=max_model_len,
            memory_share=share,
            device=device,
            enforce_eager=enforce_eager,
            tensor_parallel_size=llm.tensor_parallel_size,
            revision=revision,
            extra_args=extra,
        )
        configs.append((config, slot in llm.preload_models))
    return configs
