"""Input limits and deadlines: 413 before parsing, readable JSON errors, OpenAI's content rule, numeric
bounds, request timeouts (504 or a final SSE error) with the engine request aborted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from llm_service.config.settings import LLMSettings
from tests.metrics_text import metric

from .app_client import app_client


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]


async def test_body_over_the_limit_is_413_from_content_length():
    async with app_client(app={"max_body_bytes": 4096}) as (client, factory):
        body = json.dumps({"prompt": "x " * 5000})
        r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "request_too_large" and "4096" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert factory.of("standard")[0].generations == 0


async def test_chunked_body_over_the_limit_is_413_without_reading_it_all():
    sent = []

    async def chunks():
        for _ in range(100):
            sent.append(1)
            yield b"x" * 1024

    async with app_client(app={"max_body_bytes": 4096}) as (client, _):
        r = await client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "content-length" not in r.request.headers
        assert len(sent) < 100  # refused as soon as the limit passed


async def test_body_under_the_limit_is_served():
    async with app_client(app={"max_body_bytes": 4096}) as (client, _):
        assert (await client.post("/generate", json={"prompt": "small prompt"})).status_code == 200


@pytest.mark.parametrize(
    ("body", "where"),
    [('{"prompt": "hi",\n  "max_tokens": }', "line 2 column 17"), ('{"prompt": "x"', "line 1 column 15")],
)
async def test_invalid_json_says_so_and_where(body, where):
    async with app_client() as (client, _):
        for path in ("/generate", "/v1/completions"):
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["message"].startswith("the request body is not valid JSON") and where in error["message"]
            assert error["param"] is None


async def test_missing_body_is_400():
    async with app_client() as (client, _):
        r = await client.post("/generate", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("role", ["user", "system", "developer"])
async def test_user_and_system_messages_need_content(role):
    async with app_client() as (client, _):
        messages = [{"role": role}] if role != "user" else [{"role": "user", "content": None}]
        r = await client.post("/v1/chat/completions", json={"model": "standard", "messages": messages})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages.0" and "needs content" in r.json()["error"]["message"]


async def test_assistant_message_may_come_without_content():
    async with app_client() as (client, _):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "ok"}]
        r = await client.post("/v1/chat/completions", json={"model": "standard", "messages": messages})
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 2**63), ("seed", -(2**63) - 1), ("top_k", 2**31), ("top_k", -2), ("temperature", 2.5)],
)
async def test_numbers_the_engine_would_reject_are_400(field, value):
    async with app_client() as (client, factory):
        for path, extra in (("/generate", {}), ("/v1/completions", {"model": "standard"})):
            r = await client.post(path, json={"prompt": "hi", field: value, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert factory.of("standard")[0].generations == 0


# --- deadlines ---------------------------------------------------------------------------------
async def test_timeout_header_gives_504_and_aborts_the_engine_request():
    async with app_client(engine={"token_delay": 0.3}) as (client, factory):
        started = time.monotonic()
        r = await client.post(
            "/generate", json={"prompt": "a b c"}, headers={"X-Request-Timeout": "0.5", "X-Request-ID": "late-1"}
        )
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert time.monotonic() - started < 5
        assert any(rid.startswith("late-1") for rid in factory.of("standard")[0].aborted)
        text = (await client.get("/metrics")).text
        assert metric(text, "llm_requests_timed_out_total", model="standard") == 1


async def test_timeout_body_field_on_v1_gives_504_in_openais_envelope():
    async with app_client(engine={"token_delay": 0.3}) as (client, _):
        payload = {"model": "standard", "messages": [{"role": "user", "content": "hi"}], "timeout": 0.5}
        r = await client.post("/v1/chat/completions", json=payload)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


async def test_streamed_request_past_its_deadline_ends_with_an_error_event():
    async with app_client(engine={"token_delay": 0.2}) as (client, factory):
        payload = {"prompt": "a b c", "stream": True, "timeout": 0.5}
        r = await client.post("/generate", json=payload, headers={"X-Request-ID": "late-2"})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[0]["type"] == "delta"
        assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "timeout"
        assert any(rid.startswith("late-2") for rid in factory.of("standard")[0].aborted)


async def test_waiting_for_a_load_counts_against_the_deadline():
    async with app_client(engine={"start_delay": 2.0}) as (client, _factory):
        started = time.monotonic()
        payload = {"prompt": "hi", "model": "longctx"}
        r = await client.post("/generate", json=payload, headers={"X-Request-Timeout": "0.5"})
        assert r.status_code == 504
        assert time.monotonic() - started < 1.5


async def test_the_deadline_counts_from_the_requests_arrival_not_from_its_route():
    body = json.dumps({"prompt": "a b c"}).encode()

    async def slowly() -> AsyncIterator[bytes]:  # the body takes 0.8 s to arrive
        yield body[:5]
        await asyncio.sleep(0.8)
        yield body[5:]

    async with app_client(engine={"token_delay": 0.01}) as (client, _):
        headers = {"X-Request-Timeout": "0.5", "Content-Length": str(len(body)), "Content-Type": "application/json"}
        started = time.monotonic()
        r = await client.post("/generate", content=slowly(), headers=headers)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert time.monotonic() - started < 1.2  # ended with its body: its time was up
        fast = await client.post("/generate", json={"prompt": "a b c"}, headers={"X-Request-Timeout": "0.5"})
        assert fast.status_code == 200


async def test_default_timeout_applies_without_header_or_field():
    async with app_client(engine={"token_delay": 0.3}, request_timeout_seconds=0.5) as (client, _):
        assert (await client.post("/generate", json={"prompt": "a b c"})).status_code == 504


@pytest.mark.parametrize(("header", "body"), [("abc", None), ("0", None), ("7201", None), (None, 7201), (None, 0)])
async def test_timeouts_out_of_bounds_are_400(header, body):
    async with app_client(max_request_timeout_seconds=7200) as (client, _):
        payload = {"prompt": "hi"} if body is None else {"prompt": "hi", "timeout": body}
        headers = {} if header is None else {"X-Request-Timeout": header}
        r = await client.post("/generate", json=payload, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in ("X-Request-Timeout", "timeout")


def test_default_timeout_may_not_exceed_the_maximum():
    with pytest.raises(ValueError, match="LLM_REQUEST_TIMEOUT_SECONDS"):
        LLMSettings(request_timeout_seconds=100, max_request_timeout_seconds=50)


async def test_cache_lifetime_is_bounded():
    async with app_client() as (client, _):
        r = await client.post("/generate", json={"prompt": "hi", "cache": {"ttl": 10**12}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache.ttl"
