"""The OpenAI-compatible API (/v1): models, chat and text completions, streamed or not.

Every request goes through GenerationService, the path /generate uses, so caching, tracing,
metrics and limits are the same; this module only translates OpenAI's shapes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llm_service.api.deps import GenerationDep, RegistryDep, RequestIdDep, RequestRecordDep, ResourcesDep
from llm_service.api.fanout import MergedStreams, complete_all, merged_headers, open_all
from llm_service.api.fast_path import FastRoute
from llm_service.api.openai_schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAISampling,
)
from llm_service.api.responses import GENERATION_STATUSES, OpenAIErrorEnvelope, error_responses, streaming_response
from llm_service.api.streaming import SSEResponse, sse
from llm_service.api.timeouts import RequestTimeoutDep
from llm_service.cache.controls import CacheControl
from llm_service.engines.base import SamplingOptions, TokenLogprob, ToolCallDelta
from llm_service.errors import InvalidRequest, render_openai_error, to_service_error
from llm_service.registry import Slot
from llm_service.serving.generation import GenerationResult, GenerationSpec, GenerationStream, ToolCall
from llm_service.traffic.request_record import RequestRecord

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS = error_responses(OpenAIErrorEnvelope, 401, 404)
_GENERATION_ERRORS = {
    **streaming_response("The completion; with stream: true, Server-Sent Events of chunks ending in [DONE]"),
    **error_responses(OpenAIErrorEnvelope, *GENERATION_STATUSES),
}
_CACHE_HEADER = Header(None, description="no-cache, no-store, max-age=N")
# vLLM reports -inf as -9999.0 too: JSON has no infinity.
_MIN_LOGPROB = -9999.0


# --- models --------------------------------------------------------------------------------
def _card(slot: Slot, started_at: float, adapter: str | None = None) -> ModelCard:
    """A slot's card, or the card of one of its LoRA adapters (`parent`: the slot's model id)."""
    config = slot.config
    return ModelCard(
        id=adapter or slot.name,
        parent=config.model_id if adapter else None,
        created=int(slot.loaded_at or started_at),
        owned_by="llm-service",
        model_id=config.model_id,
        state=slot.state.value,
        max_model_len=config.max_model_len,
        kind=config.kind,
    )


@router.get("/models", response_model=ModelList, responses=error_responses(OpenAIErrorEnvelope, 401),
            summary="List the slots as OpenAI models")
async def list_models(registry: RegistryDep, resources: ResourcesDep) -> ModelList:
    slots = [registry.slot(name) for name in registry.slot_names]
    cards = [
        _card(slot, resources.started_at, adapter)
        for slot in slots
        for adapter in [None, *(a.name for a in slot.config.adapters)]
    ]
    return ModelList(data=cards)


@router.get("/models/{model:path}", response_model=ModelCard, responses=_ERRORS, summary="One slot")
async def retrieve_model(model: str, registry: RegistryDep, resources: ResourcesDep) -> ModelCard:
    slot, adapter = registry.find_model(model)
    return _card(slot, resources.started_at, adapter)


# --- requests to specs ---------------------------------------------------------------------
def _sampling(
    body: OpenAISampling, max_tokens: int | None, logprobs: int | None, json_schema: dict[str, Any] | None
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        stop=body.stop_tuple(),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        n=body.n or 1,
        logprobs=logprobs,
        json_schema=json_schema,
        logit_bias=_logit_bias(body.logit_bias),
        ignore_eos=bool(body.ignore_eos),
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's map of token id (as a string) to a bias in [-100, 100]."""
    if not bias:
        return None
    try:
        parsed = {int(token): float(value) for token, value in bias.items()}
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None
    if any(token < 0 for token in parsed) or any(not -100 <= value <= 100 for value in parsed.values()):
        raise InvalidRequest("logit_bias maps token ids >= 0 to values in [-100, 100]", param="logit_bias")
    return parsed


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """The message as vLLM's renderer takes it (content parts, images, tool calls pass through)."""
    param = f"messages.{index}"
    if message.role == "function":
        raise InvalidRequest("function messages (deprecated) are not supported; use tool messages", param=param)
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequest("a tool message needs the tool_call_id it answers", param=param)
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.content is None and not message.tool_calls:
        rendered["content"] = ""
    for name in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, name):
            rendered[name] = getattr(message, name)
    return rendered


