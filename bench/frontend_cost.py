"""The HTTP front end's own cost: ours beside `vllm serve`, both up on the same model.

    python -m bench.frontend_cost [--concurrency 8] [--prompts 16] [--tokens 128] [--profile]

Per request: one-token requests (no stream), alternating between the servers one at a time, so
the engine's part (a ~100-token prefill) is the same work at the same moments of the machine and
the paired difference is the front end's (parsing, rendering, admission, the response). Each
engine start runs at its own speed (about ±10 % on this VM), so a server measured alone cannot
tell a few milliseconds from that. The prompt tokens each server counted are printed beside it
(a different chat template would show there).

Per streamed token: both servers run the engine core in a child process; the front end (the
process that parses requests, detokenizes and streams) is the parent. On 2 cores its CPU time is
what the engine loses, and CPU seconds are steadier than tokens/s on a shared machine, so this
prints the parent's CPU milliseconds per streamed output token for each endpoint (vLLM's
benchmark client, one server's load at a time), and the ratio ours / `vllm serve`. --profile
records each front end with py-spy (bench/results/frontend-*.txt, raw stacks); the sampler
itself raises the CPU figures several times, so compare them only with other profiled runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import load
from bench.latency import spread
from bench.plan import ROOT, Plan, workload
from bench.report import PEERS
from bench.servers import Process, Spy, cpu_seconds, free_port, http_ok, service, service_env, vllm_serve
from bench.throughput import NO_CACHE, datasets, http_targets, warm_up

# The latency pass sends one request per endpoint and round; its first rounds are not recorded.
WARMUP_ROUNDS = 3


def one_token_body(endpoint: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "standard", "max_tokens": 1, "temperature": 0}
    if endpoint == "/v1/chat/completions":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


def request_latency(servers: dict[str, str], endpoints: list[str], prompt: str, requests: int) -> list[dict[str, Any]]:
    """One-token requests per endpoint of ours (the peer gets its PEERS endpoint), alternating
    between the servers: p50, p99 and max per server, and the median of the paired differences
    ours - `vllm serve`."""
    no_cache = dict([NO_CACHE.split("=", 1)])  # ours answers from the engine; `vllm serve` ignores it
    clients = {name: httpx.Client(base_url=url, timeout=120, headers=no_cache) for name, url in servers.items()}
    rows = []
    try:
        for endpoint in endpoints:
            paths = {name: endpoint if name == "ours" else PEERS[endpoint] for name in clients}
            seconds: dict[str, list[float]] = {name: [] for name in clients}
            tokens: dict[str, int] = {}
            for round_ in range(requests + WARMUP_ROUNDS):
                for name, client in clients.items():
                    began = time.perf_counter()
                    response = client.post(paths[name], json=one_token_body(paths[name], prompt))
                    elapsed = time.perf_counter() - began
                    response.raise_for_status()
                    tokens[name] = response.json()["usage"]["prompt_tokens"]
                    if round_ >= WARMUP_ROUNDS:
                        seconds[name].append(elapsed)
            pairs = [a - b for a, b in zip(seconds.get("ours", []), seconds.get("vllm-serve", []), strict=False)]
            for name, values in seconds.items():
                paired = round(statistics.median(pairs) * 1000, 1) if pairs and name == "ours" else None
                rows.append({
                    "server": name, "endpoint": paths[name], "requests": requests, **spread(values),
                    "prompt_tokens": tokens[name], "paired_difference_p50_ms": paired,
                })  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
    return rows


async def measure(
    server: str, proc: Process, targets: list[tuple[load.Target, list[dict[str, Any]]]], profile: bool
) -> list[dict[str, Any]]:
    """Each target's run after its warm-up, with the front end's CPU time over the run."""
    assert proc.proc is not None
    pid = proc.proc.pid
    log = ROOT / "bench" / "results" / "frontend-client.log"
    rows = []
    for target, (spec,) in targets:
        await warm_up([(target, [spec])], log)
        label = f"frontend-{spec['label']}"
        spy = Spy(pid, ROOT / "bench" / "results" / f"{label}.txt") if profile else None
        before = cpu_seconds(pid)
        figures = await load.run(
            target, spec["served_name"], Path(spec["dataset"]), spec["prompts"], spec["concurrency"],
            spec["output_len"], label, log,
        )  # fmt: skip
        used = cpu_seconds(pid) - before
        if spy is not None:
            spy.stop()
        tokens = figures["total_output_tokens"] or 1
        row = {
            "server": server,
            "endpoint": target.endpoint,
            "cpu_seconds": round(used, 2),
            "cpu_ms_per_token": round(used * 1000 / tokens, 3),
            "output_tokens_per_second": round(figures["output_throughput"] or 0, 1),
            "median_itl_ms": round(figures["median_itl_ms"] or 0, 1),
            "median_ttft_ms": round(figures["median_ttft_ms"] or 0, 1),
            "failed": figures["failed"],
        }
        sys.stderr.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def start(server: str, out: Path) -> tuple[Process, str]:
    if server == "ours":
        proc, base_url = service("ours-frontend", service_env(free_port(), None, "standard", 0.35, False), out)
        proc.start(http_ok(base_url + "/health/ready"))
    else:
        proc, base_url = vllm_serve(out)
        proc.start(http_ok(base_url + "/health"))
    return proc, base_url


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend_cost", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--latency-requests", type=int, default=30, help="one-token requests per endpoint")
    parser.add_argument("--only", default="vllm-serve,ours")
    args = parser.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    short_chat = workload("short-chat", args.tokens, (args.concurrency,), min_prompts=args.prompts)
    # Every endpoint of each server on the short-chat workload, as the bench runs them.
    plan = Plan("frontend", (short_chat,), ("short-chat",), ("short-chat",))
    files = datasets(plan, out)
    prompt = json.loads(files["short-chat"].read_text().splitlines()[0])["prompt"]
    rows: list[dict[str, Any]] = []
    procs: dict[str, tuple[Process, str]] = {}
    try:
        # Both up (vLLM's CPU build binds each engine's worker to core 0; only one runs at a time).
        for server in [s.strip() for s in args.only.split(",")]:
            procs[server] = start(server, out)
        targets = {
            server: http_targets(plan, files, server, url, server == "ours", (NO_CACHE,) if server == "ours" else ())
            for server, (_, url) in procs.items()
        }
        endpoints = [t.endpoint for t, _ in targets.get("ours") or targets["vllm-serve"]]
        latencies = request_latency({name: url for name, (_, url) in procs.items()}, endpoints, prompt,
                                    args.latency_requests)  # fmt: skip
        for server, (proc, _) in procs.items():
            rows += asyncio.run(measure(server, proc, targets[server], args.profile))
    finally:
        for proc, _ in procs.values():
            proc.stop()
    peer = {r["endpoint"]: r for r in rows if r["server"] == "vllm-serve"}
    for row in rows:
        ref = peer.get(PEERS[row["endpoint"]])
        ratio = f"{row['cpu_ms_per_token'] / ref['cpu_ms_per_token']:.2f}" if ref else "-"
        sys.stdout.write(
            f"{row['server']:10} {row['endpoint']:22} cpu {row['cpu_ms_per_token']:6.3f} ms/token "
            f"(x{ratio} of vllm serve) {row['output_tokens_per_second']:7.1f} tok/s "
            f"ITL p50 {row['median_itl_ms']:6.1f} ms failed {row['failed']}\n"
        )
    for lat in latencies:
        paired = lat["paired_difference_p50_ms"]
        sys.stdout.write(
            f"{lat['server']:10} {lat['endpoint']:22} one-token request p50 {lat['p50_ms']:6.1f} ms "
            f"p99 {lat['p99_ms']:6.1f} ms ({lat['prompt_tokens']} prompt tokens)"
            + (f", ours - vllm serve per pair p50 {paired:+.1f} ms" if paired is not None else "")
            + "\n"
        )
    (out / "frontend-cost.json").write_text(json.dumps({"streaming": rows, "one_token": latencies}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
