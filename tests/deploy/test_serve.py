"""scripts/serve.sh (make serve): a redis-server for the run only when the cache needs one, stopped after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

SERVE = REPO / "scripts" / "serve.sh"
# Stands in for the service: exits 0 when Redis answers on REDIS_PORT as `want` says.
PROBE = """
import os, socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(os.environ["REDIS_PORT"])), timeout=1) as s:
        s.sendall(b"PING\\r\\n")
        up = s.recv(16).startswith(b"+PONG")
except OSError:
    up = False
sys.exit(0 if up == (sys.argv[1] == "up") else 3)
"""
# Stands in for the service: runs until TERM, then exits 0.
UNTIL_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("serving", flush=True)
while True:
    time.sleep(0.1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def fake_python(tmp_path: Path, program: str, *args: str) -> Path:
    """Stands in for the venv's python: `fake -m llm_service` runs `program` with `args`."""
    path = tmp_path / "python"
    source = tmp_path / "service.py"
    source.write_text(program, encoding="utf-8")
    quoted = " ".join(f"'{a}'" for a in args)
    check = '[ "$1 $2" = "-m llm_service" ] || exit 9'
    path.write_text(f"#!/usr/bin/env bash\n{check}\nexec {sys.executable} {source} {quoted}\n")
    path.chmod(0o755)
    return path


def env(port: int, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "LLM_CACHE"))}
    return {**base, "REDIS_PORT": str(port), **extra}


@pytest.fixture(autouse=True)
def needs_redis() -> None:
    if subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True).returncode:
        pytest.fail("redis-server is not installed (make setup installs it)")


def test_redis_runs_with_the_service_and_stops_after(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [str(SERVE), str(fake_python(tmp_path, PROBE, "up"))], env=env(port), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "started redis-server" in result.stderr
    assert not listening(port), "serve.sh left its redis-server running"


def test_no_redis_when_the_cache_is_off(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [str(SERVE), str(fake_python(tmp_path, PROBE, "down"))],
        env=env(port, LLM_CACHE_ENABLED="false"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "redis-server" not in result.stderr


def test_the_service_exit_status_is_kept(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SERVE), str(fake_python(tmp_path, "raise SystemExit(7)"))],
        env=env(free_port(), LLM_CACHE_ENABLED="false"),
        capture_output=True,
    )
    assert result.returncode == 7


def test_sigterm_stops_the_service_then_redis(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(SERVE), str(fake_python(tmp_path, UNTIL_TERM))],
        env=env(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        assert listening(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listening(port), "serve.sh left its redis-server running after SIGTERM"
