"""Two slots that do not fit together, two clients alternating between them, on real engines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.metrics_text import metric

from .conftest import ServiceProcess, base_env

pytestmark = pytest.mark.long(130)  # about 130 s here: started early by make test's workers (tests/conftest.py)

SLOTS = ("standard", "longctx")
REQUESTS_PER_CLIENT = 3


@pytest.fixture(scope="module")
def swap_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Nothing preloaded; shares of 0.15 in a 0.2 budget: one slot at a time."""
    env = base_env(LLM_LOAD_ON_STARTUP="false", LLM_GPU_MEMORY_UTILIZATION="0.2", LLM_CACHE_ENABLED="false")
    proc = ServiceProcess(env, tmp_path_factory.mktemp("swap") / "service.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def swap_service(swap_process: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=swap_process.base_url, timeout=900) as http:
        yield http


def log_events(proc: ServiceProcess, event: str) -> list[dict]:
    """The service's log lines of one event."""
    lines = proc.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if f'"event": "{event}"' in line]


def test_two_clients_alternating_between_slots_that_do_not_fit_together(
    swap_service: httpx.Client, swap_process: ServiceProcess
) -> None:
    client = swap_service

    def alternate(first: int) -> list[tuple[str, int]]:
        answers = []
        for i in range(REQUESTS_PER_CLIENT):
            slot = SLOTS[(first + i) % 2]
            r = client.post("/generate", json={"model": slot, "prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 8})
            answers.append((slot, r.status_code))
        return answers

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(alternate, [0, 1]))
    statuses = [status for answers in results for _, status in answers]
    assert statuses == [200] * (2 * REQUESTS_PER_CLIENT), results

    text = client.get("/metrics").text
    loads = {slot: metric(text, "llm_model_loads_total", model=slot) for slot in SLOTS}
    evictions = {slot: metric(text, "llm_model_evictions_total", model=slot) for slot in SLOTS}
    # Each load serves the requests of both clients that wait for it: two in a row go to one slot,
    # then two to the other; with a load per request (or a ping-pong) this would be 6 or more.
    assert sum(loads.values()) <= 4, (loads, evictions)
    assert metric(text, "llm_model_load_wait_seconds_count", model="standard") >= 1
    # The heap is frozen after every load and collected (unfrozen, then frozen again) after every stop.
    frozen = log_events(swap_process, "vllm_engine.heap_frozen")
    collected = log_events(swap_process, "vllm_engine.collected")
    assert len(frozen) == sum(loads.values()) and all(e["objects"] > 100_000 for e in frozen), frozen
    assert len(collected) >= sum(evictions.values()) >= 1, (collected, evictions)
    print(f"\nloads {loads}, evictions {evictions} for {len(statuses)} requests")
