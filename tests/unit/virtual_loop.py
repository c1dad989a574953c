"""An asyncio event loop on a virtual clock: when nothing is ready, time jumps to the next timer.

`asyncio.sleep`, `asyncio.timeout` and every `call_later` run on `loop.time()`, so code under test
that takes its clock from the loop sees seconds pass without any real wait. Only for code that
does no real I/O (fake engines): a select that would block with no timer left is a deadlock and
raises.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is ready, no timer is set: the loop would wait forever."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            ready = super().select(0)  # the loop's own wake-up pipe (call_soon_threadsafe), never real I/O
            if ready:
                return ready
            raise Deadlock("every task waits and no timer is set")
        assert self.loop is not None
        self.loop.now += max(0.0, timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` is virtual and advances only while the loop is idle."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T], start: float = 1000.0) -> T:
    """Run `coro` to its end on a fresh virtual loop, then close the loop."""
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
