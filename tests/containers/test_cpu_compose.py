"""The CPU compose stack as DEPLOYMENT.md brings it up: the service with Redis, a cached answer, a clean `down`."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.containers.engine import REPO, Engine
from tests.containers.test_cpu_image import QUESTION, wait_ready

pytestmark = pytest.mark.container
PROJECT = "llm-service-compose-test"
URL = "http://127.0.0.1:8002"  # the port docker-compose.cpu.yml publishes
CONTAINERS = {"llm-service", "redis"}  # its container names


def compose(engine: Engine, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [*engine.compose(), "-f", str(REPO / "docker-compose.cpu.yml"), "-p", PROJECT, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=engine.env, cwd=REPO,
                            check=False)  # fmt: skip
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def names(engine: Engine) -> set[str]:
    return set(engine.run("ps", "-a", "--format", "{{.Names}}").stdout.split())


@pytest.fixture
def stack(engine: Engine, cpu_image: str, facts: dict[str, object]) -> Iterator[None]:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 8002)) == 0:
            pytest.fail("port 8002 is taken: the compose file publishes the service there")
    assert not CONTAINERS & names(engine), "containers of an earlier run are left: remove them first"
    started = time.monotonic()
    compose(engine, "up", "-d")  # the image exists: nothing is built

    try:
        wait_ready(engine, "llm-service", URL)
        facts["compose up to ready (s)"] = round(time.monotonic() - started, 1)
        yield
    finally:
        logs = engine.run("logs", "llm-service", check=False)
        started = time.monotonic()
        compose(engine, "down", "-v", "-t", "60")
        facts["compose down (s)"] = round(time.monotonic() - started, 1)
        print(logs.stdout[-2000:] + logs.stderr[-2000:])


def test_the_stack_caches_in_its_redis_and_down_leaves_nothing(engine: Engine, stack: None) -> None:
    with httpx.Client(base_url=URL, timeout=120) as client:
        health = client.get("/health").json()
        assert health["dependencies"]["redis"]["status"] == "up", health["dependencies"]
        first = client.post("/generate", json=QUESTION)
        second = client.post("/generate", json=QUESTION)
    assert first.status_code == second.status_code == 200, first.text + second.text
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"].upper().startswith("HIT"), second.headers
    assert second.json()["text"] == first.json()["text"]


def test_down_removed_the_stack(engine: Engine, cpu_image: str) -> None:
    """Runs after the stack's test: `down` left no container of it, running or stopped."""
    assert not CONTAINERS & names(engine)
