"""Lazy loading, two engines at once and eviction, on a service of its own with real engines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.metrics_text import metric

from .conftest import ServiceProcess, base_env
from .test_generate import CAPITAL

pytestmark = pytest.mark.long(120)  # about 120 s here: started early by make test's workers (tests/conftest.py)


@pytest.fixture(scope="module")
def lazy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Nothing preloaded; the budget (0.3) fits two of the three 0.15 slots."""
    env = base_env(
        LLM_LOAD_ON_STARTUP="false",
        LLM_GPU_MEMORY_UTILIZATION="0.3",
        LLM_EVICTION_WAIT_SECONDS="2",
        # A slot in the way drains at once (no fairness time), so a refusal comes within seconds.
        LLM_SWAP_FAIRNESS_SECONDS="0",
    )
    proc = ServiceProcess(env, tmp_path_factory.mktemp("lazy") / "service.log")
    proc.start()
    try:
        with httpx.Client(base_url=proc.base_url, timeout=600) as http:
            yield http
    finally:
        proc.stop()


def states(client: httpx.Client) -> dict[str, str]:
    models = client.get("/health").json()["dependencies"]["models"]
    return {name: slot["state"] for name, slot in models.items()}


def ask(client: httpx.Client, slot: str) -> httpx.Response:
    return client.post(
        "/generate", json={"model": slot, "messages": CAPITAL, "temperature": 0, "max_tokens": 16}
    )


def test_lazy_loads_two_slots_then_evicts_the_least_recently_used(lazy_service: httpx.Client) -> None:
    client = lazy_service
    assert states(client) == {"standard": "unloaded", "longctx": "unloaded", "multimodal": "unloaded"}

    # Concurrent first requests to one slot: one load, every request answered.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: ask(client, "standard"), range(3)))
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all("Paris" in r.json()["text"] for r in answers)
    text = client.get("/metrics").text
    assert metric(text, "llm_model_load_duration_seconds_count", model="standard") == 1

    # A lazy load of a second slot; both stay loaded and answer at the same time.
    assert ask(client, "longctx").status_code == 200
    assert states(client) == {"standard": "loaded", "longctx": "loaded", "multimodal": "unloaded"}
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda slot: ask(client, slot), ["standard", "longctx"]))
    assert [r.json()["model"] for r in both] == ["standard", "longctx"]
    assert all("Paris" in r.json()["text"] for r in both)
    health = client.get("/health").json()
    assert health["memory"]["used"] == pytest.approx(0.3)
    assert health["dependencies"]["models"]["longctx"]["max_model_len"] == 4096

    # standard is used last, so longctx is the least recently used: loading multimodal evicts it.
    assert ask(client, "standard").status_code == 200
    r = ask(client, "multimodal")
    assert r.status_code == 200 and "Paris" in r.json()["text"]
    assert states(client) == {"standard": "loaded", "longctx": "unloaded", "multimodal": "loaded"}
    text = client.get("/metrics").text
    assert metric(text, "llm_model_evictions_total", model="longctx") == 1
    assert metric(text, "llm_model_loaded", model="longctx") == 0
    assert metric(text, "llm_model_loaded", model="multimodal") == 1
    assert client.get("/health").json()["memory"]["used"] == pytest.approx(0.3)


def test_refuses_a_load_when_every_loaded_slot_is_busy(lazy_service: httpx.Client) -> None:
    client = lazy_service
    assert states(client) == {"standard": "loaded", "longctx": "unloaded", "multimodal": "loaded"}
    started = {slot: threading.Event() for slot in ("standard", "multimodal")}

    def long_stream(slot: str) -> int:
        payload = {"model": slot, "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 160, "stream": True}
        with client.stream("POST", "/generate", json=payload) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started[slot].set()
        return r.status_code

    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(long_stream, slot) for slot in started]
        assert all(event.wait(300) for event in started.values())
        r = ask(client, "longctx")
        assert r.status_code == 503, r.text
        assert "in flight" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert [s.result() for s in streams] == [200, 200]
    assert states(client)["longctx"] == "unloaded"