def chat_spec(
    body: ChatCompletionRequest, request_id: str, cache_header: str | None, deadline: float, record: RequestRecord
) -> GenerationSpec:
    """The generation a chat completion request asks for; InvalidRequest for unsupported fields."""
    if body.functions:
        raise InvalidRequest("functions (deprecated) are not supported; use tools", param="functions")
    if body.modalities and set(body.modalities) - {"text"}:
        raise InvalidRequest("only text output is supported", param="modalities")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    schema = body.response_format.engine_schema() if body.response_format else None
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, logprobs, schema)
    return GenerationSpec(
        request_id=request_id,
        slot=body.model,
        sampling=sampling,
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        cache=CacheControl.parse(cache_header, body.cache),
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        deadline=deadline,
        record=record,
    )


def completion_specs(
    body: CompletionRequest, request_id: str, cache_header: str | None, deadline: float | None = None
) -> list[GenerationSpec]:
    """One generation per prompt; InvalidRequest for unsupported fields."""
    prompts = _prompts(body.prompt)
    if body.suffix:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequest("best_of is not supported (only best_of == n)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    sampling = _sampling(body, body.max_tokens, body.logprobs, None)
    cache = CacheControl.parse(cache_header, body.cache)
    return [
        GenerationSpec(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
            slot=body.model,
            sampling=sampling,
            prompt=prompt if isinstance(prompt, str) else None,
            token_ids=None if isinstance(prompt, str) else prompt,
            cache=cache,
            deadline=deadline,
        )
        for i, prompt in enumerate(prompts)
    ]


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | tuple[int, ...]]:
    """The prompts of a completion request: text, or token ids (one list, or a list of lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [tuple(prompt)]  # type: ignore[arg-type]
    prompts: list[str | tuple[int, ...]] = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            prompts.append(tuple(p))
        else:
            raise InvalidRequest("prompt is text, a list of texts, token ids or lists of token ids", param="prompt")
    return prompts


# --- results to OpenAI shapes ----------------------------------------------------------------
def usage_of(results: Sequence[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}

    content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]} for t in items]
    return {"content": content, "refusal": None}


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [_logprob(t.logprob) for t in items],
        "top_logprobs": [{token: _logprob(lp) for token, lp in t.top} for t in items],
        "text_offset": offsets,
    }


def _tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _tool_call_chunks(calls: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """OpenAI's delta.tool_calls: index, id, type and name with a call's first piece, then arguments."""
    chunks = []
    for call in calls:
        chunk: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
        if call.id:
            chunk.update(id=call.id, type="function")
        if call.name:
            chunk["function"]["name"] = call.name
        chunks.append(chunk)
    return chunks


def chat_response(result: GenerationResult, body: ChatCompletionRequest, created: int) -> dict[str, Any]:
    choices = [
        {
            "index": c.index,
            "message": {
                "role": "assistant",
                "content": None if c.tool_calls and not c.text else c.text,
                "refusal": None,
                "tool_calls": _tool_calls(c.tool_calls),
            },
            "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in result.choices
    ]
    response = ChatCompletionResponse.model_validate(
        {"id": f"chatcmpl-{result.request_id}", "created": created, "model": body.model,
         "choices": choices, "usage": usage_of([result])}
    )
    return response.model_dump()


def completion_response(
    results: Sequence[GenerationResult], body: CompletionRequest, request_id: str, created: int
) -> dict[str, Any]:
    n = body.n or 1
    choices = [
        {
            "index": position * n + c.index,
            "text": (result.prompt if body.echo else "") + c.text,
            "logprobs": completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }
        for position, result in enumerate(results)
        for c in result.choices
    ]
    response = CompletionResponse.model_validate(
        {"id": f"cmpl-{request_id}", "created": created, "model": body.model,
         "choices": choices, "usage": usage_of(results)}
    )
    return response.model_dump()


# --- streaming -------------------------------------------------------------------------------
class ChunkWriter:
    """SSE chunks of one streamed response in OpenAI's format."""

    def __init__(self, object_name: str, response_id: str, model: str, created: int, include_usage: bool):
        self.base = {"id": response_id, "object": object_name, "created": created, "model": model,
                     "system_fingerprint": None}
        self.include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]]) -> bytes:
        data = {**self.base, "choices": choices}
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    async def end(self, results: Sequence[GenerationResult]) -> AsyncIterator[bytes]:
        """The usage chunk if asked for, then [DONE]."""
        if self.include_usage:
            yield sse({**self.base, "choices": [], "usage": usage_of(results)})
        yield sse("[DONE]")


