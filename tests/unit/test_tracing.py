"""LangfuseTracer on the pinned SDK, exporting to a local OTLP receiver; the no-op tracer."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import AppSettings, LangfuseSettings, Settings
from llm_service.engines.base import SamplingOptions
from llm_service.observability.tracing import LangfuseTracer, NoTracer, build_tracer
from tests.e2e.otlp_receiver import PUBLIC_KEY, SECRET_KEY, OTLPReceiver, ReceivedSpan

from .conftest import GIB, FakeFactory, fake_settings

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingOptions(max_tokens=16, temperature=0.0, stop=("\n",), seed=7)


def langfuse_settings(host: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "enabled": True,
        "host": host,
        "public_key": PUBLIC_KEY,
        "secret_key": SECRET_KEY,
        "flush_interval": 0.1,
        "timeout": 1,
        "flush_timeout_seconds": 5,
    }
    values.update(overrides)
    return Settings(app=AppSettings(env="test"), langfuse=LangfuseSettings(**values))


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver()
    server.start()
    yield server
    server.stop()


def only_span(receiver: OTLPReceiver) -> ReceivedSpan:
    spans = receiver.spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def finish(trace: Any, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "outputs": ["Paris."],
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "time_to_first_token": 0.05,
        "cache": "miss",
        "outcome": "success",
        "error": None,
    }
    values.update(overrides)
    trace.end(**values)


async def test_a_trace_reaches_langfuse_with_every_attribute(receiver: OTLPReceiver) -> None:
    tracer = LangfuseTracer(langfuse_settings(receiver.base_url))
    trace = tracer.start(
        request_id="req-1", slot="standard", model_id="org/model", input=CAPITAL, sampling=GREEDY
    )
    assert trace.trace_id is not None and len(trace.trace_id) == 32
    finish(trace)
    await tracer.close()

    span = only_span(receiver)
    export = receiver.exports[-1]
    assert export.path == "/api/public/otel/v1/traces"
    assert export.headers["authorization"] == OTLPReceiver.expected_auth()
    assert export.headers.get("content-encoding") == "gzip"
    a = span.attributes
    assert span.trace_id == trace.trace_id and span.parent_span_id is None
    assert a["langfuse.observation.type"] == "generation"
    assert a["langfuse.trace.name"] == "llm-service"
    assert a["langfuse.observation.model.name"] == "org/model"
    assert json.loads(a["langfuse.observation.input"]) == CAPITAL
    assert a["langfuse.observation.output"] == "Paris."
    assert json.loads(a["langfuse.observation.usage_details"]) == {"input": 12, "output": 3, "total": 15}
    params = json.loads(a["langfuse.observation.model.parameters"])
    assert params["temperature"] == 0.0 and params["max_tokens"] == 16 and params["seed"] == 7
    assert params["stop"] == ["\n"]
    assert "langfuse.observation.completion_start_time" in a
    assert json.loads(a["langfuse.observation.metadata.cache"]) == "miss"
    assert json.loads(a["langfuse.observation.metadata.slot"]) == "standard"
    assert json.loads(a["langfuse.observation.metadata.request_id"]) == "req-1"
    assert json.loads(a["langfuse.trace.metadata.request_id"]) == "req-1"
    assert span.resource["service.name"] == "llm-service"
    assert tracer.health()["status"] == "up" and tracer.health()["last_export"] == "ok"


async def test_an_error_is_recorded_on_the_generation(receiver: OTLPReceiver) -> None:
    tracer = LangfuseTracer(langfuse_settings(receiver.base_url))
    trace = tracer.start(request_id="req-2", slot="standard", model_id="m", input="hi", sampling=GREEDY)
    finish(
        trace, outputs=[], completion_tokens=0, time_to_first_token=None, outcome="error", error="engine died"
    )
    await tracer.close()
    a = only_span(receiver).attributes
    assert a["langfuse.observation.level"] == "ERROR"
    assert a["langfuse.observation.status_message"] == "engine died"
    assert json.loads(a["langfuse.observation.metadata.outcome"]) == "error"
    assert "langfuse.observation.completion_start_time" not in a


async def test_capture_content_false_drops_prompt_and_output_only(receiver: OTLPReceiver) -> None:
    tracer = LangfuseTracer(langfuse_settings(receiver.base_url, capture_content=False))
    trace = tracer.start(request_id="req-3", slot="longctx", model_id="m", input=CAPITAL, sampling=GREEDY)
    finish(trace, cache="hit")
    await tracer.close()
    a = only_span(receiver).attributes
    assert "langfuse.observation.input" not in a and "langfuse.observation.output" not in a
    assert not any("Paris" in str(v) or "capital" in str(v) for v in a.values())
    assert json.loads(a["langfuse.observation.usage_details"])["output"] == 3
    assert a["langfuse.observation.model.name"] == "m"
    assert json.loads(a["langfuse.observation.metadata.cache"]) == "hit"


async def test_unreachable_langfuse_shows_in_health_and_recovers(receiver: OTLPReceiver) -> None:
    receiver.stop()
    tracer = LangfuseTracer(langfuse_settings(receiver.base_url))
    try:
        before = tracer.health()
        assert before["status"] == "up" and before["last_export"] is None
        finish(tracer.start(request_id="r", slot="standard", model_id="m", input="x", sampling=GREEDY))
        await wait_until(lambda: tracer.health()["last_export"] == "failed")
        health = tracer.health()
        assert health["status"] == "down" and health["enabled"] is True and health["last_error"]
        receiver.start()
        finish(tracer.start(request_id="r2", slot="standard", model_id="m", input="x", sampling=GREEDY))
        await wait_until(lambda: tracer.health()["last_export"] == "ok")
        assert tracer.health()["status"] == "up"
    finally:
        await tracer.close()


class BlockingExporter(SpanExporter):
    """An exporter stuck on a Langfuse that never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(60)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


