"""A client that goes away cancels its request (engine request aborted); a draining service refuses new
work with 503 and reports not ready, while requests in flight finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llm_service.traffic.drain import Drain

from .app_client import build_app, running


async def call_then_disconnect(app: Any, path: str, payload: dict, request_id: str, after: float) -> list[dict]:
    """Drive the ASGI app like a server whose client disconnects `after` seconds into the request."""
    body = json.dumps(payload).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1234),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode())],
    }
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
async def test_disconnect_aborts_the_engine_request_at_once(path, stream):
    application, factory = build_app(engine={"token_delay": 0.5})
    async with running(application):
        engine = factory.of("standard")[0]
        payload = {"prompt": "one two three four five six", "stream": stream, "model": "standard"}
        started = time.monotonic()
        sent = await call_then_disconnect(application, path, payload, "gone-1", after=0.7)
        elapsed = time.monotonic() - started
        # The answer would take 3.5 s; the request ended right after the client left.
        assert elapsed < 1.7, elapsed
        assert any(rid.startswith("gone-1") for rid in engine.aborted)
        assert engine.num_requests() == 0
        assert not any(m.get("type") == "http.response.body" and not m.get("more_body") for m in sent)
        assert application.state.resources.registry.slot("standard").in_flight == 0


@contextlib.asynccontextmanager
async def draining(
    token_delay: float, prompt: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Drain, asyncio.Task[httpx.Response]]]:
    """The app with one /generate request in flight when the drain begins: its client, the drain and
    the request's task."""
    application, _ = build_app(engine={"token_delay": token_delay})
    async with running(application) as client:
        in_flight = asyncio.create_task(client.post("/generate", json={"prompt": prompt}))
        await asyncio.sleep(0.1)
        drain = application.state.drain
        assert drain.in_flight == 1
        drain.begin()
        yield client, drain, in_flight


async def test_draining_service_refuses_new_work_and_is_not_ready():
    async with draining(token_delay=0.2, prompt="a b c") as (client, drain, in_flight):
        r = await client.get("/health/ready")
        assert r.status_code == 503 and r.json()["reason"] == "shutting down"
        r = await client.post("/generate", json={"prompt": "new"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["type"] == "shutting_down"
        r = await client.post("/v1/completions", json={"model": "standard", "prompt": "new"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert (await client.get("/health/live")).status_code == 200
        assert (await in_flight).status_code == 200  # the one in flight finishes
        assert await drain.wait_idle(1.0)
        assert drain.in_flight == 0


async def test_drain_wait_gives_up_after_the_grace_period():
    async with draining(token_delay=0.5, prompt="a b c d e f") as (_client, drain, in_flight):
        started = time.monotonic()
        assert not await drain.wait_idle(0.3)
        assert time.monotonic() - started < 1.0
        await in_flight
