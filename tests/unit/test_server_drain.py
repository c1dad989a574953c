"""The draining server in a real process with real signals (fake engines): SIGTERM makes it not ready
and refuse new work at once, lets the stream in flight finish, then exits; the grace period bounds it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(grace: float, token_delay: float = 0.25) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.drain_app", str(port), str(grace), str(token_delay)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not get ready"
        try:
            if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def stream_in_background(base: str, events: list[dict], first: threading.Event) -> threading.Thread:
    def read() -> None:
        payload = {"prompt": "one two three", "stream": True}
        try:
            with httpx.stream("POST", base + "/generate", json=payload, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()
        except httpx.HTTPError:  # the server cut the stream
            events.append({"type": "cut"})

    thread = threading.Thread(target=read)
    thread.start()
    return thread


@dataclass
class StreamInFlight:
    """The draining server's process with one /generate stream under way (its first event read)."""

    proc: subprocess.Popen[bytes]
    base: str
    events: list[dict]
    reader: threading.Thread


@contextlib.contextmanager
def stream_in_flight(grace: float, token_delay: float = 0.25) -> Iterator[StreamInFlight]:
    """Start the server, start a stream and wait for its first event; kill the process at the end."""
    proc, base = start(grace, token_delay)
    try:
        events: list[dict] = []
        first = threading.Event()
        reader = stream_in_background(base, events, first)
        assert first.wait(30)
        yield StreamInFlight(proc, base, events, reader)
    finally:
        proc.kill()
        proc.wait(10)


def get_on(sock: socket.socket, path: str) -> bytes:
    """GET `path` on an open connection; the response's head and body ("" if the server closed it)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_an_idle_connection_outlasts_the_clients_own_idle_expiry():
    # httpx and the openai SDK reuse a connection idle for up to 5 s, uvicorn's own default: a client
    # sending after ~5 s could meet the server closing it ("Server disconnected without sending a
    # response"). The service keeps idle connections well past that.
    proc, base = start(grace=5)
    try:
        with connect(base) as sock:
            assert get_on(sock, "/health/live").startswith(b"HTTP/1.1 200")
            time.sleep(6)
            assert get_on(sock, "/health/live").startswith(b"HTTP/1.1 200")
    finally:
        proc.kill()
        proc.wait(10)


def test_sigterm_drains_then_exits():
    with stream_in_flight(grace=30) as served, connect(served.base) as kept:
        assert b"connection: close" not in get_on(kept, "/health/live").lower()
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(served.base + "/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "shutting down"
        refused = httpx.post(served.base + "/generate", json={"prompt": "new"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        # While draining, every response closes its connection: a kept-alive client's next request
        # opens a new one, which the load balancer sends to another replica.
        assert ready.headers["connection"] == "close" and refused.headers["connection"] == "close"
        answer = get_on(kept, "/health/ready")
        assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower()
        assert kept.recv(1) == b""  # closed by the server
        served.reader.join(60)
        assert served.events[-1]["type"] == "done" and served.events[-1]["finish_reason"] == "stop"
        served.proc.wait(30)


# The fake answers 'fake answer to one two three' word by word; at 4 s a word the stream would take
# 24 s, so a stream cut short shows the process did not wait for it.
SLOW = 4.0


def test_grace_period_bounds_the_drain():
    with stream_in_flight(grace=0.5, token_delay=SLOW) as served:
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(40)
        served.reader.join(30)
        assert served.events and served.events[-1]["type"] != "done"


def test_second_sigterm_stops_without_waiting_for_the_drain():
    with stream_in_flight(grace=120, token_delay=SLOW) as served:
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(served.base + "/health/ready", timeout=5).status_code == 503
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(40)
        served.reader.join(30)
        assert served.events and served.events[-1]["type"] != "done"
