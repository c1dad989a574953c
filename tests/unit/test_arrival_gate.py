"""The fast path's arrival gate on a virtual clock: in a burst, requests admitted to wait go on only
once arrivals pause (or after the limit), together, in the order they came; a request alone does not
wait."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.api.fast_path import ArrivalGate

from .virtual_loop import run_virtual

STEP, LIMIT = 0.001, 0.05


async def burst(gate: ArrivalGate, count: int, every: float) -> float:
    """`count` arrivals `every` seconds apart; the time of the last."""
    loop = asyncio.get_running_loop()
    for _ in range(count):
        await asyncio.sleep(every)
        gate.arrived()
    return loop.time()


async def admitted(gate: ArrivalGate, name: str, waits: bool, gone: list[tuple[str, float]]) -> None:
    await gate.admitted(waits)
    gone.append((name, asyncio.get_running_loop().time()))


def test_waiting_requests_go_on_together_in_order_once_the_burst_pauses() -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        gone: list[tuple[str, float]] = []
        waiters = [asyncio.create_task(admitted(gate, f"w{i}", True, gone)) for i in range(5)]
        last = await burst(gate, 20, STEP / 2)
        await asyncio.gather(*waiters)
        assert [name for name, _ in gone] == [f"w{i}" for i in range(5)]
        times = {t for _, t in gone}
        assert len(times) == 1  # released together, by one watcher
        assert last < times.pop() <= last + 2 * STEP

    run_virtual(scenario())


def test_an_endless_burst_holds_them_no_longer_than_the_limit() -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        loop = asyncio.get_running_loop()
        gone: list[tuple[str, float]] = []
        began = loop.time()
        flood = asyncio.create_task(burst(gate, 1000, STEP / 4))
        await admitted(gate, "w", True, gone)
        assert began + LIMIT <= gone[0][1] <= began + LIMIT + STEP
        assert not flood.done()
        flood.cancel()

    run_virtual(scenario())


@pytest.mark.parametrize(("waits", "held_for"), [(False, 0.0), (True, STEP)])
def test_a_request_alone_goes_on_after_one_turn_or_one_step(waits: bool, held_for: float) -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        began = asyncio.get_running_loop().time()
        gone: list[tuple[str, float]] = []
        await admitted(gate, "alone", waits, gone)
        assert gone[0][1] - began == pytest.approx(held_for)

    run_virtual(scenario())


def test_one_the_engine_starts_at_once_waits_with_a_burst_arriving_meanwhile() -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        gone: list[tuple[str, float]] = []
        first = asyncio.create_task(admitted(gate, "at-once", False, gone))
        await asyncio.sleep(0)  # it is decided, and yields its one turn
        gate.arrived()  # the burst's next request, within that turn
        last = await burst(gate, 10, STEP / 2)
        await first
        assert gone[0][1] > last

    run_virtual(scenario())


def test_one_the_engine_starts_at_once_waits_when_it_arrives_within_a_step_of_the_one_before() -> None:
    # No arrival during its one turn (the next ones are still being read), but it came in a burst.
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        gone: list[tuple[str, float]] = []
        gate.arrived()  # the burst's first request
        await asyncio.sleep(STEP / 4)
        second = asyncio.create_task(admitted(gate, "at-once", False, gone))
        await asyncio.sleep(STEP / 4)
        last = await burst(gate, 10, STEP / 2)
        await second
        assert gone[0][1] > last

    run_virtual(scenario())


def test_one_the_engine_starts_at_once_goes_on_when_the_one_before_came_a_step_earlier() -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        gone: list[tuple[str, float]] = []
        gate.arrived()
        await asyncio.sleep(2 * STEP)
        began = asyncio.get_running_loop().time()
        await admitted(gate, "at-once", False, gone)
        assert gone[0][1] == began

    run_virtual(scenario())


def test_the_watcher_cancelled_lets_the_others_go_on() -> None:
    async def scenario() -> None:
        gate = ArrivalGate(STEP, LIMIT)
        gone: list[tuple[str, float]] = []
        flood = asyncio.create_task(burst(gate, 1000, STEP / 4))
        watcher = asyncio.create_task(admitted(gate, "watcher", True, gone))
        await asyncio.sleep(STEP / 8)
        follower = asyncio.create_task(admitted(gate, "follower", True, gone))
        await asyncio.sleep(STEP)
        watcher.cancel()  # its client left
        left = asyncio.get_running_loop().time()
        await follower
        assert gone == [("follower", left)]  # at once, not at the limit
        assert watcher.cancelled()
        flood.cancel()

    run_virtual(scenario())
