"""Throughput and latency of llm-service against `vllm serve` on the same model, same workload.

Starts each server in turn (never both at once: they would share the CPU), waits until it is
ready, sends the same streamed requests at a fixed concurrency, and prints our figures as ratios
of vLLM's. Results go to bench/results/serve_vs_vllm.json.

    .venv/bin/python bench/serve_vs_vllm.py [--requests 24] [--concurrency 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "bench" / "results"
MAX_MODEL_LEN = 2048
SHARE = 0.3


@dataclass
class Run:
    name: str
    start_seconds: float
    requests: int
    failed: int
    wall_seconds: float
    output_tokens: int
    output_tokens_per_second: float
    ttft_p50: float
    ttft_p90: float
    latency_p50: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], url: str, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    while time.perf_counter() - began < 900:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, time.perf_counter() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{url} not ready; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


async def load(
    url: str, payload: Callable[[int], dict], tokens_of: Callable[[dict], int], requests: int, concurrency: int
) -> tuple[list[float], list[float], int, int, float]:
    """Send `requests` streamed requests, `concurrency` at a time; return TTFTs, latencies, tokens."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = failed = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens, failed
        async with gate:
            began = time.perf_counter()
            first = None
            try:
                async with client.stream("POST", url, json=payload(i)) as r:
                    if r.status_code != 200:
                        failed += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if first is None:
                            first = time.perf_counter() - began
                        tokens += tokens_of(event)
            except httpx.HTTPError:
                failed += 1
                return
            ttfts.append(first or 0.0)
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
    return ttfts, latencies, tokens, failed, time.perf_counter() - began


def prompt(i: int) -> str:
    # Distinct prompts (no cache hits); counting keeps both servers generating to max_tokens.
    return f"{i}, {i + 1}, {i + 2},"


def run_ours(args: argparse.Namespace, log_dir: Path) -> Run:
    port = free_port()
    env = {
        "APP_PORT": str(port), "APP_HOST": "127.0.0.1", "APP_ENV": "production", "LLM_DEVICE": "cpu",
        "LLM_MODEL_STANDARD": str(MODEL), "LLM_MODEL_LONGCTX": str(MODEL), "LLM_MODEL_MULTIMODAL": str(MODEL),
        "LLM_MAX_MODEL_LEN_STANDARD": str(MAX_MODEL_LEN), "LLM_MEMORY_SHARE_STANDARD": str(SHARE),
        "LLM_MEMORY_SHARE_LONGCTX": str(SHARE), "LLM_MEMORY_SHARE_MULTIMODAL": str(SHARE),
        "LLM_GPU_MEMORY_UTILIZATION": "0.9", "LLM_PRELOAD_MODELS": "standard", "LLM_CACHE_ENABLED": "false",
    }
    base = f"http://127.0.0.1:{port}"
    proc, started = start([sys.executable, "-m", "llm_service"], env, base + "/health/ready", log_dir / "ours.log")
    try:
        def payload(i: int) -> dict:
            return {"prompt": prompt(i), "max_tokens": args.max_tokens, "temperature": 0, "stream": True}

        def tokens_of(event: dict) -> int:
            return int(event.get("usage", {}).get("completion_tokens", 0)) if event.get("type") == "done" else 0

        result = asyncio.run(load(base + "/generate", payload, tokens_of, args.requests, args.concurrency))
    finally:
        stop(proc)
    return summarize("llm-service", started, args.requests, result)


def run_vllm(args: argparse.Namespace, log_dir: Path) -> Run:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
        "--served-model-name", "demo", "--port", str(port), "--host", "127.0.0.1",
        "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", str(SHARE), "--enforce-eager",
    ]
    base = f"http://127.0.0.1:{port}"
    proc, started = start(cmd, {}, base + "/health", log_dir / "vllm.log")
    try:
        def payload(i: int) -> dict:
            return {
                "model": "demo", "prompt": prompt(i), "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
            }

        def tokens_of(event: dict) -> int:
            usage = event.get("usage") or {}
            return int(usage.get("completion_tokens", 0))

        result = asyncio.run(load(base + "/v1/completions", payload, tokens_of, args.requests, args.concurrency))
    finally:
        stop(proc)
    return summarize("vllm serve", started, args.requests, result)


def summarize(name: str, started: float, requests: int, result: tuple) -> Run:
    ttfts, latencies, tokens, failed, wall = result
    return Run(
        name=name,
        start_seconds=round(started, 1),
        requests=requests,
        failed=failed,
        wall_seconds=round(wall, 2),
        output_tokens=tokens,
        output_tokens_per_second=round(tokens / wall, 2) if wall else 0.0,
        ttft_p50=round(percentile(ttfts, 50), 3),
        ttft_p90=round(percentile(ttfts, 90), 3),
        latency_p50=round(percentile(latencies, 50), 3),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        sys.exit(f"demo model missing at {MODEL}: run `make setup`")
    RESULTS.mkdir(parents=True, exist_ok=True)
    ours = run_ours(args, RESULTS)
    peer = run_vllm(args, RESULTS)
    ratios = {
        "output_tokens_per_second": round(ours.output_tokens_per_second / peer.output_tokens_per_second, 3)
        if peer.output_tokens_per_second else None,
        "ttft_p50": round(ours.ttft_p50 / peer.ttft_p50, 3) if peer.ttft_p50 else None,
        "latency_p50": round(ours.latency_p50 / peer.latency_p50, 3) if peer.latency_p50 else None,
        "start_seconds": round(ours.start_seconds / peer.start_seconds, 3) if peer.start_seconds else None,
    }
    report = {
        "workload": vars(args) | {"model": MODEL.name, "max_model_len": MAX_MODEL_LEN, "share": SHARE},
        "runs": [asdict(ours), asdict(peer)],
        "ratio_ours_over_vllm": ratios,
    }
    out = RESULTS / "serve_vs_vllm.json"
    out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(json.dumps(report, indent=2) + f"\nwritten to {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