async def test_close_returns_after_the_flush_timeout_even_when_export_hangs() -> None:
    exporter = BlockingExporter()
    settings = langfuse_settings("http://127.0.0.1:9", flush_timeout_seconds=0.3)
    tracer = LangfuseTracer(settings, exporter=exporter)
    finish(tracer.start(request_id="r", slot="standard", model_id="m", input="x", sampling=GREEDY))
    await wait_until(lambda: exporter.calls > 0)
    await tracer.close()
    # close() came back while the export was still stuck.
    assert not exporter.release.is_set()
    exporter.release.set()


async def test_disabled_tracing_is_a_no_op() -> None:
    tracer = build_tracer(Settings(app=AppSettings(env="test")))
    assert isinstance(tracer, NoTracer)
    trace = tracer.start(request_id="r", slot="s", model_id="m", input="x", sampling=GREEDY)
    assert trace.trace_id is None
    finish(trace)
    assert tracer.health()["status"] == "disabled"
    await tracer.close()


@pytest.fixture
async def traced_app(receiver: OTLPReceiver) -> AsyncIterator[tuple[httpx.AsyncClient, OTLPReceiver]]:
    base = fake_settings()
    settings = base.model_copy(update={"langfuse": langfuse_settings(receiver.base_url).langfuse})
    app = create_app(settings, EngineBackend(FakeFactory(), "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, receiver


async def test_every_request_gets_a_trace_and_its_id_in_a_header(traced_app) -> None:
    client, receiver = traced_app
    r = await client.post(
        "/generate", json={"messages": CAPITAL, "temperature": 0}, headers={"X-Request-ID": "a1"}
    )
    assert r.status_code == 200
    trace_id = r.headers["x-trace-id"]
    streamed = await client.post("/generate", json={"prompt": "hello there", "stream": True})
    assert streamed.status_code == 200 and streamed.headers["x-trace-id"] != trace_id
    failed = await client.post("/generate", json={"prompt": "hi", "max_tokens": 100000})
    assert failed.status_code == 400 and failed.headers["x-trace-id"] not in (
        trace_id,
        streamed.headers["x-trace-id"],
    )

    span = receiver.wait_for_span(lambda s: s.trace_id == trace_id, timeout=30)
    a = span.attributes
    assert json.loads(a["langfuse.observation.metadata.request_id"]) == "a1"
    assert a["langfuse.observation.output"] == "The capital of France is Paris."
    assert json.loads(a["langfuse.observation.usage_details"])["output"] == 6
    assert json.loads(a["langfuse.observation.metadata.cache"]) == "bypass"  # the cache is off here
    receiver.wait_for_span(lambda s: s.trace_id == streamed.headers["x-trace-id"], timeout=30)
    # The rejected request is traced too, with its error, under the id its error response carried.
    error_span = receiver.wait_for_span(lambda s: s.trace_id == failed.headers["x-trace-id"], timeout=30)
    assert error_span.attributes["langfuse.observation.level"] == "ERROR"
    health = (await client.get("/health")).json()
    assert health["dependencies"]["langfuse"]["status"] == "up"
    assert health["dependencies"]["langfuse"]["enabled"] is True


async def wait_until(predicate: Any, seconds: float = 30.0) -> None:
    """Poll a condition another thread (the exporter) makes true."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
