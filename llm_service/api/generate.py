"""POST /generate: the service's own generation API (JSON or Server-Sent Events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llm_service.api.deps import GenerationDep, RequestIdDep, RequestRecordDep
from llm_service.api.fast_path import FastRoute
from llm_service.api.responses import GENERATION_STATUSES, ErrorEnvelope, error_responses, streaming_response
from llm_service.api.schemas import GenerateRequest, GenerateResponse, Timings, ToolCallOut, Usage
from llm_service.api.streaming import SSEResponse, sse
from llm_service.api.timeouts import RequestTimeoutDep
from llm_service.cache.controls import CacheControl
from llm_service.engines.base import SamplingOptions
from llm_service.errors import ServiceError, render_error, to_service_error
from llm_service.serving.generation import GenerationResult, GenerationSpec, GenerationStream
from llm_service.traffic.request_record import RequestRecord

router = APIRouter(tags=["generate"])

def spec_from_request(
    body: GenerateRequest, request_id: str, cache_header: str | None, deadline: float, record: RequestRecord
) -> GenerationSpec:
    sampling = SamplingOptions(
        max_tokens=body.max_tokens or 0,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        stop=body.stop_tuple(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
    )
    messages = [m.model_dump(exclude_none=True) for m in body.messages] if body.messages is not None else None
    return GenerationSpec(
        request_id=request_id,
        slot=body.model,
        sampling=sampling,
        prompt=body.prompt,
        messages=messages,
        cache=CacheControl.parse(cache_header, body.cache),
        images=tuple(body.images or ()),
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice,
        deadline=deadline,
        record=record,
    )


def usage_of(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def response_of(result: GenerationResult) -> GenerateResponse:
    choice = result.choices[0] if result.choices else None
    return GenerateResponse(
        id=result.request_id,
        model=result.slot,
        model_id=result.model_id,
        text=choice.text if choice else "",
        finish_reason=choice.finish_reason if choice else None,
        tool_calls=[ToolCallOut(**c.as_dict()) for c in choice.tool_calls] if choice and choice.tool_calls else None,
        usage=usage_of(result),
        timings=Timings(time_to_first_token=result.time_to_first_token, total=result.total_time),
        cached=result.cached,
        coalesced=result.coalesced,
    )


def body_of(result: GenerationResult) -> dict[str, Any]:
    """The response body; `tool_calls` only when the model called a tool."""
    return response_of(result).model_dump(exclude={"tool_calls"} if not _calls(result) else None)


def _calls(result: GenerationResult) -> bool:
    return bool(result.choices and result.choices[0].tool_calls)


async def sse_events(stream: GenerationStream) -> AsyncIterator[bytes]:
    """Deltas as `{"type": "delta"}` events (tool-call pieces as `{"type": "tool_call"}`), then one
    `done` event carrying the complete calls (or one `error` event)."""
    try:
        async for delta in stream:
            if delta.text:
                yield sse({"type": "delta", "id": stream.result.request_id, "text": delta.text})
            for call in delta.tool_calls:
                yield sse({"type": "tool_call", "id": stream.result.request_id, "index": call.index,
                           "call_id": call.id, "name": call.name, "arguments": call.arguments})
    except ServiceError as exc:
        yield sse({"type": "error", **render_error(exc)})
        return
    except Exception as exc:  # after the first byte the status is sent: report in-band
        yield sse({"type": "error", **render_error(to_service_error(exc))})
        return
    final = body_of(stream.result)
    final.pop("text")
    yield sse({"type": "done", **final})


def _rendered(result: GenerationResult, body: GenerateRequest) -> dict[str, Any]:
    return body_of(result)


# /generate as the fast path answers it (memory-tier hits, refusals): the same spec and body.
FAST_ROUTE = FastRoute(GenerateRequest, spec_from_request, _rendered)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate text from a slot's model",
    responses={
        **streaming_response("The generation; Server-Sent Events (delta, then done or error) with stream: true"),
        **error_responses(ErrorEnvelope, *GENERATION_STATUSES),
    },
)
async def generate(
    body: GenerateRequest,
    generation: GenerationDep,
    request_id: RequestIdDep,
    request_timeout: RequestTimeoutDep,
    record: RequestRecordDep,
    cache_control: str | None = Header(None, description="no-cache, no-store, max-age=N"),
) -> Any:
    spec = spec_from_request(body, request_id, cache_control, request_timeout.deadline(body.timeout), record)
    if body.stream:
        stream = await generation.open(spec)
        return SSEResponse(sse_events(stream), on_close=stream.aclose, headers=stream.result.headers())
    result = await generation.complete(spec)
    return JSONResponse(body_of(result), headers=result.headers())
