"""POST /v1/rerank (and /rerank) in the shape of vLLM's rerank API, which Jina and Cohere clients use."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from llm_service.api.deps import RequestIdDep, RequestRecordDep, ResourcesDep
from llm_service.api.timeouts import RequestTimeoutDep
from llm_service.errors import InvalidRequest

router = APIRouter(tags=["rerank"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request: empty query or documents, too many documents, a pair too long, "
          "not a rerank model"},
    404: {"description": "Unknown model"},
    429: {"description": "Admission: the slot could not start the request before its timeout; retry after "
          "Retry-After"},
    503: {"description": "Model loading, failed or out of memory budget"},
    504: {"description": "The request's timeout (X-Request-Timeout) passed; it was stopped"},
}


class RerankRequest(BaseModel):
    """A query and the documents to order by their relevance to it."""

    model: str = Field(description="A rerank slot (`rerank`) or its model id.")
    query: str = Field(description="The query the documents are scored against.")
    documents: list[str] = Field(description="The documents (texts) to score, at most LLM_RERANK_MAX_DOCUMENTS.")
    top_n: int | None = Field(None, ge=0, description="Return only the best n results; 0 or unset: all.")
    return_documents: bool = Field(True, description="Include each result's document text.")


class RerankDocument(BaseModel):
    text: str = Field(description="The document as sent.")


class RerankResultItem(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="The model's score of the (query, document) pair; higher is better.")
    document: RerankDocument | None = Field(None, description="The document, unless return_documents was false.")


class RerankUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of every (query, document) pair the model read.")
    total_tokens: int = Field(description="The same as prompt_tokens.")


class RerankResponse(BaseModel):
    id: str = Field(description="This response's id.")
    model: str = Field(description="The slot that scored the documents.")
    usage: RerankUsage
    results: list[RerankResultItem] = Field(description="By relevance_score, best first.")


@router.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS, summary="Rerank documents")
@router.post("/rerank", response_model=RerankResponse, responses=_ERRORS, summary="Rerank documents (no /v1)")
async def rerank(
    body: RerankRequest,
    resources: ResourcesDep,
    request_id: RequestIdDep,
    record: RequestRecordDep,
    request_timeout: RequestTimeoutDep,
    response: Response,
) -> RerankResponse:
    service = resources.rerank
    if service is None:
        raise InvalidRequest("reranking is not served here", param="model")
    result = await service.rerank(
        body.model, body.query, body.documents, body.top_n, request_id, record, deadline=request_timeout.deadline()
    )
    if result.trace_id:
        response.headers["X-Trace-ID"] = result.trace_id
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=result.slot,
        usage=RerankUsage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
        results=[
            RerankResultItem(
                index=doc.index,
                relevance_score=doc.score,
                document=RerankDocument(text=body.documents[doc.index]) if body.return_documents else None,
            )
            for doc in result.ranked
        ],
    )
