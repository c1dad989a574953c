"""Latency of a response-cache hit against a miss on the demo model, measured in the same run.

Starts a throwaway redis-server and the service (standard slot on the demo model), then for each
of N distinct questions sends: the question with Cache-Control: no-cache (the engine alone, the
peer), the question itself (a miss: a Redis lookup, the engine, the entry written after the
response), and the question again R times (hits). Prints the medians and the ratios; results go to
bench/results/cache_latency.json.

    .venv/bin/python bench/cache_latency.py [--questions 8] [--hits 5] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {seconds:.0f} s")


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def service_env(port: int, redis_port: int) -> dict[str, str]:
    model = str(MODEL)
    return {
        "APP_ENV": "test",
        "APP_PORT": str(port),
        "APP_HOST": "127.0.0.1",
        "LLM_DEVICE": "cpu",
        "LLM_MODEL_STANDARD": model,
        "LLM_MODEL_LONGCTX": model,
        "LLM_MODEL_MULTIMODAL": model,
        "LLM_MAX_MODEL_LEN_STANDARD": "2048",
        "LLM_MEMORY_SHARE_STANDARD": "0.3",
        "LLM_MEMORY_SHARE_LONGCTX": "0.3",
        "LLM_MEMORY_SHARE_MULTIMODAL": "0.3",
        "LLM_GPU_MEMORY_UTILIZATION": "0.9",
        "LLM_PRELOAD_MODELS": "standard",
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def timed(client: httpx.Client, body: dict[str, Any], **headers: str) -> tuple[float, httpx.Response]:
    began = time.perf_counter()
    r = client.post("/generate", json=body, headers=headers)
    elapsed = time.perf_counter() - began
    r.raise_for_status()
    return elapsed, r


def measure(base_url: str, questions: int, hits: int, max_tokens: int) -> dict[str, Any]:
    bypass: list[float] = []
    misses: list[float] = []
    hit_times: list[float] = []
    hit_server: list[float] = []
    with httpx.Client(base_url=base_url, timeout=300) as client:
        timed(
            client, {"prompt": "warm up", "temperature": 0, "max_tokens": 4}, **{"Cache-Control": "no-store"}
        )
        for i in range(questions):
            body = {
                "messages": [{"role": "user", "content": f"Question {i} ({time.time_ns()}): name a fruit."}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            seconds, r = timed(client, body, **{"Cache-Control": "no-cache, no-store"})
            bypass.append(seconds)
            seconds, r = timed(client, body)
            assert r.headers["x-cache"] == "MISS", r.headers
            misses.append(seconds)
            time.sleep(0.2)  # let the entry reach Redis: the hits below read Redis, not the flight
            for _ in range(hits):
                seconds, r = timed(client, body)
                assert r.headers["x-cache"] == "HIT", r.headers
                hit_times.append(seconds)
                hit_server.append(r.json()["timings"]["total"])
    miss_p50, hit_p50, bypass_p50 = (statistics.median(v) for v in (misses, hit_times, bypass))
    return {
        "questions": questions,
        "hits_per_question": hits,
        "max_tokens": max_tokens,
        "miss_p50_seconds": round(miss_p50, 4),
        "miss_min_seconds": round(min(misses), 4),
        "bypass_p50_seconds": round(bypass_p50, 4),
        "hit_p50_seconds": round(hit_p50, 5),
        "hit_p90_seconds": round(statistics.quantiles(hit_times, n=10)[-1], 5)
        if len(hit_times) > 1
        else None,
        "hit_server_p50_seconds": round(statistics.median(hit_server), 6),
        "miss_over_hit": round(miss_p50 / hit_p50, 1),
        "miss_over_bypass": round(miss_p50 / bypass_p50, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--hits", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        sys.stderr.write(f"demo model missing at {MODEL}: run `python -m llm_service.demo_model`\n")
        return 2
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.stderr.write("redis-server is not installed\n")
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    redis_port, port = free_port(), free_port()
    redis_proc = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = RESULTS / "cache_latency.service.log"
    service = None
    try:
        wait_until(lambda: redis_ping(redis_port), 10, "redis-server")
        service = subprocess.Popen(
            [sys.executable, "-m", "llm_service"],
            cwd=ROOT,
            env={**os.environ, **service_env(port, redis_port)},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(base_url + "/health/ready", timeout=2).status_code == 200, 900, "the service"
        )
        result = measure(base_url, args.questions, args.hits, args.max_tokens)
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(60)
            except subprocess.TimeoutExpired:
                service.kill()
        redis_proc.kill()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (RESULTS / "cache_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"hit {result['hit_p50_seconds'] * 1000:.1f} ms vs miss {result['miss_p50_seconds'] * 1000:.0f} ms "
        f"(p50): a hit is {result['miss_over_hit']}x faster; a miss costs "
        f"{result['miss_over_bypass']}x the uncached request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
