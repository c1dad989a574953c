"""Cacheable generations: answered from the cache, or from one shared engine generation per key."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import structlog

from llm_service.cache.local import MEMORY
from llm_service.cache.store import CachedResponse, CachePlan, CachePolicy, FinishedGeneration, ResponseCache
from llm_service.engines.base import GenerationDelta
from llm_service.errors import EngineFailure, ServiceError, to_service_error
from llm_service.observability.metrics import Metrics

log = structlog.get_logger(__name__)


class EngineRun(Protocol):
    """An opened engine generation (a GenerationStream): iterate for deltas; aclose releases it;
    `result` holds the deltas folded into choices."""

    @property
    def result(self) -> FinishedGeneration: ...

    def __aiter__(self) -> AsyncIterator[GenerationDelta]: ...

    async def aclose(self, cause: BaseException | None = None) -> None: ...


# Opens the engine generation of a flight (its result carries the rendered prompt).
# Raises what GenerationService.open raises (ServiceError subclasses).
OpenEngine = Callable[[], Awaitable[EngineRun]]


class Flight:
    """One engine generation and every request that reads it.

    The generation runs in a task of its own, so the first client leaving does not end it
    for the others; it is aborted only when no reader is left. Deltas are kept, so a request
    that joins late replays them from the start.
    """

    def __init__(
        self, plan: CachePlan, slot: str, model_id: str, on_abandon: Callable[[Flight], None] | None = None
    ) -> None:
        self.plan = plan
        self.slot = slot
        self.model_id = model_id
        self.store = plan.store
        self.ttl = plan.ttl
        self.prompt = ""
        self.deltas: list[GenerationDelta] = []
        self.done = False
        self.error: ServiceError | None = None
        self.readers = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._on_abandon = on_abandon

    @property
    def joinable(self) -> bool:
        return self.error is None and self.task is not None and not self.task.cancelled()

    def want_store(self, plan: CachePlan) -> None:
        """A joining request that allows storing makes the flight store (with the first such TTL)."""
        if plan.store and not self.store:
            self.store, self.ttl = True, plan.ttl

    def publish(self, delta: GenerationDelta) -> None:
        self.deltas.append(delta)
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()

    def fail(self, error: ServiceError) -> None:
        self.error = error
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self) -> AsyncIterator[GenerationDelta]:
        """Every delta of the generation, from the first; raises the generation's error."""
        self.readers += 1
        position = 0
        try:
            while True:
                if position < len(self.deltas):
                    position += 1
                    yield self.deltas[position - 1]
                elif self.error is not None:
                    # Each reader raises its own copy: one exception object, many tracebacks.
                    raise copy.copy(self.error)
                elif self.done:
                    return
                else:
                    await self._changed.wait()
        finally:
            self.readers -= 1
            if self.readers == 0 and not self.done and self.error is None:
                await self._abandon()

    async def _abandon(self) -> None:
        """The last reader left mid-generation: abort the engine request."""
        if self._on_abandon is not None:
            self._on_abandon(self)  # first, so that nobody joins a generation being cancelled
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class Served:
    """Where one cacheable request's deltas come from."""

    def __init__(
        self,
        deltas: AsyncIterator[GenerationDelta],
        cache_status: str,
        entry: CachedResponse | None = None,
        flight: Flight | None = None,
    ) -> None:
        self.deltas = deltas
        self.cache_status = cache_status  # "hit", "miss" or "coalesced"
        # Which tier a hit came from: "redis", or "memory" (the local tier, or a generation of this
        # replica that just finished); None for a miss or a coalesced request.
        self.tier = (entry.tier if entry is not None else MEMORY) if cache_status == "hit" else None
        self._entry = entry
        self._flight = flight

    @property
    def cached(self) -> bool:
        """The answer existed before the request came: from Redis, or a finished generation."""
        return self.cache_status == "hit"

    @property
    def prompt(self) -> str:
        """The rendered prompt; for a flight, known once its first delta arrived."""
        if self._entry is not None:
            return self._entry.prompt
        return self._flight.prompt if self._flight is not None else ""


async def _replay(entry: CachedResponse) -> AsyncIterator[GenerationDelta]:
    for delta in entry.deltas():
        yield delta


