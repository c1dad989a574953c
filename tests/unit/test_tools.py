"""Tool calling on fake engines: OpenAI's shapes (plain and streamed), /generate's, cache keys, and the
per-slot parser and template defaults."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from llm_service.app import EngineBackend, create_app
from llm_service.cache.store import CachedResponse, CachePolicy
from llm_service.config.frontend import DEMO_TOOL_TEMPLATE, chat_config
from llm_service.config.settings import (
    DEMO_MODEL_DIR,
    DEMO_MULTIMODAL_DIR,
    PRODUCTION_MODELS,
    ChatSettings,
    LLMSettings,
)
from llm_service.engines.base import ChatConfig, SamplingOptions
from llm_service.observability.metrics import Metrics
from llm_service.serving.coalesce import Coalescer
from llm_service.serving.generation import GenerationService, GenerationSpec

from .conftest import GIB, FakeFactory, fake_settings
from .test_images import MemoryCache, RecordingTracer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def app() -> Any:
    application = create_app(fake_settings(), EngineBackend(FakeFactory(), "cpu", 8 * GIB))
    async with application.router.lifespan_context(application):
        await application.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def sdk(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)


@pytest.mark.parametrize(
    ("tool_choice", "called", "finish"),
    [
        ("required", "get_weather", "tool_calls"),
        ({"type": "function", "function": {"name": "search"}}, "search", "stop"),  # OpenAI: named ends with stop
        ("auto", "get_weather", "tool_calls"),  # the fake calls a tool the message names
        ("none", None, "stop"),
    ],
)
async def test_chat_tool_calls_in_openai_shape(app: httpx.AsyncClient, tool_choice: Any, called: str | None,
                                               finish: str) -> None:
    messages = [{"role": "user", "content": "Use get_weather for Paris."}]
    reply = await sdk(app).chat.completions.create(
        model="standard", messages=messages, tools=[WEATHER, SEARCH], tool_choice=tool_choice  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == finish
    if called is None:
        assert choice.message.tool_calls is None and choice.message.content
        return
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == called and call.id
    assert json.loads(call.function.arguments) == {"query": "fake"}
    assert choice.message.content is None


async def test_streamed_tool_calls_come_as_id_and_name_then_argument_fragments(app: httpx.AsyncClient) -> None:
    stream = await sdk(app).chat.completions.create(
        model="standard", messages=ASK, tools=[WEATHER], tool_choice="required", stream=True
    )
    pieces = [c.choices[0].delta.tool_calls for c in [chunk async for chunk in stream] if c.choices]
    calls = [call for piece in pieces if piece for call in piece]
    first, *rest = calls
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert rest and all(c.id is None and c.function.name is None for c in rest)
    assert json.loads("".join((c.function.arguments or "") for c in calls)) == {"query": "fake"}


async def test_a_conversation_with_a_tool_result_reaches_the_engine(app: httpx.AsyncClient) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"query": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    reply = await sdk(app).chat.completions.create(model="standard", messages=messages, tools=[WEATHER])
    assert reply.choices[0].finish_reason == "stop" and "sunny" in (reply.choices[0].message.content or "")


async def test_generate_has_its_own_tool_call_shape(app: httpx.AsyncClient) -> None:
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    plain = (await app.post("/generate", json=body)).json()
    assert plain["finish_reason"] == "tool_calls"
    expected = {"id": "call_get_weather_0", "name": "get_weather", "arguments": '{"query": "fake"}'}
    assert plain["tool_calls"] == [expected]
    r = await app.post("/generate", json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["tool_call", "tool_call", "tool_call", "done"]
    assert events[0]["name"] == "get_weather" and events[0]["call_id"] == "call_get_weather_0"
    assert events[-1]["tool_calls"] == plain["tool_calls"]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    answered = await app.post("/generate", json={"messages": history, "tools": [WEATHER]})
    assert answered.status_code == 200 and "tool_calls" not in answered.json()
    bad = await app.post("/generate", json={"prompt": "x", "tools": [WEATHER]})
    assert bad.status_code == 400 and "go with 'messages'" in bad.json()["error"]["message"]


async def test_tools_are_part_of_the_cache_key_and_hits_replay_the_calls(make_registry: Any) -> None:
    registry, _ = make_registry()
    cache, metrics = MemoryCache(), Metrics()
    coalescer = Coalescer(CachePolicy(LLMSettings(cache_enabled=True)), cache, metrics)
    tracer = RecordingTracer()
    service = GenerationService(registry, metrics, 16, coalescer=coalescer, tracer=tracer)  # type: ignore[arg-type]
    greedy = SamplingOptions(max_tokens=8, temperature=0)

    async def ask(tools: list[dict[str, Any]], choice: Any = "required") -> tuple[bool, list[str]]:
        spec = GenerationSpec("r", "standard", greedy, messages=ASK, tools=tools, tool_choice=choice)
        result = await service.complete(spec)
        return result.cached, [c.name for c in result.choices[0].tool_calls]

    try:
        assert await ask([WEATHER]) == (False, ["get_weather"])
        assert await ask([SEARCH, WEATHER]) == (False, ["search"])
        assert await ask([WEATHER], "none") == (False, [])
        assert await ask([WEATHER]) == (True, ["get_weather"])
        assert len(cache.entries) == 3
        assert isinstance(next(iter(cache.entries.values())), CachedResponse)
    finally:
        await coalescer.close()
        await registry.close()


def test_entries_round_trip_tool_calls() -> None:
    entry = CachedResponse.decode(
        b'{"v": 1, "model_id": "m", "prompt": "p", "prompt_tokens": 3, "created": 1.0, "choices": [{"index": 0,'
        b' "text": "", "finish_reason": "tool_calls", "completion_tokens": 2, "logprobs": [],'
        b' "tool_calls": [["call_1", "f", "{}"]]}]}'
    )
    assert CachedResponse.decode(entry.encode()) == entry
    (delta,) = entry.deltas()
    assert delta.tool_calls[0].name == "f" and delta.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("slot", "model", "expected"),
    [
        ("standard", PRODUCTION_MODELS["standard"], ChatConfig(None, "llama3_json", "parameter")),
        ("longctx", PRODUCTION_MODELS["longctx"], ChatConfig(None, "mistral")),
        ("multimodal", PRODUCTION_MODELS["multimodal"], ChatConfig(None, "pythonic")),
        ("standard", str(DEMO_MODEL_DIR), ChatConfig(str(DEMO_TOOL_TEMPLATE), "hermes")),
        ("multimodal", str(DEMO_MULTIMODAL_DIR.resolve()), ChatConfig(str(DEMO_TOOL_TEMPLATE), "hermes")),
        ("standard", "some/other-model", ChatConfig(None, None)),
    ],
)
def test_tool_parser_and_template_defaults_fit_the_models(slot: str, model: str, expected: ChatConfig) -> None:
    assert chat_config(ChatSettings(), LLMSettings().slot(slot), model) == expected


def test_settings_override_and_turn_off_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    monkeypatch.setenv("LLM_TOOL_PARSER_STANDARD", "none")
    monkeypatch.setenv("LLM_TOOL_PARSER_LONGCTX", "hermes")
    monkeypatch.setenv("LLM_CHAT_TEMPLATE_LONGCTX", str(template))
    chat, llm = ChatSettings(), LLMSettings()
    assert chat_config(chat, llm.slot("standard"), PRODUCTION_MODELS["standard"]) == ChatConfig(None, None)
    assert chat_config(chat, llm.slot("longctx"), "x/y") == ChatConfig(str(template), "hermes")
    monkeypatch.setenv("LLM_CHAT_TEMPLATE_LONGCTX", str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="no such file"):
        LLMSettings()
