"""Admission control: the policy on plain data, and 429s with Retry-After through both API surfaces."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.admission import AdmissionLimits, AdmissionPolicy, SlotLoad
from llm_service.engines.base import EngineCapacity
from tests.metrics_text import metric

from .app_client import app_client


def test_batch_is_the_smaller_of_max_num_seqs_and_what_the_kv_cache_holds():
    assert EngineCapacity(max_num_seqs=256, kv_cache_tokens=23_000, max_model_len=2048).batch == 11
    assert EngineCapacity(max_num_seqs=4, kv_cache_tokens=1_000_000, max_model_len=2048).batch == 4
    assert EngineCapacity(max_num_seqs=8, kv_cache_tokens=100, max_model_len=2048).batch == 1


def test_slot_bound_comes_from_the_engine_unless_set():
    derived = AdmissionPolicy(AdmissionLimits(per_batch=2.0, before_load=5))
    assert derived.slot_bound(SlotLoad(batch=11)) == 22
    assert derived.slot_bound(SlotLoad(batch=None)) == 5  # not loaded yet: capacity unknown
    fixed = AdmissionPolicy(AdmissionLimits(per_slot=3))
    assert fixed.slot_bound(SlotLoad(batch=11)) == 3


def test_refusals_per_slot_and_in_total():
    policy = AdmissionPolicy(AdmissionLimits(per_slot=4, total=6))
    loads = {"a": SlotLoad(pending=3, batch=2), "b": SlotLoad(pending=2, batch=2)}
    assert policy.refusal("a", 1, loads) is None
    refusal = policy.refusal("a", 2, loads)
    assert refusal is not None and refusal.reason == "slot" and refusal.limit == 4
    loads = {"a": SlotLoad(pending=3, batch=2), "b": SlotLoad(pending=3, batch=2)}
    refusal = policy.refusal("b", 1, loads)
    assert refusal is not None and refusal.reason == "total" and refusal.limit == 6


def test_a_request_heavier_than_the_bound_runs_on_an_idle_slot():
    policy = AdmissionPolicy(AdmissionLimits(per_slot=2))
    assert policy.refusal("a", 5, {"a": SlotLoad(pending=0, batch=1)}) is None
    assert policy.refusal("a", 1, {"a": SlotLoad(pending=2, batch=1)}) is not None


def test_total_bound_defaults_to_the_sum_of_the_slots():
    policy = AdmissionPolicy(AdmissionLimits(per_batch=2.0, before_load=10))
    assert policy.total_bound({"a": SlotLoad(batch=4), "b": SlotLoad(batch=None)}) == 18


@pytest.mark.parametrize(
    ("path", "payload", "envelope_keys"),
    [
        ("/generate", {"prompt": "one two three"}, {"type", "message", "param"}),
        ("/v1/completions", {"model": "standard", "prompt": "one two three"}, {"type", "message", "param", "code"}),
    ],
)
async def test_past_the_slot_bound_requests_get_429_at_once(path, payload, envelope_keys):
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


async def test_default_bound_refuses_part_of_ten_times_what_the_engine_batches():
    # The fake engine batches 4; the default bound is 2 x 4 = 8 running or waiting.
    async with app_client(engine={"token_delay": 0.05, "max_num_seqs": 4}) as (client, _):
        responses = await asyncio.gather(
            *(client.post("/generate", json={"prompt": f"p {i}"}) for i in range(40))
        )
        served = sum(r.status_code == 200 for r in responses)
        refused = sum(r.status_code == 429 for r in responses)
        assert served + refused == 40
        assert served == 8 and refused == 32


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
        await asyncio.gather(*tasks)
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_running", model="standard") == 0
        assert metric(text, "llm_requests_waiting", model="standard") == 0


async def test_total_bound_covers_every_slot():
    async with app_client(engine={"token_delay": 0.2}, max_pending_total=2) as (client, _):
        responses = await asyncio.gather(
            client.post("/generate", json={"prompt": "a b", "model": "standard"}),
            client.post("/generate", json={"prompt": "a b", "model": "standard"}),
            client.post("/generate", json={"prompt": "a b", "model": "longctx"}),
        )
        assert sorted(r.status_code for r in responses) == [200, 200, 429]


async def test_bound_comes_from_a_loaded_engine_before_any_request():
    # Preloaded standard (fake batch 8): 2 x 8; longctx not loaded yet: the before-load bound.
    async with app_client(max_pending_before_load=5) as (client, _):
        admission = (await client.get("/health")).json()["admission"]
        assert admission["standard"]["bound"] == 16
        assert admission["longctx"]["bound"] == 5
