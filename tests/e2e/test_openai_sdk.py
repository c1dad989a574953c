"""The OpenAI-compatible API on the real engine and the demo model, through the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jsonschema
import openai
import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import ServiceProcess

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
# Every request runs the engine: a cached answer would hide what the engine streams.
CLIENT_OPTIONS: dict[str, Any] = {
    "api_key": "unused", "timeout": 300, "max_retries": 0, "default_headers": {"Cache-Control": "no-cache"}
}


@pytest.fixture(scope="module")
def sync_client(service: ServiceProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS) as client:
        yield client


def async_client(service: ServiceProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=service.base_url + "/v1", **CLIENT_OPTIONS)


def test_models_list(sync_client: openai.OpenAI) -> None:
    cards = {model.id: model for model in sync_client.models.list()}
    assert list(cards) == ["standard", "longctx", "multimodal"]
    standard = cards["standard"].model_extra or {}
    assert standard["state"] == "loaded" and standard["model_id"].endswith("SmolLM2-135M-Instruct")
    assert sync_client.models.retrieve(standard["model_id"]).id == "standard"


def test_chat_plain_and_streamed_give_the_same_text(sync_client: openai.OpenAI) -> None:
    args = {"model": "standard", "messages": CAPITAL, "temperature": 0, "max_tokens": 24}
    raw = sync_client.chat.completions.with_raw_response.create(**args, logprobs=True, top_logprobs=2)
    plain = raw.parse()
    assert raw.headers["x-cache"] and raw.headers["x-request-id"] in plain.id
    choice = plain.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason in {"stop", "length"}
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    tokens = choice.logprobs.content
    # One entry per generated token; vLLM counts (and scores) the end-of-turn token too.
    assert len(tokens) == plain.usage.completion_tokens
    assert "".join(t.token for t in tokens).startswith(choice.message.content)
    # At temperature 0 the sampled token is the most likely one.
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in tokens)

    stream = sync_client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # really streamed
    assert "".join(pieces) == choice.message.content
    assert chunks[-1].usage == plain.usage


async def test_async_completions_of_a_prompt_list(service: ServiceProcess) -> None:
    async with async_client(service) as client:
        completion = await client.completions.create(
            model="standard", prompt=["1, 2, 3, 4,", "Monday, Tuesday,"], temperature=0, max_tokens=8
        )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text.strip().startswith("5")
    assert "Wednesday" in completion.choices[1].text
    usage = completion.usage
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_async_chat_with_n_choices(service: ServiceProcess) -> None:
    async with async_client(service) as client:
        completion = await client.chat.completions.create(
            model="standard", messages=CAPITAL, n=2, temperature=0.8, seed=7, max_tokens=16
        )
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content for c in completion.choices)


def test_stop_sequence(sync_client: openai.OpenAI) -> None:
    args = {"model": "standard", "messages": CAPITAL, "temperature": 0, "max_tokens": 24}
    full = sync_client.chat.completions.create(**args).choices[0].message.content
    assert "Paris" in full
    stopped = sync_client.chat.completions.create(**args, stop=["Paris"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert "Paris" not in stopped.message.content and full.startswith(stopped.message.content)


def test_json_schema_response_validates(sync_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Berlin"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    completion = sync_client.chat.completions.create(
        model="standard",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        temperature=0,
        max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    answer = json.loads(completion.choices[0].message.content)
    jsonschema.validate(answer, schema)


def test_errors_map_to_the_sdk_exceptions(sync_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sync_client.chat.completions.create(model="gpt-4o", messages=CAPITAL, max_tokens=4)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sync_client.chat.completions.create(model="standard", messages=CAPITAL, temperature=3)
    assert bad.value.param == "temperature"
