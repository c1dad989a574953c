"""The fast path: memory-tier hits and admission's refusals answered before the routes, the same as the routes."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from llm_service.api.fast_path import ArrivalGate
from llm_service.config.settings import LLMSettings
from llm_service.serving.generation import GenerationService

from .app_client import app_client
from .test_api import metric
from .test_cache_local import GREEDY, replica
from .test_cache_redis import RedisProcess, eventually, keys, redis_process, store

__all__ = ["redis_process", "store"]

CHAT = {"model": "standard", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0}


@pytest.fixture
def gate_arrivals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per arrival the fast path's gate counted (requests admission decided on)."""
    counted: list[int] = []
    arrived = ArrivalGate.arrived

    def counting(self: ArrivalGate) -> None:
        counted.append(1)
        arrived(self)

    monkeypatch.setattr(ArrivalGate, "arrived", counting)
    return counted


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The generations the routes opened (`complete` opens one too): the fast path opens none."""
    calls: list[str] = []
    open_ = GenerationService.open

    async def counted_open(self: GenerationService, spec: Any) -> Any:
        calls.append("open")
        return await open_(self, spec)

    monkeypatch.setattr(GenerationService, "open", counted_open)
    yield calls


async def stored(client: httpx.AsyncClient, resources: Any, path: str, body: dict[str, Any],
                 store: redis.Redis) -> httpx.Response:
    """Send `body` once (a miss) and wait until its entry is in both tiers."""
    first = await client.post(path, json=body)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS", first.text
    assert await eventually(lambda: keys(store))
    assert await eventually(lambda: not resources.generation.coalescer.in_flight())
    return first


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    """The body without what differs between two answers of one request (ids, times)."""
    return {k: v for k, v in body.items() if k not in {"id", "timings", "created", "cached"}}


async def test_a_memory_hit_is_answered_before_the_route_with_the_routes_body(
    redis_process: RedisProcess, store: redis.Redis, route_calls: list[str], gate_arrivals: list[int]
) -> None:
    async with replica(redis_process) as (client, resources):
        for path, body in (("/generate", GREEDY), ("/v1/chat/completions", CHAT)):
            store.flushdb()
            resources.cache.local.clear()
            first = await stored(client, resources, path, body, store)
            route_calls.clear()
            hit = await client.post(path, json=body, headers={"X-Request-ID": "hit-1"})
            assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT-MEMORY"
            assert route_calls == [], f"{path}: the route served the hit"
            assert hit.headers["x-request-id"] == "hit-1"
            assert without_volatile(hit.json()) == without_volatile(first.json())
            assert hit.json()["id"].endswith("hit-1")
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_cache_hits_total", model="standard") == 2
        assert metric(text, "llm_cache_local_hits_total", model="standard") == 2
        assert metric(text, "llm_requests_total", model="standard", status="success", code="200") == 4
        assert gate_arrivals == []  # hits (and cacheable misses) never hold an admitted request back


async def test_cache_controls_and_streams_go_to_the_route(
    redis_process: RedisProcess, store: redis.Redis, route_calls: list[str]
) -> None:
    async with replica(redis_process) as (client, resources):
        await stored(client, resources, "/generate", GREEDY, store)
        route_calls.clear()
        r = await client.post("/generate", json=GREEDY, headers={"Cache-Control": "no-cache"})
        assert r.headers["x-cache"] == "MISS" and route_calls == ["open"]
        await eventually(lambda: not resources.generation.coalescer.in_flight())
        route_calls.clear()
        r = await client.post("/generate", json={**GREEDY, "cache": {"use_cache": False}})
        assert r.headers["x-cache"] == "MISS" and route_calls == ["open"]
        route_calls.clear()
        r = await client.post("/generate", json={**GREEDY, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-cache"] == "HIT-MEMORY" and route_calls == ["open"]
        # Malformed input gets the route's own 400, not an answer from the fast path.
        route_calls.clear()
        r = await client.post("/generate", json={**GREEDY, "temperature": "hot"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = await client.post("/generate", json=GREEDY, headers={"X-Request-Timeout": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"


async def test_a_hit_needs_the_api_key(redis_process: RedisProcess, store: redis.Redis,
                                       monkeypatch: pytest.MonkeyPatch, route_calls: list[str]) -> None:
    monkeypatch.setattr(LLMSettings, "api_key_set", lambda self: frozenset({"k-123"}))
    async with replica(redis_process) as (client, resources):
        assert (await client.post("/generate", json=GREEDY)).status_code == 401
        key = {"Authorization": "Bearer k-123"}
        first = await client.post("/generate", json=GREEDY, headers=key)
        assert first.status_code == 200
        assert await eventually(lambda: keys(store))
        await eventually(lambda: not resources.generation.coalescer.in_flight())
        r = await client.post("/generate", json=GREEDY)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        r = await client.post("/generate", json=GREEDY, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        route_calls.clear()
        for headers in (key, {"x-api-key": "k-123"}):
            r = await client.post("/generate", json=GREEDY, headers=headers)
            assert r.headers["x-cache"] == "HIT-MEMORY"
        assert route_calls == []


async def test_admissions_refusal_is_answered_before_the_route(
    route_calls: list[str], gate_arrivals: list[int]
) -> None:
    async with app_client(engine={"token_delay": 0.2}, max_pending_per_slot=1) as (client, _):
        busy = asyncio.create_task(client.post("/generate", json={"prompt": "a b c d"}))
        assert await eventually(lambda: route_calls)
        await asyncio.sleep(0.1)
        route_calls.clear()
        for path, body in (("/generate", {"prompt": "hi"}), ("/v1/chat/completions", {**CHAT, "temperature": 1}),
                           ("/generate", {"prompt": "hi", "stream": True})):
            r = await client.post(path, json=body)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"]
            assert r.headers["x-cache"] == "MISS"
            error = r.json()["error"]
            assert error["type"] == "overloaded" and (path == "/generate" or error["code"] == "overloaded")
        assert route_calls == []
        assert (await busy).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_refused_total", model="standard", reason="slot") == 3
        assert metric(text, "llm_requests_total", model="standard", status="overloaded", code="429") == 3
        assert metric(text, "llm_requests_waiting", model="standard") == 0
        assert len(gate_arrivals) == 4  # the busy request's admission and the three refusals


async def test_a_burst_decided_before_the_routes_admits_no_more_than_the_bound(route_calls: list[str]) -> None:
    """Every request of a burst reaches the fast path before any reaches its route: what the fast
    path lets through is reserved at once, so the rest of the burst counts it."""
    async with app_client(engine={"token_delay": 0.05}, max_pending_per_slot=2) as (client, _):
        responses = await asyncio.gather(*(client.post("/generate", json={"prompt": "a b c"}) for _ in range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 2 + [429] * 8, statuses
        assert len(route_calls) == 2  # the refused never reached a route
        figures = (await client.get("/health")).json()["admission"]["standard"]
        assert figures["waiting"] == 0 and figures["running"] == 0 and figures["held_tokens"] == 0


TURNS_BETWEEN_ARRIVALS = 5


async def test_a_burst_is_decided_before_its_admitted_requests_reach_their_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a burst the refusals go first: the requests admitted to wait (the engine runs two at once)
    reach their routes only once every arrival was decided, and in the order they came."""
    opened: list[tuple[str, float]] = []
    open_ = GenerationService.open

    async def counted_open(self: GenerationService, spec: Any) -> Any:
        refused = self.metrics.requests_refused.labels(model="standard", reason="slot")._value.get()
        opened.append((spec.prompt, refused))
        return await open_(self, spec)

    monkeypatch.setattr(GenerationService, "open", counted_open)
    async with app_client(engine={"token_delay": 0.05, "max_num_seqs": 2}, max_pending_per_slot=4) as (client, _):
        tasks = []
        for i in range(12):  # one after another, a few turns of the event loop apart (a burst on the wire)
            tasks.append(asyncio.create_task(client.post("/generate", json={"prompt": f"q {i}"})))
            for _ in range(TURNS_BETWEEN_ARRIVALS):
                await asyncio.sleep(0)
        responses = await asyncio.gather(*tasks)
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 4 + [429] * 8, statuses
    assert [prompt for prompt, _ in opened] == [f"q {i}" for i in range(4)]
    assert [refused for _, refused in opened[2:]] == [8, 8], opened


async def test_a_refusal_leaves_no_garbage_cycles_behind() -> None:
    """A flood's refusals must not feed the cyclic garbage collector, whose collections pause the
    event loop every few refusals (the exception passed through an exit stack left ~95 objects in
    cycles per refusal): a 429 leaves about as few as a `/health/live` through the same client."""
    async with app_client(engine={"token_delay": 0.5}, max_pending_per_slot=1) as (client, _):
        busy = asyncio.create_task(client.post("/generate", json={"prompt": "a b c d"}))
        await asyncio.sleep(0.1)

        async def cycles_left(path: str, body: dict[str, Any] | None) -> int:
            gc.collect()
            gc.disable()
            try:
                for _ in range(20):
                    r = await (client.get(path) if body is None else client.post(path, json=body))
                    assert r.status_code == (200 if body is None else 429), r.text
                return gc.collect()
            finally:
                gc.enable()

        await cycles_left("/generate", {"prompt": "hi"})  # first-use caches
        baseline = await cycles_left("/health/live", None)
        refused = await cycles_left("/generate", {"prompt": "hi"})
        assert refused - baseline < 20 * 10, (refused, baseline)  # ~4 a request; it was ~95
        assert (await busy).status_code == 200
