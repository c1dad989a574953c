"""The response cache and coalescing through the app, on fake engines and a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import SSLConnection

from llm_service.app import EngineBackend, create_app
from llm_service.cache.controls import CacheControl
from llm_service.cache.store import CachedChoice, CachedResponse, CachePolicy, RedisCache, connection_pool
from llm_service.config.settings import RedisSettings
from llm_service.engines.base import SamplingOptions
from llm_service.observability.metrics import Metrics
from llm_service.serving.generation import GenerationService, GenerationSpec

from .conftest import GIB, FakeFactory, fake_settings
from .test_api import metric, sse_events

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
NAMESPACE = "llm-service"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """redis-server on a free port, without persistence; stop() and start() for fault tests."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make setup installs it)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            [self.binary, *args],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_process: RedisProcess) -> Iterator[redis.Redis]:
    if redis_process.process is None:
        redis_process.start()
    client = redis_process.client()
    client.flushdb()
    yield client
    client.close()


def keys(store: redis.Redis) -> list[str]:
    return sorted(k.decode() for k in store.keys(f"{NAMESPACE}:*"))


async def only_keys(cached: App, store: redis.Redis) -> list[str]:
    """The keys besides a sentinel request's, once its entry is stored: a write that any earlier
    request (wrongly) queued has happened by then too."""
    sentinel = f"sentinel {time.monotonic_ns()}"
    await cached.post({"prompt": sentinel, "temperature": 0})

    def sentinel_keys() -> set[str]:
        return {k for k in keys(store) if sentinel.encode() in (store.get(k) or b"")}

    assert await eventually(sentinel_keys), "the sentinel entry was never stored"
    return sorted(set(keys(store)) - sentinel_keys())


async def stored(store: redis.Redis, count: int = 1) -> list[str]:
    """The keys once `count` entries are in Redis (a response is written after it is sent)."""
    await eventually(lambda: len(keys(store)) >= count)
    return keys(store)


async def eventually(predicate: Callable[[], Any], seconds: float = 30.0) -> Any:
    """Poll `predicate` until it is truthy (returned) or `seconds` pass (its last value)."""
    deadline = time.monotonic() + seconds
    value = predicate()
    while not value and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        value = predicate()
    return value


class App:
    def __init__(self, client: httpx.AsyncClient, factory: FakeFactory, app: Any) -> None:
        self.client, self.factory, self.app = client, factory, app

    @property
    def generation(self) -> GenerationService:
        service: GenerationService = self.app.state.resources.generation
        return service

    def generations(self, slot: str = "standard") -> int:
        return sum(e.generations for e in self.factory.of(slot))

    async def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        r = await self.client.post("/generate", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text


@pytest.fixture
async def cached(store: redis.Redis, redis_process: RedisProcess) -> AsyncIterator[App]:
    factory = FakeFactory(token_delay=0.01)
    # Redis alone: these tests look at what Redis holds (test_cache_local.py covers the local tier).
    settings = fake_settings(cache_enabled=True, cache_local_max_entries=0).model_copy(
        update={
            "redis": RedisSettings(host="127.0.0.1", port=redis_process.port, breaker_cooldown_seconds=0.2)
        }
    )
    app = create_app(settings, EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield App(client, factory, app)


GREEDY = {"messages": CAPITAL, "temperature": 0}


async def test_miss_then_hit(cached: App, store: redis.Redis) -> None:
    first = await cached.post(GREEDY)
    assert first.headers["x-cache"] == "MISS" and first.json()["cached"] is False
    (key,) = await stored(store)
    assert key.startswith(f"{NAMESPACE}:response:v1:standard:")
    second = await cached.post(GREEDY)
    assert second.headers["x-cache"].startswith("HIT-") and second.json()["cached"] is True
    a, b = first.json(), second.json()
    assert a["text"] == b["text"] == "The capital of France is Paris."
    assert a["usage"] == b["usage"] and a["finish_reason"] == b["finish_reason"]
    assert a["model_id"] == b["model_id"] and b["id"] != a["id"]
    assert cached.generations() == 1
    text = await cached.metrics()
    assert metric(text, "llm_cache_hits_total", model="standard") == 1
    assert metric(text, "llm_cache_misses_total", model="standard") == 1
    assert metric(text, "llm_engine_generations_total", model="standard") == 1
    assert metric(text, "llm_requests_total", model="standard", status="success") == 2


async def test_a_streamed_request_is_answered_from_the_cache_as_a_stream(cached: App) -> None:
    plain = (await cached.post(GREEDY)).json()
    r = await cached.post({**GREEDY, "stream": True})
    assert r.headers["x-cache"].startswith("HIT-") and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert "".join(e["text"] for e in events if e["type"] == "delta") == plain["text"]
    done = events[-1]
    assert done["type"] == "done" and done["cached"] is True and done["usage"] == plain["usage"]
    # And a streamed miss fills the cache for a plain hit.
    streamed = await cached.post({"prompt": "tell me more", "temperature": 0, "stream": True})
    assert streamed.headers["x-cache"] == "MISS"
    hit = await cached.post({"prompt": "tell me more", "temperature": 0})
    assert hit.headers["x-cache"].startswith("HIT-") and cached.generations() == 2


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 5},
        {"stop": ["Paris"]},
        {"seed": 3},
        {"top_p": 0.5},
        {"top_k": 3},
        {"presence_penalty": 0.1},
        {"model": "longctx"},
        {"messages": [{"role": "user", "content": "What is the capital of Italy?"}]},
    ],
)
async def test_a_changed_parameter_misses(cached: App, change: dict[str, Any]) -> None:
    await cached.post(GREEDY)
    r = await cached.post({**GREEDY, **change})
    assert r.headers["x-cache"] == "MISS"
    again = await cached.post({**GREEDY, **change})
    assert again.headers["x-cache"].startswith("HIT-")


