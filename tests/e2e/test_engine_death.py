"""A real engine's core process killed with SIGKILL while requests are in flight."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.metrics_text import metric

from .conftest import READY_TIMEOUT, ServiceProcess, wait_for

pytestmark = pytest.mark.long(110)  # about 110 s here: started early by make test's workers (tests/conftest.py)

STREAM = {"model": "standard", "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 400, "stream": True}


@pytest.fixture(scope="module")
def dying_service(faulty_slots_service: ServiceProcess) -> ServiceProcess:
    """standard preloaded; a failed slot is loaded again after 5 s."""
    return faulty_slots_service


def engine_cores(service: ServiceProcess) -> list[psutil.Process]:
    assert service.process is not None
    found = []
    for child in psutil.Process(service.process.pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_killed_engine_fails_its_requests_at_once_and_the_slot_comes_back(dying_service: ServiceProcess) -> None:
    service = dying_service
    client = httpx.Client(base_url=service.base_url, timeout=httpx.Timeout(120, connect=10))
    (core,) = engine_cores(service)
    streaming = threading.Event()
    events: list[dict] = []

    def stream() -> int:
        with client.stream("POST", "/generate", json=STREAM) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    streaming.set()
            return r.status_code

    def plain() -> httpx.Response:
        return client.post("/generate", json={**STREAM, "stream": False})

    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream)
        assert streaming.wait(300), "the stream never started"
        plain_answer = pool.submit(plain)
        time.sleep(1.0)  # the non-streamed request is in the engine too
        killed_at = time.monotonic()
        core.send_signal(signal.SIGKILL)
        status = streamed.result(timeout=60)
        stream_ended = time.monotonic() - killed_at
        answer = plain_answer.result(timeout=60)
    # In-flight requests end at once: the stream with a final error event, the other with 503.
    assert status == 200 and events[-1]["type"] == "error", events[-3:]
    assert events[-1]["error"]["type"] == "engine_error"
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["type"] == "engine_error"

    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["reason"] == "a preloaded model is down"
    refused = client.post("/generate", json={**STREAM, "stream": False})
    assert refused.status_code == 503 and "retry-after" in refused.headers

    wait_for(lambda: client.get("/health/ready").status_code == 200, READY_TIMEOUT, "ready again", interval=0.25)
    back_after = time.monotonic() - killed_at
    r = client.post("/generate", json={**STREAM, "stream": False, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

    text = client.get("/metrics").text
    assert metric(text, "llm_engine_deaths_total", model="standard") == 1
    assert metric(text, "llm_model_loads_total", model="standard") == 2
    assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE
    assert len(engine_cores(service)) == 1
    print(f"\nstream ended {stream_ended:.2f} s after the kill; ready again after {back_after:.1f} s")

    # With nothing in flight, the engine's own death signal tells the registry (the message is the
    # signal's, not the periodic health check's).
    (core,) = engine_cores(service)
    killed_at = time.monotonic()
    core.send_signal(signal.SIGKILL)
    wait_for(lambda: client.get("/health/ready").status_code == 503, 60, "not ready", interval=0.05)
    noticed = time.monotonic() - killed_at
    error = client.get("/health").json()["dependencies"]["models"]["standard"]["error"]
    assert "its engine core process exited" in error, error
    wait_for(lambda: client.get("/health/ready").status_code == 200, READY_TIMEOUT, "ready again", interval=0.25)
    print(f"idle engine killed: noticed after {noticed:.2f} s, ready again after {time.monotonic() - killed_at:.1f} s")
    client.close()
