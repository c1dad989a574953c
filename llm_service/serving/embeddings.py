"""Embeddings: per-input cache, one engine batch for the misses, limits and metrics.

The HTTP shape lives in api/embeddings.py; this module knows inputs, vectors and token counts.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from array import array
from dataclasses import dataclass

from llm_service.cache.store import ResponseCache
from llm_service.engines.base import Embedder, EngineConfig
from llm_service.errors import InvalidRequest, to_service_error
from llm_service.observability.metrics import Metrics
from llm_service.observability.tracing import NoTracer, Tracer
from llm_service.registry import ModelRegistry
from llm_service.serving.retrieval import admitted_engine, start_request, traced
from llm_service.traffic.admission import AdmissionController, Work
from llm_service.traffic.deadlines import before_deadline
from llm_service.traffic.request_record import RequestRecord

EMBEDDING_SCHEMA_VERSION = 1
# A token-id input (OpenAI's list of ints) or a text.
EmbeddingInput = str | list[int]


@dataclass(frozen=True)
class Embedding:
    """One input's vector and the tokens the model read for it."""

    vector: list[float]
    tokens: int
    cached: bool = False

    def encode(self) -> bytes:
        """Token count, then the vector as little-endian float32 (what the engine computes in)."""
        values = array("f", self.vector)
        if values.itemsize != 4:  # pragma: no cover (every platform we run on)
            raise RuntimeError("float32 array item size is not 4")
        return struct.pack("<I", self.tokens) + values.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Embedding | None:
        if len(data) < 4 or (len(data) - 4) % 4:
            return None
        (tokens,) = struct.unpack_from("<I", data)
        values = array("f")
        values.frombytes(data[4:])
        return cls(values.tolist(), tokens, cached=True)


@dataclass(frozen=True)
class EmbeddingResult:
    slot: str
    embeddings: list[Embedding]
    trace_id: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(e.tokens for e in self.embeddings)

    @property
    def cache_hits(self) -> int:
        return sum(e.cached for e in self.embeddings)


