"""scripts/gpu-check.sh --dry-run: every step of the GPU check wired up, on fake engines, no GPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_service.tools.gpu_check import mimic_env
from tests.deploy.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"
STEPS = ["preload", "chat_each_slot", "image_on_multimodal", "swap", "engine_kill_and_recovery"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-check")
    report = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "HF_", "APP_", "REDIS_"))}
    env.update(PYTHON=sys.executable, HF_HUB_CACHE=str(tmp / "hub"))
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--device-memory", "22.05GiB", "--report", str(report),
         "--port", str(free_port()), "--timeout", "60"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu-check: OK" in done.stdout
    return json.loads(report.read_text())


def test_every_step_runs_and_passes(dry_report: dict) -> None:
    assert dry_report["ok"] and dry_report["dry_run"]
    assert [step["name"] for step in dry_report["steps"]] == STEPS
    assert all(step["ok"] and step["error"] is None for step in dry_report["steps"])
    # nvidia-smi before and after each step: its figures on a GPU, a reason here.
    assert all(step["gpu_before"] is not None and step["gpu_after"] is not None for step in dry_report["steps"])
    kill = next(step for step in dry_report["steps"] if step["name"] == "engine_kill_and_recovery")
    assert kill["detail"]["slot_down"] and len(kill["detail"]["answers"]) == 3


def test_the_report_has_planned_against_measured_bytes_and_load_times(dry_report: dict) -> None:
    assert dry_report["plan"]["device"]["memory_bytes"] == int(22.05 * 1024**3)
    engines = dry_report["engines"]
    assert set(engines) == {"standard", "longctx", "multimodal"}
    for engine in engines.values():
        assert engine["memory_planned_bytes"] and engine["memory_measured_bytes"]
        assert engine["last_load_seconds"] is not None
    multimodal = engines["multimodal"]
    assert multimodal["memory_measured_bytes"] > multimodal["memory_planned_bytes"]
    assert dry_report["memory_log_lines"]
    # A small card swaps: multimodal evicts the preloaded slots and they come back.
    swap = next(step for step in dry_report["steps"] if step["name"] == "swap")
    assert swap["detail"]["swapped"]


def test_a_smaller_card_is_mimicked_with_the_same_bytes_per_slot() -> None:
    small = {"device": {"memory_bytes": 24 * 2**30, "budget": 0.85},
             "slots": [{"slot": "standard", "share": 0.35, "max_model_len": 8192}]}
    env = mimic_env(small, 141 * 2**30)
    assert float(env["LLM_MEMORY_SHARE_STANDARD"]) * 141 == pytest.approx(0.35 * 24, rel=1e-5)
    assert float(env["LLM_GPU_MEMORY_UTILIZATION"]) * 141 == pytest.approx(0.85 * 24, rel=1e-5)
    assert env["LLM_MAX_MODEL_LEN_STANDARD"] == "8192"


def test_without_a_gpu_the_real_run_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--report", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "nvidia-smi not found" in done.stderr
