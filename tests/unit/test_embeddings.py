"""/v1/embeddings on fake engines: shapes, limits, errors, the embedding slot kind, the per-input cache."""

from __future__ import annotations

import base64
import dataclasses
import json
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import DEMO_MODEL_DIR, SLOTS, LLMSettings, RedisSettings
from tests.metrics_text import metric

from .conftest import GIB, FakeFactory, fake_settings
from .test_cache_redis import RedisProcess, redis_process, store  # noqa: F401 (fixtures)

EMBEDDING = {"model_embedding": "fake/embedding", "memory_share_embedding": 0.2, "max_model_len_embedding": 16}


class App:
    def __init__(self, client: httpx.AsyncClient, factory: FakeFactory) -> None:
        self.client, self.factory = client, factory

    async def embed(self, body: dict[str, Any], status: int = 200, **headers: str) -> dict[str, Any]:
        r = await self.client.post("/v1/embeddings", json={"model": "embedding", **body}, headers=headers)
        assert r.status_code == status, r.text
        result: dict[str, Any] = r.json()
        return result

    def batches(self) -> list[int]:
        return [size for engine in self.factory.of("embedding") for size in engine.embed_batches]


async def _app(settings: Any) -> AsyncIterator[App]:
    factory = FakeFactory()
    app = create_app(settings, EngineBackend(factory, "cpu", 8 * GIB))
    async with app.router.lifespan_context(app):
        await app.state.resources.registry.wait_preloaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield App(client, factory)


@pytest.fixture
async def embedder() -> AsyncIterator[App]:
    async for app in _app(fake_settings(**EMBEDDING, embedding_max_inputs=8)):
        yield app


@pytest.fixture
async def cached_embedder(redis_process: RedisProcess, store: redis.Redis) -> AsyncIterator[App]:  # noqa: F811
    settings = fake_settings(**EMBEDDING, cache_enabled=True).model_copy(
        update={"redis": RedisSettings(host="127.0.0.1", port=redis_process.port)}
    )
    async for app in _app(settings):
        yield app


def norm(vector: list[float]) -> float:
    return float(sum(x * x for x in vector) ** 0.5)


def test_slot_is_off_unless_its_model_is_set() -> None:
    assert LLMSettings().enabled_slots() == SLOTS
    assert LLMSettings(model_embedding="some/model").enabled_slots() == (*SLOTS, "embedding")


async def test_list_of_texts_is_one_batch_in_openai_shape(embedder: App) -> None:
    body = await embedder.embed({"input": ["a b", "c d e", "f"]})
    assert body["object"] == "list" and body["model"] == "embedding"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert all(abs(norm(d["embedding"]) - 1) < 1e-6 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}  # a fake token per word
    assert embedder.batches() == [3]


async def test_input_shapes_and_base64(embedder: App) -> None:
    text = await embedder.embed({"input": "one two"})
    tokens = await embedder.embed({"input": [3, 3]})  # the fake tokenizer's ids of "one two"
    nested = await embedder.embed({"input": [[3, 3], [5]]})
    assert len(text["data"]) == len(tokens["data"]) == 1 and len(nested["data"]) == 2
    assert text["data"][0]["embedding"] == tokens["data"][0]["embedding"] == nested["data"][0]["embedding"]
    encoded = await embedder.embed({"input": "one two", "encoding_format": "base64"})
    decoded = array("f")
    decoded.frombytes(base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded.tolist() == pytest.approx(text["data"][0]["embedding"], rel=1e-6)


async def test_dimensions(embedder: App) -> None:
    body = await embedder.embed({"input": "x y", "dimensions": 4})
    assert len(body["data"][0]["embedding"]) == 4
    error = await embedder.embed({"input": "x y", "dimensions": 99}, status=400)
    assert "dimensions" in error["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [f"text {i}" for i in range(9)]}, "input"),  # over embedding_max_inputs=8
        ({"input": " ".join(["w"] * 17)}, "input"),  # over max_model_len_embedding=16
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": "x", "model": "standard"}, "model"),  # a generation slot
    ],
)
async def test_bad_requests_are_400_in_openai_envelope(embedder: App, body: dict[str, Any], param: str) -> None:
    error = await embedder.embed(body, status=400)
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param
    assert embedder.batches() == []