def error_chunk(exc: Exception) -> bytes:
    """After the first byte the status is sent: the error goes in-band as the last chunk."""
    return sse(render_openai_error(to_service_error(exc)))


async def chat_chunks(
    stream: GenerationStream, body: ChatCompletionRequest, created: int
) -> AsyncIterator[bytes]:
    out = ChunkWriter("chat.completion.chunk", f"chatcmpl-{stream.result.request_id}", body.model, created,
                      body.include_usage)
    for index in range(body.n or 1):
        yield out.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
    try:
        async for delta in stream:
            content: dict[str, Any] = {"content": delta.text} if delta.text else {}
            if delta.tool_calls:
                content["tool_calls"] = _tool_call_chunks(delta.tool_calls)
            yield out.chunk([{
                "index": delta.index,
                "delta": content,
                "logprobs": chat_logprobs(delta.logprobs) if body.logprobs else None,
                "finish_reason": delta.finish_reason,
            }])
    except Exception as exc:
        yield error_chunk(exc)
        yield sse("[DONE]")
        return
    async for data in out.end([stream.result]):
        yield data


async def completion_chunks(
    merged: MergedStreams, body: CompletionRequest, request_id: str, created: int
) -> AsyncIterator[bytes]:
    streams = merged.streams
    out = ChunkWriter("text_completion", f"cmpl-{request_id}", body.model, created, body.include_usage)
    n = body.n or 1
    offsets: dict[int, int] = {}
    if body.echo:
        for position, stream in enumerate(streams):
            for index in range(n):
                yield out.chunk([{"index": position * n + index, "text": stream.result.prompt,
                                  "logprobs": None, "finish_reason": None}])
    try:
        async for position, delta in merged:
            index = position * n + delta.index
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(delta.text)
            yield out.chunk([{"index": index, "text": delta.text, "logprobs": logprobs,
                              "finish_reason": delta.finish_reason}])
    except Exception as exc:
        yield error_chunk(exc)
        yield sse("[DONE]")
        return
    async for data in out.end([s.result for s in streams]):
        yield data


def _chat_rendered(result: GenerationResult, body: ChatCompletionRequest) -> dict[str, Any]:
    return chat_response(result, body, int(time.time()))


# /v1/chat/completions as the fast path answers it (memory-tier hits, refusals).
CHAT_FAST_ROUTE = FastRoute(ChatCompletionRequest, chat_spec, _chat_rendered)


# --- endpoints -------------------------------------------------------------------------------
@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_ERRORS,
             summary="Chat completion (OpenAI-compatible), streamed with stream: true")
async def chat_completions(
    body: ChatCompletionRequest,
    generation: GenerationDep,
    request_id: RequestIdDep,
    request_timeout: RequestTimeoutDep,
    record: RequestRecordDep,
    cache_control: str | None = _CACHE_HEADER,
) -> Any:
    spec = chat_spec(body, request_id, cache_control, request_timeout.deadline(body.timeout), record)
    created = int(time.time())
    if body.stream:
        stream = await generation.open(spec)
        return SSEResponse(chat_chunks(stream, body, created), on_close=stream.aclose,
                           headers=stream.result.headers())
    result = await generation.complete(spec)
    return JSONResponse(chat_response(result, body, created), headers=result.headers())


@router.post("/completions", response_model=CompletionResponse, responses=_GENERATION_ERRORS,
             summary="Text completion (OpenAI-compatible), one generation per prompt")
async def completions(
    body: CompletionRequest,
    generation: GenerationDep,
    request_id: RequestIdDep,
    request_timeout: RequestTimeoutDep,
    record: RequestRecordDep,
    cache_control: str | None = _CACHE_HEADER,
) -> Any:
    deadline = request_timeout.deadline(body.timeout)
    specs = [dataclasses.replace(s, record=record) for s in completion_specs(body, request_id, cache_control, deadline)]
    created = int(time.time())
    if body.stream:
        merged = MergedStreams(await open_all(generation, specs))
        headers = merged_headers([s.result for s in merged.streams])
        chunks = completion_chunks(merged, body, request_id, created)
        return SSEResponse(chunks, on_close=merged.aclose, headers=headers)
    results = await complete_all(generation, specs)
    response = completion_response(results, body, request_id, created)
    return JSONResponse(response, headers=merged_headers(results))
