"""A flood: 20 x what the engine runs at once, sent at once; how fast the excess gets its 429.

    python -m bench.flood [--times 20] [--timeout 10]

Ours on its defaults with `standard` loaded (and Redis, as in production). Each request reserves
an eighth of the KV cache (max_tokens) and asks for a short answer, bypassing the cache. A first
round of what runs at once measures the engine's drain rate; then the flood goes out with
ApacheBench (`ab -n N -c N`: every request on its own connection, all opened at once, by a client
whose own work is a few microseconds of C a request, so that the times are the service's and not a
Python client's), each with X-Request-Timeout (default 10 s): what cannot start before it is refused
at once. /health/live is probed every 20 ms throughout. The 429s' latency is reported beside the
floor of such a burst here: as many /health/live requests sent at once by ab right after, and, run
alone, beside their time inside the service (from its access lines). Writes bench/results/flood.json;
`make bench` runs it as part of ours (BENCHMARKS.md, "Flood").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench import ab
from bench.plan import MAX_MODEL_LEN, ROOT
from bench.servers import Redis, free_port, http_ok, service, service_env

QUESTION = "What is the capital of France?"
PROBE_SECONDS = 0.02


def payload(max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": max_tokens,
            "cache": {"use_cache": False}}


async def exchange(host: str, port: int, request: bytes) -> tuple[int, float, dict[str, str]]:
    """Send `request` on a new connection; (status, seconds to the whole response, headers)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        response = await reader.read()  # Connection: close: the server closes after the response
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    head, _, _ = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, seconds, headers


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(values: list[float]) -> dict[str, float | None]:
    return {f"p{int(q * 100)}_ms": None if (v := percentile(values, q)) is None else round(v * 1000, 2)
            for q in (0.5, 0.99)} | {"max_ms": round(max(values) * 1000, 2) if values else None}


async def _flood(base_url: str, times: int, request_timeout: float) -> dict[str, Any]:
    split = urlsplit(base_url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        figures = (await http.get("/health")).json()["admission"]["standard"]
        kv, max_num_seqs = figures["kv_cache_tokens"], figures["max_num_seqs"]
        max_tokens = min(MAX_MODEL_LEN - 64, kv // 8)
        body = payload(max_tokens)
        alone = time.perf_counter()
        prompt_tokens = (await http.post("/generate", json=body)).json()["usage"]["prompt_tokens"]
        alone_ms = (time.perf_counter() - alone) * 1000  # a served request takes at least this
        at_once = min(max_num_seqs, kv // (prompt_tokens + max_tokens))
        # A round that runs at once: the drain rate of this shape of request is measured.
        warm = await asyncio.gather(*(http.post("/generate", json=body) for _ in range(at_once)))
        if {r.status_code for r in warm} != {200}:
            raise RuntimeError(f"the warm-up round was not served: {[r.status_code for r in warm]}")
    live_request = f"GET /health/live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    live: list[tuple[int, float]] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            status, seconds, _ = await exchange(host, port, live_request)
            live.append((status, seconds))
            await asyncio.sleep(PROBE_SECONDS)

    sent = times * at_once
    flood_body = json.dumps(body).encode()
    timeout_header = {"X-Request-Timeout": f"{request_timeout:g}"}
    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.1)
    began = time.perf_counter()
    flooded = await asyncio.to_thread(ab.burst, f"{base_url}/generate", sent, flood_body, timeout_header)
    wall = time.perf_counter() - began
    done.set()
    await prober
    # The floor of a burst on this machine: as many /health/live at once by the same client (nothing cheaper).
    await asyncio.sleep(1.0)
    burst = await asyncio.to_thread(ab.burst, f"{base_url}/health/live", sent)
    return summarise(flooded, burst, live, alone_ms) | {
        "at_once": at_once,
        "max_tokens": max_tokens,
        "kv_cache_tokens": kv,
        "request_timeout_seconds": request_timeout,
        "sent": sent,
        "client": "ab (ApacheBench): every request on its own connection, all opened at once",
        "wall_seconds": round(wall, 2),
    }


def summarise(
    flooded: dict[str, Any], burst: dict[str, Any], live: list[tuple[int, float]], served_least_ms: float
) -> dict[str, Any]:
    """The flood's figures from its `ab` burst: ab gives each request's time but not which status it
    got, so the 429s' times are the fastest as many as there were 429s. That split is exact when every
    one of them took less than a served request takes at the least (`served_least_ms`: one request
    alone on the idle engine); `split_exact` says whether they did."""
    statuses = flooded["statuses"]
    refused, served = statuses.get("429", 0), statuses.get("200", 0)
    ms = flooded["ms"]
    refused_ms, rest_ms = ms[:refused], ms[refused:]
    return {
        "ended": sum(statuses.values()),
        "statuses": statuses,
        "served": served,
        "refused": refused,
        "refused_with_retry_after": flooded["retry_after"].get("429", 0),
        "refusal": _ms([v / 1000 for v in refused_ms]),
        "split_exact": not refused_ms or max(refused_ms) < served_least_ms,
        "served_seconds_max": round(max(rest_ms) / 1000, 2) if rest_ms else None,
        "live": {"probes": len(live), "ok": sum(1 for s, _ in live if s == 200)} | _ms([s for _, s in live]),
        "live_burst": {"sent": len(burst["ms"]), "ok": burst["statuses"].get("200", 0)}
        | _ms([v / 1000 for v in burst["ms"]]),
    }


def ours(base_url: str, times: int = 20, timeout: float = 10.0) -> dict[str, Any]:
    """The flood against a running service (standard loaded)."""
    return asyncio.run(_flood(base_url, times, timeout))


def server_side(log: Path) -> dict[str, Any]:
    """The 429s' time inside the service, from its access lines (request_finished, APP_LOG_LEVEL=INFO)."""
    seconds = []
    for line in log.read_text(errors="replace").splitlines():
        if '"request_finished"' in line and '"status": 429' in line:
            seconds.append(float(json.loads(line)["seconds"]))
    return {"refused": len(seconds)} | _ms(seconds)


def summary(result: dict[str, Any]) -> str:
    r, live = result["refusal"], result["live"]
    return (
        f"flood: {result['at_once']} at once, sent {result['sent']}: ended {result['ended']} "
        f"{result['statuses']}, served {result['served']}, refused {result['refused']} "
        f"({result['refused_with_retry_after']} with Retry-After); 429 p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms; "
        f"/health/live {live['ok']}/{live['probes']} ok, p50 {live['p50_ms']} ms p99 {live['p99_ms']} ms; "
        f"as many /health/live at once (the floor): p50 {result['live_burst']['p50_ms']} ms "
        f"p99 {result['live_burst']['p99_ms']} ms; "
        f"{result['wall_seconds']} s\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--times", type=int, default=20, help="the flood in multiples of what runs at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="X-Request-Timeout of the flood's requests")
    args = parser.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    redis = Redis(out).launch()
    # INFO: the access lines give the 429s' time inside the service beside the client's figure.
    env = service_env(free_port(), redis.port, "standard", 0.35, True, APP_LOG_LEVEL="INFO")
    proc, base_url = service("ours-flood", env, out)
    proc.log_path.unlink(missing_ok=True)  # appended to otherwise: only this run's lines
    try:
        proc.start(http_ok(base_url + "/health/ready"))
        result = ours(base_url, args.times, args.timeout)
    finally:
        proc.stop()
        redis.stop()
    result["refusal_server_side"] = server_side(proc.log_path)
    sys.stdout.write(summary(result) + f"429s inside the service: {result['refusal_server_side']}\n")
    (out / "flood.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
