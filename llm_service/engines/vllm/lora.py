"""LoRA adapters of one engine through vLLM's own support (enable_lora, LoRARequest, add_lora/remove_lora)."""

from __future__ import annotations

from typing import Any

from vllm.lora.request import LoRARequest
from vllm.v1.engine.async_llm import AsyncLLM

from llm_service.engines.base import AdapterConfig, EngineConfig


def lora_engine_args(config: EngineConfig) -> dict[str, Any]:
    """`vllm serve --enable-lora --max-loras --max-lora-rank` for a slot with adapters."""
    if not config.lora:
        return {}
    return {
        "enable_lora": True,
        "max_loras": config.max_loras,
        "max_lora_rank": config.max_lora_rank,
        # Adapters kept loaded in host memory; more than this are reloaded from disk on demand.
        "max_cpu_loras": max(config.max_loras, len(config.adapters)),
    }


class Adapters:
    """The engine's adapters by name, each with the integer id vLLM keys them by (never reused)."""

    def __init__(self, config: EngineConfig) -> None:
        self._enabled = config.lora
        self._next_id = 1
        self._by_name: dict[str, LoRARequest] = {}
        for adapter in config.adapters:
            self._register(adapter)

    def _register(self, adapter: AdapterConfig) -> LoRARequest:
        request = LoRARequest(adapter.name, self._next_id, adapter.path)
        self._next_id += 1
        self._by_name[adapter.name] = request
        return request

    def request(self, name: str | None) -> LoRARequest | None:
        """The LoRARequest of a generation on adapter `name` (None: the base model); KeyError if unknown."""
        return None if name is None else self._by_name[name]

    async def add(self, llm: AsyncLLM, adapter: AdapterConfig) -> None:
        """Load the adapter now (its files are read and checked by vLLM); ValueError if it cannot be."""
        if not self._enabled:
            raise ValueError("this slot was started without LoRA: list an adapter in its config to enable it")
        if adapter.name in self._by_name:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        request = self._register(adapter)
        try:
            await llm.add_lora(request)
        except Exception as exc:
            del self._by_name[adapter.name]
            raise ValueError(f"vLLM could not load adapter {adapter.name!r} from {adapter.path}: {exc}") from exc

    async def remove(self, llm: AsyncLLM, name: str) -> None:
        request = self._by_name.pop(name, None)
        if request is not None:
            await llm.remove_lora(request.lora_int_id)
