"""A slot that cannot fit the budget no longer stops the service: real process, real engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ServiceProcess, base_env


@pytest.fixture(scope="module")
def overfull(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # multimodal's share (0.9) is more than the whole budget (0.45): the registry used to raise at
    # start, and the process exited before serving anything.
    env = base_env(LLM_MEMORY_SHARE_MULTIMODAL="0.9", LLM_CACHE_ENABLED="false")
    proc = ServiceProcess(env, tmp_path_factory.mktemp("sizing") / "service.log")
    proc.start()
    yield proc
    proc.stop()


def test_the_other_slots_serve_and_the_unfit_one_says_why(overfull: ServiceProcess) -> None:
    with httpx.Client(base_url=overfull.base_url, timeout=300) as http:
        ok = http.post("/generate", json={"model": "standard", "prompt": "Hello", "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        refused = http.post("/generate", json={"model": "multimodal", "prompt": "Hello", "max_tokens": 4})
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["type"] == "model_unavailable" and "cannot be loaded on this device" in error["message"]
        assert http.get("/health/ready").status_code == 200
        models = http.get("/health").json()["dependencies"]["models"]
        assert "budget" in models["multimodal"]["error"] and models["standard"]["state"] == "loaded"
    log = Path(overfull.log_path).read_text(errors="replace")
    assert "slot_not_loadable" in log and "multimodal" in log
