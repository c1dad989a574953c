"""The lifecycle policy as a table: a snapshot of the slots in, the reconciler's next action out."""

from __future__ import annotations

from typing import Any

import pytest

from llm_service.registry.policy import (
    Action,
    Drain,
    Evict,
    Forget,
    GiveUp,
    LifecyclePolicy,
    Load,
    ShutDownDead,
    Snapshot,
    StopAll,
    Unload,
    Wait,
)
from llm_service.registry.slots import RegistryPolicy, SlotState
from llm_service.registry.swap import SlotView

NOW = 1000.0
POLICY = LifecyclePolicy(
    RegistryPolicy(min_residency=5, swap_fairness=30, eviction_wait=10, idle_unload=60, retry_backoff=10)
)
L, U, F = SlotState.LOADED, SlotState.UNLOADED, SlotState.FAILED


def v(name: str, state: SlotState = U, share: float = 0.3, **kwargs: Any) -> SlotView:
    return SlotView(name=name, state=state, share=share, in_flight=kwargs.pop("in_flight", 0),
                    waiting=kwargs.pop("waiting", 0), last_used=kwargs.pop("last_used", NOW - 1),
                    loaded_since=kwargs.pop("loaded_since", NOW - 100), **kwargs)


def waits(name: str, state: SlotState = U, since: float = NOW - 1, **kwargs: Any) -> SlotView:
    return v(name, state, waiting=1, waiting_since=since, **kwargs)


CASES: list[tuple[str, tuple[SlotView, ...], Action]] = [
    ("nothing to do", (v("a", L, pinned=True), v("b")), Wait(None)),
    ("a dead engine goes first, even mid-drain",
     (v("a", L, in_flight=1, draining_since=NOW - 1, draining_for="c"), v("b", L, dead=True), waits("c")),
     ShutDownDead("b")),
    ("a waited-for slot that fits loads", (v("a", L), waits("b")), Load("b")),
    ("the oldest demand loads first", (waits("a", since=NOW - 5), waits("b", since=NOW - 9)), Load("b")),
    ("a pinned slot's preload", (v("a", pinned=True, wanted_since=0.0),), Load("a")),
    ("an idle victim past its residency is evicted", (v("a", L), v("b", L), waits("c")), Evict(("a",), "c")),
    ("the least recently used idle victim", (v("a", L, last_used=NOW - 2), v("b", L, last_used=NOW - 9), waits("c")),
     Evict(("b",), "c")),
    ("a just-loaded victim keeps its residency",
     (v("a", L, loaded_since=NOW - 2), v("b", L, loaded_since=NOW - 3, last_used=NOW - 3), waits("c")),
     Wait(NOW + 2)),
    ("the least recently used idle victim is waited for through its residency, not passed over",
     (v("a", L, last_used=NOW), v("b", L, loaded_since=NOW - 4, last_used=NOW - 2), waits("c")), Wait(NOW + 1)),
    ("a busy victim admits for the fairness time",
     (v("a", L, in_flight=1), v("b", L, in_flight=1, last_used=NOW - 5), waits("c", since=NOW - 10)),
     Wait(NOW + 20)),
    ("then the least recently used busy victim drains",
     (v("a", L, in_flight=1), v("b", L, in_flight=1, last_used=NOW - 5), waits("c", since=NOW - 30)),
     Drain(("b",), "c")),
    ("a drained victim stays chosen though another is now less recently used (bug 5)",
     (v("a", L, in_flight=1, last_used=NOW - 9), v("b", L, in_flight=1, draining_since=NOW - 2, draining_for="c"),
      waits("c", since=NOW - 40)), Wait(NOW + 8)),
    ("an idle slot that frees enough is evicted rather than waiting for a drain",
     (v("a", L), v("b", L, in_flight=1, draining_since=NOW - 2, draining_for="c"), waits("c", since=NOW - 40)),
     Evict(("a",), "c")),
    ("a drain past its timeout is given up", (v("a", L), v("b", L, in_flight=1, draining_since=NOW - 10,
     draining_for="c"), v("a2", L, in_flight=1), waits("c", since=NOW - 60)), GiveUp("c", "the budget is held by "
     "slots with requests in flight: b (0.30, 1 in flight), a (0.30, 0 in flight)")),
    ("a drain for a load nobody waits for any more is abandoned",
     (v("a", L, in_flight=1, draining_since=NOW - 2, draining_for="c"), v("b", L), v("c")), GiveUp("c", None)),
    ("the fewest victims, not LRU order (bug 6)",
     (v("standard", L, 0.23, last_used=NOW - 9), v("longctx", L, 0.50, last_used=NOW - 5), waits("mm", share=0.38)),
     Evict(("longctx",), "mm")),
    ("a failed slot waits for its back-off", (v("a", F, retry_at=NOW + 4, pinned=True, wanted_since=NOW + 4),),
     Wait(NOW + 4)),
    ("a pinned slot loads again after its back-off, evicting an idle lazy slot",
     (v("a", F, retry_at=NOW - 1, pinned=True, wanted_since=NOW - 1), v("b", L), v("c", L, last_used=NOW - 3)),
     Evict(("c",), "a")),
    ("a lazy slot retries when it fits", (v("a", F, retry_at=NOW - 1), v("b", L)), Load("a")),
    ("a lazy slot's retry never evicts (bug 2): its failure expires", (v("a", F, retry_at=NOW - 1), v("b", L),
     v("c", L)), Forget("a")),
    ("an admin load during the back-off loads now", (v("a", F, retry_at=NOW + 9, wish="load", wish_since=NOW),),
     Load("a")),
    ("an admin unload of an idle slot", (v("a", L, wish="unload"),), Unload("a", "admin")),
    ("an admin unload of a busy slot drains it", (v("a", L, in_flight=1, wish="unload"),), Drain(("a",), None)),
    ("and gives up after the eviction wait",
     (v("a", L, in_flight=1, wish="unload", draining_since=NOW - 10),), GiveUp("a", "still has requests in flight")),
    ("an admin unload of a slot no longer loaded is answered", (v("a", F, wish="unload"),), GiveUp("a", None)),
    ("an idle lazy slot unloads after the idle time", (v("a", L, last_used=NOW - 60),), Unload("a", "idle")),
    ("a pinned slot never idles out", (v("a", L, last_used=NOW - 600, pinned=True),), Wait(None)),
    ("a later demand waits while the oldest one waits for room",
     (v("a", L, in_flight=1), v("d", L, in_flight=1), waits("b", since=NOW - 5), waits("c", since=NOW - 1)),
     Wait(NOW + 25)),
    ("a slot the plan rules out is never loaded", (waits("a", loadable=False),), Wait(None)),
]


@pytest.mark.parametrize(("slots", "expected"), [(s, e) for _, s, e in CASES], ids=[c[0] for c in CASES])
def test_next_action(slots: tuple[SlotView, ...], expected: Action) -> None:
    budget = 0.6 if all(s.share == 0.3 for s in slots) else 0.85
    assert POLICY.next_action(Snapshot(slots, budget, NOW)) == expected


def test_shutdown_stops_everything_after_the_dead() -> None:
    slots = (v("a", L), v("b", L, dead=True))
    assert POLICY.next_action(Snapshot(slots, 0.6, NOW, closing=True)) == ShutDownDead("b")
    assert POLICY.next_action(Snapshot((v("a", L),), 0.6, NOW, closing=True)) == StopAll()
