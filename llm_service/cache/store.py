"""Response cache: which requests are cacheable, their key, the stored entry, and the Redis store."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from llm_service.cache.controls import CacheControl
from llm_service.config.settings import LLMSettings, RedisSettings
from llm_service.engines.base import EngineConfig, GenerationDelta, SamplingOptions, TokenLogprob, ToolCallDelta
from llm_service.observability.metrics import Metrics

log = structlog.get_logger(__name__)

# Bump when the key material or the entry format changes: old entries then simply miss.
SCHEMA_VERSION = 1

T = TypeVar("T")


# --- which requests, under which key ------------------------------------------------------
@dataclass(frozen=True)
class CachePlan:
    """What the cache may do for one request."""

    key: str
    read: bool  # look the key up (False: Cache-Control no-cache)
    store: bool  # store the result (False: no-store)
    ttl: int  # seconds the stored entry lives


def reproducible(sampling: SamplingOptions) -> bool:
    """Greedy or seeded sampling gives the same output for the same input."""
    return sampling.temperature == 0 or sampling.seed is not None


def cache_key(
    namespace: str,
    config: EngineConfig,
    sampling: SamplingOptions,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    default_max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> str:
    """`{namespace}:response:v{schema}:{slot}:{sha256}` over everything that changes the output.

    Computed from the raw request and the slot's configuration, never from the engine, so a
    hit needs no loaded model. max_tokens 0 ("the default, capped by the context") is resolved
    by the engine from default_max_tokens and max_model_len, so both are part of the key. The
    device and the engine arguments (the dtype the backend chose on this host among them, see
    app.with_host_args; quantization and adapters) change the numerics, so they are too.
    """
    # A shallow copy: asdict's deep copy of every field showed in the hit path's profile.
    params = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        params[name] = float(params[name])  # 0 and 0.0 are the same request
    material = {
        "schema": SCHEMA_VERSION,
        "slot": config.slot,
        "model": config.model_id,
        "revision": config.revision,
        "max_model_len": config.max_model_len,
        "device": config.device,
        "engine_args": config.extra_args,
        "default_max_tokens": default_max_tokens,
        "prompt": prompt,
        "messages": messages,
        "sampling": params,
    }
    if extra:
        # Token-id prompts and images beside a prompt; absent otherwise, so older keys stay valid.
        material["input"] = extra
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{namespace}:response:v{SCHEMA_VERSION}:{config.slot}:{digest}"


class CachePolicy:
    """Decides per request whether and how the response cache takes part (LLM_CACHE_*)."""

    def __init__(self, llm: LLMSettings) -> None:
        self.enabled = llm.cache_enabled
        self.namespace = llm.cache_namespace
        self.default_ttl = llm.cache_ttl_seconds
        self.default_max_tokens = llm.default_max_tokens

    def plan(
        self,
        control: CacheControl,
        sampling: SamplingOptions,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        config: EngineConfig,
        extra: dict[str, Any] | None = None,
    ) -> CachePlan | None:
        """None: the request bypasses the cache (and coalescing) entirely."""
        if not self.enabled or control.force is False:
            return None
        if not (control.force or reproducible(sampling)):
            return None
        if control.no_cache and control.no_store:
            return None
        key = cache_key(self.namespace, config, sampling, prompt, messages, self.default_max_tokens, extra)
        ttl = control.ttl or self.default_ttl
        return CachePlan(key, read=not control.no_cache, store=not control.no_store, ttl=ttl)


# --- the stored entry ---------------------------------------------------------------------
class FinishedChoice(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def logprobs(self) -> Sequence[TokenLogprob]: ...
    @property
    def tool_calls(self) -> Sequence[FinishedToolCall]: ...


class FinishedToolCall(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def arguments(self) -> str: ...


class FinishedGeneration(Protocol):
    """What an entry is made from (generation.GenerationResult, folded from the deltas)."""

    model_id: str
    prompt: str
    prompt_tokens: int

    @property
    def choices(self) -> Sequence[FinishedChoice]: ...


@dataclass(frozen=True)
class CachedChoice:
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[tuple[str, str, str], ...] = ()  # (id, name, arguments)


@dataclass(frozen=True)
class CachedResponse:
    """A finished generation as stored: every choice complete, no request-specific fields."""

    model_id: str
    prompt: str
    prompt_tokens: int
    choices: tuple[CachedChoice, ...]
    created: float
    # Which tier answered: "redis", or "memory" for the replica's own (cache_local.LocalTier).
    tier: str = field(default="redis", compare=False)

    @classmethod
    def from_result(cls, result: FinishedGeneration) -> CachedResponse | None:
        """The entry of a finished generation; None when a choice did not finish properly."""
        choices = result.choices
        if not choices or any(c.finish_reason in (None, "abort") for c in choices):
            return None
        return cls(
            result.model_id,
            result.prompt,
            result.prompt_tokens,
            tuple(
                CachedChoice(
                    c.index, c.text, c.finish_reason, c.completion_tokens, tuple(c.logprobs),
                    tuple((t.id, t.name, t.arguments) for t in c.tool_calls),
                )
                for c in choices
            ),
            time.time(),
        )

    def deltas(self) -> list[GenerationDelta]:
        """The entry as a stream: one delta per choice, carrying its whole text."""
        return [
            GenerationDelta(
                c.index, c.text, c.completion_tokens, self.prompt_tokens, c.finish_reason, c.logprobs,
                tuple(ToolCallDelta(i, call_id, name, arguments) for i, (call_id, name, arguments) in
                      enumerate(c.tool_calls)),
            )
            for c in self.choices
        ]

    def encode(self) -> bytes:
        body = {
            "v": SCHEMA_VERSION,
            "model_id": self.model_id,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "created": self.created,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "completion_tokens": c.completion_tokens,
                    "logprobs": [[lp.token, lp.logprob, [list(t) for t in lp.top]] for lp in c.logprobs],
                    **({"tool_calls": [list(t) for t in c.tool_calls]} if c.tool_calls else {}),
                }
                for c in self.choices
            ],
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse:
        """Raises ValueError for anything that is not an entry of this schema."""
        try:
            body = json.loads(data)
            if body.get("v") != SCHEMA_VERSION:
                raise ValueError(f"entry schema {body.get('v')!r}, expected {SCHEMA_VERSION}")
            choices = tuple(
                CachedChoice(
                    index=int(c["index"]),
                    text=str(c["text"]),
                    finish_reason=c["finish_reason"],
                    completion_tokens=int(c["completion_tokens"]),
                    logprobs=tuple(
                        TokenLogprob(str(tok), float(lp), tuple((str(t), float(v)) for t, v in top))
                        for tok, lp, top in c["logprobs"]
                    ),
                    tool_calls=tuple((str(i), str(n), str(a)) for i, n, a in c.get("tool_calls", ())),
                )
                for c in body["choices"]
            )
            return cls(
                str(body["model_id"]),
                str(body["prompt"]),
                int(body["prompt_tokens"]),
                choices,
                float(body["created"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"unreadable cache entry: {exc}") from exc


# --- the store ----------------------------------------------------------------------------
class ResponseCache(Protocol):
    """Where finished responses live. Never raises: a failure is a miss or a lost write."""

    async def get(self, key: str, model: str = "") -> CachedResponse | None:
        """The entry under `key`, or None (absent, unreadable, or the store is unavailable).
        `model` (the slot) labels the error metrics."""

    def peek(self, key: str, model: str = "") -> CachedResponse | None:
        """The entry under `key` if this replica holds it in memory (no I/O, nothing awaited),
        counted as a memory-tier hit; None otherwise, and nothing counted (`get` looks further)."""

    async def set(self, key: str, entry: CachedResponse, ttl: int, model: str = "") -> bool:
        """Store `entry` for `ttl` seconds; False when it was not stored."""

    async def get_many(self, keys: list[str], model: str = "") -> list[bytes | None]:
        """Raw values under `keys` (one Redis round trip), None for each one absent or unreadable."""

    async def set_many(self, items: dict[str, bytes], ttl: int, model: str = "") -> bool:
        """Store raw values for `ttl` seconds in one round trip; False when they were not stored."""

    async def purge(self, slot: str | None = None) -> int | None:
        """Delete every entry of the namespace (one slot's, if given) on every replica; the number
        deleted from Redis, None when the store could not be reached."""

    async def start(self) -> None:
        """Start background work (the purge subscription); called once by the lifespan."""

    async def health(self) -> dict[str, Any]:
        """{"status": "up" | "down" | "disabled", ...} for /health."""

    async def close(self) -> None:
        """Release connections."""


class NoCache:
    """The cache when LLM_CACHE_ENABLED=false: nothing is read or stored."""

    async def get(self, key: str, model: str = "") -> CachedResponse | None:
        return None

    def peek(self, key: str, model: str = "") -> CachedResponse | None:
        return None

    async def set(self, key: str, entry: CachedResponse, ttl: int, model: str = "") -> bool:
        return False

    async def get_many(self, keys: list[str], model: str = "") -> list[bytes | None]:
        return [None] * len(keys)

    async def set_many(self, items: dict[str, bytes], ttl: int, model: str = "") -> bool:
        return False

    async def purge(self, slot: str | None = None) -> int | None:
        return 0

    async def start(self) -> None:
        return None

    async def health(self) -> dict[str, Any]:
        return {"status": "disabled"}

    async def close(self) -> None:
        return None


class CircuitBreaker:
    """After `failures` consecutive errors, stop calling for `cooldown` seconds; then let one
    probe through: its success closes the breaker, its failure opens it again."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self.cooldown:
            return False
        # One probe at a time; a probe that never reported back (cancelled) expires.
        if self._probe_at is not None and now - self._probe_at < self.cooldown:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probe_at = None

    def failure(self) -> bool:
        """Count an error; True when this one opened the breaker."""
        self._failures += 1
        was_open = self._opened_at is not None
        if was_open or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probe_at = None
            return not was_open
        return False


def connection_pool(settings: RedisSettings) -> BlockingConnectionPool:
    """A pool of at most `max_connections`: redis-py's default pool opens one connection per Redis
    call in flight and keeps them all, so a burst of a thousand requests would leave a thousand
    idle connections to Redis for the life of the process. Past the bound a call waits for a free
    connection, up to the socket timeout (then it is a miss, like a slow reply)."""
    tls: dict[str, Any] = {}
    if settings.tls:
        tls = {
            "connection_class": SSLConnection,
            "ssl_ca_certs": str(settings.tls_ca_file) if settings.tls_ca_file else None,
        }
    return BlockingConnectionPool(
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_seconds,
        host=settings.host,
        port=settings.port,
        db=settings.db,
        password=settings.secret(),
        socket_timeout=settings.socket_timeout_seconds,
        socket_connect_timeout=settings.connect_timeout_seconds,
        # redis-py 8 retries 10 times by default; one immediate retry on a connection error
        # replaces a pooled connection that died with a restarted Redis, timeouts never retry.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name="llm-service",
        **tls,
    )


class RedisCache:
    """The response cache in Redis: short timeouts, no retry storms, a circuit breaker."""

    def __init__(
        self,
        settings: RedisSettings,
        metrics: Metrics,
        max_entry_bytes: int,
        client: Redis | None = None,
        breaker: CircuitBreaker | None = None,
        namespace: str = "llm-service",
    ) -> None:
        self.address = f"{settings.host}:{settings.port}/{settings.db}"
        self._namespace = namespace
        self.max_entry_bytes = max_entry_bytes
        self._metrics = metrics
        self._breaker = breaker or CircuitBreaker(
            settings.breaker_failures, settings.breaker_cooldown_seconds
        )
        # An outer bound on one operation, whatever redis-py does inside it.
        self._deadline = 2 * (settings.connect_timeout_seconds + settings.socket_timeout_seconds)
        self._last_error: str | None = None
        self._client = client or Redis.from_pool(connection_pool(settings))

    @property
    def client(self) -> Redis:
        return self._client

    async def get(self, key: str, model: str = "") -> CachedResponse | None:
        data = await self._call("get", lambda: self._client.get(key), model)
        return None if data is None else self._decode(key, data, model)

    def peek(self, key: str, model: str = "") -> CachedResponse | None:
        return None  # Redis alone holds nothing in this process

    async def get_with_ttl(self, key: str, model: str = "") -> tuple[CachedResponse, int, float] | None:
        """The entry under `key`, its encoded size and the seconds it has left, in one round trip."""

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            return list(await pipe.execute())

        found = await self._call("get", read, model)
        if found is None or found[0] is None:
            return None
        data = found[0].encode() if isinstance(found[0], str) else found[0]
        entry = self._decode(key, data, model)
        # PTTL: -1 no expiry (not written by us), -2 gone since the GET.
        pttl = int(found[1])
        return None if entry is None else (entry, len(data), math.inf if pttl == -1 else max(0, pttl) / 1000)

    def _decode(self, key: str, data: bytes | str, model: str) -> CachedResponse | None:
        try:
            return CachedResponse.decode(data.encode() if isinstance(data, str) else data)
        except ValueError as exc:
            self._metrics.cache_errors.labels(model=model, operation="decode").inc()
            log.warning("cache_entry_unreadable", key=key, error=str(exc))
            return None

    async def set(self, key: str, entry: CachedResponse, ttl: int, model: str = "") -> bool:
        return await self.put(key, entry.encode(), ttl, model)

    async def put(self, key: str, data: bytes, ttl: int, model: str = "") -> bool:
        """Store an encoded entry; False when it was not stored (too large, or Redis failed)."""
        if len(data) > self.max_entry_bytes:
            log.info("cache_entry_too_large", bytes=len(data), limit=self.max_entry_bytes)
            return False
        return bool(await self._call("set", lambda: self._client.set(key, data, ex=ttl), model))

    async def delete_matching(self, namespace: str, slot: str | None = None) -> int | None:
        """Delete the namespace's response and embedding entries (one slot's, if given)."""
        patterns = [f"{namespace}:{kind}:v*:{slot or '*'}:*" for kind in ("response", "embedding")]

        async def delete() -> int:
            deleted = 0
            for pattern in patterns:
                batch: list[Any] = []
                async for key in self._client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        deleted += int(await self._client.unlink(*batch))
                        batch = []
                if batch:
                    deleted += int(await self._client.unlink(*batch))
            return deleted

        return await self._call("purge", delete)

    async def publish(self, channel: str, message: str) -> None:
        await self._call("purge", lambda: self._client.publish(channel, message))

    async def purge(self, slot: str | None = None) -> int | None:
        """Without a local tier there is nothing to tell the other replicas."""
        return await self.delete_matching(self._namespace, slot)

    async def start(self) -> None:
        return None

    async def get_many(self, keys: list[str], model: str = "") -> list[bytes | None]:
        if not keys:
            return []
        values = await self._call("get", lambda: self._client.mget(keys), model)
        if values is None:
            return [None] * len(keys)
        return [value.encode() if isinstance(value, str) else value for value in values]

    async def set_many(self, items: dict[str, bytes], ttl: int, model: str = "") -> bool:
        items = {key: data for key, data in items.items() if len(data) <= self.max_entry_bytes}
        if not items:
            return False

        async def write() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key, data in items.items():
                pipe.set(key, data, ex=ttl)
            return list(await pipe.execute())

        return bool(await self._call("set", write, model))

    async def health(self) -> dict[str, Any]:
        pong = await self._call("ping", self._client.ping)
        return {
            "status": "up" if pong else "down",
            "address": self.address,
            "circuit": self._breaker.state,
            "last_error": self._last_error,
        }

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            log.warning("cache_close_failed", error=str(exc))

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]], model: str = "") -> T | None:
        """Run one Redis call; None when the breaker is open or the call failed."""
        if not self._breaker.allow():
            return None
        try:
            async with asyncio.timeout(self._deadline):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc, model)
            return None
        self._breaker.success()
        self._last_error = None
        return result

    def _failed(self, operation: str, exc: BaseException, model: str) -> None:
        self._metrics.cache_errors.labels(model=model, operation=operation).inc()
        self._last_error = f"{type(exc).__name__}: {exc}"
        opened = self._breaker.failure()
        log.warning(
            "cache_unavailable" if opened else "cache_error",
            operation=operation,
            error=self._last_error,
            retry_in=self._breaker.cooldown if opened else None,
        )
