"""The swap policy: pure decisions on snapshots, then a scripted alternating workload on fake engines."""

from __future__ import annotations

import pytest

from llm_service.engines.fake import FakeEngine
from llm_service.registry.slots import Slot, SlotState
from llm_service.registry.swap import SlotView, SwapPolicy

from .conftest import slot_config
from .swap_workload import LOAD, TOKEN, UNLOAD, alternating_registry, run_alternating

POLICY = SwapPolicy(min_residency=5, fairness=30, drain_timeout=10)
NOW = 1000.0


def view(name: str, state: SlotState = SlotState.LOADED, share: float = 0.3, **kwargs) -> SlotView:
    values = {"in_flight": 0, "waiting": 0, "last_used": 0.0, "loaded_since": 0.0, **kwargs}
    return SlotView(name=name, state=state, share=share, **values)


def decide(*slots: SlotView, budget: float = 0.5, waiting_since: float = NOW, now: float = NOW):
    return POLICY.make_room(list(slots), "b", budget, waiting_since, now)


UNLOADED_B = view("b", SlotState.UNLOADED)


def test_a_load_that_fits_needs_nothing() -> None:
    assert decide(view("a"), UNLOADED_B, budget=0.6).fits


def test_an_idle_victim_is_evicted_least_recently_used_first() -> None:
    decision = decide(view("a", last_used=5.0), view("c", last_used=3.0), UNLOADED_B, budget=0.8)
    assert decision.evict == ("c",)


def test_idle_victims_go_before_busy_ones_even_if_used_later() -> None:
    decision = decide(view("a", in_flight=1, last_used=1.0), view("c", last_used=9.0), UNLOADED_B, budget=0.8)
    assert decision.evict == ("c",)


def test_a_just_loaded_slot_stays_for_its_minimum_residency() -> None:
    decision = decide(view("a", loaded_since=NOW - 2), UNLOADED_B)
    assert not decision.evict and not decision.drain and decision.recheck_at == NOW + 3


def test_a_slot_with_waiting_requests_is_not_idle() -> None:
    """The ping-pong bug: a slot loaded for waiting requests must serve them first."""
    decision = decide(view("a", waiting=1), UNLOADED_B)
    assert not decision.evict and not decision.drain


def test_a_busy_victim_admits_until_the_fairness_bound_then_drains() -> None:
    busy = view("a", in_flight=2)
    within = decide(busy, UNLOADED_B, waiting_since=NOW - 10)
    assert not within.drain and within.recheck_at == NOW + 20
    past = decide(busy, UNLOADED_B, waiting_since=NOW - 30)
    assert past.drain == ("a",) and past.recheck_at == NOW + 10


def test_fairness_counts_from_the_victims_load_when_the_other_waited_longer() -> None:
    """Time a request waited while the victim itself was loading is not the victim's turn."""
    decision = decide(view("a", in_flight=1, loaded_since=NOW - 5), UNLOADED_B, waiting_since=NOW - 60)
    assert not decision.drain and decision.recheck_at == NOW + 25


def test_a_drained_victim_is_evicted_when_idle() -> None:
    decision = decide(view("a", draining_since=NOW - 1), UNLOADED_B, waiting_since=NOW - 31)
    assert decision.evict == ("a",)


def test_a_drain_that_outlasts_its_timeout_is_refused_with_the_holders() -> None:
    decision = decide(view("a", in_flight=1, draining_since=NOW - 10), UNLOADED_B, waiting_since=NOW - 40)
    assert decision.refuse and "a (0.30, 1 in flight)" in decision.refuse


def test_room_held_by_slots_that_are_not_loaded_cannot_be_freed() -> None:
    decision = decide(view("a", SlotState.LOADING), UNLOADED_B)
    assert decision.refuse


# --- the scripted workload ---------------------------------------------------------------
# "alternate": every client switches slot on each request, so a load can serve at most one request
# per client (4), and serves them all: 100 / 4 loads, plus the first. "sticky": two clients per
# slot; a load serves what waited plus what arrives within the fairness bound (0.3 s of 60 ms
# requests by two clients: about ten).
@pytest.mark.parametrize(("pattern", "max_loads"), [("alternate", 27), ("sticky", 20)])
async def test_alternating_clients_load_rarely_and_nobody_starves(pattern: str, max_loads: int) -> None:
    registry, factory = alternating_registry()
    result = await run_alternating(registry, factory, clients=4, requests=100, pattern=pattern)
    await registry.close()
    assert result.refused == 0 and result.served == 100
    assert result.loads <= max_loads, result.loads
    # No request waits longer than: the other slot's load, its fairness time, its longest request,
    # its unload, then its own load.
    bound = LOAD + registry.policy.swap_fairness + 16 * TOKEN + UNLOAD + LOAD
    assert result.max_wait <= bound * 1.5, (result.max_wait, bound)  # slack: a shared, busy CPU


async def test_the_fairness_bound_is_what_saves_the_loads() -> None:
    """Against the same workload without fairness time or minimum residency (waiting requests
    still keep their slot: the ping-pong fix alone)."""
    eager, eager_factory = alternating_registry(swap_fairness=0.0, min_residency=0.0)
    without = await run_alternating(eager, eager_factory, clients=4, requests=40, pattern="sticky")
    await eager.close()
    fair, fair_factory = alternating_registry()
    with_bound = await run_alternating(fair, fair_factory, clients=4, requests=40, pattern="sticky")
    await fair.close()
    assert with_bound.loads * 2 <= without.loads, (with_bound.loads, without.loads)


def test_a_draining_slot_owes_only_the_requests_that_waited_before_its_drain() -> None:
    config = slot_config("a")
    slot = Slot(config=config, pinned=False, state=SlotState.LOADED, engine=FakeEngine(config))
    slot.wait_starts = [10.0, 20.0]
    assert slot.owed == 2 and slot.admits(20.0)
    slot.draining_since = 15.0
    assert slot.owed == 1 and slot.admits(10.0) and not slot.admits(20.0)
    assert SlotView.of(slot, 1.0).waiting == 1
    slot.wait_starts = [20.0]
    assert SlotView.of(slot, 1.0).idle  # the later request waits for the slot's next load
