"""python -m bench [--quick | --smoke]: run every benchmark, write bench/results/ and BENCHMARKS.md.

One server at a time (on 2 cores two would share the CPU): the bare engine, `vllm serve`, ours
(throughput, head-of-line, cache hits, coalescing, a LiteLLM proxy in front of it), then ours
with a budget of one engine (slot swaps). Benchmarks never assert times; they record them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cache_hits, flood, latency, litellm_proxy, report, throughput
from bench.plan import (
    DTYPE,
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    MEMORY_SHARE,
    MODEL,
    OURS_PARTS,
    PLANS,
    ROOT,
    SECTIONS,
    Plan,
)
from bench.servers import Redis, free_port, http_ok, service, service_env, vllm_serve


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")


def meta(plan: Plan) -> dict[str, Any]:
    import torch
    import vllm

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with open("/proc/meminfo") as info:
        mem_kib = int(info.readline().split()[1])
    return {
        "plan": plan.name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": sha.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "memory_gib": round(mem_kib / 1024**2, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "litellm": litellm_proxy.VERSION,
        },
        "engine": {
            "model": MODEL.name,
            "max_model_len": MAX_MODEL_LEN,
            "memory_share": MEMORY_SHARE,
            "kv_cache_bytes": KV_CACHE_BYTES,
            "enforce_eager": True,
            "dtype": DTYPE,
            "prefix_caching": False,
        },
        "workloads": [w.__dict__ | {"prompts": {c: w.prompts_at(c) for c in w.levels}} for w in plan.workloads],
    }


def merged(
    earlier: dict[str, Any], rerun: dict[str, Any], sections: list[str], parts: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An earlier run's results with `sections` replaced by a re-run's; with `parts`, only those parts
    of ours (and its server figures) are replaced, the rest of ours is kept. The re-run is listed in the meta."""
    if earlier["meta"]["plan"] != rerun["meta"]["plan"]:
        raise ValueError(f"cannot merge a {rerun['meta']['plan']} run into a {earlier['meta']['plan']} run")
    result = {**earlier, **{s: rerun[s] for s in sections if s in rerun}}
    if parts and "ours" in sections and "ours" in rerun:
        result["ours"] = {**earlier.get("ours", {}), **rerun["ours"]}
    keep = ("date", "commit", "wall_seconds", "machine")
    entry = {"sections": sections} | ({"parts": list(parts)} if parts else {}) | {
        k: rerun["meta"][k] for k in keep if k in rerun["meta"]}
    result["meta"] = {**earlier["meta"], "reruns": [*earlier["meta"].get("reruns", []), entry]}
    return result


def guarded(results: dict[str, Any], name: str, step: Callable[[], Any]) -> None:
    """Run one measurement; a failure is recorded (and the run goes on), never hidden."""
    log(name)
    began = time.perf_counter()
    try:
        results[name] = step()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{name} failed: {exc}")
    log(f"{name} done in {time.perf_counter() - began:.0f} s")


def run_vllm_serve(plan: Plan, files: dict[str, Path], out: Path) -> dict[str, Any]:
    proc, base_url = vllm_serve(out)
    proc.start(http_ok(base_url + "/health"))
    try:
        targets = throughput.http_targets(plan, files, "vllm-serve", base_url, False)
        runs = asyncio.run(throughput.drive(targets, out / "client.log"))
    finally:
        memory = proc.stop()
    return {"server": {"start_seconds": round(proc.started_in or 0, 1), "rss": memory}, "runs": runs}


def run_ours(plan: Plan, files: dict[str, Path], out: Path, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Ours with the plan's slots loaded and the cache on: throughput (cache bypassed per request),
    then the plan's other parts: head-of-line, cache hits, coalescing, a flood, LiteLLM in front of it.
    `only`: these parts alone ("runs" is throughput; empty: all)."""
    redis = Redis(out).launch()
    port = free_port()
    proc, base_url = service("ours", service_env(port, redis.port, ",".join(plan.preload()), 0.35, True), out)
    result: dict[str, Any] = {}
    try:
        proc.start(http_ok(base_url + "/health/ready"))
        targets = throughput.http_targets(plan, files, "ours", base_url, True, (throughput.NO_CACHE,))
        if not only or "runs" in only:
            guarded(result, "runs", lambda: asyncio.run(throughput.drive(targets, out / "client.log")))
        parts = {
            "head_of_line": lambda: latency.head_of_line(plan, base_url),
            "cache": lambda: cache_hits.ours(plan, base_url),
            "coalescing": lambda: cache_hits.coalescing(plan, base_url),
            "flood": lambda: flood.ours(base_url),
            "litellm": lambda: run_litellm(plan, base_url, redis.port, out),
        }
        for part in plan.ours_parts:
            if not only or part in only:
                guarded(result, part, parts[part])
    finally:
        memory = proc.stop()
        redis.stop()
    result["server"] = {"start_seconds": round(proc.started_in or 0, 1), "rss": memory}
    return result


def run_litellm(plan: Plan, upstream: str, redis_port: int, out: Path) -> dict[str, Any]:
    proc, base_url, key = litellm_proxy.proxy(upstream, redis_port, out)
    proc.start(litellm_proxy.ready(base_url))
    try:
        return cache_hits.litellm(plan, base_url, key) | {"start_seconds": round(proc.started_in or 0, 1)}
    finally:
        proc.stop()


def run_swap(plan: Plan, out: Path) -> dict[str, Any]:
    """Ours with a budget that holds one engine and nothing preloaded."""
    port = free_port()
    proc, base_url = service("ours-swap", service_env(port, None, "", 0.2, False), out)
    proc.start(http_ok(base_url + "/health/ready"))
    try:
        return latency.swaps(plan, base_url)
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="fewer prompts and levels (minutes)")
    form.add_argument("--smoke", action="store_true", help="one request per setting (the test suite's form)")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(SECTIONS)} (default: the form's)")
    parser.add_argument(
        "--parts", default="", help=f"ours: comma list of runs (throughput), {', '.join(OURS_PARTS)} (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument(
        "--into", type=Path, default=None, help="an earlier run's folder: re-run --only's sections into its results"
    )
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"), help="report to write ('' = none)")
    parser.add_argument("--plots", type=Path, default=ROOT / "bench" / "plots", help="where the report's plots go")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(plan.sections)
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    if not (MODEL / "config.json").exists():
        parser.error(f"demo model missing at {MODEL}: run `make setup`")
    if args.into is not None and not (args.into / "results.json").exists():
        parser.error(f"no results.json in {args.into}")
    out = args.into or args.out / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results: dict[str, Any] = {"meta": meta(plan)}
    files = throughput.datasets(plan, out)
    if "bare" in only:
        guarded(results, "bare", lambda: throughput.run_bare(plan, files, out))
    if "vllm-serve" in only:
        guarded(results, "vllm-serve", lambda: run_vllm_serve(plan, files, out))
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if "ours" in only:
        guarded(results, "ours", lambda: run_ours(plan, files, out, parts))
    if "swap" in only:
        guarded(results, "swap", lambda: run_swap(plan, out))
    results["meta"]["wall_seconds"] = round(time.perf_counter() - began, 1)
    results["meta"]["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = out / "results.json"
    if args.into is not None:
        results = merged(json.loads(path.read_text()), results, only, parts)
    path.write_text(json.dumps(results, indent=2))
    log(f"results in {path} ({results['meta']['wall_seconds']:.0f} s)")
    if args.report:
        report.write(results, Path(args.report), args.plots)
        log(f"report in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
