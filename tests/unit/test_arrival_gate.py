"""The fast path's arrival gate on a virtual clock: in a burst, requests admitted to wait go on only
once arrivals pause (or after the limit), one by one in the order they came, stopping again when a
request arrives; a request alone does not wait."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.api.fast_path import ArrivalGate

from .virtual_loop import run_virtual

STEP, QUIET, LIMIT = 0.001, 0.003, 0.05


def gate_() -> ArrivalGate:
    return ArrivalGate(quiet=QUIET, limit=LIMIT, burst=STEP)


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


def test_waiting_requests_go_on_in_order_once_no_request_arrived_for_the_quiet_time() -> None:
    async def scenario() -> None:
        gate = gate_()
        gone: list[tuple[str, float]] = []
        waiters = [asyncio.create_task(admitted(gate, f"w{i}", True, gone)) for i in range(5)]
        last = await burst(gate, 20, STEP / 2)
        await asyncio.gather(*waiters)
        assert [name for name, _ in gone] == [f"w{i}" for i in range(5)]
        times = [t for _, t in gone]
        assert last + QUIET <= min(times) and max(times) <= last + QUIET + STEP  # one releaser, one by one

    run_virtual(scenario())


def test_a_request_arriving_while_they_go_on_stops_the_rest_until_the_next_quiet_time() -> None:
    # A burst read in two parts: the first part's routes used to hold the second part behind them.
    async def scenario() -> None:
        gate = gate_()
        loop = asyncio.get_running_loop()
        gone: list[tuple[str, float]] = []
        second: list[float] = []

        async def first() -> None:
            await admitted(gate, "w0", True, gone)
            gate.arrived()  # the burst's second part, decided during the turns after w0 went on
            second.append(loop.time())

        waiters = [asyncio.create_task(first())]
        waiters += [asyncio.create_task(admitted(gate, f"w{i}", True, gone)) for i in range(1, 5)]
        await burst(gate, 3, STEP / 2)
        await asyncio.gather(*waiters)
        assert [name for name, _ in gone] == [f"w{i}" for i in range(5)]
        assert second[0] == gone[0][1]
        assert all(second[0] + QUIET <= t for _, t in gone[1:])

    run_virtual(scenario())


def test_an_endless_burst_holds_them_no_longer_than_the_limit() -> None:
    async def scenario() -> None:
        gate = gate_()
        loop = asyncio.get_running_loop()
        gone: list[tuple[str, float]] = []
        began = loop.time()
        flood = asyncio.create_task(burst(gate, 1000, STEP / 4))
        await asyncio.gather(*(admitted(gate, f"w{i}", True, gone) for i in range(3)))
        assert [name for name, _ in gone] == ["w0", "w1", "w2"]
        assert {t for _, t in gone} == {began + LIMIT}  # all at once: arrivals no longer stop them
        assert not flood.done()
        flood.cancel()

    run_virtual(scenario())


@pytest.mark.parametrize(("waits", "held_for"), [(False, 0.0), (True, QUIET)])
def test_a_request_alone_goes_on_after_its_turns_or_the_quiet_time(waits: bool, held_for: float) -> None:
    async def scenario() -> None:
        gate = gate_()
        began = asyncio.get_running_loop().time()
        gone: list[tuple[str, float]] = []
        await admitted(gate, "alone", waits, gone)
        assert gone[0][1] - began == pytest.approx(held_for)

    run_virtual(scenario())


def test_one_the_engine_starts_at_once_waits_with_a_burst_arriving_meanwhile() -> None:
    async def scenario() -> None:
        gate = gate_()
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
        gate = gate_()
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
        gate = gate_()
        gone: list[tuple[str, float]] = []
        gate.arrived()
        await asyncio.sleep(2 * STEP)
        began = asyncio.get_running_loop().time()
        await admitted(gate, "at-once", False, gone)
        assert gone[0][1] == began

    run_virtual(scenario())


def test_a_waiting_request_whose_client_left_is_skipped() -> None:
    async def scenario() -> None:
        gate = gate_()
        gone: list[tuple[str, float]] = []
        first = asyncio.create_task(admitted(gate, "left", True, gone))
        second = asyncio.create_task(admitted(gate, "stays", True, gone))
        flood = asyncio.create_task(burst(gate, 10, STEP / 2))
        await asyncio.sleep(STEP)
        first.cancel()  # its client left
        last = await flood
        await second
        assert gone == [("stays", last + QUIET)]
        assert first.cancelled()
        await asyncio.sleep(STEP)
        assert gate._releaser is None  # nothing left running

    run_virtual(scenario())
