"""Graceful drain: after SIGTERM refuse new work, let requests in flight finish within a grace period."""

from __future__ import annotations

import asyncio
import time

import structlog

log = structlog.get_logger(__name__)

# What a refused client is told to wait: by then the load balancer sends it to another replica.
RETRY_AFTER_SECONDS = 5.0


class Drain:
    """The process's drain state and its count of requests in flight (kept by RequestGuard)."""

    def __init__(self) -> None:
        self.draining = False
        self.began_at: float | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """Stop taking work: /health/ready answers 503 and new requests 503 from now on."""
        if not self.draining:
            self.draining = True
            self.began_at = time.monotonic()
            log.info("drain_started", in_flight=self.in_flight)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no request is in flight or `grace` seconds pass; True if none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("drain_grace_expired", in_flight=self.in_flight, grace_seconds=grace)
            return False
        log.info("drain_finished", seconds=round(time.monotonic() - (self.began_at or time.monotonic()), 2))
        return True
