"""Overload, deadlines, client disconnects and the body limit on the real engine (vLLM, demo model)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

from tests.metrics_text import metric

from .conftest import ServiceProcess


# Greedy counting goes on to max_tokens (a story may end early); the cache is bypassed so the
# engine really runs each request.
def long_request(start: int, **extra: object) -> dict[str, object]:
    numbers = ", ".join(str(n) for n in range(start, start + 8))
    return {"prompt": f"Count: {numbers},", "max_tokens": 1000, "temperature": 0,
            "cache": {"use_cache": False}, **extra}


def engine_requests(client: httpx.Client) -> float:
    """The standard engine's own count of the requests it holds (vLLM's output processor)."""
    return metric(client.get("/metrics").text, "llm_engine_requests", model="standard")


def wait_engine_idle(client: httpx.Client, limit: float = 120.0) -> float:
    """Seconds until the engine holds no request (polled every 20 ms)."""
    started = time.monotonic()
    while engine_requests(client) > 0:
        assert time.monotonic() - started < limit, "the engine kept the request"
        time.sleep(0.02)
    return time.monotonic() - started


def test_ten_times_the_engine_batch_is_refused_in_part(client: httpx.Client, service: ServiceProcess) -> None:
    admission = client.get("/health").json()["admission"]["standard"]
    bound = admission["bound"]
    # The default bound is 2x what the engine batches (max_num_seqs and KV cache, as vLLM reports them).
    batch = bound // 2
    total = 10 * batch
    payload = {"prompt": "Count from one to twenty:", "max_tokens": 8, "temperature": 0.7}

    async def one(http: httpx.AsyncClient) -> tuple[int, float]:
        started = time.monotonic()
        r = await http.post("/generate", json=payload)
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
        return r.status_code, time.monotonic() - started

    async def burst() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=total)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=600, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(total)))

    started = time.monotonic()
    results = asyncio.run(burst())
    elapsed = time.monotonic() - started
    served = [t for status, t in results if status == 200]
    refused = [t for status, t in results if status == 429]
    print(
        f"\noverload: batch {batch}, bound {bound}, sent {total}: served {len(served)}, refused {len(refused)}, "
        f"slowest refusal {max(refused, default=0) * 1000:.0f} ms, slowest success {max(served, default=0):.1f} s, "
        f"all done in {elapsed:.1f} s"
    )
    assert len(served) + len(refused) == total
    assert refused and len(served) >= bound
    text = client.get("/metrics").text
    assert metric(text, "llm_requests_refused_total", model="standard", reason="slot") >= len(refused)
    assert metric(text, "llm_requests_waiting", model="standard") == 0


def test_streamed_client_that_leaves_aborts_the_engine_request(client: httpx.Client, service: ServiceProcess) -> None:
    payload = long_request(1, stream=True)
    with httpx.Client(base_url=service.base_url, timeout=120) as http, http.stream(
        "POST", "/generate", json=payload
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert engine_requests(client) == 1
        r.close()  # the client goes away mid-stream
    seconds = wait_engine_idle(client)
    print(f"\nstreamed disconnect: engine request gone {seconds * 1000:.0f} ms after the client left")


def test_plain_client_that_leaves_aborts_the_engine_request(client: httpx.Client, service: ServiceProcess) -> None:
    # 1000 tokens take about a minute here; the client gives up after a second and closes its socket.
    body = json.dumps(long_request(11)).encode()
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        deadline = time.monotonic() + 60
        while engine_requests(client) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    seconds = wait_engine_idle(client)
    print(f"\nplain disconnect: engine request gone {seconds * 1000:.0f} ms after the client left")


def test_deadline_aborts_the_engine_request(client: httpx.Client) -> None:
    r = client.post("/generate", json=long_request(21), headers={"X-Request-Timeout": "2"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    wait_engine_idle(client)
    r = client.post(
        "/v1/completions",
        json={"model": "standard", "prompt": long_request(31)["prompt"], "max_tokens": 1000, "temperature": 0,
              "stream": True, "timeout": 2, "cache": {"use_cache": False}},
    )
    chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["error"]["code"] == "timeout"
    wait_engine_idle(client)


def test_huge_body_is_refused_before_it_stalls_the_service(client: httpx.Client, service: ServiceProcess) -> None:
    body = json.dumps({"prompt": "word " * 1_600_000})  # 8 MB: tokenizing it froze the loop for 6.9 s
    async def both() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=120) as http:
            big = asyncio.create_task(
                http.post("/generate", content=body, headers={"content-type": "application/json"})
            )
            await asyncio.sleep(0.05)
            started = time.monotonic()
            live = await http.get("/health/live")
            assert live.status_code == 200
            return await big, time.monotonic() - started

    response, live_seconds = asyncio.run(both())
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
    print(f"\n8 MB body: 413; /health/live answered in {live_seconds * 1000:.0f} ms meanwhile")
