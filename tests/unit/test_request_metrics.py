"""llm_requests_total counts every request to a generation endpoint once, with its final status class;
every such response carries X-Cache; error messages name what is wrong and where."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llm_service.api.accounting import CLIENT_CLOSED, RequestAccounting, final_code, record_of, status_label
from llm_service.app import EngineBackend, create_app
from llm_service.engines.base import GenerationDelta, GenerationRequest
from llm_service.engines.fake import FakeEngine
from llm_service.errors import Overloaded
from tests.metrics_text import metric

from .conftest import GIB, FakeFactory, fake_settings

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


class BusyEngine(FakeEngine):
    """An engine whose queue is full: every generation is refused with Overloaded (429)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        raise Overloaded("the engine's queue is full", retry_after=1)
        yield  # an async generator, like the real one


class Factory(FakeFactory):
    """Fake engines; `multimodal` is busy, `longctx` fails to start, `standard` dies mid-stream on demand."""

    def __call__(self, config: Any) -> FakeEngine:
        if config.slot == "multimodal":
            engine = BusyEngine(config)
            self.engines.append(engine)
            return engine
        return super().__call__(config)


@pytest.fixture
async def app_client() -> AsyncIterator[httpx.AsyncClient]:
    factory = Factory()
    factory.per_slot["longctx"] = {"fail_start": RuntimeError("no memory for longctx")}
    app = create_app(
        fake_settings(load_retry_seconds=300), EngineBackend(factory, "cpu", 8 * GIB)
    )
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.factory = factory  # type: ignore[attr-defined]
            client.app = app  # type: ignore[attr-defined]
            yield client


async def requests_total(client: httpx.AsyncClient, **labels: str) -> float:
    return metric((await client.get("/metrics")).text, "llm_requests_total", **labels)


JSON = {"content-type": "application/json"}
# (how to send it, expected HTTP status, labels it must count under)
CASES: list[tuple[str, dict[str, Any], int, dict[str, str]]] = [
    ("/generate", {"json": {"messages": CAPITAL}}, 200, {"model": "standard", "status": "success"}),
    ("/v1/chat/completions", {"json": {"model": "standard", "messages": CAPITAL}}, 200,
     {"model": "standard", "status": "success"}),
    ("/generate", {"json": {"prompt": "hi", "temperature": 5}}, 400, {"model": "unknown", "status": "invalid"}),
    ("/generate", {"content": b"{not json", "headers": JSON}, 400, {"model": "unknown", "status": "invalid"}),
    ("/generate", {"data": {"prompt": "hi"}}, 400, {"model": "unknown", "status": "invalid"}),
    ("/generate", {"json": {"prompt": "hi", "max_tokens": 100000}}, 400, {"model": "standard", "status": "invalid"}),
    ("/v1/chat/completions", {"json": {"model": "standard", "messages": CAPITAL, "functions": [{"name": "f"}]}}, 400,
     {"model": "unknown", "status": "invalid"}),
    ("/generate", {"json": {"model": "nope", "prompt": "hi"}}, 404, {"model": "unknown", "status": "not_found"}),
    ("/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}, 404,
     {"model": "unknown", "status": "not_found"}),
    ("/generate", {"json": {"model": "multimodal", "prompt": "hi"}}, 429,
     {"model": "multimodal", "status": "overloaded"}),
    ("/generate", {"json": {"model": "longctx", "prompt": "hi"}}, 503,
     {"model": "longctx", "status": "unavailable"}),
]


@pytest.mark.parametrize(("path", "send", "status", "labels"), CASES)
async def test_every_status_class_is_counted_once(
    app_client: httpx.AsyncClient, path: str, send: dict[str, Any], status: int, labels: dict[str, str]
) -> None:
    series = {**labels, "code": str(status)}
    before = await requests_total(app_client)
    before_series = await requests_total(app_client, **series)
    r = await app_client.post(path, **send)
    assert r.status_code == status, r.text
    assert r.headers["x-cache"] == "MISS"  # errors too: the answer did not come from the cache
    assert await requests_total(app_client, **series) - before_series == 1
    assert await requests_total(app_client) - before == 1  # once, and nowhere else


async def test_an_error_after_the_stream_began_counts_with_its_own_status(app_client: httpx.AsyncClient) -> None:
    await app_client.post("/generate", json={"prompt": "warm up"})
    engine = app_client.factory.of("standard")[0]  # type: ignore[attr-defined]
    engine.die_after_tokens = 1
    r = await app_client.post("/generate", json={"prompt": "hi there", "stream": True})
    assert r.status_code == 200 and '"type": "error"' in r.text
    assert await requests_total(app_client, model="standard", status="unavailable", code="503") == 1


async def test_routes_that_do_not_generate_are_not_counted(app_client: httpx.AsyncClient) -> None:
    before = await requests_total(app_client)
    for path in ("/health", "/v1/models", "/nope"):
        await app_client.get(path)
    assert await requests_total(app_client) == before


@pytest.mark.parametrize(
    ("status", "completed", "failure", "code", "label"),
    [
        (200, True, None, 200, "success"),
        (200, True, 503, 503, "unavailable"),  # an engine error after the first byte
        (400, True, 400, 400, "invalid"),
        (200, False, None, CLIENT_CLOSED, "cancelled"),  # the client left mid-stream
        (None, False, None, CLIENT_CLOSED, "cancelled"),  # ... or before the response began
        (429, True, None, 429, "overloaded"),
        (500, True, None, 500, "error"),
        (401, True, None, 401, "unauthorized"),
        (413, True, None, 413, "invalid"),
    ],
)
def test_final_code_and_label(
    status: int | None, completed: bool, failure: int | None, code: int, label: str
) -> None:
    assert final_code(status, completed, failure) == code
    assert status_label(code) == label


async def test_error_messages_say_what_and_where(app_client: httpx.AsyncClient) -> None:
    bad_json = await app_client.post("/generate", content=b'{"prompt": "hi",}', headers=JSON)
    error = bad_json.json()["error"]
    assert "not valid JSON" in error["message"] and "character 16" in error["message"]
    assert error["param"] is None
    form = (await app_client.post("/generate", data={"prompt": "hi"})).json()["error"]
    assert "must be a JSON object" in form["message"] and "Content-Type: application/json" in form["message"]
    missing = (await app_client.post("/generate", json={"max_tokens": 3})).json()["error"]
    assert missing["param"] == "prompt" and "'prompt' or 'messages'" in missing["message"]
    both = (await app_client.post("/generate", json={"prompt": "a", "messages": CAPITAL})).json()["error"]
    assert both["param"] == "messages"
    root = await app_client.get("/")
    assert root.status_code == 404 and root.json()["error"]["type"] == "not_found"


async def test_a_response_the_client_left_counts_as_cancelled(app_client: httpx.AsyncClient) -> None:
    """Starlette ends a streamed response without its last body message when the client goes away."""
    app = app_client.app  # type: ignore[attr-defined]
    metrics = app.state.resources.metrics

    async def half_sent(scope: Any, receive: Any, send: Any) -> None:
        record_of(scope).slot = "standard"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    accounting = RequestAccounting(half_sent, frozenset({"/generate"}))
    await accounting({"type": "http", "path": "/generate", "app": app}, None, send)
    text = metrics.render().decode()
    assert metric(text, "llm_requests_total", model="standard", status="cancelled", code="499") == 1
    assert (b"x-cache", b"MISS") in sent[0]["headers"]
