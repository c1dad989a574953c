"""Several generations of one request (a prompt list) run concurrently through GenerationService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from llm_service.engines.base import GenerationDelta
from llm_service.generation import GenerationResult, GenerationService, GenerationSpec, GenerationStream


async def open_all(generation: GenerationService, specs: Sequence[GenerationSpec]) -> list[GenerationStream]:
    """Open every spec concurrently; if one fails, close the others and raise its error."""
    opened = await asyncio.gather(*(generation.open(spec) for spec in specs), return_exceptions=True)
    streams = [s for s in opened if isinstance(s, GenerationStream)]
    if len(streams) < len(opened):
        for stream in streams:
            await stream.aclose()
        raise next(e for e in opened if isinstance(e, BaseException))
    return streams


async def complete_all(
    generation: GenerationService, specs: Sequence[GenerationSpec]
) -> list[GenerationResult]:
    """Run every spec to the end concurrently; raise the first error once all have ended."""
    outcomes = await asyncio.gather(*(generation.complete(spec) for spec in specs), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return [o for o in outcomes if isinstance(o, GenerationResult)]


async def merged(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Deltas of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for delta in streams[0]:
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

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            position, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def close_all(streams: Sequence[GenerationStream]) -> None:
    for stream in streams:
        await stream.aclose()


def merged_headers(results: Sequence[GenerationResult]) -> dict[str, str]:
    """Headers of several results: one value where they agree, else every value in prompt order."""
    per_result = [result.headers() for result in results]
    keys = dict.fromkeys(key for headers in per_result for key in headers)
    merged_values = {}
    for key in keys:
        values = [headers.get(key, "") for headers in per_result]
        merged_values[key] = values[0] if len(set(values)) == 1 else ", ".join(values)
    return merged_values
