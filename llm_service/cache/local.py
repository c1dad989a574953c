"""The in-process tier in front of Redis: recent entries per replica, cleared by purges on every replica."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError

from llm_service.cache.store import CachedResponse, NoCache, RedisCache, ResponseCache
from llm_service.config.settings import Settings
from llm_service.observability.metrics import Metrics

log = structlog.get_logger(__name__)

# Where a hit came from (CachedResponse.tier; X-Cache: HIT-MEMORY or HIT-REDIS).
MEMORY = "memory"


@dataclass(frozen=True)
class _Held:
    entry: CachedResponse
    model: str
    size: int
    expires: float  # monotonic clock


class LocalTier:
    """A bounded map of recent entries (least recently used out first), each with its expiry.

    Bounded by entries and by bytes (an entry's size is its encoded size, as stored in Redis).
    Not thread-safe: the event loop is its only user.
    """

    def __init__(
        self, max_entries: int, max_bytes: int, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._metrics = metrics
        self._clock = clock
        self._held: OrderedDict[str, _Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def get(self, key: str) -> CachedResponse | None:
        held = self._held.get(key)
        if held is None:
            return None
        if self._clock() >= held.expires:
            self._drop(key)
            return None
        self._held.move_to_end(key)
        return held.entry

    def put(self, key: str, entry: CachedResponse, size: int, ttl: float, model: str) -> None:
        """Hold `entry` for `ttl` seconds; one larger than the whole tier is not held."""
        if key in self._held:
            self._drop(key)
        if ttl <= 0 or size > self.max_bytes or self.max_entries <= 0:
            return
        while self._held and (len(self._held) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._drop(next(iter(self._held)))
        self._held[key] = _Held(dataclasses.replace(entry, tier=MEMORY), model, size, self._clock() + ttl)
        self.bytes += size
        self._count(model, 1, size)

    def clear(self) -> int:
        """Drop every entry; the number dropped."""
        dropped = len(self._held)
        for key in list(self._held):
            self._drop(key)
        return dropped

    def _drop(self, key: str) -> None:
        held = self._held.pop(key)
        self.bytes -= held.size
        self._count(held.model, -1, -held.size)

    def _count(self, model: str, entries: int, size: int) -> None:
        self._metrics.cache_local_entries.labels(model=model).inc(entries)
        self._metrics.cache_local_bytes.labels(model=model).inc(size)


class TieredCache:
    """The response cache: the local tier first, then Redis; writes go to both.

    A Redis hit fills the local tier for what Redis has left of the entry's TTL; a write fills it
    for the request's TTL; neither for longer than `max_age`. Purges reach every replica through a
    Redis channel; while this replica is not subscribed to it (Redis down, reconnecting) the local
    tier is not read, and it is emptied when the subscription is back, since a purge may have been
    missed meanwhile. Embedding lookups (get_many, set_many) go to Redis alone.
    """

    def __init__(self, redis: RedisCache, local: LocalTier, metrics: Metrics, namespace: str, max_age: float) -> None:
        self.redis = redis
        self.local = local
        self.namespace = namespace
        self.channel = f"{namespace}:cache:purge"
        self.max_age = max_age
        self._metrics = metrics
        self._subscribed = False
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to purges (in the background: Redis may be down)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="cache-purge-listener")

    async def get(self, key: str, model: str = "") -> CachedResponse | None:
        if self._subscribed:
            entry = self.peek(key, model)
            if entry is not None:
                return entry
            self._metrics.cache_local_misses.labels(model=model).inc()
        found = await self.redis.get_with_ttl(key, model)
        if found is None:
            return None
        entry, size, ttl = found
        if self._subscribed:
            self.local.put(key, entry, size, min(ttl, self.max_age), model)
        return entry

    def peek(self, key: str, model: str = "") -> CachedResponse | None:
        if not self._subscribed:  # a purge may have been missed: the local tier is not read
            return None
        entry = self.local.get(key)
        if entry is not None:
            self._metrics.cache_local_hits.labels(model=model).inc()
        return entry

    async def set(self, key: str, entry: CachedResponse, ttl: int, model: str = "") -> bool:
        data = entry.encode()
        if self._subscribed and len(data) <= self.redis.max_entry_bytes:
            self.local.put(key, entry, len(data), min(ttl, self.max_age), model)
        return await self.redis.put(key, data, ttl, model)

    async def get_many(self, keys: list[str], model: str = "") -> list[bytes | None]:
        return await self.redis.get_many(keys, model)

    async def set_many(self, items: dict[str, bytes], ttl: int, model: str = "") -> bool:
        return await self.redis.set_many(items, ttl, model)

    async def purge(self, slot: str | None = None) -> int | None:
        """Delete the namespace's entries (one slot's, if given) in Redis and in every replica's
        local tier; the number deleted in Redis, None when Redis could not be reached."""
        self.local.clear()
        deleted = await self.redis.delete_matching(self.namespace, slot)
        if deleted is not None:
            # Again: a Redis hit during the deletion may have refilled it with a deleted entry.
            self.local.clear()
            await self.redis.publish(self.channel, slot or "*")
        return deleted

    async def health(self) -> dict[str, Any]:
        health = await self.redis.health()
        health["local"] = {
            "entries": len(self.local),
            "bytes": self.local.bytes,
            "purge_subscription": "up" if self._subscribed else "down",
        }
        return health

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.close()

    async def _listen(self) -> None:
        """Clear the local tier on every purge message; resubscribe (clearing it) after an error."""
        delay = 0.1
        while True:
            pubsub = self.redis.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.local.clear()  # purges sent while this replica was not listening
                self._subscribed, delay = True, 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        dropped = self.local.clear()
                        log.info("cache_local_purged", entries=dropped, slot=message.get("data"))
            except (RedisError, OSError, TimeoutError) as exc:
                if self._subscribed:
                    log.warning("cache_purge_subscription_lost", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._subscribed = False
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def build_cache(settings: Settings, metrics: Metrics) -> ResponseCache:
    """The store the lifespan owns: the local tier over Redis when the cache is enabled (Redis
    alone with LLM_CACHE_LOCAL_MAX_ENTRIES=0), else the no-op."""
    llm = settings.llm
    if not llm.cache_enabled:
        return NoCache()
    redis = RedisCache(settings.redis, metrics, llm.cache_max_entry_bytes, namespace=llm.cache_namespace)
    if llm.cache_local_max_entries == 0:
        return redis
    local = LocalTier(llm.cache_local_max_entries, llm.cache_local_max_bytes, metrics)
    return TieredCache(redis, local, metrics, llm.cache_namespace, llm.cache_local_max_age_seconds)
