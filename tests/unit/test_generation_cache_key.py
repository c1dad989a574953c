"""The response-cache keys the generation path computes, pinned: a change to the key material
(the request's or the slot's chat template and tool parser) would orphan every stored entry."""

from __future__ import annotations

import dataclasses

from llm_service.cache import CachePolicy
from llm_service.coalesce import Coalescer
from llm_service.engines.base import ChatConfig, SamplingOptions
from llm_service.generation import GenerationService, GenerationSpec, cache_key_extra
from llm_service.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy
from llm_service.settings import LLMSettings

from .conftest import FakeFactory, slot_config
from .test_images import MemoryCache

CHAT = ChatConfig(chat_template="/templates/chat.jinja", tool_parser="hermes")
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
GREEDY = SamplingOptions(max_tokens=8, temperature=0.0)
# The keys as the service computed them when this test was written.
PINNED = {
    "prompt on a plain slot": (
        "llm-service:response:v1:standard:e02ccddab130c962aeb9911436738ea9e05d3431fc32b27680c89f613d5cbd43"
    ),
    "token ids on a plain slot": (
        "llm-service:response:v1:standard:452e823de1514289d07b01f46dac81023b9675f61e3204e5940d0be2a2e3951c"
    ),
    "prompt on a slot with a chat config": (
        "llm-service:response:v1:longctx:8cb1259db4f5232271f0c6fe186d18ddebb54b8f511cc4e01cb959bf96d714dd"
    ),
    "tools on a slot with a chat config": (
        "llm-service:response:v1:longctx:61897b3ca50d75d3bf8726488dbde4c2964d079f5161445cefd3717945ed1186"
    ),
}


def specs() -> dict[str, GenerationSpec]:
    messages = [{"role": "user", "content": "Where is it?"}]
    return {
        "prompt on a plain slot": GenerationSpec("r", "standard", GREEDY, prompt="one two three"),
        "token ids on a plain slot": GenerationSpec("r", "standard", GREEDY, token_ids=(1, 2, 3)),
        "prompt on a slot with a chat config": GenerationSpec("r", "longctx", GREEDY, prompt="one two three"),
        "tools on a slot with a chat config": GenerationSpec(
            "r", "longctx", GREEDY, messages=messages, tools=[TOOL], tool_choice="auto"
        ),
    }


async def key_of(spec: GenerationSpec) -> str:
    slots = [
        (slot_config("standard"), True),
        (dataclasses.replace(slot_config("longctx"), chat=CHAT), True),
    ]
    policy = RegistryPolicy(min_residency=0.0, swap_fairness=0.0)
    registry = ModelRegistry(slots, 0.6, FakeFactory(), Metrics(), policy)
    cache, metrics = MemoryCache(), Metrics()
    coalescer = Coalescer(CachePolicy(LLMSettings(cache_enabled=True)), cache, metrics)  # type: ignore[arg-type]
    service = GenerationService(registry, metrics, 16, coalescer=coalescer)
    try:
        await service.complete(spec)
    finally:
        await coalescer.close()
        await registry.close()
    (key,) = cache.entries
    return key


async def test_keys_of_fixed_requests_do_not_change() -> None:
    keys = {name: await key_of(spec) for name, spec in specs().items()}
    assert keys == PINNED


def test_the_slot_key_material_is_the_chat_config() -> None:
    assert cache_key_extra(ChatConfig()) is None
    assert cache_key_extra(CHAT) == {
        "chat": {"chat_template": "/templates/chat.jinja", "tool_parser": "hermes", "tool_strict_level": "parameter"}
    }
