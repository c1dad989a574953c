"""A six-slot config file on the real engine: a second generate slot with the demo LoRA adapter, whose
answer differs from the base model's and equals `vllm serve --enable-lora --lora-modules`'s, beside
embeddings and rerank; the plan lists the six."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_service.config.frontend import DEMO_TOOL_TEMPLATE
from llm_service.config.settings import DEMO_EMBEDDING_DIR, DEMO_MULTIMODAL_DIR
from llm_service.tools.demo_adapter import build_adapter

from .conftest import KV_CACHE_ARGS, ROOT, ServiceProcess, base_env, demo_model_path, free_port, wait_for

pytestmark = pytest.mark.long(150)  # about 150 s here: started early by make test's workers (tests/conftest.py)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24
SLOT_VARS = ("LLM_MODEL_", "LLM_MAX_MODEL_LEN_", "LLM_MEMORY_SHARE_", "LLM_ENGINE_ARGS_")


def slot_file(path: Path, adapter: Path) -> Path:
    demo = demo_model_path()
    kv = json.loads(KV_CACHE_ARGS)

    def slot(model: str, kind: str = "generate", length: int = 1024, **more: Any) -> dict[str, Any]:
        share = 0.15 if kind == "generate" else 0.1
        return {"model": model, "kind": kind, "memory_share": share, "max_model_len": length, "engine_args": kv, **more}

    slots = {  # only the slots the test uses preload (standard and longctx do by default)
        "standard": slot(demo, preload=False),
        "longctx": slot(demo, length=2048, preload=False),
        "multimodal": slot(demo_model_path(DEMO_MULTIMODAL_DIR)),
        "embedding": slot(demo_model_path(DEMO_EMBEDDING_DIR), "embedding", 256, preload=True),
        "rerank": slot(demo_model_path(DEMO_EMBEDDING_DIR), "rerank", 256, preload=True),
        # float32 as the vllm serve beside it: on a CPU with AVX-512 BF16 and no AMX the service would run bf16, and a
        # random adapter's near-tie logits turn that difference into another answer after a few tokens.
        "fast": slot(demo, preload=True, adapters=[{"name": "demo-lora", "path": str(adapter)}], max_lora_rank=8,
                     engine_args={**kv, "dtype": "float32"}),
    }
    path.write_text(json.dumps({"slots": slots}), encoding="utf-8")  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    folder = tmp_path_factory.mktemp("slots")
    adapter = build_adapter(Path(demo_model_path()), folder / "SmolLM2-135M-LoRA-demo")
    env = {k: v for k, v in base_env().items() if not k.startswith(SLOT_VARS)}
    env.pop("LLM_PRELOAD_MODELS")
    env["LLM_CONFIG_FILE"] = str(slot_file(folder / "slots.yaml", adapter))
    env["LLM_GPU_MEMORY_UTILIZATION"] = "0.6"
    return env, adapter


@pytest.fixture(scope="module")
def vllm_serve(setup: tuple[dict[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server on the demo model and the same adapter (started first: it takes longest).

    TEST_VLLM_SERVE_URL names one already running with these arguments instead (the adapter's weights
    are seeded, so any build of it is the same)."""
    _, adapter = setup
    if os.environ.get("TEST_VLLM_SERVE_URL"):
        yield os.environ["TEST_VLLM_SERVE_URL"]
        return
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm") / "vllm.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", demo_model_path(),
         "--served-model-name", "demo", "--enable-lora", "--lora-modules", f"demo-lora={adapter}",
         "--max-lora-rank", "8", "--enforce-eager", "--gpu-memory-utilization", "0.15", "--max-model-len", "1024",
         # As the service's `fast` slot: float32 (set in its engine_args), its chat template.
         "--dtype", "float32", "--chat-template", str(DEMO_TOOL_TEMPLATE),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        exited = process.poll()
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        assert exited is None, f"vLLM's server exited ({exited}) early; log: {log.name}"


@pytest.fixture(scope="module")
def six(setup: tuple[dict[str, str], Path], vllm_serve: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[httpx.Client]:
    env, _ = setup
    proc = ServiceProcess(env, tmp_path_factory.mktemp("six") / "service.log")
    proc.start()
    try:
        with httpx.Client(base_url=proc.base_url, timeout=300) as http:
            yield http
    finally:
        proc.stop()


def chat(base_url: str, model: str) -> str:
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_the_plan_lists_the_six_slots(setup: tuple[dict[str, str], Path]) -> None:
    env, _ = setup
    out = subprocess.run([sys.executable, "-m", "llm_service", "plan", "--json", "--device", "cpu"],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    # Exit status 1 says the preloaded slots do not fit this machine's measured memory; the listing holds.
    assert out.returncode in (0, 1) and out.stdout.startswith("{"), out.stderr
    slots = [s["slot"] for s in json.loads(out.stdout)["slots"]]
    assert slots == ["standard", "longctx", "multimodal", "embedding", "rerank", "fast"]


def test_six_slots_serve_chat_on_the_new_slot_and_its_adapter(six: httpx.Client) -> None:
    cards = {card["id"]: card for card in six.get("/v1/models").json()["data"]}
    assert set(cards) == {"standard", "longctx", "multimodal", "embedding", "rerank", "fast", "demo-lora"}
    assert cards["demo-lora"]["parent"] == cards["fast"]["model_id"]
    base = chat(str(six.base_url), "fast")
    tuned = chat(str(six.base_url), "demo-lora")
    assert tuned != base, "the random adapter should change the greedy answer"
    generated = six.post("/generate", json={"model": "demo-lora", "messages": PROMPT, "temperature": 0,
                                            "max_tokens": MAX_TOKENS})
    assert generated.status_code == 200 and generated.json()["text"] == tuned


def test_the_adapters_answer_is_vllm_serves(six: httpx.Client, vllm_serve: str) -> None:
    def vllm_up() -> bool:
        try:
            return httpx.get(vllm_serve + "/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(vllm_up, 900, "vLLM's OpenAI server")  # started before the service, it is usually up by now
    assert chat(vllm_serve, "demo") == chat(str(six.base_url), "fast")
    assert chat(vllm_serve, "demo-lora") == chat(str(six.base_url), "demo-lora")


def test_six_slots_serve_embeddings_and_rerank(six: httpx.Client) -> None:
    embedded = six.post("/v1/embeddings", json={"model": "embedding", "input": ["a", "b"]})
    assert embedded.status_code == 200 and len(embedded.json()["data"]) == 2
    reranked = six.post("/v1/rerank", json={"model": "rerank", "query": "q", "documents": ["x", "y", "z"]})
    assert reranked.status_code == 200 and len(reranked.json()["results"]) == 3
