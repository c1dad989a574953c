"""Cache hits under `ab` (ours beside /health/live and a LiteLLM proxy) and request coalescing."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx

from bench import ab
from bench.plan import Plan

QUESTION = "Name three fruits."


def generate_body() -> dict[str, Any]:
    return {"prompt": QUESTION, "max_tokens": 16, "temperature": 0}


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}


def warm(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, str]:
    """Send `body` until it is answered from the cache; the response headers of that hit."""
    with httpx.Client(timeout=300) as client:
        for _ in range(20):
            r = client.post(url, json=body, headers=headers)
            r.raise_for_status()
            if r.headers.get("x-cache", "").startswith("HIT") or r.headers.get("x-litellm-cache-key"):
                return dict(r.headers)
            time.sleep(0.3)
    raise RuntimeError(f"{url} never answered from its cache")


def metric(text: str, name: str, model: str = "standard") -> float:
    match = re.search(rf'^{name}_total\{{model="{model}"\}} ([\d.e+]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def levels(plan: Plan, url: str, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> list[Any]:
    payload = json.dumps(body).encode() if body is not None else None
    return [ab.run(url, plan.cache_requests, c, payload, headers) for c in plan.cache_levels]


def ours(plan: Plan, base_url: str) -> dict[str, Any]:
    """Hit requests/s and latency of /generate and /v1/chat/completions, and /health/live as the floor."""
    warm(base_url + "/generate", generate_body())
    warm(base_url + "/v1/chat/completions", chat_body("standard"))
    before = httpx.get(base_url + "/metrics").text
    result: dict[str, Any] = {
        "health_live": levels(plan, base_url + "/health/live", None),
        "generate_hit": levels(plan, base_url + "/generate", generate_body()),
        "chat_hit": levels(plan, base_url + "/v1/chat/completions", chat_body("standard")),
    }
    after = httpx.get(base_url + "/metrics").text
    hits = metric(after, "llm_cache_hits") - metric(before, "llm_cache_hits")
    runs = metric(after, "llm_engine_generations") - metric(before, "llm_engine_generations")
    result["counted"] = {"cache_hits": hits, "engine_generations": runs}
    return result


def litellm(plan: Plan, base_url: str, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    body = chat_body("demo")
    warm(base_url + "/v1/chat/completions", body, headers)
    return {"chat_hit": levels(plan, base_url + "/v1/chat/completions", body, headers)}


async def _coalesce(base_url: str, n: int) -> dict[str, Any]:
    body = {"prompt": f"Coalesced question {time.time_ns()}: name a colour.", "max_tokens": 32, "temperature": 0}
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        before = (await client.get("/metrics")).text
        began = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(n)))
        wall = time.perf_counter() - began
        after = (await client.get("/metrics")).text
        began = time.perf_counter()
        alone = await client.post("/generate", json=body, headers={"Cache-Control": "no-cache, no-store"})
        single = time.perf_counter() - began
    texts = {r.json().get("text") for r in responses if r.status_code == 200}
    return {
        "requests": n,
        "ok": sum(r.status_code == 200 for r in responses),
        "distinct_texts": len(texts),
        "same_as_uncached": alone.json().get("text") in texts,
        "engine_generations": metric(after, "llm_engine_generations") - metric(before, "llm_engine_generations"),
        "coalesced": metric(after, "llm_cache_coalesced") - metric(before, "llm_cache_coalesced"),
        "wall_seconds": round(wall, 3),
        "one_uncached_request_seconds": round(single, 3),
    }


def coalescing(plan: Plan, base_url: str) -> dict[str, Any]:
    """N identical requests at once: the engine generations they cost, counted from /metrics."""
    return asyncio.run(_coalesce(base_url, plan.coalesce_requests))
