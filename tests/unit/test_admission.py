"""Admission control: the policy on plain data, and 429s with Retry-After through both API surfaces."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from typing import Any

import pytest

from llm_service.engines.base import EngineCapacity
from llm_service.errors import Overloaded
from llm_service.observability.metrics import Metrics
from llm_service.traffic.admission import (
    AdmissionController,
    AdmissionLimits,
    AdmissionPolicy,
    DrainMeter,
    DrainRate,
    SlotLoad,
    Work,
    queue_seconds,
    requests_at_once,
)
from tests.metrics_text import metric

from .app_client import app_client

CAPACITY = EngineCapacity(max_num_seqs=8, kv_cache_tokens=10_000, max_model_len=4096)
RATE = DrainRate(tokens_per_second=1000.0, sequences_per_second=0.5)


@pytest.mark.parametrize(
    ("held", "work", "drain", "seconds_left", "reason", "retry_after"),
    [
        # An idle slot runs any request that passed validation.
        (Work(0, 0), Work(1, 9_999), None, math.inf, None, None),
        # Room in the KV cache and the batch: starts at once, whatever the deadline.
        (Work(3, 6_000), Work(1, 4_000), RATE, 0.001, None, None),
        # KV cache full, no rate measured yet: queued up to per_batch (2) engine-fulls of work...
        (Work(5, 10_000), Work(1, 1_000), None, math.inf, None, None),
        (Work(8, 800), Work(1, 100), None, math.inf, None, None),
        # ...and refused past them, with the momentary Retry-After.
        (Work(10, 19_500), Work(1, 1_000), None, math.inf, "queue", 1.0),
        (Work(16, 1_600), Work(1, 100), None, math.inf, "queue", 1.0),
        # With a rate: 3,000 tokens over the KV cache drain in 3 s; queued when the deadline is later...
        (Work(7, 12_000), Work(1, 1_000), RATE, 10.0, None, None),
        (Work(7, 12_000), Work(1, 1_000), RATE, math.inf, None, None),
        # ...refused now when it is sooner, Retry-After the expected drain.
        (Work(7, 12_000), Work(1, 1_000), RATE, 2.0, "queue", 3),
        # The batch bounds too: 3 sequences over max_num_seqs at 0.5 a second is 6 s.
        (Work(10, 1_000), Work(1, 10), RATE, 5.0, "queue", 6),
        (Work(10, 1_000), Work(1, 10), RATE, 7.0, None, None),
    ],
)
def test_work_refusal(held, work, drain, seconds_left, reason, retry_after):
    policy = AdmissionPolicy(AdmissionLimits(per_batch=2.0))
    load = SlotLoad(pending=held.sequences, held=held, capacity=CAPACITY, drain=drain)
    refusal = policy.work_refusal("a", work, load, seconds_left)
    assert (refusal.reason if refusal else None) == reason
    if refusal is not None:
        assert refusal.retry_after == retry_after


def test_work_of_a_slot_never_loaded_is_bounded_by_count_only():
    policy = AdmissionPolicy(AdmissionLimits())
    assert policy.work_refusal("a", Work(9, 10**9), SlotLoad(pending=9, held=Work(9, 10**9)), 0.1) is None


@pytest.mark.parametrize(
    ("held", "work", "expected"),
    [
        (Work(0, 0), Work(1, 10_000), 0.0),
        (Work(7, 9_000), Work(1, 2_000), 1.0),  # 1,000 tokens over at 1,000 a second
        (Work(9, 100), Work(1, 100), 4.0),  # 2 sequences over at 0.5 a second
    ],
)
def test_queue_seconds(held, work, expected):
    assert queue_seconds(SlotLoad(held=held, capacity=CAPACITY, drain=RATE), work) == expected
    if expected:
        assert queue_seconds(SlotLoad(held=held, capacity=CAPACITY), work) is None  # no rate yet


@pytest.mark.parametrize(
    ("kv_tokens", "max_num_seqs", "tokens", "expected"),
    [
        (9_289, 256, 1_000, 9),  # `standard` on 24 GiB
        (9_289, 256, 4_000, 2),
        (188_589, 256, 1_000, 188),
        (188_589, 128, 1_000, 128),  # the batch bounds
        (500, 256, 1_000, 0),
    ],
)
def test_requests_at_once(kv_tokens, max_num_seqs, tokens, expected):
    assert requests_at_once(kv_tokens, max_num_seqs, tokens) == expected


def test_count_bounds_apply_where_set():
    policy = AdmissionPolicy(AdmissionLimits(per_slot=4, total=6))
    loads = {"a": SlotLoad(pending=3, capacity=CAPACITY), "b": SlotLoad(pending=2, capacity=CAPACITY)}
    assert policy.arrival_refusal("a", 1, loads) is None
    refusal = policy.arrival_refusal("a", 2, loads)
    assert refusal is not None and refusal.reason == "slot" and refusal.limit == 4
    loads = {"a": SlotLoad(pending=3, capacity=CAPACITY), "b": SlotLoad(pending=3, capacity=CAPACITY)}
    refusal = policy.arrival_refusal("b", 1, loads)
    assert refusal is not None and refusal.reason == "total" and refusal.limit == 6


def test_without_explicit_bounds_only_a_slot_never_loaded_is_bounded_by_count():
    policy = AdmissionPolicy(AdmissionLimits(before_load=5))
    assert policy.slot_bound(SlotLoad(capacity=CAPACITY)) is None
    assert policy.arrival_refusal("a", 1, {"a": SlotLoad(pending=1000, capacity=CAPACITY)}) is None
    assert policy.slot_bound(SlotLoad()) == 5
    assert policy.arrival_refusal("a", 1, {"a": SlotLoad(pending=5)}) is not None
    assert policy.arrival_refusal("a", 9, {"a": SlotLoad(pending=0)}) is None  # an idle slot takes one


def test_drain_meter_measures_release_per_busy_second():
    meter = DrainMeter(horizon=1e9)
    assert meter.rate() is None
    meter.tick(0.0, busy=False)
    meter.tick(2.0, busy=True)  # busy from 0 to 2
    meter.release(Work(2, 1_000))
    meter.tick(10.0, busy=False)  # idle time does not count
    meter.tick(12.0, busy=True)
    meter.release(Work(2, 1_000))
    rate = meter.rate()
    assert rate is not None
    assert rate.tokens_per_second == pytest.approx(500.0) and rate.sequences_per_second == pytest.approx(1.0)


async def test_arrivals_reserve_their_least_work_until_their_exact_work_replaces_it():
    now = iter(range(100))
    controller = AdmissionController(["a"], AdmissionPolicy(AdmissionLimits(per_batch=1.0)), Metrics(),
                                     lambda slot: CAPACITY, clock=lambda: float(next(now)))
    async with controller.admit("a", Work(1, 5_000)) as first, controller.admit("a", Work(1, 4_000)) as second:
        # Neither has started, yet a third is weighed against both reservations (no queue at per_batch 1).
        with pytest.raises(Overloaded):
            async with controller.admit("a", Work(1, 1_001)):
                pass
        first.start(Work(1, 6_000), CAPACITY)  # its prompt: 1,000 tokens more than reserved
        with pytest.raises(Overloaded):
            second.start(Work(1, 4_500), CAPACITY)
        assert controller.snapshot()["a"] | {"drain_tokens_per_second": None} == {
            "waiting": 1, "running": 1, "held_tokens": 10_000, "kv_cache_tokens": 10_000, "max_num_seqs": 8,
            "drain_tokens_per_second": None, "bound": None,
        }
    assert controller.snapshot()["a"]["held_tokens"] == 0
    assert controller.snapshot()["a"]["drain_tokens_per_second"] == 6_000  # drained in one second of the clock


async def test_at_start_only_its_own_work_turns_a_request_admitted_on_arrival_into_a_429():
    """The deadline is decided on arrival. At start a request is refused only when its own work, now
    known, adds more to its wait than it had to spare then: not because time passed on the way to the
    engine (a burst being decided first) or the estimate of the queue ahead moved."""
    now = [0.0]
    controller = AdmissionController(["a"], AdmissionPolicy(AdmissionLimits()), Metrics(), lambda slot: CAPACITY,
                                     clock=lambda: now[0])
    async with controller.admit("a", Work(1, 1_000)) as measured:
        measured.start(Work(1, 1_000), CAPACITY)
        now[0] = 1.0
    assert controller.snapshot()["a"]["drain_tokens_per_second"] == 1_000  # the clock stands still from here
    loop = asyncio.get_running_loop()
    async with controller.admit("a", Work(1, 10_000)) as full:
        full.start(Work(1, 10_000), CAPACITY)  # the KV cache is full: the next ones queue
        # Expected to start in 1 s, 2 s before its deadline.
        async with controller.admit("a", Work(1, 1_000), deadline=loop.time() + 3) as moved:
            # Its deadline is 0.5 s away when it reaches the engine, 1.5 s of queue ahead: still admitted.
            moved.start(Work(1, 1_500), CAPACITY, deadline=loop.time() + 0.5)
            # Expected to start in 2.5 s, 0.5 s to spare; its prompt adds 1 s.
            async with controller.admit("a", Work(1, 1_000), deadline=loop.time() + 3) as grown:
                with pytest.raises(Overloaded) as refused:
                    grown.start(Work(1, 2_000), CAPACITY, deadline=loop.time() + 3)
                assert refused.value.retry_after == 4


@pytest.mark.parametrize(
    ("path", "payload", "envelope_keys"),
    [
        ("/generate", {"prompt": "one two three"}, {"type", "message", "param"}),
        ("/v1/completions", {"model": "standard", "prompt": "one two three"}, {"type", "message", "param", "code"}),
    ],
)
async def test_past_an_explicit_slot_bound_requests_get_429_at_once(path, payload, envelope_keys):
    async with app_client(engine={"token_delay": 0.2}, max_pending_per_slot=2) as (client, _):
        responses = await asyncio.gather(*(client.post(path, json=payload) for _ in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert set(refused.json()["error"]) == envelope_keys
        assert refused.json()["error"]["type"] == "overloaded"
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_refused_total", model="standard", reason="slot") == 4
        # Once the admitted ones finished, the slot admits again.
        assert (await client.post(path, json=payload)).status_code == 200


def _request(i: int, max_tokens: int = 7) -> dict[str, object]:
    # Three prompt words plus max_tokens: 10 tokens of work with the fake engine.
    return {"prompt": f"count {i} now", "max_tokens": max_tokens, "cache": {"use_cache": False}}


async def test_what_the_engine_runs_at_once_is_never_refused():
    # 40 KV tokens: four 10-token requests at once, whatever their count bound used to be.
    async with app_client(engine={"token_delay": 0.05, "kv_cache_tokens": 40}) as (client, _):
        responses = await asyncio.gather(*(client.post("/generate", json=_request(i)) for i in range(4)))
        assert [r.status_code for r in responses] == [200] * 4


async def test_a_flood_is_refused_at_once_and_the_admitted_are_served():
    at_once = 4  # 40 KV tokens, 10 tokens a request
    async with app_client(engine={"token_delay": 0.05, "kv_cache_tokens": 40}) as (client, _):
        live: list[int] = []
        flooding = True

        async def probe_liveness() -> None:
            while flooding:
                live.append((await client.get("/health/live")).status_code)
                await asyncio.sleep(0.01)

        async def one(i: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            r = await client.post("/generate", json=_request(i))
            return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

        prober = asyncio.create_task(probe_liveness())
        results = await asyncio.gather(*(one(i) for i in range(20 * at_once)))
        flooding = False
        await prober
        served = [r for r in results if r[0] == 200]
        refused = sorted(seconds for status, seconds, _ in results if status == 429)
        assert len(served) + len(refused) == 20 * at_once  # every request ended, served or refused
        # No drain rate measured yet: two engine-fulls are admitted (running and queued behind them).
        assert len(served) == 2 * at_once
        assert all(retry == "1" for status, _, retry in results if status == 429)
        assert live and set(live) == {200}
        p99 = refused[math.ceil(0.99 * len(refused)) - 1]
        print(f"\nflood of {20 * at_once}: {len(served)} served, {len(refused)} refused, "
              f"refusal p99 {p99 * 1000:.1f} ms")
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_refused_total", model="standard", reason="queue") == len(refused)
        assert metric(text, "llm_requests_waiting", model="standard") == 0


async def test_a_request_that_could_not_start_before_its_deadline_gets_429_at_once():
    async with app_client(engine={"token_delay": 0.05, "kv_cache_tokens": 40}) as (client, _):
        # Measure a drain rate, then fill the engine and queue one engine-full behind it.
        assert {r.status_code for r in await asyncio.gather(
            *(client.post("/generate", json=_request(i)) for i in range(4)))} == {200}
        busy = [asyncio.create_task(client.post("/generate", json=_request(i))) for i in range(8)]
        await asyncio.sleep(0.02)
        rushed = await client.post("/generate", json=_request(99), headers={"X-Request-Timeout": "0.05"})
        assert rushed.status_code == 429 and rushed.json()["error"]["type"] == "overloaded"
        assert int(rushed.headers["retry-after"]) >= 1
        patient = await client.post("/generate", json=_request(100), headers={"X-Request-Timeout": "60"})
        assert patient.status_code == 200
        assert {r.status_code for r in await asyncio.gather(*busy)} == {200}


async def test_waiting_and_running_gauges_follow_the_engine_batch():
    async with app_client(engine={"token_delay": 0.3, "max_num_seqs": 2}) as (client, factory):
        tasks = [asyncio.create_task(client.post("/generate", json={"prompt": f"q {i}"})) for i in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if factory.of("standard")[0].num_requests() == 3:
                break
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_running", model="standard") == 2
        assert metric(text, "llm_requests_waiting", model="standard") == 1
        assert metric(text, "llm_engine_requests", model="standard") == 3
        assert metric(text, "llm_engine_kv_cache_usage", model="standard") == 1.0
        busy_tasks = metric(text, "llm_event_loop_tasks")
        await asyncio.gather(*tasks)
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_running", model="standard") == 0
        assert metric(text, "llm_requests_waiting", model="standard") == 0
        assert metric(text, "llm_engine_kv_cache_usage", model="standard") == 0.0
        assert metric(text, "llm_event_loop_tasks") < busy_tasks  # the three requests' tasks are gone


async def test_total_bound_covers_every_slot():
    async with app_client(engine={"token_delay": 0.2}, max_pending_total=2) as (client, _):
        responses = await asyncio.gather(
            client.post("/generate", json={"prompt": "a b", "model": "standard"}),
            client.post("/generate", json={"prompt": "a b", "model": "standard"}),
            client.post("/generate", json={"prompt": "a b", "model": "longctx"}),
        )
        assert sorted(r.status_code for r in responses) == [200, 200, 429]


async def test_health_shows_the_engine_capacity_before_any_request():
    # Preloaded standard (fake: 8 sequences, 65,536 KV tokens): bounded by work; longctx not loaded
    # yet: the before-load count bound.
    async with app_client(max_pending_before_load=5) as (client, _):
        admission = (await client.get("/health")).json()["admission"]
        assert admission["standard"]["bound"] is None
        assert admission["standard"]["kv_cache_tokens"] == 65536 and admission["standard"]["max_num_seqs"] == 8
        assert admission["longctx"]["bound"] == 5


@pytest.mark.parametrize("seed", range(20))
async def test_the_held_work_follows_every_schedule_of_reservations_starts_and_ends(seed: int) -> None:
    """Seeded schedules of arrivals (reserved or admitted), starts with more or less work than
    reserved, refusals, releases and ends: after every step the held tokens and sequences /health
    shows are those of the requests still held (a failing seed replays)."""
    rng = random.Random(seed)
    controller = AdmissionController(["a"], AdmissionPolicy(AdmissionLimits(per_batch=3.0)), Metrics(),
                                     lambda slot: CAPACITY)
    held: dict[int, Work] = {}  # the model: what each live request holds
    live: dict[int, tuple[contextlib.AsyncExitStack, Any]] = {}
    reservations: dict[int, Any] = {}
    for step in range(150):
        action = rng.choice(["reserve", "admit", "release", "start", "end"])
        least = Work(rng.randint(1, 2), rng.randint(1, 3_000))
        if action == "reserve":
            with contextlib.suppress(Overloaded):
                reservations[step] = controller.reserve("a", least)
                held[step] = least
        elif action == "admit" and reservations:
            key = rng.choice(list(reservations))
            stack = contextlib.AsyncExitStack()
            admission = await stack.enter_async_context(controller.admit("a", least, reservation=reservations.pop(key)))
            live[key] = (stack, admission)
        elif action == "release" and reservations:
            key = rng.choice(list(reservations))
            reservations.pop(key).release()
            del held[key]
        elif action == "start" and live:
            key = rng.choice(list(live))
            if live[key][1].started:  # a second start changes nothing
                continue
            work = Work(held[key].sequences, max(1, held[key].tokens + rng.randint(-500, 2_000)))
            with contextlib.suppress(Overloaded):
                live[key][1].start(work, CAPACITY)
                held[key] = work
        elif action == "end" and live:
            key = rng.choice(list(live))
            stack, _ = live.pop(key)
            await stack.aclose()
            del held[key]
        figures = controller.snapshot()["a"]
        assert figures["held_tokens"] == sum(w.tokens for w in held.values()), (seed, step, action)
        assert figures["waiting"] + figures["running"] == sum(w.sequences for w in held.values()), (seed, step)
    for stack, _ in live.values():
        await stack.aclose()
