"""Request deadlines on every surface: past one the request is stopped and the client gets 504."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from llm_service.errors import DeadlineExceeded
from llm_service.observability.metrics import Metrics


def deadline_passed(metrics: Metrics, slot: str) -> DeadlineExceeded:
    """The error of a request past its deadline (its engine request is aborted by then), counted."""
    metrics.requests_timed_out.labels(model=slot).inc()
    return DeadlineExceeded("the request took longer than its timeout; it was stopped")


@contextlib.asynccontextmanager
async def before_deadline(deadline: float | None, metrics: Metrics, slot: str) -> AsyncIterator[None]:
    """Cancel the block at `deadline` (event-loop time; None: never) and raise DeadlineExceeded."""
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError as exc:
        raise deadline_passed(metrics, slot) from exc
