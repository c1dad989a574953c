"""The in-process cache tier: its bounds and expiry, and two replicas (apps) sharing one real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import redis
from pydantic import SecretStr

from llm_service.app import EngineBackend, create_app
from llm_service.cache.local import MEMORY, LocalTier
from llm_service.cache.store import CachedChoice, CachedResponse
from llm_service.config.settings import AppSettings, RedisSettings
from llm_service.engines.base import EngineConfig
from llm_service.observability.metrics import Metrics

from .conftest import GIB, FakeFactory, fake_settings
from .test_api import metric
from .test_cache import Clock
from .test_cache_redis import CAPITAL, RedisProcess, eventually, keys, redis_process, store

__all__ = ["redis_process", "store"]  # the fixtures, shared with test_cache_redis

ADMIN = {"Authorization": "Bearer s3cret"}
GREEDY = {"messages": CAPITAL, "temperature": 0}


def entry(text: str = "Paris.") -> CachedResponse:
    return CachedResponse("m", "p", 3, (CachedChoice(0, text, "stop", 2),), 0.0)


def test_the_tier_is_bounded_by_entries_and_bytes_least_recently_used_out_first() -> None:
    metrics = Metrics()
    tier = LocalTier(max_entries=3, max_bytes=100, metrics=metrics)
    for key in "abc":
        tier.put(key, entry(key), 10, 60, "standard")
    assert tier.get("a") is not None  # a is now the most recently used
    tier.put("d", entry("d"), 10, 60, "standard")
    assert [k for k in "abcd" if tier.get(k) is not None] == ["a", "c", "d"]
    tier.put("big", entry("big"), 85, 60, "standard")  # 30 + 85 > 100: the oldest go
    assert len(tier) == 2 and tier.bytes == 95 and tier.get("big") is not None
    tier.put("huge", entry("huge"), 101, 60, "standard")  # larger than the tier: never held
    assert tier.get("huge") is None and tier.bytes == 95
    held = tier.get("big")
    assert held is not None and held.tier == MEMORY and held == entry("big")
    text = metrics.render().decode()
    assert metric(text, "llm_cache_local_entries", model="standard") == 2
    assert metric(text, "llm_cache_local_bytes", model="standard") == 95
    assert tier.clear() == 2 and tier.bytes == 0
    assert metric(metrics.render().decode(), "llm_cache_local_entries", model="standard") == 0


def test_an_entry_lives_its_ttl() -> None:
    clock = Clock()
    tier = LocalTier(10, 1000, Metrics(), clock=clock)
    tier.put("short", entry(), 10, 5, "standard")
    tier.put("long", entry(), 10, 60, "standard")
    tier.put("none", entry(), 10, 0, "standard")  # nothing left of its TTL: not held
    clock.now += 4.9
    assert tier.get("short") is not None and tier.get("none") is None
    clock.now += 0.1
    assert tier.get("short") is None and tier.get("long") is not None
    assert len(tier) == 1 and tier.bytes == 10


@contextlib.asynccontextmanager
async def replica(
    redis_process: RedisProcess, host_args: Callable[[EngineConfig], dict[str, Any]] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """One app (a replica) on the shared redis-server, once subscribed to purges."""
    settings = fake_settings(cache_enabled=True).model_copy(
        update={
            "app": AppSettings(env="test", admin_token=SecretStr("s3cret")),
            "redis": RedisSettings(host="127.0.0.1", port=redis_process.port),
        }
    )
    backend = EngineBackend(FakeFactory(), "cpu", 8 * GIB)
    if host_args is not None:
        backend = EngineBackend(FakeFactory(), "cpu", 8 * GIB, host_args=host_args)
    app = create_app(settings, backend)
    async with app.router.lifespan_context(app):
        resources = app.state.resources
        await resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:

            async def subscribed() -> bool:
                health = await resources.cache.health()
                return bool(health["local"]["purge_subscription"] == "up")

            for _ in range(500):
                if await subscribed():
                    break
                await asyncio.sleep(0.01)
            assert await subscribed(), "the purge subscription never came up"
            yield client, resources


async def cache_of(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> str:
    r = await client.post("/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.headers["x-cache"])


async def test_two_replicas_share_redis_each_with_its_own_tier_and_a_purge_clears_both(
    redis_process: RedisProcess, store: redis.Redis
) -> None:
    async with replica(redis_process) as (a, res_a), replica(redis_process) as (b, res_b):
        assert await cache_of(a, GREEDY) == "MISS"
        assert await eventually(lambda: keys(store))
        assert await cache_of(a, GREEDY) == "HIT-MEMORY"  # filled on the write
        assert await cache_of(b, GREEDY) == "HIT-REDIS"
        assert await cache_of(b, GREEDY) == "HIT-MEMORY"  # filled on the Redis hit
        text = (await b.get("/metrics")).text
        assert metric(text, "llm_cache_local_hits_total", model="standard") == 1
        assert metric(text, "llm_cache_local_misses_total", model="standard") == 1
        assert metric(text, "llm_cache_hits_total", model="standard") == 2
        assert metric(text, "llm_cache_local_entries", model="standard") == 1
        assert metric(text, "llm_cache_local_bytes", model="standard") > 0
        assert (await b.get("/health")).json()["dependencies"]["redis"]["local"]["entries"] == 1

        purged = await a.post("/admin/cache/purge", headers=ADMIN)
        assert purged.status_code == 200 and purged.json() == {"purged": 1, "model": None}
        assert keys(store) == [] and len(res_a.cache.local) == 0
        assert await eventually(lambda: len(res_b.cache.local) == 0), "replica b kept its entries"
        assert await cache_of(b, GREEDY) == "MISS"
        assert (await a.post("/admin/cache/purge?model=nope", headers=ADMIN)).status_code == 404
        assert (await a.post("/admin/cache/purge")).status_code == 401


async def test_the_tier_honours_every_cache_control(redis_process: RedisProcess, store: redis.Redis) -> None:
    async with replica(redis_process) as (client, resources):
        tier: LocalTier = resources.cache.local
        # no-store: neither tier holds the result.
        no_store = {"prompt": "no store", "temperature": 0}
        assert await cache_of(client, no_store, **{"Cache-Control": "no-store"}) == "MISS"
        assert await cache_of(client, no_store) == "MISS"
        await eventually(lambda: len(tier) == 1)
        # no-cache: read neither tier, generate afresh (and refresh both).
        assert await cache_of(client, no_store) == "HIT-MEMORY"
        assert await cache_of(client, no_store, **{"Cache-Control": "no-cache"}) == "MISS"
        # A per-request TTL bounds the local copy as it bounds the Redis entry.
        short = {"prompt": "short-lived", "temperature": 0}
        assert await cache_of(client, short, **{"Cache-Control": "max-age=7"}) == "MISS"
        await eventually(lambda: len(tier) == 2)
        now = tier._clock()
        lives = {key: held.expires - now for key, held in tier._held.items()}
        assert sorted(round(seconds) for seconds in lives.values()) == [7, 300]  # 300: LLM_CACHE_LOCAL_MAX_AGE_SECONDS


async def test_a_replica_whose_engines_run_another_dtype_does_not_read_the_entry(
    redis_process: RedisProcess, store: redis.Redis
) -> None:
    """Issue 25: a bf16 engine's entry must not answer for a float32 one sharing the Redis."""
    float32 = replica(redis_process, host_args=lambda _: {"dtype": "float32"})
    async with replica(redis_process) as (native, _), float32 as (emulating, _):
        assert await cache_of(native, GREEDY) == "MISS"
        assert await eventually(lambda: keys(store))
        assert await cache_of(emulating, GREEDY) == "MISS"


