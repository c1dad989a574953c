"""CPU time of the HTTP front end per output token: ours beside `vllm serve`, one server at a time.

    python -m bench.frontend_cost [--concurrency 8] [--prompts 16] [--tokens 128] [--profile]

Both servers run the engine core in a child process; the front end (the process that parses
requests, detokenizes and streams) is the parent. On 2 cores its CPU time is what the engine
loses, and CPU seconds are steadier than tokens/s on a shared machine, so this prints the
parent's CPU milliseconds per streamed output token for each endpoint, and the ratio ours /
`vllm serve`. --profile records each front end with py-spy (bench/results/frontend-*.txt, raw
stacks for a flame graph or `collapse`-style reading).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import load
from bench.plan import ROOT, Plan, workload
from bench.servers import Process, free_port, http_ok, service, service_env, vllm_serve
from bench.throughput import NO_CACHE, datasets

ENDPOINTS = {
    "/v1/completions": ("openai", False),
    "/v1/chat/completions": ("openai-chat", True),
    "/generate": (load.GENERATE_BACKEND, False),
}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class Spy:
    """py-spy recording one process until stopped (raw stacks)."""

    def __init__(self, pid: int, path: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(path), "--rate", "200"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(60)


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
    parser.add_argument("--only", default="vllm-serve,ours")
    args = parser.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    short_chat = workload("short-chat", args.tokens, (args.concurrency,), min_prompts=args.prompts)
    plan = Plan("frontend", (short_chat,), (), ())
    files = datasets(plan, out)
    rows: list[dict[str, Any]] = []
    servers = [s.strip() for s in args.only.split(",")]
    for server in servers:
        if server == "ours":
            port = free_port()
            proc, base_url = service("ours-frontend", service_env(port, None, "standard", 0.35, False), out)
            ready, endpoints = http_ok(base_url + "/health/ready"), list(ENDPOINTS)
        else:
            proc, base_url = vllm_serve(out)
            ready, endpoints = http_ok(base_url + "/health"), list(ENDPOINTS)[:2]
        proc.start(ready)
        try:
            rows += asyncio.run(measure(server, proc, base_url, endpoints, files, args))
        finally:
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
    (out / "frontend-cost.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
