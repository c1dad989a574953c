"""Embeddings and rerank go through admission (429 past a bound) and honour request deadlines (504)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.metrics_text import metric

from .app_client import app_client

RETRIEVAL = {
    "model_embedding": "fake/embedding", "memory_share_embedding": 0.2, "max_model_len_embedding": 64,
    "model_rerank": "fake/rerank", "memory_share_rerank": 0.2, "max_model_len_rerank": 64,
    "preload_models": "embedding,rerank",
}
CALLS = {
    "embedding": ("/v1/embeddings", {"model": "embedding", "input": ["some text"]}),
    "rerank": ("/v1/rerank", {"model": "rerank", "query": "capital of france", "documents": ["paris"]}),
}


async def _post(client: Any, slot: str, i: int, **headers: str) -> Any:
    path, body = CALLS[slot]
    if slot == "embedding":
        body = {**body, "input": [f"text number {i}"]}
    return await client.post(path, json=body, headers={"Cache-Control": "no-cache", **headers})


@pytest.mark.parametrize("slot", ["embedding", "rerank"])
async def test_past_the_bound_429_and_health_shows_them(slot: str) -> None:
    async with app_client(engine={"token_delay": 0.3}, max_pending_per_slot=2, **RETRIEVAL) as (client, _):
        tasks = [asyncio.create_task(_post(client, slot, i)) for i in range(6)]
        await asyncio.sleep(0.1)
        admission = (await client.get("/health")).json()["admission"][slot]
        assert admission["running"] + admission["waiting"] == 2
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_running", model=slot) == 2
        statuses = sorted(r.status_code for r in await asyncio.gather(*tasks))
        assert statuses == [200, 200, 429, 429, 429, 429]
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_refused_total", model=slot, reason="slot") == 4
        assert metric(text, "llm_requests_running", model=slot) == 0


@pytest.mark.parametrize("slot", ["embedding", "rerank"])
async def test_past_the_deadline_504(slot: str) -> None:
    async with app_client(engine={"token_delay": 0.5}, **RETRIEVAL) as (client, _):
        r = await _post(client, slot, 0, **{"X-Request-Timeout": "0.1"})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_timed_out_total", model=slot) == 1
        assert metric(text, "llm_requests_running", model=slot) == 0
        assert (await _post(client, slot, 1)).status_code == 200