class Coalescer:
    """Answers cacheable requests from the cache, else from the one in-flight generation of the
    same key, else by starting that generation (and storing its result when it finishes)."""

    def __init__(self, policy: CachePolicy, cache: ResponseCache, metrics: Metrics) -> None:
        self.policy = policy
        self.cache = cache
        self.metrics = metrics
        self._flights: dict[str, Flight] = {}
        self._running: set[asyncio.Task[None]] = set()

    def in_flight(self) -> int:
        return len(self._flights)

    async def serve(self, plan: CachePlan, slot: str, model_id: str, open_engine: OpenEngine) -> Served:
        """Deltas for a cacheable request. Never raises for the cache; engine errors surface when
        the returned deltas are iterated (the first one included)."""
        if not plan.read:
            # no-cache: a fresh generation of its own, never shared, stored unless no-store.
            return self._read(self._start(plan, slot, model_id, open_engine, shared=False), "miss")
        flight = self._joinable(plan.key)
        if flight is not None:
            return self._join(flight, plan)
        entry = await self.cache.get(plan.key, model=slot)
        if entry is not None:
            self.metrics.cache_hits.labels(model=slot).inc()
            return Served(_replay(entry), "hit", entry=entry)
        self.metrics.cache_misses.labels(model=slot).inc()
        # The lookup awaited: an identical request may have started the generation meanwhile.
        flight = self._joinable(plan.key)
        if flight is not None:
            return self._join(flight, plan)
        return self._read(self._start(plan, slot, model_id, open_engine, shared=True), "miss")

    def memory_hit(self, plan: CachePlan, slot: str) -> CachedResponse | None:
        """The entry of `plan`'s key when this replica holds it in memory, counted as a hit and
        found without awaiting anything; None (nothing counted) when `serve` has to decide."""
        if not plan.read or self._joinable(plan.key) is not None:
            return None
        entry = self.cache.peek(plan.key, model=slot)
        if entry is not None:
            self.metrics.cache_hits.labels(model=slot).inc()
        return entry

    async def close(self) -> None:
        """Abort every generation still running (at shutdown)."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._flights.clear()

    def _joinable(self, key: str) -> Flight | None:
        flight = self._flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def _join(self, flight: Flight, plan: CachePlan) -> Served:
        if flight.done:
            # Finished, its entry still being written to Redis: as good as a hit, and faster.
            self.metrics.cache_hits.labels(model=flight.slot).inc()
            return self._read(flight, "hit")
        flight.want_store(plan)
        self.metrics.cache_coalesced.labels(model=flight.slot).inc()
        return self._read(flight, "coalesced")

    @staticmethod
    def _read(flight: Flight, status: str) -> Served:
        return Served(flight.read(), status, flight=flight)

    def _start(self, plan: CachePlan, slot: str, model_id: str, open_engine: OpenEngine, shared: bool) -> Flight:
        flight = Flight(plan, slot, model_id, on_abandon=self._forget if shared else None)
        if shared:
            self._flights[plan.key] = flight
        flight.task = asyncio.create_task(self._run(flight, open_engine))
        self._running.add(flight.task)
        flight.task.add_done_callback(self._running.discard)
        return flight

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.plan.key) is flight:
            del self._flights[flight.plan.key]

    async def _run(self, flight: Flight, open_engine: OpenEngine) -> None:
        """The flight's task: run the generation, fan it out, then store it."""
        run: EngineRun | None = None
        try:
            try:
                run = await open_engine()
                flight.prompt = run.result.prompt
                async for delta in run:
                    flight.publish(delta)
            except Exception as exc:
                flight.fail(to_service_error(exc))
                return
            except asyncio.CancelledError:
                # Cancelled by the service (closing), not by a reader leaving (then none is left):
                # release the readers with an error rather than leave them waiting.
                flight.fail(EngineFailure("the generation was stopped: the service is shutting down", retry_after=1))
                raise
            finally:
                if run is not None:
                    await run.aclose()  # idempotent; releases the slot if iteration never began
            flight.finish()
            if flight.store:
                await self._store(flight, run.result)
        finally:
            self._forget(flight)

    async def _store(self, flight: Flight, result: FinishedGeneration) -> None:
        entry = CachedResponse.from_result(result)
        if entry is None:
            return
        try:
            await self.cache.set(flight.plan.key, entry, flight.ttl, model=flight.slot)
        except Exception as exc:  # a ResponseCache must not raise; if one does, the request is unaffected
            log.warning("cache_store_failed", error=str(exc))
