"""Head-of-line blocking (streams on one slot while long prompts arrive on another) and slot swaps."""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from typing import Any

import httpx

from bench.plan import Plan


def spread(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max in milliseconds."""
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def _stream(client: httpx.AsyncClient, tokens: int, index: int) -> list[float]:
    """Inter-chunk gaps of one streamed completion on `standard`."""
    body = {
        "model": "standard", "prompt": f"Stream {index}: count slowly.", "max_tokens": tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    gaps: list[float] = []
    last: float | None = None
    headers = {"Cache-Control": "no-cache, no-store"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not json.loads(line[6:]).get("choices"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return gaps


async def _probe(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    """/health/live latencies every 50 ms: how long the event loop leaves a request waiting."""
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        await client.get("/health/live")
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.05)
    return latencies


def rag_prompt(rng: random.Random, words: int = 3000) -> str:
    vocabulary = ("river", "stone", "paper", "market", "engine", "garden", "signal", "winter", "letter", "orbit")
    return "Context: " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "\nQuestion: which word is first?"


async def _phase(base_url: str, plan: Plan, with_rag: bool) -> dict[str, Any]:
    rng = random.Random(f"hol-{with_rag}")
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(client, stop))
        streams = [asyncio.create_task(_stream(client, plan.hol_stream_tokens, i)) for i in range(plan.hol_streams)]
        rag_seconds: list[float] = []
        if with_rag:
            await asyncio.sleep(0.5)  # the streams are decoding when the long prompts arrive

            async def rag(i: int) -> None:
                body = {"model": "longctx", "prompt": rag_prompt(rng), "max_tokens": 8, "temperature": 0}
                began = time.perf_counter()
                r = await client.post("/v1/completions", json=body, headers={"Cache-Control": "no-cache, no-store"})
                r.raise_for_status()
                rag_seconds.append(time.perf_counter() - began)

            await asyncio.gather(*(rag(i) for i in range(plan.hol_rag_prompts)))
        gaps = [g for gaps in await asyncio.gather(*streams) for g in gaps]
        stop.set()
        probes = await probe
    return {
        "stream_itl": spread(gaps),
        "health_live": spread(probes),
        "rag_requests": len(rag_seconds),
        "rag_e2e": spread(rag_seconds),
    }


def head_of_line(plan: Plan, base_url: str) -> dict[str, Any]:
    """Streams on `standard` alone, then again while RAG-sized prompts arrive on `longctx`."""
    return {
        "streams": plan.hol_streams,
        "rag_prompts": plan.hol_rag_prompts,
        "alone": asyncio.run(_phase(base_url, plan, with_rag=False)),
        "with_rag": asyncio.run(_phase(base_url, plan, with_rag=True)),
    }


def _histogram(text: str, name: str) -> tuple[float, float]:
    total = count = 0.0
    for suffix in ("sum", "count"):
        for match in re.finditer(rf"^{name}_{suffix}\{{[^}}]*\}} ([\d.e+]+)$", text, re.MULTILINE):
            if suffix == "sum":
                total += float(match.group(1))
            else:
                count += float(match.group(1))
    return total, count


def swaps(plan: Plan, base_url: str) -> dict[str, Any]:
    """Requests alternating between standard and longctx when the budget holds one engine:
    the first loads from nothing (a lazy load), every later one swaps."""
    order = ["standard", "longctx"] * (plan.swap_requests // 2 + 1)
    requests = []
    with httpx.Client(base_url=base_url, timeout=900) as client:
        for slot in order[: plan.swap_requests + 1]:
            body = {"model": slot, "prompt": "Say hello.", "max_tokens": 8, "temperature": 0}
            began = time.perf_counter()
            r = client.post("/v1/completions", json=body, headers={"Cache-Control": "no-cache, no-store"})
            requests.append({"slot": slot, "status": r.status_code, "seconds": round(time.perf_counter() - began, 2)})
        metrics = client.get("/metrics").text
    load_sum, load_count = _histogram(metrics, "llm_model_load_duration_seconds")
    evictions = sum(float(m) for m in re.findall(r'^llm_model_evictions_total\{[^}]*\} ([\d.e+]+)$', metrics, re.M))
    return {
        "lazy_load_request_seconds": requests[0]["seconds"],
        "swap_request_seconds": [r["seconds"] for r in requests[1:]],
        "requests": requests,
        "engine_loads": load_count,
        "mean_load_seconds": round(load_sum / load_count, 2) if load_count else None,
        "evictions": evictions,
    }
