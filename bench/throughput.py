"""Throughput and latency of every target under the same workloads, one server at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.dataset import write_prompts
from bench.plan import MODEL, ROOT, Plan, Workload
from bench.servers import PeakRSS

NO_CACHE = "Cache-Control=no-cache, no-store"


def datasets(plan: Plan, out: Path) -> dict[str, Path]:
    """One prompt file per workload, as many prompts as its largest run needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    files = {}
    for workload in plan.workloads:
        count = max(workload.prompts_at(c) for c in workload.levels)
        files[workload.name] = write_prompts(workload, count, tokenizer, out / f"prompts-{workload.name}.jsonl")
    return files


def runs_of(
    workload: Workload, dataset: Path, server: str, endpoint: str, levels: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    return [
        {
            "server": server,
            "endpoint": endpoint,
            "workload": workload.name,
            "served_name": workload.slot,
            "dataset": str(dataset),
            "prompts": workload.prompts_at(c),
            "concurrency": c,
            "output_len": workload.output_len,
            "label": f"{server}-{endpoint.strip('/').replace('/', '-')}-{workload.name}-c{c}",
        }
        for c in levels or workload.levels
    ]


WARMUP_TOKENS = 8


# Above this concurrency a warm-up costs a wave of prefills (66 s at 128 on 2 cores) and the run's
# own batch shapes vary anyway.
WARMUP_MAX_CONCURRENCY = 8


async def warm_up(targets: list[tuple[load.Target, list[dict[str, Any]]]], log: Path) -> None:
    """One short unrecorded pass per concurrency level (up to WARMUP_MAX_CONCURRENCY) on the
    server's first target: the first batches of a fresh engine pay one-time costs (kernel set-up
    per batch shape) that would otherwise land on whichever target a server happens to run first."""
    target, runs = targets[0]
    runs_by_level = {run["concurrency"]: run for _, rs in targets for run in rs}
    levels = {c: run for c, run in runs_by_level.items() if c <= WARMUP_MAX_CONCURRENCY}
    for spec in levels.values():
        c = spec["concurrency"]
        label = f"warmup-{spec['label']}"
        try:
            await load.run(target, runs[0]["served_name"], Path(runs[0]["dataset"]), c, c, WARMUP_TOKENS, label, log)
        except Exception as exc:  # the measured runs will show the failure
            sys.stderr.write(f"  {label} failed: {exc}\n")


async def drive(targets: list[tuple[load.Target, list[dict[str, Any]]]], log: Path) -> list[dict[str, Any]]:
    """Every run of every target, in order, after a warm-up; a failed run is recorded, not raised."""
    if targets:
        await warm_up(targets, log)
    results = []
    for target, runs in targets:
        for spec in runs:
            try:
                figures = await load.run(
                    target, spec["served_name"], Path(spec["dataset"]), spec["prompts"], spec["concurrency"],
                    spec["output_len"], spec["label"], log,
                )  # fmt: skip
            except Exception as exc:  # one failed setting is recorded; the others still run
                figures = {"failed": spec["prompts"], "completed": 0, "error": f"{type(exc).__name__}: {exc}"}
            results.append({**spec, "figures": figures})
            sys.stderr.write(f"  {spec['label']}: {figures.get('output_throughput') or 0:.1f} tok/s\n")
    return results


def http_targets(
    plan: Plan, files: dict[str, Path], server: str, base_url: str, generate: bool, headers: tuple[str, ...] = ()
) -> list[tuple[load.Target, list[dict[str, Any]]]]:
    """/v1/completions for every workload, /v1/chat/completions (and ours' /generate) for some."""
    targets = []
    for workload in plan.workloads:
        dataset = files[workload.name]
        completions = load.Target(f"{server} /v1/completions", "openai", base_url, "/v1/completions", headers=headers)
        targets.append((completions, runs_of(workload, dataset, server, "/v1/completions")))
        if workload.name in plan.chat_workloads:
            chat = load.Target(
                f"{server} /v1/chat/completions", "openai-chat", base_url, "/v1/chat/completions", True, headers
            )
            targets.append((chat, runs_of(workload, dataset, server, "/v1/chat/completions", plan.other_levels)))
        if generate and workload.name in plan.generate_workloads:
            gen = load.Target(f"{server} /generate", load.GENERATE_BACKEND, base_url, "/generate", headers=headers)
            targets.append((gen, runs_of(workload, dataset, server, "/generate", plan.other_levels)))
    return targets


def bare_runs(plan: Plan, files: dict[str, Path]) -> list[dict[str, Any]]:
    """The bare engine's runs: every workload at the plan's bare levels (a workload with none is left out)."""
    return [
        run
        for w in plan.workloads
        if (levels := plan.bare_levels(w))
        for run in runs_of(w, files[w.name], "bare", "AsyncLLM", levels)
    ]


def run_bare(plan: Plan, files: dict[str, Path], out: Path) -> dict[str, Any]:
    """The bare engine in a child process (python -m bench.bare), its RSS sampled from here."""
    runs = bare_runs(plan, files)
    spec_path, result_path = out / "bare-spec.json", out / "bare-result.json"
    spec_path.write_text(json.dumps({"runs": runs, "log": str(out / "client.log")}))
    with (out / "bare.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", str(spec_path), str(result_path)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        rss = PeakRSS(proc.pid).start()
        began = time.perf_counter()
        code = proc.wait()
    memory = rss.stop()
    if code != 0:
        raise RuntimeError(f"bare engine run failed ({code}); see {out / 'bare.log'}")
    result = json.loads(result_path.read_text())
    return {
        "server": {
            "start_seconds": result["engine_start_seconds"],
            "wall_seconds": round(time.perf_counter() - began, 1),
            "rss": memory,
        },
        "runs": result["runs"],
    }
