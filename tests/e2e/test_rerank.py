"""/v1/rerank and /rerank on the real engine: all-MiniLM-L6-v2 (the demo) behind vLLM's pooling runner
as a bi-encoder (a pair's score is the cosine of the query's and the document's embeddings), in the
retrieval service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.metrics_text import metric

from .conftest import ServiceProcess
from .test_embeddings import ANSWER, FACTS, QUESTION

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Bananas are yellow when they are ripe.",
    "The Eiffel Tower is in Paris.",
    "Berlin is the capital of Germany.",
    "France borders Spain, Italy and Germany.",
]


@pytest.fixture(scope="module")
def http(retrieval_service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=retrieval_service.base_url, timeout=300) as client:
        yield client


def rerank(http: httpx.Client, status: int = 200, path: str = "/v1/rerank", **body: Any) -> dict[str, Any]:
    r = http.post(path, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS, **body})
    assert r.status_code == status, r.text
    result: dict[str, Any] = r.json()
    return result


def test_shape_and_order_consistent_with_scores(http: httpx.Client) -> None:
    body = rerank(http)
    assert body["model"] == "rerank" and body["id"]
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)  # cosine similarities
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > len(DOCUMENTS) * 10


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_the_question_ranks_its_fact_first(http: httpx.Client, path: str) -> None:
    results = rerank(http, path=path, query=QUESTION, documents=FACTS)["results"]
    assert results[0]["index"] == ANSWER, [r["document"]["text"] for r in results[:3]]
    # The same cosine as /v1/embeddings' vectors give (0.86): vLLM's bi-encoder scoring of the embeddings.
    assert results[0]["relevance_score"] == pytest.approx(0.86, abs=0.01)
    assert results[1]["relevance_score"] < 0.3


def test_batch_scores_equal_single_scores_and_both_paths_agree(http: httpx.Client) -> None:
    batch = {r["index"]: r["relevance_score"] for r in rerank(http)["results"]}
    for index in (0, 3):
        single = rerank(http, documents=[DOCUMENTS[index]], path="/rerank")["results"][0]
        assert single["index"] == 0 and single["relevance_score"] == pytest.approx(batch[index], abs=2e-2)


def test_top_n_and_return_documents(http: httpx.Client) -> None:
    full = rerank(http)["results"]
    top = rerank(http, top_n=2, return_documents=False)["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert all(r["document"] is None for r in top)


def test_errors(http: httpx.Client, retrieval_service: ServiceProcess) -> None:
    assert "empty" in rerank(http, 400, query="")["error"]["message"]
    assert "empty" in rerank(http, 400, documents=[])["error"]["message"]
    assert "at most 64" in rerank(http, 400, documents=["d"] * 65)["error"]["message"]
    too_long = rerank(http, 400, documents=["short", "word " * 600])["error"]
    assert "document 1" in too_long["message"] and "256" in too_long["message"]
    assert rerank(http, 400, model="embedding")["error"]["param"] == "model"
    assert rerank(http, 404, model="no-such-model")["error"]["type"] == "model_not_found"
    embed = http.post("/v1/embeddings", json={"model": "rerank", "input": "x"})
    assert embed.status_code == 400 and "rerank model" in embed.json()["error"]["message"]
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["rerank"]["kind"] == "rerank" and models["rerank"]["state"] == "loaded"
    health = http.get("/health").json()["dependencies"]["models"]
    assert health["rerank"]["kind"] == "rerank" and health["embedding"]["kind"] == "embedding"


def test_metrics_and_request_counts(http: httpx.Client) -> None:
    def read() -> tuple[float, float, float, float]:
        text = http.get("/metrics").text
        return (
            metric(text, "llm_rerank_documents_total", model="rerank"),
            metric(text, "llm_rerank_duration_seconds_count", model="rerank"),
            metric(text, "llm_requests_total", model="rerank", status="success", code="200"),
            metric(text, "llm_requests_total", model="embedding", status="success", code="200"),
        )

    before = read()
    rerank(http, documents=DOCUMENTS[:3])
    http.post("/v1/embeddings", json={"model": "embedding", "input": f"count me {time.monotonic_ns()}"})
    after = read()
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 1, 1, 1]


def test_throughput(http: httpx.Client) -> None:
    """Documents/s for a query with 1 and 32 documents; printed with -s, never asserted."""
    documents = [f"passage {i}: {DOCUMENTS[i % len(DOCUMENTS)]}" for i in range(32)]
    rates = {}
    for n in (1, 32):
        rerank(http, documents=documents[:n])  # warm-up
        started = time.perf_counter()
        rounds = 3
        for _ in range(rounds):
            rerank(http, documents=documents[:n])
        rates[n] = rounds * n / (time.perf_counter() - started)
    print(f"\nrerank documents/s: 1 document {rates[1]:.1f}, 32 documents {rates[32]:.1f}")
