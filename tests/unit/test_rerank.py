"""/v1/rerank and /rerank on fake engines: shape, order, top_n, limits, errors, kind, metrics, traces."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import SLOTS, LLMSettings
from llm_service.observability.metrics import Metrics
from llm_service.registry import ModelRegistry, RegistryPolicy
from llm_service.serving.rerank import RerankService, ranked
from tests.metrics_text import metric

from .conftest import GIB, FakeFactory, fake_settings, slot_config

RERANK = {"model_rerank": "fake/rerank", "memory_share_rerank": 0.2, "max_model_len_rerank": 12}
QUERY = "capital of france"
DOCUMENTS = ["bananas are yellow", "paris is the capital of france", "the capital city", "france"]


class App:
    def __init__(self, client: httpx.AsyncClient, factory: FakeFactory) -> None:
        self.client, self.factory = client, factory

    async def rerank(self, body: dict[str, Any], status: int = 200, path: str = "/v1/rerank") -> dict[str, Any]:
        r = await self.client.post(path, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS, **body})
        assert r.status_code == status, r.text
        result: dict[str, Any] = r.json()
        return result

    def batches(self) -> list[int]:
        return [size for engine in self.factory.of("rerank") for size in engine.rerank_batches]


@pytest.fixture
async def reranker() -> AsyncIterator[App]:
    factory = FakeFactory()
    app = create_app(fake_settings(**RERANK, rerank_max_documents=5), EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield App(client, factory)


def test_slot_is_off_unless_its_model_is_set() -> None:
    assert "rerank" not in LLMSettings().enabled_slots()
    assert LLMSettings(model_rerank="some/model").enabled_slots() == (*SLOTS, "rerank")
    both = LLMSettings(model_embedding="a/b", model_rerank="c/d", preload_models="standard,rerank")
    assert both.enabled_slots() == (*SLOTS, "embedding", "rerank") and both.preload_models == ["standard", "rerank"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
async def test_results_sorted_by_score_in_one_batch(reranker: App, path: str) -> None:
    body = await reranker.rerank({}, path=path)
    assert body["model"] == "rerank" and body["id"].startswith("rerank-")
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert results[0]["index"] == 3 and results[-1]["index"] == 0  # "france": all words in the query
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    # A pair's tokens are the query's words and the document's (the fake's tokenizer).
    assert body["usage"] == {"prompt_tokens": 3 * 4 + 3 + 6 + 3 + 1, "total_tokens": 25}
    assert reranker.batches() == [4]


async def test_top_n_and_return_documents(reranker: App) -> None:
    full = await reranker.rerank({})
    top = await reranker.rerank({"top_n": 2, "return_documents": False})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    assert all(r["document"] is None for r in top["results"])
    assert len((await reranker.rerank({"top_n": 0}))["results"]) == 4  # 0: all, as vLLM
    assert len((await reranker.rerank({"top_n": 10}))["results"]) == 4


def test_ties_keep_the_request_order() -> None:
    order = ranked([(0.5, 1), (0.9, 1), (0.5, 1), (0.1, 1)], None)
    assert [d.index for d in order] == [1, 0, 2, 3]
    assert [d.index for d in ranked([(0.5, 1), (0.9, 1)], 1)] == [1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "  "}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": ["ok", ""]}, "documents"),
        ({"documents": [f"doc {i}" for i in range(6)]}, "documents"),  # over rerank_max_documents=5
        ({"model": "standard"}, "model"),  # a generation slot
        ({"top_n": -1}, "top_n"),
    ],
)
async def test_bad_requests_are_400(reranker: App, body: dict[str, Any], param: str) -> None:
    error = await reranker.rerank(body, status=400)
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param
    assert reranker.batches() == []


async def test_pair_too_long_is_400_and_runs_nothing(reranker: App) -> None:
    error = await reranker.rerank({"documents": ["short", " ".join(["w"] * 10)]}, status=400)
    assert "document 1" in error["error"]["message"] and "at most 12" in error["error"]["message"]
    assert reranker.batches() == []


async def test_unknown_model_is_404_and_envelopes_follow_the_path(reranker: App) -> None:
    v1 = await reranker.rerank({"model": "nope"}, status=404)
    assert v1["error"]["type"] == "model_not_found" and "code" in v1["error"]  # OpenAI's envelope under /v1
    bare = await reranker.rerank({"model": "nope"}, status=404, path="/rerank")
    assert bare["error"]["type"] == "model_not_found" and "code" not in bare["error"]


async def test_rerank_slot_neither_generates_nor_embeds(reranker: App) -> None:
    chat = await reranker.client.post(
        "/v1/chat/completions", json={"model": "rerank", "messages": [{"role": "user", "content": "hi"}]}
    )
    embed = await reranker.client.post("/v1/embeddings", json={"model": "rerank", "input": "hi"})
    assert chat.status_code == embed.status_code == 400
    assert "LLM_MODEL_EMBEDDING" in embed.json()["error"]["message"]


async def test_models_and_health_show_the_kind(reranker: App) -> None:
    models = {m["id"]: m for m in (await reranker.client.get("/v1/models")).json()["data"]}
    assert models["rerank"]["kind"] == "rerank" and models["rerank"]["max_model_len"] == 12
    health = (await reranker.client.get("/health")).json()
    assert health["dependencies"]["models"]["rerank"]["kind"] == "rerank"


async def test_metrics_count_requests_documents_and_tokens(reranker: App) -> None:
    await reranker.rerank({})
    await reranker.rerank({"documents": []}, status=400)
    await reranker.rerank({"model": "nope"}, status=404)
    text = (await reranker.client.get("/metrics")).text
    assert metric(text, "llm_rerank_documents_total", model="rerank") == 4
    assert metric(text, "llm_rerank_tokens_total", model="rerank") == 25
    assert metric(text, "llm_rerank_duration_seconds_count", model="rerank") == 1
    assert metric(text, "llm_requests_total", model="rerank", status="success", code="200") == 1
    assert metric(text, "llm_requests_total", model="rerank", status="invalid", code="400") == 1
    assert metric(text, "llm_requests_total", model="unknown", status="not_found", code="404") == 1


class RecordingTrace:
    trace_id = "0" * 32

    def __init__(self, started: dict[str, Any]) -> None:
        self.started = started
        self.ended: dict[str, Any] | None = None

    def end(self, **fields: Any) -> None:
        self.ended = fields


class RecordingTracer:
    def __init__(self) -> None:
        self.traces: list[RecordingTrace] = []

    def start(self, **fields: Any) -> RecordingTrace:
        raise AssertionError("a rerank request is not a generation")

    def start_retrieval(self, **fields: Any) -> RecordingTrace:
        self.traces.append(RecordingTrace(fields))
        return self.traces[-1]

    def health(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


async def test_trace_has_counts_and_tokens_and_the_error() -> None:
    config = dataclasses.replace(slot_config("rerank", 0.2, max_model_len=12), kind="rerank")
    registry = ModelRegistry([(config, False)], 0.6, FakeFactory(), Metrics(), RegistryPolicy())
    tracer = RecordingTracer()
    service = RerankService(registry, Metrics(), max_documents=5, tracer=tracer)
    try:
        result = await service.rerank("rerank", QUERY, DOCUMENTS, 2, "req-1")
        with pytest.raises(Exception, match="document 0 is empty"):
            await service.rerank("rerank", QUERY, [""], None, "req-2")
    finally:
        await registry.close()
    ok, failed = tracer.traces
    assert result.trace_id == ok.trace_id and len(result.ranked) == 2
    assert ok.started["operation"] == "rerank" and ok.started["parameters"] == {"documents": 4, "top_n": 2}
    assert ok.started["input"] == {"query": QUERY, "documents": DOCUMENTS}
    assert ok.ended is not None and ok.ended["prompt_tokens"] == 25 and ok.ended["outcome"] == "success"
    assert failed.ended is not None and failed.ended["outcome"] == "invalid"
    assert "empty" in failed.ended["error"]


def test_rerank_slot_is_planned_with_the_others_and_starts_the_pooling_runner() -> None:
    from llm_service.config.engine_configs import build_slot_configs
    from llm_service.config.settings import DEMO_MODEL_DIR
    from llm_service.engines.vllm import VLLMEngine

    configs = [config for config, _ in build_slot_configs(fake_settings(**RERANK).llm, "cpu", 8 * GIB)]
    assert [(c.slot, c.kind) for c in configs][-1] == ("rerank", "rerank")
    rerank = configs[-1]
    assert rerank.memory_share == 0.2 and rerank.max_model_len == 12
    demo = str(DEMO_MODEL_DIR.resolve())  # engine arguments resolve the model: a local one
    assert VLLMEngine(dataclasses.replace(rerank, model_id=demo)).engine_args().runner == "pooling"


async def test_a_model_id_in_both_retrieval_slots_means_the_slot_of_the_route() -> None:
    """The demo serves one folder in `embedding` and `rerank`: its id reaches each route's own slot."""
    shared = {"model_embedding": "fake/minilm", "memory_share_embedding": 0.2, "max_model_len_embedding": 12}
    settings = fake_settings(**{**RERANK, "model_rerank": "fake/minilm"}, **shared)
    app = create_app(settings, EngineBackend(FakeFactory(), "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            pairs = {"query": QUERY, "documents": DOCUMENTS}
            ranked_ = await client.post("/v1/rerank", json={"model": "fake/minilm", **pairs})
            embedded = await client.post("/v1/embeddings", json={"model": "fake/minilm", "input": "france"})
            wrong = await client.post("/v1/rerank", json={"model": "embedding", **pairs})
    assert ranked_.status_code == 200 and ranked_.json()["model"] == "rerank"
    assert embedded.status_code == 200 and embedded.json()["model"] == "embedding"
    assert wrong.status_code == 400  # a slot's own name still means that slot
