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


def _measured(service: ServiceProcess, path: str, body: dict[str, Any], slot: str) -> None:
    """Finish a request of `body` on the slot, so that its drain rate is measured."""
    done = httpx.post(service.base_url + path, json=body, headers=NO_CACHE, timeout=300)
    assert done.status_code == 200, done.text
    figures = _figures(service, slot)
    assert figures["drain_tokens_per_second"], figures


@pytest.mark.parametrize(("slot", "path"), [("embedding", "/v1/embeddings"), ("rerank", "/v1/rerank")])
def test_past_the_bound_429_past_the_deadline_504(retrieval_service: ServiceProcess, slot: str, path: str) -> None:
    body = _embedding_body(retrieval_service) if slot == "embedding" else _rerank_body(retrieval_service)
    _measured(retrieval_service, path, body, slot)
    # Two requests of 32 inputs hold the engine while the second arrives (one runs, one waits: many
    # times what the second takes to arrive, on any machine).
    field = "input" if slot == "embedding" else "documents"
    holding = {**body, field: [f"{i} {TEXT}" for i in range(32)]}

    async def run() -> tuple[list[httpx.Response], httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=retrieval_service.base_url, timeout=600) as http:
            first = [asyncio.create_task(http.post(path, json=holding, headers=NO_CACHE)) for _ in range(2)]
            figures: dict[str, Any] = {"running": 0}
            while not figures["running"] or not figures["waiting"]:  # one runs, one queues behind it
                figures = (await http.get("/health")).json()["admission"][slot]
                if all(task.done() for task in first):
                    pytest.fail(f"the two holders ended before they were seen queued: {figures}")
                await asyncio.sleep(0.01)
            # The second (more than the engine holds) starts only once the held work beyond the engine's
            # KV cache has drained: at least (held - kv + 1.1 kv) / rate seconds. Its deadline is a
            # quarter of the least of that (one of the two holders may have ended since the figures),
            # whatever this machine's measured rate: 429 now, not a wait, whichever machine runs it.
            least_wait = (figures["held_tokens"] / 2 + 0.1 * figures["kv_cache_tokens"]) / figures[
                "drain_tokens_per_second"]
            timeout = least_wait / 4
            started = time.monotonic()
            second = await http.post(path, json=body, headers={**NO_CACHE, "X-Request-Timeout": f"{timeout:.3f}"})
            refused_in = time.monotonic() - started
            return list(await asyncio.gather(*first)), second, refused_in, timeout

    holders, second, refused_in, timeout = asyncio.run(run())
    assert [r.status_code for r in holders] == [200] * 2, [r.text for r in holders]
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "overloaded" and int(second.headers["retry-after"]) >= 1
    print(f"\n{slot}: {len(body.get('input') or body['documents'])} inputs a request; the second refused in "
          f"{refused_in * 1000:.0f} ms (its timeout {timeout:.2f} s), Retry-After {second.headers['retry-after']} s")
    late = httpx.post(retrieval_service.base_url + path, json=body, headers={**NO_CACHE, "X-Request-Timeout": "0.05"},
                      timeout=300)
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout", late.text
    text = httpx.get(retrieval_service.base_url + "/metrics", timeout=30).text
    assert metric(text, "llm_requests_refused_total", model=slot, reason="queue") >= 1
    assert metric(text, "llm_requests_timed_out_total", model=slot) >= 1
    figures = _figures(retrieval_service, slot)
    assert figures["waiting"] == 0 and figures["running"] == 0
