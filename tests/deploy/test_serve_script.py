"""`make serve` (scripts/serve.sh) stops the redis-server it started, whichever way the service ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

SCRIPT = REPO / "scripts" / "serve.sh"
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_up(port: int) -> bool:
    return subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0


def fake_python(tmp_path: Path, body: str) -> Path:
    """Stands in for the venv's python: `fake -m llm_service` runs `body`."""
    path = tmp_path / "python"
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return path


def run_env(port: int) -> dict[str, str]:
    return {**os.environ, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port)}


def test_redis_it_started_is_stopped_when_the_service_exits(tmp_path: Path) -> None:
    port = free_port()
    python = fake_python(tmp_path, f"redis-cli -p {port} ping > {tmp_path}/seen")
    result = subprocess.run([str(SCRIPT), str(python)], env=run_env(port), timeout=60)
    assert result.returncode == 0
    assert (tmp_path / "seen").read_text().strip() == "PONG"  # redis served while the service ran
    assert not redis_up(port)


def test_sigterm_reaches_the_service_and_redis_is_stopped(tmp_path: Path) -> None:
    port = free_port()
    loop = "while true; do sleep 0.1; done"
    python = fake_python(tmp_path, f"trap 'echo drained > {tmp_path}/term; exit 0' TERM\n{loop}")
    proc = subprocess.Popen([str(SCRIPT), str(python)], env=run_env(port))
    deadline = time.monotonic() + 30
    while not redis_up(port):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert (tmp_path / "term").read_text().strip() == "drained"
    assert not redis_up(port)


def test_a_redis_already_running_is_left_alone(tmp_path: Path) -> None:
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not redis_up(port):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        subprocess.run([str(SCRIPT), str(fake_python(tmp_path, "true"))], env=run_env(port), timeout=60, check=True)
        assert redis_up(port)
    finally:
        redis.kill()
        redis.wait(10)