async def test_non_reproducible_requests_bypass_unless_asked(cached: App, store: redis.Redis) -> None:
    hot = {"messages": CAPITAL, "temperature": 0.8}
    for _ in range(2):
        assert (await cached.post(hot)).headers["x-cache"] == "MISS"
    assert await only_keys(cached, store) == [] and cached.generations() == 3
    assert metric(await cached.metrics(), "llm_cache_misses_total", model="standard") == 1  # the sentinel's
    forced = {**hot, "cache": {"use_cache": True}}
    await cached.post(forced)
    assert (await cached.post(forced)).headers["x-cache"].startswith("HIT-")
    seeded = {**hot, "seed": 42}
    await cached.post(seeded)
    assert (await cached.post(seeded)).headers["x-cache"].startswith("HIT-")
    off = {**GREEDY, "cache": {"use_cache": False}}
    for _ in range(2):
        assert (await cached.post(off)).headers["x-cache"] == "MISS"


async def test_no_cache_skips_the_read_and_refreshes_the_entry(cached: App) -> None:
    await cached.post(GREEDY)
    for fresh in ((GREEDY, {"Cache-Control": "no-cache"}), ({**GREEDY, "cache": {"no_cache": True}}, {})):
        r = await cached.post(fresh[0], **fresh[1])
        assert r.headers["x-cache"] == "MISS"
    assert cached.generations() == 3
    assert (await cached.post(GREEDY)).headers["x-cache"].startswith("HIT-")


async def test_no_store_skips_the_write(cached: App, store: redis.Redis) -> None:
    await cached.post(GREEDY, **{"Cache-Control": "no-store"})
    await cached.post({**GREEDY, "cache": {"no_store": True}})
    await cached.post(GREEDY, **{"Cache-Control": "max-age=0"})
    assert await only_keys(cached, store) == [] and cached.generations() == 4
    # no-store still reads: an entry stored by someone else is served.
    await cached.post(GREEDY)
    assert (await cached.post(GREEDY, **{"Cache-Control": "no-store"})).headers["x-cache"].startswith("HIT-")


@pytest.mark.parametrize(
    ("body", "header", "ttl"),
    [
        ({}, "max-age=50", 50),
        ({}, "s-maxage=40", 40),
        ({"cache": {"ttl": 7}}, None, 7),
        ({"cache": {"ttl": 7}}, "max-age=50", 7),
    ],
)
async def test_ttl_from_the_request(
    cached: App, store: redis.Redis, body: dict, header: str | None, ttl: int
) -> None:
    await cached.post({**GREEDY, **body}, **({"Cache-Control": header} if header else {}))
    (key,) = await stored(store)
    assert 0 < store.pttl(key) <= ttl * 1000


