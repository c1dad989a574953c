"""The HTTP front end's own cost: ours beside `vllm serve`, one server at a time.

    python -m bench.frontend_cost [--concurrency 8] [--prompts 16] [--tokens 128] [--profile]

Both servers run the engine core in a child process; the front end (the process that parses
requests, detokenizes and streams) is the parent. On 2 cores its CPU time is what the engine
loses, and CPU seconds are steadier than tokens/s on a shared machine, so this prints the
parent's CPU milliseconds per streamed output token for each endpoint, and the ratio ours /
`vllm serve`. --profile records each front end with py-spy (bench/results/frontend-*.txt, raw
stacks for a flame graph or `collapse`-style reading).

Before that, with both servers up, the per-request cost: one-token requests (no stream),
alternating between the servers one at a time, so the engine's part (a ~100-token prefill) is
the same work at the same moments of the machine and the paired difference is the front end's
(parsing, rendering, admission, the response). Each engine start runs at its own speed (±5 % on
this VM), so a server measured alone cannot tell a few milliseconds from that. The prompt tokens
each server counted are printed beside it (a different chat template would show there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import load
from bench.plan import ROOT, Plan, workload
from bench.servers import Process, Spy, cpu_seconds, free_port, http_ok, service, service_env, vllm_serve
from bench.throughput import NO_CACHE, datasets

ENDPOINTS = {
    "/v1/completions": ("openai", False),
    "/v1/chat/completions": ("openai-chat", True),
    "/generate": (load.GENERATE_BACKEND, False),
}


def one_token_body(endpoint: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "standard", "max_tokens": 1, "temperature": 0}
    if endpoint == "/v1/chat/completions":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


def request_latency(servers: dict[str, str], endpoints: list[str], prompt: str, requests: int) -> list[dict[str, Any]]:
    """One-token requests per endpoint, alternating between the servers (both up, one request at a
    time, so each engine runs alone but both see the same moments of the machine): p50 and p90 per
    server, and the median of the paired differences ours - `vllm serve`."""
    clients = {
        name: httpx.Client(
            base_url=url, timeout=120, headers={"Cache-Control": "no-cache, no-store"} if name == "ours" else {}
        )
        for name, url in servers.items()
    }
    rows = []
    try:
        for endpoint in endpoints:
            # /generate is paired with the peer's /v1/completions (the same prompt, no template)
            peer_endpoint = "/v1/completions" if endpoint == "/generate" else endpoint
            times: dict[str, list[float]] = {name: [] for name in clients}
            tokens: dict[str, int] = {}
            for i in range(requests + 3):
                for name, client in clients.items():
                    path = endpoint if name == "ours" else peer_endpoint
                    began = time.perf_counter()
                    response = client.post(path, json=one_token_body(path, prompt))
                    elapsed = (time.perf_counter() - began) * 1000
                    response.raise_for_status()
                    tokens[name] = response.json()["usage"]["prompt_tokens"]
                    if i >= 3:
                        times[name].append(elapsed)
            pairs = [a - b for a, b in zip(times.get("ours", []), times.get("vllm-serve", []), strict=False)]
            for name, values in times.items():
                rows.append({
                    "server": name, "endpoint": endpoint if name == "ours" else peer_endpoint, "requests": requests,
                    "p50_ms": quantile(values, 0.5), "p90_ms": quantile(values, 0.9), "prompt_tokens": tokens[name],
                    "paired_difference_p50_ms": quantile(pairs, 0.5) if pairs and name == "ours" else None,
                })  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
    return rows


async def measure(
    server: str, proc: Process, base_url: str, endpoints: list[str], files: dict[str, Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    assert proc.proc is not None
    pid = proc.proc.pid
    headers = (NO_CACHE,) if server == "ours" else ()
    dataset = files["short-chat"]
    log = ROOT / "bench" / "results" / "frontend-client.log"
    rows = []
    for endpoint in endpoints:
        backend, chat = ENDPOINTS[endpoint]
        target = load.Target(f"{server} {endpoint}", backend, base_url, endpoint, chat, headers)
        label = f"frontend-{server}-{endpoint.strip('/').replace('/', '-')}"
        # one unrecorded pass: first batches of a fresh engine pay one-time costs
        await load.run(target, "standard", dataset, args.concurrency, args.concurrency, 8, "warm-" + label, log)
        spy = Spy(pid, ROOT / "bench" / "results" / f"{label}.txt") if args.profile else None
        before = cpu_seconds(pid)
        figures = await load.run(
            target, "standard", dataset, args.prompts, args.concurrency, args.tokens, label, log
        )  # fmt: skip
        used = cpu_seconds(pid) - before
        if spy is not None:
            spy.stop()
        tokens = figures["total_output_tokens"] or 1
        row = {
            "server": server,
            "endpoint": endpoint,
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
    plan = Plan("frontend", (short_chat,), (), ())
    files = datasets(plan, out)
    prompt = json.loads(files["short-chat"].read_text().splitlines()[0])["prompt"]
    rows: list[dict[str, Any]] = []
    procs: dict[str, tuple[Process, str]] = {}
    try:
        # Both up (vLLM's CPU build binds each engine's worker to core 0; only one runs at a time).
        for server in [s.strip() for s in args.only.split(",")]:
            if server == "ours":
                proc, base_url = service("ours-frontend", service_env(free_port(), None, "standard", 0.35, False), out)
                proc.start(http_ok(base_url + "/health/ready"))
            else:
                proc, base_url = vllm_serve(out)
                proc.start(http_ok(base_url + "/health"))
            procs[server] = (proc, base_url)
        endpoints = list(ENDPOINTS) if "ours" in procs else list(ENDPOINTS)[:2]
        urls = {name: url for name, (_, url) in procs.items()}
        latencies = request_latency(urls, endpoints, prompt, args.latency_requests)
        for server, (proc, base_url) in procs.items():
            mine = list(ENDPOINTS) if server == "ours" else list(ENDPOINTS)[:2]
            rows += asyncio.run(measure(server, proc, base_url, mine, files, args))
    finally:
        for proc, _ in procs.values():
            proc.stop()
    peer = {r["endpoint"]: r for r in rows if r["server"] == "vllm-serve"}
    for row in rows:
        ref = peer.get(row["endpoint"] if row["endpoint"] != "/generate" else "/v1/completions")
        ratio = f"{row['cpu_ms_per_token'] / ref['cpu_ms_per_token']:.2f}" if ref else "-"
        sys.stdout.write(
            f"{row['server']:10} {row['endpoint']:22} cpu {row['cpu_ms_per_token']:6.3f} ms/token "
            f"(x{ratio} of vllm serve) {row['output_tokens_per_second']:7.1f} tok/s "
            f"ITL p50 {row['median_itl_ms']:6.1f} ms failed {row['failed']}\n"
        )
    for lat in latencies:
        sys.stdout.write(
            f"{lat['server']:10} {lat['endpoint']:22} one-token request p50 {lat['p50_ms']:6.1f} ms "
            f"p90 {lat['p90_ms']:6.1f} ms ({lat['prompt_tokens']} prompt tokens)"
            + (
                f", ours - vllm serve per pair p50 {lat['paired_difference_p50_ms']:+.1f} ms"
                if lat["paired_difference_p50_ms"] is not None
                else ""
            )
            + "\n"
        )
    (out / "frontend-cost.json").write_text(json.dumps({"streaming": rows, "one_token": latencies}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
