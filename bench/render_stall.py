"""Does rendering long prompts stall other requests? Time to first token and token gaps of short
requests on `standard`, idle and while other clients send long chat prompts, in the same run.

Starts the service from a source tree (default: this one; pass another checkout's root with
--tree to measure it the same way), with the demo model in `standard` and the cache off. Phase
"idle": probe requests one after the other (streamed, short prompt) give the time to first token,
and one longer stream gives the largest gap between its tokens. Phase "rendering": the same
while --loaders clients send chat messages of --kilobytes of text each, again and again (they are
rendered and tokenized, then refused as longer than the context: rendering is all they cost).
Prints both phases and their ratio; results go to bench/results/render_stall_<label>.json.

    .venv/bin/python bench/render_stall.py --label after
    .venv/bin/python bench/render_stall.py --tree /path/to/old/checkout --label before
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(port: int) -> dict[str, str]:
    model = str((ROOT / "models" / "SmolLM2-135M-Instruct").resolve())
    return {
        **os.environ,
        "APP_ENV": "test",
        "APP_PORT": str(port),
        "APP_HOST": "127.0.0.1",
        "LLM_DEVICE": "cpu",
        "LLM_MODEL_STANDARD": model,
        "LLM_MODEL_LONGCTX": model,
        "LLM_MODEL_MULTIMODAL": model,
        "LLM_MAX_MODEL_LEN_STANDARD": "2048",
        "LLM_MEMORY_SHARE_STANDARD": "0.15",
        "LLM_ENGINE_ARGS_STANDARD": '{"kv_cache_memory_bytes": 536870912}',
        "LLM_GPU_MEMORY_UTILIZATION": "0.45",
        "LLM_PRELOAD_MODELS": "standard",
        "LLM_CACHE_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


async def stream_times(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, float]:
    """(time to first token, largest gap between tokens) of one streamed short request."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    began = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"delta"' in line:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return stamps[0] - began, max(gaps, default=0.0)


async def phase(client: httpx.AsyncClient, probes: int) -> dict[str, float]:
    ttfts = [(await stream_times(client, 4))[0] for _ in range(probes)]
    _, gap = await stream_times(client, 32)
    return {
        "ttft_p50_seconds": round(statistics.median(ttfts), 3),
        "ttft_max_seconds": round(max(ttfts), 3),
        "stream_max_gap_seconds": round(gap, 3),
    }


async def loader(client: httpx.AsyncClient, text: str, stop: asyncio.Event, counts: list[int]) -> None:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    while not stop.is_set():
        r = await client.post("/generate", json=body)
        counts.append(r.status_code)


async def measure(base_url: str, probes: int, loaders: int, kilobytes: int) -> dict[str, Any]:
    text = ("The quick brown fox jumps over the lazy dog. " * (kilobytes * 1024 // 45 + 1))[: kilobytes * 1024]
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await stream_times(client, 4)  # warm up
        idle = await phase(client, probes)
        stop, counts = asyncio.Event(), []
        tasks = [asyncio.create_task(loader(client, text, stop, counts)) for _ in range(loaders)]
        await asyncio.sleep(1.0)
        loaded = await phase(client, probes)
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "probes": probes,
        "loaders": loaders,
        "prompt_kilobytes": kilobytes,
        "long_prompts_sent": len(counts),
        "long_prompt_statuses": sorted(set(counts)),
        "idle": idle,
        "rendering": loaded,
        "ttft_p50_ratio": round(loaded["ttft_p50_seconds"] / idle["ttft_p50_seconds"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree whose llm_service runs")
    parser.add_argument("--label", default="after")
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--loaders", type=int, default=2)
    parser.add_argument("--kilobytes", type=int, default=256)
    args = parser.parse_args()
    port = free_port()
    log_path = Path(f"/tmp/render_stall_{args.label}.log")
    with log_path.open("wb") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "llm_service"], cwd=args.tree, env=service_env(port), stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if service.poll() is not None or time.monotonic() > wait:
                    raise RuntimeError(f"service did not become ready; see {log_path}")
                time.sleep(1)
            result = asyncio.run(measure(f"http://127.0.0.1:{port}", args.probes, args.loaders, args.kilobytes))
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(120)
    result = {"label": args.label, "tree": str(args.tree), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"render_stall_{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