def embedding_key(namespace: str, config: EngineConfig, item: EmbeddingInput, dimensions: int | None) -> str:
    """`{namespace}:embedding:v{schema}:{slot}:{sha256}` over the model and one input."""
    material = {
        "model": config.model_id,
        "revision": config.revision,
        "max_model_len": config.max_model_len,
        "device": config.device,
        "engine_args": config.extra_args,
        "dimensions": dimensions,
        "input": item,
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{namespace}:embedding:v{EMBEDDING_SCHEMA_VERSION}:{config.slot}:{digest}"


def check_inputs(inputs: list[EmbeddingInput], max_inputs: int) -> None:
    """400 for no input, an empty input, or more inputs than LLM_EMBEDDING_MAX_INPUTS."""
    if not inputs:
        raise InvalidRequest("input must not be empty", param="input")
    if len(inputs) > max_inputs:
        raise InvalidRequest(
            f"{len(inputs)} inputs in one request; at most {max_inputs} (LLM_EMBEDDING_MAX_INPUTS)", param="input"
        )
    for index, item in enumerate(inputs):
        if len(item) == 0:
            raise InvalidRequest(f"input {index} is empty", param="input")


class EmbeddingService:
    """Serves embedding requests on the registry's embedding slots."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        cache: ResponseCache,
        *,
        cache_enabled: bool,
        namespace: str,
        ttl: int,
        max_inputs: int,
        tracer: Tracer | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self._registry = registry
        self._admission = admission  # None: no admission bounds
        self._tracer = tracer or NoTracer()
        self._metrics = metrics
        self._cache = cache
        self._cache_enabled = cache_enabled
        self._namespace = namespace
        self._ttl = ttl
        self.max_inputs = max_inputs

    async def embed(
        self,
        model: str,
        inputs: list[EmbeddingInput],
        dimensions: int | None,
        request_id: str,
        *,
        read_cache: bool = True,
        store_cache: bool = True,
        record: RequestRecord | None = None,
        deadline: float | None = None,
    ) -> EmbeddingResult:
        """Vectors of `inputs`, from the cache or one engine batch. Raises ServiceError subclasses:
        InvalidRequest, Overloaded (admission), DeadlineExceeded (past `deadline`, event-loop time),
        ModelUnavailable, EngineFailure."""
        slot, trace = start_request(
            self._registry,
            self._tracer,
            model=model,
            kind="embedding",
            request_id=request_id,
            record=record,
            input=inputs,
            parameters={"inputs": len(inputs), "dimensions": dimensions},
        )
        config = slot.config
        started = time.monotonic()
        with traced(trace) as summary:
            check_inputs(inputs, self.max_inputs)
            read = read_cache and self._cache_enabled
            keys = [embedding_key(self._namespace, config, item, dimensions) for item in inputs]
            found = await self._cache.get_many(keys, slot.name) if read else [None] * len(inputs)
            results: list[Embedding | None] = [Embedding.decode(data) if data else None for data in found]
            missing = [index for index, result in enumerate(results) if result is None]
            if missing:
                try:
                    async with before_deadline(deadline, self._metrics, slot.name):
                        fresh = await self._embed_on_engine(
                            slot.name, config, inputs, missing, dimensions, request_id, deadline
                        )
                except Exception as exc:  # engine failures and rejected inputs, as the client sees them
                    raise to_service_error(exc) from exc
                for index, embedding in zip(missing, fresh, strict=True):
                    results[index] = embedding
                if store_cache and self._cache_enabled:
                    await self._cache.set_many(
                        {keys[i]: e.encode() for i, e in zip(missing, fresh, strict=True)}, self._ttl, slot.name
                    )
            done = [r for r in results if r is not None]
            hits = len(done) - len(missing)
            summary.tokens = sum(e.tokens for e in done)
            summary.cache = "bypass" if not read else "hit" if not missing else "miss"
            summary.details = {"inputs": len(done), "cache_hits": hits}
        m = self._metrics
        m.embedding_inputs.labels(model=slot.name).inc(len(done))
        m.embedding_cache_hits.labels(model=slot.name).inc(hits)
        m.embedding_cache_misses.labels(model=slot.name).inc(len(missing))
        m.embedding_duration.labels(model=slot.name).observe(time.monotonic() - started)
        return EmbeddingResult(slot.name, done, trace.trace_id)

    async def _embed_on_engine(
        self,
        slot: str,
        config: EngineConfig,
        all_inputs: list[EmbeddingInput],
        missing: list[int],
        dimensions: int | None,
        request_id: str,
        deadline: float | None,
    ) -> list[Embedding]:
        """Embed the inputs at `missing` as one batch; token limits and admission checked before the
        engine sees any."""
        inputs = [all_inputs[i] for i in missing]
        # Before tokenizing: a token-id input's tokens, at least one for a text.
        least = Work(len(inputs), sum(1 if isinstance(item, str) else len(item) for item in inputs))
        async with admitted_engine(self._registry, self._admission, slot, least, deadline) as (engine, admission):
            if not isinstance(engine, Embedder):
                raise InvalidRequest(f"model {slot!r} cannot embed", param="model")
            texts = [item for item in inputs if isinstance(item, str)]
            tokenized = iter(await engine.tokenize(texts)) if texts else iter(())
            token_ids = [next(tokenized) if isinstance(item, str) else list(item) for item in inputs]
            for index, ids in zip(missing, token_ids, strict=True):
                if len(ids) > config.max_model_len:
                    raise InvalidRequest(
                        f"input {index} has {len(ids)} tokens; the model takes at most {config.max_model_len}",
                        param="input",
                    )
            if admission is not None:  # by the inputs and their tokens, against the deadline
                work = Work(len(token_ids), sum(len(ids) for ids in token_ids))
                admission.start(work, engine.capacity(), deadline)
            vectors = await engine.embed(request_id, token_ids, dimensions)
        self._metrics.embedding_tokens.labels(model=slot).inc(sum(len(ids) for ids in token_ids))
        # float32, as stored: a vector from the cache is the same as a fresh one, bit for bit.
        return [Embedding(array("f", v).tolist(), len(ids)) for v, ids in zip(vectors, token_ids, strict=True)]
