"""Langfuse tracing of the real service, exported to a local OTLP receiver and decoded there."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from .conftest import wait_for
from .otlp_receiver import OTLPReceiver, ReceivedSpan


def meta(span: ReceivedSpan, name: str) -> Any:
    """An observation metadata value (the SDK JSON-encodes each one)."""
    raw = span.attributes.get(f"langfuse.observation.metadata.{name}")
    return None if raw is None else json.loads(raw)


def span_of(receiver: OTLPReceiver, trace_id: str) -> ReceivedSpan:
    return receiver.wait_for_span(lambda s: s.trace_id == trace_id)


def fresh_messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Say hello to {uuid.uuid4().hex[:6]}."}]


def test_a_request_is_one_trace_with_its_generation(
    client: httpx.Client, otlp_receiver: OTLPReceiver
) -> None:
    messages = fresh_messages()
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    r = client.post(
        "/generate",
        json={"messages": messages, "temperature": 0, "max_tokens": 12},
        headers={"X-Request-ID": request_id},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    trace_id = r.headers["x-trace-id"]
    span = span_of(otlp_receiver, trace_id)
    assert [s for s in otlp_receiver.spans() if s.trace_id == trace_id] == [span]  # one observation
    a = span.attributes
    assert span.parent_span_id is None and a["langfuse.observation.type"] == "generation"
    assert a["langfuse.trace.name"] == "llm-service"
    assert a["langfuse.observation.model.name"] == body["model_id"]
    assert meta(span, "slot") == "standard" and meta(span, "request_id") == request_id
    assert json.loads(a["langfuse.trace.metadata.request_id"]) == request_id
    assert json.loads(a["langfuse.observation.input"]) == messages
    assert a["langfuse.observation.output"] == body["text"]
    usage = json.loads(a["langfuse.observation.usage_details"])
    assert usage["input"] == body["usage"]["prompt_tokens"]
    assert usage["output"] == body["usage"]["completion_tokens"]
    params = json.loads(a["langfuse.observation.model.parameters"])
    assert params["temperature"] == 0 and params["max_tokens"] == 12
    assert "langfuse.observation.completion_start_time" in a
    assert meta(span, "cache") == "miss" and meta(span, "outcome") == "success"
    assert "langfuse.observation.level" not in a
    assert span.start_ns < span.end_ns
    export = next(e for e in otlp_receiver.exports if span in e.spans)
    assert export.headers["authorization"] == OTLPReceiver.expected_auth()
    assert export.headers.get("content-encoding") == "gzip"

    hit = client.post("/generate", json={"messages": messages, "temperature": 0, "max_tokens": 12})
    assert hit.headers["x-cache"].startswith("HIT-")
    hit_span = span_of(otlp_receiver, hit.headers["x-trace-id"])
    assert meta(hit_span, "cache") == "hit"
    assert hit_span.attributes["langfuse.observation.output"] == body["text"]


def test_a_streamed_request_is_traced(client: httpx.Client, otlp_receiver: OTLPReceiver) -> None:
    payload = {"messages": fresh_messages(), "temperature": 0.7, "max_tokens": 8, "stream": True}
    with client.stream("POST", "/generate", json=payload) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        trace_id = r.headers["x-trace-id"]
    span = span_of(otlp_receiver, trace_id)
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert span.attributes["langfuse.observation.output"] == text
    assert meta(span, "cache") == "bypass"  # temperature 0.7 without a seed
    assert "langfuse.observation.completion_start_time" in span.attributes


def test_a_failed_request_is_traced_with_its_error(client: httpx.Client, otlp_receiver: OTLPReceiver) -> None:
    request_id = f"fail-{uuid.uuid4().hex[:8]}"
    r = client.post(
        "/generate", json={"prompt": "hi", "max_tokens": 5000}, headers={"X-Request-ID": request_id}
    )
    assert r.status_code == 400
    span = span_of(otlp_receiver, r.headers["x-trace-id"])
    assert meta(span, "request_id") == request_id
    assert span.attributes["langfuse.observation.level"] == "ERROR"
    assert "context length" in span.attributes["langfuse.observation.status_message"]
    assert meta(span, "outcome") == "invalid"


def test_an_unreachable_langfuse_changes_nothing_for_requests(
    client: httpx.Client, otlp_receiver: OTLPReceiver
) -> None:
    body = {"messages": fresh_messages(), "temperature": 0, "max_tokens": 8}
    reference = client.post("/generate", json=body)
    assert reference.status_code == 200
    otlp_receiver.stop()
    try:
        for _ in range(3):
            r = client.post("/generate", json={**body, "cache": {"no_cache": True}})
            assert r.status_code == 200 and r.json()["text"] == reference.json()["text"]
            assert r.headers["x-trace-id"]

        def export_failed() -> bool:
            return client.get("/health").json()["dependencies"]["langfuse"]["last_export"] == "failed"

        wait_for(export_failed, 60, "a failed export in /health")
        health = client.get("/health").json()
        assert health["dependencies"]["langfuse"]["status"] == "down"
        assert health["dependencies"]["langfuse"]["enabled"] is True
        assert health["status"] == "degraded"
    finally:
        otlp_receiver.start()
    r = client.post("/generate", json=body)
    assert r.status_code == 200
    span_of(otlp_receiver, r.headers["x-trace-id"])
    wait_for(
        lambda: client.get("/health").json()["dependencies"]["langfuse"]["status"] == "up",
        60,
        "the export to work again",
    )
