"""The Redis response cache and coalescing on the real engine, the demo model and a real redis-server."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from .conftest import RedisServer, wait_for
from .test_generate import metric

NAMESPACE = "llm-service"


def question() -> list[dict[str, str]]:
    """A question no other test asked: its first request is a miss."""
    return [{"role": "user", "content": f"Name a colour. ({uuid.uuid4().hex[:8]})"}]


def greedy(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"messages": messages, "temperature": 0, "max_tokens": 12, **extra}


def post(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    r = client.post("/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r


def stream(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        return r.headers, events


def engine_runs(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "llm_engine_generations_total", model="standard")


def counter(client: httpx.Client, name: str, **labels: str) -> float:
    return metric(client.get("/metrics").text, name, **labels)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    yield client
    client.close()


def keys(store: redis.Redis) -> set[str]:
    return {k.decode() for k in store.keys(f"{NAMESPACE}:*")}


def new_key(store: redis.Redis, before: set[str]) -> str:
    """The one key written since `before` (an entry is written right after its response)."""
    wait_for(lambda: keys(store) - before, 30, "the cache entry")
    (key,) = keys(store) - before
    return key


def test_miss_then_hit(client: httpx.Client, store: redis.Redis) -> None:
    body = greedy(question())
    runs, hits = engine_runs(client), counter(client, "llm_cache_hits_total", model="standard")
    before = keys(store)
    miss = post(client, body)
    assert miss.headers["x-cache"] == "MISS" and miss.json()["cached"] is False
    key = new_key(store, before)
    assert key.startswith(f"{NAMESPACE}:response:v1:standard:")
    hit = post(client, body)
    assert hit.headers["x-cache"].startswith("HIT-") and hit.json()["cached"] is True
    a, b = miss.json(), hit.json()
    assert a["text"] == b["text"] and a["text"]
    assert a["usage"] == b["usage"] and a["finish_reason"] == b["finish_reason"]
    assert engine_runs(client) == runs + 1
    assert counter(client, "llm_cache_hits_total", model="standard") == hits + 1
    assert hit.headers["x-trace-id"] and hit.headers["x-trace-id"] != miss.headers["x-trace-id"]


@pytest.mark.parametrize("change", [{"max_tokens": 11}, {"seed": 5}, {"stop": ["."]}, {"top_k": 4}])
def test_a_changed_parameter_misses(client: httpx.Client, change: dict[str, Any]) -> None:
    messages = question()
    post(client, greedy(messages))
    assert post(client, greedy(messages)).headers["x-cache"].startswith("HIT-")
    runs = engine_runs(client)
    assert post(client, greedy(messages, **change)).headers["x-cache"] == "MISS"
    assert engine_runs(client) == runs + 1
    assert post(client, greedy(messages, **change)).headers["x-cache"].startswith("HIT-")


def test_a_changed_question_misses(client: httpx.Client) -> None:
    post(client, greedy(question()))
    assert post(client, greedy(question())).headers["x-cache"] == "MISS"


def test_a_streamed_request_is_answered_from_the_cache_as_a_stream(client: httpx.Client) -> None:
    body = greedy(question())
    plain = post(client, body).json()
    headers, events = stream(client, body)
    assert headers["x-cache"].startswith("HIT-")
    assert "".join(e["text"] for e in events if e["type"] == "delta") == plain["text"]
    assert events[-1]["type"] == "done" and events[-1]["cached"] is True
    assert events[-1]["usage"] == plain["usage"]
    # A streamed miss stores its result too.
    other = greedy(question())
    headers, events = stream(client, other)
    assert headers["x-cache"] == "MISS" and events[-1]["cached"] is False
    again = post(client, other)
    assert again.headers["x-cache"].startswith("HIT-")
    assert again.json()["text"] == "".join(e["text"] for e in events if e["type"] == "delta")


def test_non_reproducible_requests_bypass_the_cache(client: httpx.Client, store: redis.Redis) -> None:
    body = {"messages": question(), "temperature": 0.9, "max_tokens": 8}
    runs = engine_runs(client)
    assert post(client, body).headers["x-cache"] == "MISS"
    assert post(client, body).headers["x-cache"] == "MISS"
    assert engine_runs(client) == runs + 2
    forced = {**body, "cache": {"use_cache": True}}
    post(client, forced)
    assert post(client, forced).headers["x-cache"].startswith("HIT-")


def test_no_cache_skips_the_read(client: httpx.Client) -> None:
    body = greedy(question())
    post(client, body)
    runs = engine_runs(client)
    assert post(client, body, **{"Cache-Control": "no-cache"}).headers["x-cache"] == "MISS"
    assert post(client, {**body, "cache": {"no_cache": True}}).headers["x-cache"] == "MISS"
    assert engine_runs(client) == runs + 2
    assert post(client, body).headers["x-cache"].startswith("HIT-")


def test_no_store_skips_the_write(client: httpx.Client, store: redis.Redis) -> None:
    body = greedy(question())
    before = keys(store)
    assert post(client, body, **{"Cache-Control": "no-store"}).headers["x-cache"] == "MISS"
    assert post(client, {**body, "cache": {"no_store": True}}).headers["x-cache"] == "MISS"
    # A normal request for the same question is still a miss: nothing was stored.
    assert post(client, body).headers["x-cache"] == "MISS"
    new_key(store, before)  # exactly one entry: the normal request's


@pytest.mark.parametrize(
    ("extra", "headers", "ttl"),
    [({}, {"Cache-Control": "max-age=30"}, 30), ({"cache": {"ttl": 20}}, {}, 20), ({}, {}, 3600)],
)
def test_ttl(client: httpx.Client, store: redis.Redis, extra: dict, headers: dict, ttl: int) -> None:
    before = keys(store)
    post(client, greedy(question(), **extra), **headers)
    remaining = store.pttl(new_key(store, before))
    # Bounds that tell the three TTLs apart, nothing tighter.
    assert (100_000 if ttl > 100 else 0) < remaining <= ttl * 1000


def test_an_expired_entry_misses(client: httpx.Client, store: redis.Redis) -> None:
    body = greedy(question())
    before = keys(store)
    post(client, body, **{"Cache-Control": "max-age=1"})
    key = new_key(store, before)
    wait_for(lambda: not store.exists(key), 30, "the entry to expire")
    assert post(client, body).headers["x-cache"] == "MISS"


def test_the_openai_surface_is_cached_too(client: httpx.Client) -> None:
    body = {"model": "standard", "messages": question(), "temperature": 0, "max_tokens": 12}
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"].startswith("HIT-")
    texts = [r.json()["choices"][0]["message"]["content"] for r in (first, second)]
    assert texts[0] == texts[1]


def test_identical_concurrent_requests_cost_one_generation(client: httpx.Client, service: Any) -> None:
    n = 6
    body = greedy(question(), max_tokens=24)
    runs = engine_runs(client)
    coalesced = counter(client, "llm_cache_coalesced_total", model="standard")
    hits = counter(client, "llm_cache_hits_total", model="standard")
    start = threading.Barrier(n)

    def one(i: int) -> tuple[str, str, bool]:
        """The text, X-Cache, and whether the body said it was coalesced."""
        with httpx.Client(base_url=service.base_url, timeout=300) as own:
            start.wait()
            if i % 2:
                headers, events = stream(own, body)
                done = events[-1]
                return "".join(e["text"] for e in events if e["type"] == "delta"), headers["x-cache"], done["coalesced"]
            r = post(own, body)
            return str(r.json()["text"]), r.headers["x-cache"], r.json()["coalesced"]

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    texts = [text for text, _, _ in answers]
    assert len(set(texts)) == 1 and texts[0]
    assert engine_runs(client) == runs + 1
    shared = counter(client, "llm_cache_coalesced_total", model="standard") - coalesced
    late = counter(client, "llm_cache_hits_total", model="standard") - hits
    assert shared + late == n - 1 and shared >= 1
    # Each request that shared the generation says so, in the header and in the body.
    assert [x_cache for _, x_cache, _ in answers].count("COALESCED") == shared
    assert all((x_cache == "COALESCED") == said for _, x_cache, said in answers)


def test_redis_dying_under_load_fails_no_request(
    client: httpx.Client, service: Any, redis_server: RedisServer
) -> None:
    """Kill redis-server while requests run: nothing fails, /health says degraded; start it
    again: hits resume. Runs last in this module: it leaves Redis running but empty."""
    repeated = greedy(question(), max_tokens=6)
    post(client, repeated)
    failures: list[str] = []
    done = threading.Event()
    completed = [0]

    def worker(i: int) -> None:
        with httpx.Client(base_url=service.base_url, timeout=300) as own:
            while not done.is_set():
                body = repeated if i % 2 else greedy(question(), max_tokens=4)
                r = own.post("/generate", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                completed[0] += 1

    def after(extra: int) -> Callable[[], bool]:
        target = completed[0] + extra
        return lambda: completed[0] >= target

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(after(4), 120, "requests before the fault")
        redis_server.stop()
        wait_for(after(8), 300, "requests while Redis is down")
        health = client.get("/health").json()
        assert health["status"] == "degraded", health
        assert health["dependencies"]["redis"]["status"] == "down"
        assert counter(client, "llm_cache_errors_total", operation="get") > 0
    finally:
        if redis_server.process is None:
            redis_server.start()
    wait_for(after(4), 300, "requests after the restart")
    done.set()
    for t in threads:
        t.join(300)
    assert failures == []
    # Once the breaker lets a probe through, entries are stored and served again.
    wait_for(lambda: post(client, repeated).headers["x-cache"].startswith("HIT-"), 120, "a hit after the restart", 0.5)
    # A hit from the in-process tier needs no Redis call: the breaker closes on its next probe.
    wait_for(lambda: client.get("/health").json()["dependencies"]["redis"]["status"] == "up", 60, "Redis up", 0.5)
