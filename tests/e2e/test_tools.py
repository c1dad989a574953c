"""Tool calling on the real engine (demo model, the shipped tool template, vLLM's hermes parser):
the openai SDK sync, async and streamed, LangChain's bind_tools. A 135M model may answer in text
when it may choose, so `auto` asserts the contract, not the model's judgement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from .conftest import ServiceProcess

CLIENT_OPTIONS: dict[str, Any] = {"api_key": "unused", "timeout": 300.0, "max_retries": 0}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sdk(service: ServiceProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS) as client:
        yield client


def test_required_call_has_valid_arguments(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="standard", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.id and c.type == "function" for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        schema = WEATHER_PARAMS if call.function.name == "get_weather" else TIME["function"]["parameters"]
        jsonschema.validate(arguments, schema)


def test_named_call_streamed_in_openai_shape(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="standard", messages=ASK, tools=[WEATHER, TIME], max_tokens=64, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    pieces = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert pieces and pieces[0].id and pieces[0].function.name == "get_weather"
    assert all(p.id is None for p in pieces[1:])
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in pieces)), WEATHER_PARAMS)
    assert chunks[-1].choices[0].finish_reason == "stop"  # OpenAI ends a named call with stop


async def test_async_conversation_with_a_tool_result_continues(service: ServiceProcess) -> None:
    async with openai.AsyncOpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS) as client:
        first = await client.chat.completions.create(
            model="standard", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0
        )
        (call, *_) = first.choices[0].message.tool_calls or []
        messages = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "sky": "sunny"}'},
        ]
        second = await client.chat.completions.create(
            model="standard", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=32, temperature=0
        )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.usage and second.usage.prompt_tokens > (first.usage.prompt_tokens if first.usage else 0)


def test_tool_choice_none_never_calls_and_auto_keeps_the_contract(sdk: openai.OpenAI) -> None:
    none = sdk.chat.completions.create(
        model="standard", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=48, temperature=0
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    auto = sdk.chat.completions.create(model="standard", messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0)
    choice = auto.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert all(json.loads(c.function.arguments) is not None for c in choice.message.tool_calls)
    else:
        assert choice.message.content is not None and "<tool_call>" not in choice.message.content


def test_generate_returns_tool_calls_in_its_own_shape(client: Any) -> None:
    r = client.post("/generate", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                       "max_tokens": 64, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "tool_calls" and body["tool_calls"]
    jsonschema.validate(json.loads(body["tool_calls"][0]["arguments"]), WEATHER_PARAMS)


@pytest.mark.parametrize(
    ("tools", "tool_choice"),
    [
        ([{"type": "function", "function": {"name": "has space"}}], None),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None),
        ([WEATHER], {"type": "function", "function": {"name": "unknown"}}),
        ([{"type": "code_interpreter"}], None),
    ],
)
def test_malformed_tools_are_400s(sdk: openai.OpenAI, tools: list[dict[str, Any]], tool_choice: Any) -> None:
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="standard", messages=ASK, tools=tools, max_tokens=8, **extra)  # type: ignore[arg-type]


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(description="The city")


def test_langchain_bind_tools(service: ServiceProcess) -> None:
    chat = ChatOpenAI(model="standard", base_url=service.base_url + "/v1", api_key="unused", temperature=0,
                      max_tokens=64, max_retries=0, timeout=300)
    forced = chat.bind_tools([GetWeather], tool_choice="GetWeather")
    message = forced.invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and isinstance(call["args"]["city"], str) and call["id"]
    chunks = list(forced.stream("What is the weather in Rome?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "GetWeather"
