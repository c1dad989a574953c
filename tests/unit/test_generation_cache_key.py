"""The response-cache keys the generation path computes, pinned: a change to the key material
(the request's or the slot's chat template and tool parser) would orphan every stored entry.
And what must change a key: the slot's device, the dtype its engine runs in, a template's content."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llm_service.app import EngineBackend, with_host_args
from llm_service.cache.store import CachePolicy
from llm_service.config.settings import LLMSettings
from llm_service.engines.base import ChatConfig, EngineConfig, SamplingOptions
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.generation import GenerationService, GenerationSpec, cache_key_extra

from .conftest import FakeFactory, slot_config
from .test_images import MemoryCache

CHAT = ChatConfig(chat_template="/templates/chat.jinja", tool_parser="hermes")
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
GREEDY = SamplingOptions(max_tokens=8, temperature=0.0)
# The keys as the service computed them when the device joined the key material (issue 25).
PINNED = {
    "prompt on a plain slot": (
        "llm-service:response:v1:standard:2189e38f89786c678df2f47f31685cd851fb16013d1d69960163eeecc9458bd3"
    ),
    "token ids on a plain slot": (
        "llm-service:response:v1:standard:eeccd17c44ee4cdfcda398a5f4b33c99b7cbbd12d8b7494f93980063a2ef829c"
    ),
    "prompt on a slot with a chat config": (
        "llm-service:response:v1:longctx:443c3598d5fc9528cb36c686d3feb61f7b44b157aee277634b77be59d5769665"
    ),
    "tools on a slot with a chat config": (
        "llm-service:response:v1:longctx:0ee8eece9b1e522e9f45336e3c4122bdf600c5ab36b1eab0cdc1827f64107f9e"
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


async def key_of(spec: GenerationSpec, standard: EngineConfig | None = None) -> str:
    slots = [
        (standard or slot_config("standard"), True),
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


def on_host(config: EngineConfig, dtype: str | None) -> EngineConfig:
    """The slot's config as build_registry makes it on a host whose backend picks `dtype`."""
    backend = EngineBackend(FakeFactory(), config.device, None, host_args=lambda _: {"dtype": dtype} if dtype else {})
    return with_host_args(config, backend)


async def test_the_dtype_the_host_chose_is_part_of_the_key() -> None:
    spec = specs()["prompt on a plain slot"]
    plain = slot_config("standard")
    keys = {dtype: await key_of(spec, on_host(plain, dtype)) for dtype in (None, "float32", "bfloat16")}
    assert len(set(keys.values())) == 3, keys
    assert on_host(plain, "float32").extra_args == {"dtype": "float32"}
    # An operator's dtype (LLM_ENGINE_ARGS_<SLOT>) wins over the host's choice, as in the engine.
    explicit = dataclasses.replace(plain, extra_args={"dtype": "bfloat16"})
    assert on_host(explicit, "float32").extra_args == {"dtype": "bfloat16"}


async def test_the_device_quantization_and_adapters_are_part_of_the_key() -> None:
    spec = specs()["prompt on a plain slot"]
    plain = slot_config("standard")
    variants = [
        plain,
        dataclasses.replace(plain, device="cuda"),
        dataclasses.replace(plain, extra_args={"quantization": "fp8"}),
        dataclasses.replace(plain, extra_args={"enable_lora": True, "lora_modules": ["a=/adapters/a"]}),
    ]
    keys = [await key_of(spec, config) for config in variants]
    assert len(set(keys)) == len(variants), keys


def test_a_template_file_counts_by_its_content(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0].content }}")
    chat = ChatConfig(chat_template=str(template))
    before = cache_key_extra(chat)
    template.write_text("{{ messages[-1].content }}")
    after = cache_key_extra(chat)
    assert before is not None and after is not None
    assert before["chat"] == after["chat"] and before != after
    inline = ChatConfig(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    assert cache_key_extra(inline) == {"chat": dataclasses.asdict(inline)}
