"""The HTTP API on fake engines: responses, streaming, the error envelope, health, metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from llm_service.app import EngineBackend, create_app
from tests.metrics_text import metric

from .conftest import GIB, FakeFactory, fake_settings

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def test_generate_with_messages(fake_app):
    client, _ = fake_app
    r = await client.post("/generate", json={"messages": CAPITAL, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert "Paris" in body["text"]
    assert body["model"] == "standard" and body["model_id"] == "fake/standard"
    assert body["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["timings"]["total"] >= body["timings"]["time_to_first_token"] >= 0
    assert r.headers["x-request-id"] == body["id"]


async def test_client_request_id_is_kept(fake_app):
    client, _ = fake_app
    r = await client.post("/generate", json={"prompt": "hello there"}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "abc-123"


async def test_stream_matches_the_plain_response(fake_app):
    client, _ = fake_app
    plain = (await client.post("/generate", json={"messages": CAPITAL, "temperature": 0})).json()
    r = await client.post("/generate", json={"messages": CAPITAL, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == plain["text"]
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"] == plain["usage"]


async def test_max_tokens_limits_the_output(fake_app):
    client, _ = fake_app
    body = (await client.post("/generate", json={"messages": CAPITAL, "max_tokens": 2})).json()
    assert body["usage"]["completion_tokens"] == 2 and body["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("payload", "status", "error_type", "fragment"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model_not_found", "standard, longctx, multimodal"),
        ({}, 400, "invalid_request_error", "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "a", "messages": CAPITAL}, 400, "invalid_request_error", "exactly one"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
        ({"prompt": "hi", "temperature": 5}, 400, "invalid_request_error", "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        ({"prompt": "hi", "bogus": 1}, 400, "invalid_request_error", "bogus"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request_error", "role"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "invalid_request_error", "context length"),
        ({"prompt": "word " * 600}, 400, "invalid_request_error", "context length"),
    ],
)
async def test_bad_requests_get_the_json_envelope(fake_app, payload, status, error_type, fragment):
    client, _ = fake_app
    r = await client.post("/generate", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == error_type
    assert fragment in error["message"]


async def test_malformed_json_is_400(fake_app):
    client, _ = fake_app
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_path_is_a_json_404(fake_app):
    client, _ = fake_app
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


async def test_health_live_ready_and_dependencies(fake_app):
    client, _ = fake_app
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/health/ready")).status_code == 200
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy" and body["version"]
    models = body["dependencies"]["models"]
    assert models["standard"]["state"] == "loaded" and models["standard"]["model_id"] == "fake/standard"
    assert models["longctx"]["state"] == "unloaded"
    assert models["standard"]["memory_share"] == 0.3
    assert body["dependencies"]["redis"]["status"] in {"up", "down", "disabled"}


async def test_metrics_move_with_requests(fake_app):
    client, _ = fake_app
    before = (await client.get("/metrics")).text
    assert metric(before, "llm_model_loaded", model="standard") == 1
    await client.post("/generate", json={"messages": CAPITAL})
    await client.post("/generate", json={"model": "nope", "prompt": "x"})
    await client.post("/generate", json={"prompt": "hi", "max_tokens": 100000})
    after = (await client.get("/metrics")).text
    assert metric(after, "llm_requests_total", model="standard", status="success") == 1
    assert metric(after, "llm_requests_total", model="standard", status="invalid") == 1
    assert metric(after, "llm_tokens_generated_total", model="standard") == 6
    assert metric(after, "llm_prompt_tokens_total", model="standard") > 0
    assert metric(after, "llm_inference_duration_seconds_count", model="standard") == 1
    assert metric(after, "llm_time_to_first_token_seconds_count", model="standard") == 1
    assert metric(after, "llm_requests_in_flight", model="standard") == 0
    assert "vllm" not in after


async def test_failed_slot_gives_503_with_reason_and_other_slots_serve():
    factory = FakeFactory()
    factory.per_slot["longctx"] = {"fail_start": RuntimeError("CUDA out of memory")}
    app = create_app(fake_settings(load_retry_seconds=60), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.post("/generate", json={"model": "longctx", "prompt": "hi"})
            assert r.status_code == 503
            assert "CUDA out of memory" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 200
            health = (await client.get("/health")).json()
            assert health["status"] == "degraded"
            assert "CUDA out of memory" in health["dependencies"]["models"]["longctx"]["error"]


async def test_engine_death_mid_stream_ends_with_an_error_event():
    factory = FakeFactory(die_after_tokens=2)
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.post("/generate", json={"messages": CAPITAL, "stream": True})
            assert r.status_code == 200
            lines = sse_events(r.text)
            assert [e["type"] for e in lines[:2]] == ["delta", "delta"]
            assert lines[-1]["type"] == "error" and lines[-1]["error"]["type"] == "engine_error"
            health = (await client.get("/health")).json()
            assert health["dependencies"]["models"]["standard"]["state"] == "failed"


async def test_preloading_service_is_live_but_not_ready():
    gate = asyncio.Event()
    factory = FakeFactory(start_gate=gate)
    app = create_app(fake_settings(), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/health/live")).status_code == 200
            r = await client.get("/health/ready")
            assert r.status_code == 503 and r.json()["reason"] == "preloading models"
            assert (await client.get("/health")).json()["status"] == "degraded"
            gate.set()
            await app.state.resources.registry.wait_preloaded()
            assert (await client.get("/health/ready")).status_code == 200
