"""`python -m llm_service plan` as operators run it: a subprocess, simulated GPUs, no engine, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llm_service.config.settings import PRODUCTION_MODELS
from llm_service.sizing.estimate import GIB
from tests.deploy.conftest import closed_port

from .hf_cache import add_model

REPO = Path(__file__).resolve().parents[2]


def run_plan(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "HF_"))}
    environment.update({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), **env})
    return subprocess.run(
        [sys.executable, "-m", "llm_service", "plan", *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=120, check=False,
    )


def plan_json(gib: int, cache: Path, **env: str) -> tuple[int, dict[str, Any]]:
    result = run_plan("--device", "cuda", "--device-memory", f"{gib}GiB", "--json", cache=cache, **env)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def figures(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in slot.items() if k != "config_source"} for slot in plan["slots"]]


@pytest.fixture(scope="module")
def cached_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding the three default models: config files and sparse weights."""
    cache = tmp_path_factory.mktemp("hub")
    add_model(cache, PRODUCTION_MODELS["standard"], {
        "model-00001-of-00002.safetensors": 4 * GIB, "model-00002-of-00002.safetensors": 2 * GIB,
    })
    # The Mistral layout beside the sharded one: counting files would see both.
    add_model(cache, PRODUCTION_MODELS["longctx"], {
        "consolidated.safetensors": 8 * GIB, "model-00001-of-00002.safetensors": 5 * GIB,
        "model-00002-of-00002.safetensors": 3 * GIB,
    })
    add_model(cache, PRODUCTION_MODELS["multimodal"], {"model.safetensors": 9 * GIB})
    return cache


@pytest.mark.parametrize("gib", [24, 48, 80])
def test_the_defaults_fit_before_and_after_the_weights_are_cached(
    gib: int, tmp_path: Path, cached_weights: Path
) -> None:
    status, first_start = plan_json(gib, tmp_path)
    assert status == 0 and first_start["fits"]
    assert {slot["config_source"] for slot in first_start["slots"]} == {"bundled"}
    status, restart = plan_json(gib, cached_weights)
    assert status == 0 and restart["fits"]
    assert {slot["config_source"] for slot in restart["slots"]} == {"cache"}
    # The estimate no longer changes between the first start and a restart.
    assert figures(restart) == figures(first_start)
    for slot in restart["slots"]:
        assert slot["unloadable"] is None
        assert slot["preload"] == slot["preload_requested"] == (slot["slot"] in ("standard", "longctx"))
        assert slot["kv_tokens"] >= slot["max_model_len"]
    assert restart["preloaded_share"] <= 0.85


def test_the_table_names_each_slots_figures(tmp_path: Path) -> None:
    result = run_plan("--device", "cuda", "--device-memory", "24GiB", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Device: cuda, 24.0 GiB per device")
    header = lines[1].split()
    assert header[:6] == ["SLOT", "MODEL", "CONFIG", "PRELOAD", "SHARE", "MAX_MODEL_LEN"]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"standard", "longctx", "multimodal"}
    assert PRODUCTION_MODELS["longctx"] in rows["longctx"] and "context shortened from 32768" in rows["longctx"]
    assert "GiB" in rows["standard"] and "on demand" in rows["multimodal"]
    assert "preloaded ones fit" in lines[-1]


def test_a_configuration_that_does_not_fit_exits_1_and_says_why(tmp_path: Path) -> None:
    result = run_plan(
        "--device", "cuda", "--device-memory", "24GiB", cache=tmp_path,
        LLM_PRELOAD_MODELS="standard,longctx,multimodal",
    )
    assert result.returncode == 1
    assert "NOT PRELOADED" in result.stdout and "DOES NOT FIT" in result.stdout


def test_tensor_parallel_size_is_planned_per_gpu(tmp_path: Path) -> None:
    _, one = plan_json(24, tmp_path)
    _, two = plan_json(24, tmp_path, LLM_TENSOR_PARALLEL_SIZE="2")
    assert two["device"]["tensor_parallel"] == 2
    for single, split in zip(one["slots"], two["slots"], strict=True):
        assert split["weights_bytes"] < 0.51 * single["weights_bytes"]


def test_invalid_settings_and_sizes_are_refused(tmp_path: Path) -> None:
    assert run_plan("--device", "cuda", "--device-memory", "lots", cache=tmp_path).returncode == 2
    result = run_plan("--device", "cuda", "--device-memory", "24GiB", cache=tmp_path, LLM_MIN_MODEL_LEN="10")
    assert result.returncode == 2 and "LLM_MIN_MODEL_LEN" in result.stderr


def test_the_24_gib_plan_admits_eight_concurrent_rag_requests_on_standard(tmp_path: Path) -> None:
    # The figures of the bundled configs (no weights cached): what admission lets run at once.
    _, plan = plan_json(24, tmp_path)
    standard = next(slot for slot in plan["slots"] if slot["slot"] == "standard")
    at_once = standard["admitted_at_once"]
    assert at_once["1000"] >= 8, standard
    assert at_once["1000"] == min(standard["max_num_seqs"], standard["kv_tokens"] // 1000)
    assert at_once["4000"] == min(standard["max_num_seqs"], standard["kv_tokens"] // 4000)
    text = run_plan("--device", "cuda", "--device-memory", "24GiB", cache=tmp_path).stdout
    assert "AT ONCE 1K" in text and "AT ONCE 4K" in text



def test_without_network_plan_answers_from_the_bundled_configs_and_asks_no_hub(tmp_path: Path) -> None:
    """The Hub unreachable (HF_ENDPOINT on a closed port, offline switches off): the plan comes from
    the bundled configs with nothing on stderr; with --online, one short attempt and one line per
    model, never huggingface_hub's retries, and stdout stays the plan (JSON here)."""
    hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    default = run_plan("--device", "cuda", "--device-memory", "24GiB", "--json", cache=tmp_path, **hub)
    assert default.returncode == 0, default.stderr
    assert default.stderr == ""
    assert {slot["config_source"] for slot in json.loads(default.stdout)["slots"]} == {"bundled"}
    online = run_plan("--online", "--device", "cuda", "--device-memory", "24GiB", "--json", cache=tmp_path, **hub)
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["slots"] == json.loads(default.stdout)["slots"]
    lines = online.stderr.splitlines()
    assert len(lines) == len(PRODUCTION_MODELS) and all("model_metadata_unavailable" in line for line in lines)
    assert "Retry" not in online.stderr