async def test_embedding_slot_does_not_generate(embedder: App) -> None:
    r = await embedder.client.post(
        "/v1/chat/completions", json={"model": "embedding", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


async def test_models_and_health_show_the_kind(embedder: App) -> None:
    models = {m["id"]: m for m in (await embedder.client.get("/v1/models")).json()["data"]}
    assert models["embedding"]["kind"] == "embedding" and models["standard"]["kind"] == "generate"
    health = (await embedder.client.get("/health")).json()
    assert health["dependencies"]["models"]["embedding"]["kind"] == "embedding"


async def test_cache_sends_only_unseen_inputs_to_the_engine(cached_embedder: App) -> None:
    first = await cached_embedder.embed({"input": [f"text number {i}" for i in range(100)]})
    inputs = [f"text number {i}" for i in range(90)] + [f"other text {i}" for i in range(10)]
    second = await cached_embedder.embed({"input": inputs})
    assert cached_embedder.batches() == [100, 10]
    assert second["data"][:90] == first["data"][:90]  # from the cache, same vectors and order
    assert second["usage"]["prompt_tokens"] == 300  # cached inputs count their tokens too
    text = (await cached_embedder.client.get("/metrics")).text
    assert metric(text, "llm_embedding_cache_hits_total", model="embedding") == 90
    assert metric(text, "llm_embedding_cache_misses_total", model="embedding") == 110
    assert metric(text, "llm_embedding_inputs_total", model="embedding") == 200
    await cached_embedder.embed({"input": inputs[:5]}, **{"Cache-Control": "no-cache"})
    assert cached_embedder.batches() == [100, 10, 5]


def test_embedding_slot_is_planned_with_the_others_and_starts_the_pooling_runner() -> None:
    from llm_service.config.engine_configs import build_slot_configs
    from llm_service.engines.vllm import VLLMEngine

    configs = [config for config, _ in build_slot_configs(fake_settings(**EMBEDDING).llm, "cpu", 8 * GIB)]
    assert [c.slot for c in configs] == [*SLOTS, "embedding"]
    assert [c.kind for c in configs] == ["generate"] * len(SLOTS) + ["embedding"]
    embedding, standard = configs[-1], configs[0]
    assert embedding.memory_share == 0.2 and embedding.max_model_len == 16
    demo = str(DEMO_MODEL_DIR.resolve())  # engine arguments resolve the model: a local one
    assert VLLMEngine(dataclasses.replace(embedding, model_id=demo)).engine_args().runner == "pooling"
    assert VLLMEngine(dataclasses.replace(standard, model_id=demo)).engine_args().runner != "pooling"


async def test_redis_down_means_misses_not_errors(cached_embedder: App, redis_process: RedisProcess) -> None:  # noqa: F811
    redis_process.stop()
    body = await cached_embedder.embed({"input": ["still served", "without redis"]})
    assert len(body["data"]) == 2 and cached_embedder.batches() == [2]


def test_embedding_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODEL_EMBEDDING", "some/model")
    monkeypatch.setenv("LLM_ENGINE_ARGS_EMBEDDING", '{"kv_cache_memory_bytes": 536870912}')
    monkeypatch.setenv("LLM_PRELOAD_MODELS", "standard,embedding")
    llm = LLMSettings()
    assert llm.slot("embedding").engine_args == {"kv_cache_memory_bytes": 536870912}
    assert llm.preload_models == ["standard", "embedding"] and "embedding" in llm.enabled_slots()


def test_a_sentence_transformers_model_is_planned_at_its_max_seq_length(tmp_path: Path) -> None:
    """vLLM takes sentence_bert_config.json's max_seq_length (256 for all-MiniLM-L6-v2, the demo) as the
    model's limit and refuses a longer max_model_len; the plan's default must not ask for more."""
    from llm_service.config.engine_configs import build_slot_configs

    bert = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512}
    folder = tmp_path / "all-MiniLM-L6-v2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bert))
    settings = fake_settings(model_embedding=str(folder), memory_share_embedding=0.2).llm
    assert [c.max_model_len for c, _ in build_slot_configs(settings, "cpu", 8 * GIB) if c.slot == "embedding"] == [512]
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    assert [c.max_model_len for c, _ in build_slot_configs(settings, "cpu", 8 * GIB) if c.slot == "embedding"] == [256]
