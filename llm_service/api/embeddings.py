"""POST /v1/embeddings in OpenAI's shape (the openai SDK, LangChain and LlamaIndex call it unchanged)."""

from __future__ import annotations

import base64
from array import array
from typing import Any, Literal

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, Field

from llm_service.api.deps import RequestIdDep, RequestRecordDep, ResourcesDep
from llm_service.api.timeouts import RequestTimeoutDep
from llm_service.cache.controls import CacheControl
from llm_service.errors import InvalidRequest
from llm_service.serving.embeddings import Embedding, EmbeddingInput

router = APIRouter(prefix="/v1", tags=["embeddings"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request: too many inputs, an input too long, not an embedding model"},
    404: {"description": "Unknown model"},
    429: {"description": "Admission: the slot could not start the request before its timeout; retry after "
          "Retry-After"},
    503: {"description": "Model loading, failed or out of memory budget"},
    504: {"description": "The request's timeout (X-Request-Timeout) passed; it was stopped"},
}


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request."""

    model: str = Field(description="An embedding slot (`embedding`) or its model id.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, a list of token ids, or a list of token-id lists."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes (the openai SDK's default)."
    )
    dimensions: int | None = Field(None, ge=1, description="Shorter vectors; only for models trained for it.")
    user: str | None = Field(None, description="Accepted and ignored.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def request_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[EmbeddingInput]:
    """OpenAI's four input shapes as a list of inputs (a flat list of ints is one input)."""
    if isinstance(raw, str):
        return [raw]
    flat = [item for item in raw if isinstance(item, int)]
    if raw and len(flat) == len(raw):
        return [flat]
    return [item for item in raw if not isinstance(item, int)]


def _encoded(embedding: Embedding, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(array("f", embedding.vector).tobytes()).decode()
    return embedding.vector


@router.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, summary="Embed texts or token ids")
async def create_embeddings(
    body: EmbeddingRequest,
    resources: ResourcesDep,
    request_id: RequestIdDep,
    record: RequestRecordDep,
    request_timeout: RequestTimeoutDep,
    response: Response,
    cache_control: str | None = Header(None, description="no-cache: embed every input again; no-store"),
) -> EmbeddingResponse:
    service = resources.embeddings
    if service is None:
        raise InvalidRequest("embeddings are not served here", param="model")
    control = CacheControl.parse(cache_control)
    result = await service.embed(
        body.model, request_inputs(body.input), body.dimensions, request_id,
        read_cache=not control.no_cache,
        store_cache=not control.no_store,
        record=record,
        deadline=request_timeout.deadline(),
    )
    if result.trace_id:
        response.headers["X-Trace-ID"] = result.trace_id
    return EmbeddingResponse(
        data=[
            EmbeddingData(index=i, embedding=_encoded(e, body.encoding_format)) for i, e in enumerate(result.embeddings)
        ],
        model=result.slot,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
