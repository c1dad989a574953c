"""LoRA adapters on fake engines: served by name, parent in /v1/models, cache key, metrics, admin add/remove."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llm_service.config.engine_configs import build_slot_configs
from llm_service.config.settings import LLMSettings
from llm_service.engines.base import SamplingOptions
from llm_service.serving.generation import GenerationSpec, _key_extra
from llm_service.serving.images import RequestImages

from .conftest import GIB, FakeFactory, admin_client_for, fake_settings

AUTH = {"Authorization": "Bearer s3cret"}
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture
async def lora_app() -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    async with admin_client_for(fake_settings(slots={"standard": {"adapters": "demo-lora=/adapters/demo"}})) as pair:
        yield pair


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "temperature": 0}


async def test_an_adapter_is_a_model_of_its_own(lora_app):
    client, _ = lora_app
    cards = {card["id"]: card for card in (await client.get("/v1/models")).json()["data"]}
    assert cards["demo-lora"]["parent"] == "fake/standard" and cards["standard"]["parent"] is None
    assert (await client.get("/v1/models/demo-lora")).json()["parent"] == "fake/standard"
    base = (await client.post("/v1/chat/completions", json=chat("standard"))).json()
    tuned = (await client.post("/v1/chat/completions", json=chat("demo-lora"))).json()
    assert tuned["choices"][0]["message"]["content"].startswith("[demo-lora]")
    assert not base["choices"][0]["message"]["content"].startswith("[demo-lora]")
    generated = (await client.post("/generate", json={"model": "demo-lora", "prompt": "hi", "temperature": 0})).json()
    assert generated["text"].startswith("[demo-lora]")
    metrics = (await client.get("/metrics")).text
    assert 'llm_adapter_requests_total{adapter="demo-lora",model="standard"} 2.0' in metrics


async def test_adapters_added_and_removed_at_run_time(lora_app):
    client, factory = lora_app
    r = await client.post("/admin/models/standard/adapters", json={"name": "sql", "path": "/a/sql"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["adapters"] == ["demo-lora", "sql"]
    assert "sql" in factory.of("standard")[-1].adapters
    answer = (await client.post("/v1/chat/completions", json=chat("sql"))).json()
    assert answer["choices"][0]["message"]["content"].startswith("[sql]")
    taken = await client.post("/admin/models/standard/adapters", json={"name": "longctx", "path": "x"}, headers=AUTH)
    assert taken.status_code == 400 and "taken" in taken.json()["error"]["message"]
    no_lora = await client.post("/admin/models/longctx/adapters", json={"name": "z", "path": "x"}, headers=AUTH)
    assert no_lora.status_code == 400 and "without LoRA" in no_lora.json()["error"]["message"]
    assert (await client.post("/admin/models/standard/adapters", json={"name": "q"})).status_code in (401, 403)
    r = await client.delete("/admin/models/standard/adapters/sql", headers=AUTH)
    assert r.status_code == 200 and r.json()["adapters"] == ["demo-lora"]
    assert (await client.post("/v1/chat/completions", json=chat("sql"))).status_code == 404
    assert (await client.delete("/admin/models/standard/adapters/sql", headers=AUTH)).status_code == 404


def test_the_adapter_is_part_of_the_cache_key() -> None:
    spec = GenerationSpec("r", "standard", SamplingOptions(max_tokens=4), prompt="p")
    on_adapter = dataclasses.replace(spec, adapter="demo-lora")
    assert _key_extra(on_adapter, RequestImages(), None) == {"adapter": "demo-lora"}
    assert _key_extra(spec, RequestImages(), None) is None


def test_the_plan_counts_the_adapters_memory() -> None:
    if not (DEMO_CONFIG / "config.json").exists():
        pytest.skip("the demo model is not built")
    slots = {"standard": {"model": str(DEMO_CONFIG), "max_model_len": 512}}
    plain = {c.slot: c for c, _ in build_slot_configs(LLMSettings(slots=slots), "cpu", 8 * GIB, hub=False)}
    slots["standard"]["adapters"] = "a=/x"
    slots["standard"]["max_lora_rank"] = 64
    slots["standard"]["max_loras"] = 4
    lora = {c.slot: c for c, _ in build_slot_configs(LLMSettings(slots=slots), "cpu", 8 * GIB, hub=False)}
    assert lora["standard"].lora and not plain["standard"].lora
    assert lora["standard"].memory_share > plain["standard"].memory_share
