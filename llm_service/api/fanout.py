"""Several generations of one request (a prompt list) run concurrently through GenerationService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import structlog

from llm_service.engines.base import GenerationDelta
from llm_service.serving.generation import GenerationResult, GenerationService, GenerationSpec, GenerationStream

log = structlog.get_logger(__name__)


async def open_all(generation: GenerationService, specs: Sequence[GenerationSpec]) -> list[GenerationStream]:
    """Open every spec concurrently; if one fails, close the others and raise its error.

    Cancelled part way (the client left), it closes the streams that had opened: nobody else
    holds them, and each holds its slot and an engine request.
    """
    tasks = [asyncio.ensure_future(generation.open(spec)) for spec in specs]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        await close_all(_opened(tasks))
        raise
    streams = _opened(tasks)
    failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failure is not None:
        await close_all(streams)
        raise failure
    return streams


def _opened(tasks: Sequence[asyncio.Future[GenerationStream]]) -> list[GenerationStream]:
    return [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]


async def complete_all(
    generation: GenerationService, specs: Sequence[GenerationSpec]
) -> list[GenerationResult]:
    """Run every spec to the end concurrently; raise the first error once all have ended."""
    outcomes = await asyncio.gather(*(generation.complete(spec) for spec in specs), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return [o for o in outcomes if isinstance(o, GenerationResult)]


class MergedStreams:
    """Deltas of several streams as they come, tagged with the stream's position.

    Each stream is pulled by a task of its own. The response calls `aclose()` when it ends:
    Starlette stops a response whose client left by raising at `send`, without closing the body
    iterator, so the pulling tasks are cancelled and awaited here before the streams are closed
    (closing a stream while its task pulls it fails, and would leave the engine running).
    """

    def __init__(self, streams: Sequence[GenerationStream]) -> None:
        self.streams = list(streams)
        self._tasks: list[asyncio.Task[None]] = []

    def __aiter__(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        if len(self.streams) == 1:
            async for delta in self.streams[0]:
                yield 0, delta
            return
        queue: asyncio.Queue[tuple[int, GenerationDelta | Exception | None]] = asyncio.Queue()

        async def pump(position: int, stream: GenerationStream) -> None:
            try:
                async for delta in stream:
                    queue.put_nowait((position, delta))
                queue.put_nowait((position, None))
            except Exception as exc:
                queue.put_nowait((position, exc))

        self._tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(self.streams)]
        try:
            running = len(self._tasks)
            while running:
                position, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield position, item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop pulling, then close every stream (aborting unfinished engine requests)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_all(self.streams)


async def close_all(streams: Sequence[GenerationStream]) -> None:
    """Close every stream, carrying on past one that fails to close."""
    for stream in streams:
        try:
            await stream.aclose()
        except Exception as exc:
            log.warning("stream_close_failed", request_id=stream.result.request_id, error=str(exc))


def merged_headers(results: Sequence[GenerationResult]) -> dict[str, str]:
    """Headers of several results: one value where they agree, else every value in prompt order."""
    per_result = [result.headers() for result in results]
    keys = dict.fromkeys(key for headers in per_result for key in headers)
    merged_values = {}
    for key in keys:
        values = [headers.get(key, "") for headers in per_result]
        merged_values[key] = values[0] if len(set(values)) == 1 else ", ".join(values)
    return merged_values