async def test_default_ttl(cached: App, store: redis.Redis) -> None:
    await cached.post(GREEDY)
    (key,) = await stored(store)
    assert 3500 * 1000 < store.pttl(key) <= 3600 * 1000


async def test_an_expired_entry_misses(cached: App, store: redis.Redis) -> None:
    await cached.post({**GREEDY, "cache": {"ttl": 1}})
    (key,) = await stored(store)
    assert await eventually(lambda: not store.exists(key))
    assert (await cached.post(GREEDY)).headers["x-cache"] == "MISS"


async def test_a_hit_never_loads_the_model(cached: App) -> None:
    """The key needs no engine: an entry for the unloaded longctx slot is served as is."""
    registry = cached.app.state.resources.registry
    config = registry.slot("longctx").config
    resources = cached.app.state.resources
    plan = CachePolicy(resources.settings.llm).plan(
        CacheControl(), SamplingOptions(max_tokens=0, temperature=0.0), None, CAPITAL, config
    )
    assert plan is not None
    entry = CachedResponse(
        "fake/longctx", "<rendered>", 9, (CachedChoice(0, "Rome.", "stop", 2),), time.time()
    )
    assert await resources.cache.set(plan.key, entry, 60)
    r = await cached.post({**GREEDY, "model": "longctx"})
    assert r.headers["x-cache"].startswith("HIT-") and r.json()["text"] == "Rome."
    assert registry.snapshot()["longctx"]["state"] == "unloaded" and cached.factory.of("longctx") == []


async def test_identical_concurrent_requests_cost_one_generation(cached: App) -> None:
    n = 8
    before = metric(await cached.metrics(), "llm_engine_generations_total", model="standard")
    bodies = [{**GREEDY, "stream": i % 2 == 1} for i in range(n)]
    responses = await asyncio.gather(*(cached.post(b) for b in bodies))
    texts = []
    for body, r in zip(bodies, responses, strict=True):
        if body["stream"]:
            texts.append("".join(e["text"] for e in sse_events(r.text) if e["type"] == "delta"))
        else:
            texts.append(r.json()["text"])
    assert texts == ["The capital of France is Paris."] * n
    text = await cached.metrics()
    assert metric(text, "llm_engine_generations_total", model="standard") - before == 1
    assert cached.generations() == 1
    assert metric(text, "llm_cache_coalesced_total", model="standard") == n - 1
    assert metric(text, "llm_requests_total", model="standard", status="success") == n
    assert (await cached.post(GREEDY)).headers["x-cache"].startswith("HIT-")


async def test_coalesced_requests_say_so(cached: App) -> None:
    bodies = [{**GREEDY, "max_tokens": 7, "stream": i % 2 == 1} for i in range(6)]
    responses = await asyncio.gather(*(cached.post(b) for b in bodies))
    finals = [
        next(e for e in sse_events(r.text) if e["type"] == "done") if body["stream"] else r.json()
        for body, r in zip(bodies, responses, strict=True)
    ]
    statuses = [r.headers["x-cache"] for r in responses]
    assert statuses.count("MISS") == 1 and statuses.count("COALESCED") == 5, statuses
    for status, final in zip(statuses, finals, strict=True):
        assert final["coalesced"] is (status == "COALESCED") and final["cached"] is False
    text = await cached.metrics()
    assert metric(text, "llm_cache_coalesced_total", model="standard") == 5
    hit = await cached.post({**GREEDY, "max_tokens": 7})
    assert hit.headers["x-cache"].startswith("HIT-") and hit.json()["coalesced"] is False


