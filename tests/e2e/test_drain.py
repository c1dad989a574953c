"""SIGTERM drains a real service: not ready and 503 at once, the stream in flight finishes, then the
engines stop and no engine process is left."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import RedisServer, ServiceProcess, base_env


@pytest.fixture
def draining_service(redis_server: RedisServer, tmp_path: Path):
    env = base_env(
        REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_server.port), APP_SHUTDOWN_GRACE_SECONDS="120"
    )
    proc = ServiceProcess(env, tmp_path / "service.log")
    proc.start()
    yield proc
    proc.stop()


def test_sigterm_drains_the_stream_in_flight_then_stops_every_engine_process(draining_service: ServiceProcess):
    service = draining_service
    assert service.process is not None
    main = psutil.Process(service.process.pid)
    engine_processes = main.children(recursive=True)
    assert engine_processes, "the engine core runs in a child process"

    events: list[dict] = []
    first = threading.Event()

    def stream() -> None:
        payload = {"prompt": "Name the planets of the solar system.", "max_tokens": 48, "stream": True}
        with httpx.stream("POST", service.base_url + "/generate", json=payload, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(120)

    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ready = httpx.get(service.base_url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["reason"] == "shutting down"
    refused = httpx.post(service.base_url + "/generate", json={"prompt": "hello"}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["type"] == "shutting_down"
    assert httpx.get(service.base_url + "/health/live", timeout=10).status_code == 200

    reader.join(300)
    assert events[-1]["type"] == "done", events[-1]  # the stream in flight finished whole
    assert events[-1]["usage"]["completion_tokens"] > 1
    service.process.wait(120)
    exited = time.monotonic() - signalled
    print(f"\ndrain: stream finished and process exited {exited:.1f} s after SIGTERM")
    # Orphans would be re-parented and live on; give exiting children a moment to finish exiting.
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"engine processes left: {[(p.pid, p.cmdline()) for p in alive]}"
    log = service.log_tail(400)
    assert "drain_started" in log and "drain_finished" in log
    service.process = None
