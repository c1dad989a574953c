"""Overload, deadlines, client disconnects and the body limit on the real engine (vLLM, demo model)."""

from __future__ import annotations

import asyncio
import json
import math
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


def test_a_flood_of_twenty_times_what_runs_at_once(client: httpx.Client, service: ServiceProcess) -> None:
    figures = client.get("/health").json()["admission"]["standard"]
    kv, max_num_seqs = figures["kv_cache_tokens"], figures["max_num_seqs"]
    # Each request reserves an eighth of the KV cache (max_tokens), and ends after a few tokens.
    max_tokens = min(2048 - 64, kv // 8)
    payload = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
               "max_tokens": max_tokens, "cache": {"use_cache": False}}

    async def one(http: httpx.AsyncClient, **headers: str) -> tuple[int, float, str | None]:
        started = time.monotonic()
        r = await http.post("/generate", json=payload, headers=headers)
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "overloaded"
        return r.status_code, time.monotonic() - started, r.headers.get("retry-after")

    async def flood() -> tuple[int, float, list[tuple[int, float, str | None]], list[int]]:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=600, limits=limits) as http:
            prompt_tokens = (await http.post("/generate", json=payload)).json()["usage"]["prompt_tokens"]
            at_once = min(max_num_seqs, kv // (prompt_tokens + max_tokens))
            # A round that runs at once measures the drain rate at this shape of request, and its time
            # bounds the flood's deadline: at most a quarter of the twenty rounds' drain, so that part of
            # the flood must be refused however fast the machine (10 s alone would admit all on a fast one).
            round_started = time.monotonic()
            assert {s for s, _, _ in await asyncio.gather(*(one(http) for _ in range(at_once)))} == {200}
            round_seconds = time.monotonic() - round_started
            deadline = f"{min(10.0, 5 * round_seconds):.2f}"
            live: list[int] = []
            done = asyncio.Event()

            async def probe() -> None:
                while not done.is_set():
                    live.append((await http.get("/health/live")).status_code)
                    await asyncio.sleep(0.05)

            prober = asyncio.create_task(probe())
            results = await asyncio.gather(*(one(http, **{"X-Request-Timeout": deadline}) for _ in range(20 * at_once)))
            done.set()
            await prober
            return at_once, round_seconds, results, live

    started = time.monotonic()
    at_once, round_seconds, results, live = asyncio.run(flood())
    elapsed = time.monotonic() - started
    served = [t for status, t, _ in results if status == 200]
    refused = sorted(t for status, t, _ in results if status == 429)
    assert refused and served
    p50, p99 = (refused[max(0, math.ceil(q * len(refused)) - 1)] for q in (0.5, 0.99))
    print(
        f"\nflood: {at_once} run at once ({max_tokens} tokens reserved each, KV {kv}; a round {round_seconds:.1f} s), "
        f"sent {20 * at_once}: "
        f"served {len(served)}, refused {len(refused)}, refusal p50 {p50 * 1000:.0f} ms "
        f"p99 {p99 * 1000:.0f} ms, slowest success {max(served):.1f} s, /health/live {len(live)} probes, "
        f"all done in {elapsed:.1f} s"
    )
    # Every request ended: the admitted ones served (none left to time out), the excess refused at once
    # (by the fast path, before the router: no render, no tokenizing).
    assert {status for status, _, _ in results} <= {200, 429}
    assert len(served) + len(refused) == 20 * at_once
    assert len(served) >= at_once
    assert all(retry is not None and int(retry) >= 1 for status, _, retry in results if status == 429)
    assert live and set(live) == {200}
    text = client.get("/metrics").text
    assert metric(text, "llm_requests_refused_total", model="standard", reason="queue") >= len(refused)
    assert metric(text, "llm_requests_total", model="standard", status="overloaded", code="429") >= len(refused)
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