async def test_coalesced_requests_share_the_error(cached: App) -> None:
    bodies = [{"prompt": "hi", "temperature": 0, "max_tokens": 100000}] * 4
    responses = await asyncio.gather(*(cached.client.post("/generate", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [400] * 4
    assert all("context length" in r.json()["error"]["message"] for r in responses)


def spec(request_id: str) -> GenerationSpec:
    return GenerationSpec(
        request_id, "standard", SamplingOptions(max_tokens=0, temperature=0.0), messages=CAPITAL
    )


async def test_the_first_client_leaving_does_not_end_the_generation_for_the_others(cached: App) -> None:
    first = await cached.generation.open(spec("a"))
    second = await cached.generation.open(spec("b"))
    assert second.cache_status == "coalesced"
    await first.aclose()  # the leader's client goes away before reading anything
    text = "".join([d.text async for d in second])
    assert text == "The capital of France is Paris."
    assert cached.generations() == 1 and cached.factory.of("standard")[0].aborted == []


async def test_the_generation_is_aborted_when_every_reader_left(cached: App, store: redis.Redis) -> None:
    streams = [await cached.generation.open(spec(f"r{i}")) for i in range(3)]
    for stream in streams:
        await stream.aclose()
    engine = cached.factory.of("standard")[0]
    assert engine.aborted  # the engine request was stopped
    assert keys(store) == []  # and nothing half-done was stored
    assert cached.generation.coalescer is not None and cached.generation.coalescer.in_flight() == 0
    # The slot was released: the next request runs normally.
    assert (await cached.post(GREEDY)).json()["text"] == "The capital of France is Paris."


async def test_redis_down_costs_nothing_but_misses(cached: App, redis_process: RedisProcess) -> None:
    await cached.post(GREEDY)
    redis_process.stop()
    try:
        for i in range(6):
            r = await cached.post({**GREEDY, "max_tokens": 3 + i})
            assert r.headers["x-cache"] == "MISS"
        health = (await cached.client.get("/health")).json()
        assert health["status"] == "degraded" and health["dependencies"]["redis"]["status"] == "down"
        text = await cached.metrics()
        assert metric(text, "llm_cache_errors_total", model="standard", operation="get") >= 1
    finally:
        redis_process.start()
    # Hits resume once the breaker lets a probe through (and the entry is stored again).
    for _ in range(300):
        if (await cached.post(GREEDY)).headers["x-cache"].startswith("HIT-"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no hit after Redis came back")
    assert (await cached.client.get("/health")).json()["dependencies"]["redis"]["status"] == "up"


async def test_an_unreadable_entry_is_a_miss(cached: App, store: redis.Redis) -> None:
    await cached.post(GREEDY)
    (key,) = await stored(store)
    # Until its flight is forgotten (just after the write), an identical request is served from
    # the finished flight in memory, not from Redis.
    coalescer = cached.app.state.resources.generation.coalescer
    await eventually(lambda: coalescer.in_flight() == 0)
    store.set(key, b"garbage")
    assert (await cached.post(GREEDY)).headers["x-cache"] == "MISS"
    assert metric(await cached.metrics(), "llm_cache_errors_total", model="standard", operation="decode") == 1
    assert (await cached.post(GREEDY)).headers["x-cache"].startswith("HIT-")  # stored again, readable


async def test_the_openai_surface_shares_the_cache(cached: App) -> None:
    body = {"model": "standard", "messages": CAPITAL, "temperature": 0}
    first = await cached.client.post("/v1/chat/completions", json=body)
    second = await cached.client.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"].startswith("HIT-")
    content = [r.json()["choices"][0]["message"]["content"] for r in (first, second)]
    assert content[0] == content[1] and cached.generations() == 1


# --- RedisCache on its own ------------------------------------------------------------------
ENTRY = CachedResponse("m", "p", 3, (CachedChoice(0, "x", "stop", 1),), 0.0)


def redis_settings(port: int, **overrides: Any) -> RedisSettings:
    return RedisSettings(host="127.0.0.1", port=port, **overrides)


async def test_large_entries_are_not_stored(store: redis.Redis, redis_process: RedisProcess) -> None:
    cache = RedisCache(redis_settings(redis_process.port), Metrics(), max_entry_bytes=1024)
    big = CachedResponse("m", "p" * 2000, 3, (CachedChoice(0, "x", "stop", 1),), 0.0)
    assert await cache.set("k-big", big, 60) is False and store.get("k-big") is None
    assert await cache.set("k-small", ENTRY, 60) is True and await cache.get("k-small") == ENTRY
    await cache.close()


async def test_a_burst_of_calls_shares_a_bounded_pool(store: redis.Redis, redis_process: RedisProcess) -> None:
    # redis-py's default pool opens a connection per call in flight and keeps it: a burst of 200
    # requests would leave 200 idle connections to Redis. The bounded pool makes them wait their turn.
    # db 3: no other test's clients. The 200 calls queue for 4 connections; a generous timeout keeps a
    # pause of the test process (a full collection of a large heap takes ~0.4 s) from turning the
    # last of them into misses: the bound is the property here, not the wait.
    settings = redis_settings(redis_process.port, db=3, max_connections=4, socket_timeout_seconds=5)
    cache = RedisCache(settings, Metrics(), max_entry_bytes=1 << 20)
    try:
        stored = await asyncio.gather(*(cache.set(f"burst-{i}", ENTRY, 60) for i in range(200)))
        read = await asyncio.gather(*(cache.get(f"burst-{i}") for i in range(200)))
        assert all(stored) and all(entry == ENTRY for entry in read)
        ours = [c for c in store.client_list() if c["name"] == "llm-service" and c["db"] == "3"]
        assert 1 <= len(ours) <= 4
    finally:
        await cache.close()


def test_tls_settings_reach_the_pool(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    pool = connection_pool(RedisSettings(tls=True, tls_ca_file=ca, max_connections=8))
    assert pool.connection_class is SSLConnection and pool.max_connections == 8
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert connection_pool(RedisSettings()).connection_class is not SSLConnection


class BlackHole:
    """A TCP server that accepts connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received += 1

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


async def test_a_hung_redis_times_out_then_is_left_alone() -> None:
    hole = BlackHole()
    metrics = Metrics()
    cache = RedisCache(
        redis_settings(
            hole.port, socket_timeout_seconds=0.1, breaker_failures=2, breaker_cooldown_seconds=60
        ),
        metrics,
        max_entry_bytes=1 << 20,
    )
    try:
        # A generous outer bound only so a broken timeout fails the test instead of hanging it.
        async with asyncio.timeout(30):
            assert await cache.get("a") is None
            assert await cache.set("b", ENTRY, 60) is False
            received = hole.received
            assert received >= 1
            for _ in range(5):
                assert await cache.get("c") is None  # the breaker is open: Redis is not asked
            health = await cache.health()
        assert (
            health["status"] == "down" and health["circuit"] == "open" and "Timeout" in health["last_error"]
        )
        await asyncio.sleep(0.2)
        assert hole.received == received
        assert metric(metrics.render().decode(), "llm_cache_errors_total", operation="get") == 1
        assert metric(metrics.render().decode(), "llm_cache_errors_total", operation="set") == 1
    finally:
        await cache.close()
        hole.close()


async def test_an_unreachable_redis_is_a_miss() -> None:
    cache = RedisCache(redis_settings(free_port()), Metrics(), max_entry_bytes=1 << 20)
    assert await cache.get("a") is None
    assert await cache.set("a", ENTRY, 60) is False
    assert (await cache.health())["status"] == "down"
    await cache.close()


def test_redis_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    assert RedisSettings(password_file=secret).secret() == "s3cret"
    assert RedisSettings(password="inline").secret() == "inline"
    assert RedisSettings().secret() is None
    with pytest.raises(ValueError, match="not both"):
        RedisSettings(password="inline", password_file=secret)
    with pytest.raises(ValueError, match="no such file"):
        RedisSettings(password_file=tmp_path / "missing")


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, password="pw")
    server.start()
    yield server
    server.stop()


async def test_redis_password_is_used(tmp_path: Path, password_redis: RedisProcess) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    port = password_redis.port
    good = RedisCache(redis_settings(port, password_file=secret), Metrics(), max_entry_bytes=1 << 20)
    bad = RedisCache(redis_settings(port, password="wrong"), Metrics(), max_entry_bytes=1 << 20)
    assert (await good.health())["status"] == "up"
    assert await good.set("k", ENTRY, 60) and await good.get("k") == ENTRY
    assert await bad.get("k") is None and (await bad.health())["status"] == "down"
    await good.close()
    await bad.close()
