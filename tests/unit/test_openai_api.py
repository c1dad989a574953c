"""The OpenAI-compatible API (/v1) on fake engines, through raw HTTP, the openai SDK and LangChain."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from llm_service.app import EngineBackend, create_app
from llm_service.serving.generation import GenerationService, GenerationSpec, GenerationStream
from tests.metrics_text import metric

from .conftest import GIB, FakeFactory, fake_settings

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
OBJECT = {"type": "object"}


@dataclass
class OpenAIApp:
    """The real app on fake engines, with every GenerationSpec the API handed to the service."""

    app: FastAPI
    http: httpx.AsyncClient
    factory: FakeFactory
    specs: list[GenerationSpec] = field(default_factory=list)

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="unused", http_client=self.http, max_retries=0
        )

    @property
    def in_flight(self) -> int:
        return sum(s["in_flight"] for s in self.app.state.resources.registry.snapshot().values())


@contextlib.asynccontextmanager
async def running(factory: FakeFactory) -> AsyncIterator[OpenAIApp]:
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        resources = app.state.resources
        await resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            env = OpenAIApp(app, http, factory)
            service: GenerationService = resources.generation
            real_open = service.open

            async def recording_open(spec: GenerationSpec) -> GenerationStream:
                env.specs.append(spec)
                return await real_open(spec)

            service.open = recording_open  # type: ignore[method-assign]
            yield env


@pytest.fixture
async def api() -> AsyncIterator[OpenAIApp]:
    async with running(FakeFactory()) as env:
        yield env


def sse_data(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def chunks_of(body: str) -> list[dict[str, Any]]:
    data = sse_data(body)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --- models ----------------------------------------------------------------------------------
async def test_models_list_every_slot_with_model_id_and_state(api):
    models = await api.sdk().models.list()
    cards = {m.id: m for m in models.data}
    assert list(cards) == ["standard", "longctx", "multimodal"]
    assert all(m.object == "model" and m.owned_by == "llm-service" and m.created > 0 for m in cards.values())
    assert cards["standard"].model_extra["model_id"] == "fake/standard"
    assert cards["standard"].model_extra["state"] == "loaded"
    assert cards["longctx"].model_extra["state"] == "unloaded"
    assert cards["longctx"].model_extra["max_model_len"] == 1024


async def test_model_retrieve_by_slot_or_model_id(api):
    client = api.sdk()
    assert (await client.models.retrieve("longctx")).id == "longctx"
    assert (await client.models.retrieve("fake/multimodal")).id == "multimodal"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-4")
    assert caught.value.code == "model_not_found"


# --- chat completions ------------------------------------------------------------------------
async def test_chat_completion_in_openai_shape(api):
    raw = await api.sdk().chat.completions.with_raw_response.create(
        model="standard", messages=CAPITAL, temperature=0, max_completion_tokens=32
    )
    completion = raw.parse()
    assert raw.headers["x-cache"] == "MISS" and completion.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert completion.object == "chat.completion" and completion.model == "standard"
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == PARIS
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = completion.usage
    assert usage.completion_tokens == 6 and usage.total_tokens == usage.prompt_tokens + 6
    assert api.specs[0].sampling.max_tokens == 32 and api.specs[0].sampling.temperature == 0


async def test_chat_model_may_be_the_model_id(api):
    completion = await api.sdk().chat.completions.create(model="fake/longctx", messages=CAPITAL)
    assert completion.model == "fake/longctx" and "Paris" in completion.choices[0].message.content
    assert api.app.state.resources.registry.snapshot()["longctx"]["state"] == "loaded"


async def test_chat_sampling_fields_reach_the_engine_and_extras_are_ignored(api):
    await api.sdk().chat.completions.create(
        model="standard",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=7, temperature=0.5, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=-0.5,
        stop="x", user="someone", store=False, metadata={"k": "v"}, tool_choice="none",
        extra_body={"no_such_field": 1, "top_k": 5},
    )
    (spec,) = api.specs
    # Passed on as vLLM's renderer takes them (it maps developer to system where a template needs it).
    assert spec.messages == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    s = spec.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.top_k) == (7, 0.5, 0.9, 3, 5)
    assert (s.presence_penalty, s.frequency_penalty, s.stop, s.n) == (0.5, -0.5, ("x",), 1)
    assert s.logprobs is None and s.json_schema is None
    assert "someone" not in repr(spec)


async def test_max_completion_tokens_wins_and_length_is_reported(api):
    completion = await api.sdk().chat.completions.create(
        model="standard", messages=CAPITAL, max_tokens=5, max_completion_tokens=2
    )
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 2


async def test_chat_stream_matches_the_plain_response(api):
    client = api.sdk()
    plain = await client.chat.completions.create(model="standard", messages=CAPITAL, temperature=0)
    stream = await client.chat.completions.create(
        model="standard", messages=CAPITAL, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_raw_stream_ends_with_done_and_has_no_usage_unless_asked(api):
    body = {"model": "standard", "messages": CAPITAL, "stream": True}
    r = await api.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-cache"] == "MISS"
    chunks = chunks_of(r.text)
    assert all("usage" not in c for c in chunks)


async def test_n_choices_plain_and_streamed(api):
    client = api.sdk()
    plain = await client.chat.completions.create(model="standard", messages=CAPITAL, n=2, seed=1)
    assert [c.index for c in plain.choices] == [0, 1]
    assert all(c.message.content == PARIS for c in plain.choices)
    assert plain.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    stream = await client.chat.completions.create(model="standard", messages=CAPITAL, n=2, stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: PARIS, 1: PARIS}


async def test_stop_sequence_ends_the_text(api):
    completion = await api.sdk().chat.completions.create(model="standard", messages=CAPITAL, stop=["France"])
    choice = completion.choices[0]
    assert choice.message.content == "The capital of " and choice.finish_reason == "stop"


async def test_chat_logprobs(api):
    completion = await api.sdk().chat.completions.create(
        model="standard", messages=CAPITAL, logprobs=True, top_logprobs=2
    )
    assert api.specs[0].sampling.logprobs == 2
    content = completion.choices[0].logprobs.content
    assert "".join(t.token for t in content) == PARIS
    assert all(t.logprob == -0.5 and len(t.top_logprobs) == 2 for t in content)
    assert content[0].bytes == list(content[0].token.encode())


@pytest.mark.parametrize(
    ("response_format", "engine_schema"),
    [
        ({"type": "json_object"}, {}),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": OBJECT}},
            {"type": "object"},
        ),
        ({"type": "text"}, None),
    ],
)
async def test_response_format_becomes_the_engine_schema(api, response_format, engine_schema):
    completion = await api.sdk().chat.completions.create(
        model="standard", messages=CAPITAL, response_format=response_format
    )
    assert api.specs[0].sampling.json_schema == engine_schema
    if engine_schema is not None:
        assert json.loads(completion.choices[0].message.content) == {"answer": PARIS}


async def test_sdk_parse_with_a_pydantic_model(api):
    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: str

    completion = await api.sdk().chat.completions.parse(
        model="standard", messages=CAPITAL, response_format=Answer
    )
    assert completion.choices[0].message.parsed == Answer(answer=PARIS)
    assert api.specs[0].sampling.json_schema["properties"]["answer"]["type"] == "string"


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        ({"temperature": 5}, "temperature", "less than or equal to 2"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'system'"),
        ({"model": None}, "model", "valid string"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a 'json_schema'"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"logit_bias": {"x": -100}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name", "pattern"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "'function'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools.0.function", "type object"),
        ({"tools": []}, "tools", "at least 1"),
        ({"tool_choice": "required"}, None, "needs tools"),
        ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", ""),
        ({"tool_choice": {"type": "function", "function": {"name": "g"}},
          "tools": [{"type": "function", "function": {"name": "f"}}]}, None, "not one of the tools"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0", "scheme"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages.0.content.0", "'input_audio' is not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "only text"),
        ({"max_tokens": 100000}, "max_tokens", "context length"),
    ],
)
async def test_bad_chat_requests_get_openai_400s(api, payload, param, fragment):
    body = {"model": "standard", "messages": CAPITAL, **payload}
    r = await api.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param is None or error["param"] == param or error["param"].startswith(param + ".")
    assert fragment in error["message"]


async def test_sdk_raises_its_own_error_types(api):
    client = api.sdk()
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-4o", messages=CAPITAL)
    assert "standard, longctx, multimodal" in not_found.value.message
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-4o", messages=CAPITAL, stream=True)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="standard", messages=CAPITAL, top_p=7)
    assert bad.value.param == "top_p"
    assert api.in_flight == 0


async def test_malformed_json_is_an_openai_400(api):
    r = await api.http.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_cache_control_header_and_body_reach_the_spec(api):
    await api.sdk().chat.completions.create(
        model="standard", messages=CAPITAL, extra_headers={"Cache-Control": "no-cache, max-age=60"},
        extra_body={"cache": {"no_store": True}},
    )
    cache = api.specs[0].cache
    assert (cache.no_cache, cache.no_store, cache.ttl) == (True, True, 60)


async def test_engine_death_mid_stream_ends_with_an_error_chunk():
    async with running(FakeFactory(die_after_tokens=2)) as env:
        r = await env.http.post(
            "/v1/chat/completions", json={"model": "standard", "messages": CAPITAL, "stream": True}
        )
        assert r.status_code == 200
        chunks = chunks_of(r.text)
        assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["The", " capital"]
        assert chunks[-1]["error"]["type"] == "engine_error" and "choices" not in chunks[-1]
        assert env.in_flight == 0


async def test_sdk_raises_on_an_error_chunk():
    async with running(FakeFactory(die_after_tokens=2)) as env:
        stream = await env.sdk().chat.completions.create(model="standard", messages=CAPITAL, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        assert env.in_flight == 0


# --- text completions ------------------------------------------------------------------------
async def test_completion_of_one_prompt(api):
    completion = await api.sdk().completions.create(
        model="standard", prompt="What is the capital of France?", max_tokens=16, temperature=0
    )
    assert completion.object == "text_completion" and completion.model == "standard"
    (choice,) = completion.choices
    assert choice.text == PARIS and choice.index == 0 and choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 6 and completion.usage.completion_tokens == 6
    assert api.specs[0].prompt == "What is the capital of France?" and api.specs[0].messages is None


async def test_prompt_list_runs_one_generation_each_with_choices_indexed_across(api):
    completion = await api.sdk().completions.create(
        model="standard", prompt=["one two three", "the capital of France"], n=2, max_tokens=16
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    texts = [c.text for c in completion.choices]
    assert texts == ["fake answer to one two three"] * 2 + [PARIS] * 2
    assert completion.usage.prompt_tokens == 3 + 4 and completion.usage.completion_tokens == 2 * 6 + 2 * 6
    ids = [spec.request_id for spec in api.specs]
    assert len(ids) == 2 and len(set(ids)) == 2


async def test_prompt_list_with_one_bad_prompt_fails_whole_and_frees_the_slot(api):
    r = await api.http.post(
        "/v1/completions", json={"model": "standard", "prompt": ["hi", "word " * 600], "max_tokens": 4}
    )
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = await api.http.post(
        "/v1/completions",
        json={"model": "standard", "prompt": ["hi", "word " * 600], "max_tokens": 4, "stream": True},
    )
    assert r.status_code == 400
    assert api.in_flight == 0


async def test_completion_echo_and_logprobs(api):
    client = api.sdk()
    echoed = await client.completions.create(model="standard", prompt="the capital of France", echo=True)
    assert echoed.choices[0].text == "the capital of France" + PARIS
    scored = await client.completions.create(model="standard", prompt="the capital of France", logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == PARIS and logprobs.token_logprobs == [-0.5] * 6
    assert logprobs.text_offset == [0, 3, 11, 14, 21, 24]
    assert all(len(top) == 1 for top in logprobs.top_logprobs)


async def test_completion_stream_of_a_prompt_list(api):
    stream = await api.sdk().completions.create(
        model="standard", prompt=["one two three", "the capital of France"], echo=True, stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "one two three" + "fake answer to one two three", 1: "the capital of France" + PARIS}
    assert finishes == {0: "stop", 1: "stop"}
    assert usage.completion_tokens == 12 and usage.prompt_tokens == 7


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 9}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
async def test_bad_completion_requests_get_openai_400s(api, payload, param):
    r = await api.http.post("/v1/completions", json={"model": "standard", "prompt": "hi", **payload})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_openai_requests_share_the_metrics_of_generate(api):
    await api.sdk().chat.completions.create(model="standard", messages=CAPITAL)
    await api.sdk().completions.create(model="standard", prompt=["a b", "c d"])
    metrics = (await api.http.get("/metrics")).text
    # Two HTTP requests, three generations (one per prompt).
    assert metric(metrics, "llm_requests_total", model="standard", status="success", code="200") == 2
    assert metric(metrics, "llm_engine_generations_total", model="standard") == 3
    assert 'llm_tokens_generated_total{model="standard"} 16.0' in metrics


# --- LangChain -------------------------------------------------------------------------------
async def test_langchain_chat_openai(api):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model="standard", base_url="http://test/v1", api_key="unused", temperature=0, max_tokens=32,
        http_async_client=api.http, max_retries=0,
    )
    message = await chat.ainvoke("What is the capital of France?")
    assert message.content == PARIS
    assert message.usage_metadata["output_tokens"] == 6
    streamed = "".join([chunk.content async for chunk in chat.astream("What is the capital of France?")])
    assert streamed == PARIS


async def test_token_id_prompts_and_logit_bias_reach_the_engine(api):
    completion = await api.sdk().completions.create(
        model="standard", prompt=[[5, 6, 7], [8]], max_tokens=4, logit_bias={"5": 2.5}
    )
    first, second = api.specs
    assert first.token_ids == (5, 6, 7) and second.token_ids == (8,) and first.prompt is None
    assert first.sampling.logit_bias == {5: 2.5}
    # The fake engine counts one token per id.
    assert completion.usage.prompt_tokens == 3 + 1
    single = await api.sdk().completions.create(model="standard", prompt=[1, 2], max_tokens=4, echo=True)
    assert api.specs[-1].token_ids == (1, 2) and single.choices[0].text.startswith("t1 t2")
