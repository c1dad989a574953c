"""Embeddings and rerank on the real engines: past what the slot holds and can drain before the
deadline they get 429 at once, past their deadline 504 (the shared retrieval service, defaults)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
import pytest

from tests.metrics_text import metric

from .conftest import ServiceProcess

TEXT = "Paris is the capital and largest city of France. " * 20  # about 200 tokens, under the 256 context
NO_CACHE = {"Cache-Control": "no-cache"}


def _figures(service: ServiceProcess, slot: str) -> dict[str, Any]:
    figures: dict[str, Any] = httpx.get(service.base_url + "/health", timeout=30).json()["admission"][slot]
    return figures


def _embedding_body(service: ServiceProcess) -> dict[str, Any]:
    """Inputs worth more than the embedding engine's whole KV cache (at most 128, the fixture's limit)."""
    one = httpx.post(service.base_url + "/v1/embeddings", json={"model": "embedding", "input": [TEXT]},
                     headers=NO_CACHE, timeout=300)
    assert one.status_code == 200, one.text
    per_input = one.json()["usage"]["prompt_tokens"]
    kv = _figures(service, "embedding")["kv_cache_tokens"]
    count = math.ceil(1.1 * kv / per_input)
    if count > 128:
        pytest.skip(f"the embedding engine holds {kv} tokens: more than 128 inputs of {per_input}")
    return {"model": "embedding", "input": [f"{i} {TEXT}" for i in range(count)]}


def _rerank_body(service: ServiceProcess) -> dict[str, Any]:
    """Pairs worth more than the rerank engine's whole KV cache (admission counts a pair's bytes, at
    most the 256-token context; at most 64 documents, the fixture's limit)."""
    kv = _figures(service, "rerank")["kv_cache_tokens"]
    count = math.ceil(1.1 * kv / 256)
    if count > 64:
        pytest.skip(f"the rerank engine holds {kv} tokens: more than 64 pairs of 256")
    return {"model": "rerank", "query": "What is the capital of France?",
            "documents": [f"{i} {TEXT}" for i in range(count)]}


@pytest.mark.parametrize(("slot", "path"), [("embedding", "/v1/embeddings"), ("rerank", "/v1/rerank")])
def test_past_the_bound_429_past_the_deadline_504(retrieval_service: ServiceProcess, slot: str, path: str) -> None:
    body = _embedding_body(retrieval_service) if slot == "embedding" else _rerank_body(retrieval_service)
    # The first request holds the engine while the second arrives: the most inputs the fixture allows,
    # so that it still runs when the second is admitted (MiniLM embeds nine pairs in a fraction of a second).
    field, most = ("input", 128) if slot == "embedding" else ("documents", 64)
    holding = {**body, field: [f"{i} {TEXT}" for i in range(most)]}

    async def run() -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=retrieval_service.base_url, timeout=600) as http:
            first = asyncio.create_task(http.post(path, json=holding, headers=NO_CACHE))
            seen_running = 0
            while not seen_running:  # the first holds the engine
                seen_running = (await http.get("/health")).json()["admission"][slot]["running"]
                await asyncio.sleep(0.01)
            started = time.monotonic()
            second = await http.post(path, json=body, headers={**NO_CACHE, "X-Request-Timeout": "5"})
            refused_in = time.monotonic() - started
            return await first, second, refused_in

    first, second, refused_in = asyncio.run(run())
    assert first.status_code == 200, first.text
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "overloaded" and int(second.headers["retry-after"]) >= 1
    print(f"\n{slot}: {len(body.get('input') or body['documents'])} inputs a request; the second refused in "
          f"{refused_in * 1000:.0f} ms, Retry-After {second.headers['retry-after']} s")
    late = httpx.post(retrieval_service.base_url + path, json=body, headers={**NO_CACHE, "X-Request-Timeout": "0.05"},
                      timeout=300)
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout", late.text
    text = httpx.get(retrieval_service.base_url + "/metrics", timeout=30).text
    assert metric(text, "llm_requests_refused_total", model=slot, reason="queue") >= 1
    assert metric(text, "llm_requests_timed_out_total", model=slot) >= 1
    figures = _figures(retrieval_service, slot)
    assert figures["waiting"] == 0 and figures["running"] == 0
