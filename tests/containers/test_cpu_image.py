"""The CPU image as DEPLOYMENT.md runs it: non-root, ready, answering, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.containers.engine import Engine
from tests.e2e.conftest import free_port, wait_for

pytestmark = pytest.mark.container
READY_TIMEOUT = 900.0  # seconds: a cold engine start in a container on a busy 2-core machine
STOP_GRACE = 60  # seconds, as docker-compose.yml's stop_grace_period
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
            "max_tokens": 16}  # fmt: skip


def test_the_image_runs_as_a_non_root_user(engine: Engine, cpu_image: str) -> None:
    assert engine.run("image", "inspect", "--format", "{{.Config.User}}", cpu_image).stdout.strip() == "10001"
    assert engine.run("run", "--rm", cpu_image, "id", "-u").stdout.strip() == "10001"


def logs(engine: Engine, name: str) -> str:
    result = engine.run("logs", name, check=False)
    return (result.stdout + result.stderr)[-3000:]


def running(engine: Engine, name: str) -> bool:
    return engine.run("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"


def wait_ready(engine: Engine, name: str, url: str) -> None:
    def ready() -> bool:
        assert running(engine, name), "the container exited:\n" + logs(engine, name)
        try:
            return httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, READY_TIMEOUT, f"{name} to be ready", interval=2)


@pytest.fixture
def container(engine: Engine, cpu_image: str, facts: dict[str, object]) -> Iterator[tuple[str, str]]:
    name, port = "llm-service-image-test", free_port()
    engine.run("rm", "-f", name, check=False)
    started = time.monotonic()
    # --shm-size: vLLM's engine processes need more shared memory than the 64 MB default.
    engine.run("run", "-d", "--name", name, "--shm-size", "2g", "-p", f"127.0.0.1:{port}:8002", cpu_image)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(engine, name, url)
        facts["image ready after (s)"] = round(time.monotonic() - started, 1)
        yield name, url
    finally:
        engine.run("rm", "-f", name, check=False)


def test_the_image_serves_and_stops_cleanly(
    engine: Engine, container: tuple[str, str], facts: dict[str, object]
) -> None:
    name, url = container
    with httpx.Client(base_url=url, timeout=120) as client:
        generated = client.post("/generate", json=QUESTION)
        assert generated.status_code == 200, generated.text
        assert "Paris" in generated.json()["text"]
        chat = client.post("/v1/chat/completions", json={"model": "standard", **QUESTION})
        assert chat.status_code == 200, chat.text
        assert "Paris" in chat.json()["choices"][0]["message"]["content"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'llm_model_loaded{model="standard"} 1.0' in metrics.text
    started = time.monotonic()
    engine.run("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)  # SIGTERM, then SIGKILL
    facts["image stop after SIGTERM (s)"] = round(time.monotonic() - started, 1)
    state = json.loads(engine.run("inspect", "--format", "{{json .State}}", name).stdout)
    # 137 would mean the grace period ran out and the engine killed it.
    assert state["ExitCode"] == 0, logs(engine, name)
