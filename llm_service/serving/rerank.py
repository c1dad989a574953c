"""Reranking: limits, one engine batch of (query, document) pairs, scores sorted, metrics and a trace.

The HTTP shape lives in api/rerank.py; this module knows a query, documents and their scores.
Scores are not cached: a rerank request is one batch of pairs that rarely repeats exactly, and a
per-pair cache would cost a Redis round trip per document for little gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llm_service.engines.base import PairScore, Reranker
from llm_service.errors import InvalidRequest, to_service_error
from llm_service.observability.metrics import Metrics
from llm_service.observability.tracing import NoTracer, Tracer
from llm_service.registry import ModelRegistry
from llm_service.serving.retrieval import admitted_engine, start_request, traced
from llm_service.traffic.admission import AdmissionController, Work
from llm_service.traffic.deadlines import before_deadline
from llm_service.traffic.request_record import RequestRecord

PAIR_SPECIAL_TOKENS = 8  # separators and begin/end tokens a cross-encoder adds to a pair, at most


@dataclass(frozen=True)
class RankedDocument:
    """A document's position in the request, its relevance score and the tokens of its pair."""

    index: int
    score: float
    tokens: int


@dataclass(frozen=True)
class RerankResult:
    slot: str
    ranked: list[RankedDocument]  # best first, cut to top_n
    total_tokens: int
    trace_id: str | None = None


def check_rerank_input(query: str, documents: list[str], max_documents: int) -> None:
    """400 for an empty query, no documents, an empty document, or more than LLM_RERANK_MAX_DOCUMENTS."""
    if not query.strip():
        raise InvalidRequest("query must not be empty", param="query")
    if not documents:
        raise InvalidRequest("documents must not be empty", param="documents")
    if len(documents) > max_documents:
        raise InvalidRequest(
            f"{len(documents)} documents in one request; at most {max_documents} (LLM_RERANK_MAX_DOCUMENTS)",
            param="documents",
        )
    for index, document in enumerate(documents):
        if not document.strip():
            raise InvalidRequest(f"document {index} is empty", param="documents")


def ranked(scores: list[tuple[float, int]], top_n: int | None) -> list[RankedDocument]:
    """Documents by score, best first (ties keep the request's order), the first `top_n` of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i][0])
    return [RankedDocument(i, scores[i][0], scores[i][1]) for i in order[: top_n or len(order)]]


class RerankService:
    """Serves rerank requests on the registry's rerank slots."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        max_documents: int,
        tracer: Tracer | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self._registry = registry
        self._admission = admission  # None: no admission bounds
        self._metrics = metrics
        self._tracer = tracer or NoTracer()
        self.max_documents = max_documents

    async def rerank(
        self,
        model: str,
        query: str,
        documents: list[str],
        top_n: int | None,
        request_id: str,
        record: RequestRecord | None = None,
        deadline: float | None = None,
    ) -> RerankResult:
        """The documents by relevance. Raises ServiceError subclasses: InvalidRequest, Overloaded
        (admission), DeadlineExceeded (past `deadline`, event-loop time), ModelUnavailable, EngineFailure."""
        slot, trace = start_request(
            self._registry,
            self._tracer,
            model=model,
            kind="rerank",
            request_id=request_id,
            record=record,
            input={"query": query, "documents": documents},
            parameters={"documents": len(documents), "top_n": top_n},
        )
        started = time.monotonic()
        with traced(trace) as summary:
            check_rerank_input(query, documents, self.max_documents)
            try:
                async with before_deadline(deadline, self._metrics, slot.name):
                    scores = await self._score(slot.name, slot.config.max_model_len, query, documents, request_id,
                                               deadline)
            except ValueError as exc:  # a pair the model cannot take
                raise InvalidRequest(str(exc), param="documents") from exc
            except Exception as exc:  # engine failures, as the client sees them
                raise to_service_error(exc) from exc
            total_tokens = sum(s.tokens for s in scores)
            summary.tokens = total_tokens
            summary.details = {"documents": len(documents)}
        m = self._metrics
        m.rerank_documents.labels(model=slot.name).inc(len(documents))
        m.rerank_tokens.labels(model=slot.name).inc(total_tokens)
        m.rerank_duration.labels(model=slot.name).observe(time.monotonic() - started)
        return RerankResult(
            slot.name, ranked([(s.score, s.tokens) for s in scores], top_n), total_tokens, trace.trace_id
        )

    async def _score(
        self, slot: str, max_model_len: int, query: str, documents: list[str], request_id: str, deadline: float | None
    ) -> list[PairScore]:
        """Admit the pairs, then score them on the slot's engine as one batch."""
        work = Work(len(documents), pair_tokens(query, documents, max_model_len))  # known before the engine
        async with admitted_engine(self._registry, self._admission, slot, work, deadline) as (engine, admission):
            if not isinstance(engine, Reranker):
                raise InvalidRequest(f"model {slot!r} cannot rerank", param="model")
            if admission is not None:
                admission.start(work, engine.capacity(), deadline)
            return await engine.rerank(request_id, query, documents)


def pair_tokens(query: str, documents: list[str], max_model_len: int) -> int:
    """An upper bound of the tokens of every (query, document) pair, before the engine tokenizes
    them: a byte-level tokenizer's token is at least one byte, plus a few special tokens; a pair
    longer than the context is refused by the engine anyway."""
    query_bytes = len(query.encode())
    return sum(min(max_model_len, query_bytes + len(d.encode()) + PAIR_SPECIAL_TOKENS) for d in documents)