async def test_without_the_tier_redis_answers(redis_process: RedisProcess, store: redis.Redis) -> None:
    settings = fake_settings(cache_enabled=True, cache_local_max_entries=0).model_copy(
        update={"redis": RedisSettings(host="127.0.0.1", port=redis_process.port)}
    )
    app = create_app(settings, EngineBackend(FakeFactory(), "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert await cache_of(client, GREEDY) == "MISS"
            assert await eventually(lambda: keys(store))
            await eventually(lambda: not app.state.resources.generation.coalescer.in_flight())
            assert await cache_of(client, GREEDY) == "HIT-REDIS"
            assert "local" not in (await app.state.resources.cache.health())


async def test_an_entry_without_expiry_in_redis_is_held_for_the_tiers_max_age(
    redis_process: RedisProcess, store: redis.Redis
) -> None:
    """An entry some other writer stored without a TTL (PTTL -1) still fills the tier, for its max age."""
    async with replica(redis_process) as (client, resources):
        assert await cache_of(client, GREEDY) == "MISS"
        (key,) = await eventually(lambda: keys(store))
        await eventually(lambda: not resources.generation.coalescer.in_flight())
        store.persist(key)
        resources.cache.local.clear()
        assert await cache_of(client, GREEDY) == "HIT-REDIS"
        assert await cache_of(client, GREEDY) == "HIT-MEMORY"
        (held,) = resources.cache.local._held.values()
        assert round(held.expires - resources.cache.local._clock()) == 300
