"""The benchmark harness in its smoke form (one request per setting) on real servers, so it cannot rot.

It asserts that every section ran and produced figures, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, demo_model_path

pytestmark = pytest.mark.long(300)  # about 300 s here: started early by make test's workers (tests/conftest.py)


def test_bench_smoke_produces_every_section(tmp_path: Path) -> None:
    demo_model_path()
    report = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path), "--report", str(report),
         "--plots", str(tmp_path / "plots")],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results_path,) = tmp_path.glob("smoke-*/results.json")
    results = json.loads(results_path.read_text())
    for section in ("bare", "vllm-serve", "ours", "swap"):
        assert "error" not in results[section], (section, results[section])
    ours = results["ours"]
    for part in ("runs", "head_of_line", "cache", "coalescing"):
        assert "error" not in ours[part], (part, ours[part])
    runs = [r for s in ("bare", "vllm-serve", "ours") for r in results[s]["runs"]]
    endpoints = {(r["server"], r["endpoint"], r["workload"]) for r in runs}
    assert {("ours", "/generate", "short-chat"), ("ours", "/v1/chat/completions", "short-chat"),
            ("ours", "/v1/completions", "rag"), ("vllm-serve", "/v1/completions", "rag"),
            ("bare", "AsyncLLM", "rag")} <= endpoints  # fmt: skip
    for run in runs:
        figures = run["figures"]
        assert figures["failed"] == 0 and figures["completed"] == run["prompts"], run
        # ignore_eos: every target generates exactly the tokens asked for.
        assert figures["total_output_tokens"] == run["prompts"] * run["output_len"], run
    for levels in ours["cache"]["generate_hit"], ours["cache"]["chat_hit"]:
        assert all(level["failed"] == 0 and level["requests"] > 0 for level in levels)
    assert ours["cache"]["counted"]["engine_generations"] == 0  # hits never reach the engine
    assert ours["coalescing"]["engine_generations"] == 1
    assert ours["coalescing"]["ok"] == ours["coalescing"]["requests"]
    assert all(r["status"] == 200 for r in results["swap"]["requests"])
    for server in ("bare", "vllm-serve", "ours"):
        assert results[server]["server"]["rss"]["total_mib"] > 0
    text = report.read_text()
    assert "## Ratios" in text and "| short-chat | 1 | /generate |" in text
    assert (tmp_path / "plots" / "throughput-short-chat.png").exists()
