"""The device choice names the real cause when vLLM's platform is CUDA but torch cannot use the GPU."""

from __future__ import annotations

import pytest

from llm_service.engines.base import EngineConfig, EngineError
from llm_service.engines.vllm import engine as vllm_engine
from llm_service.engines.vllm.device import PlatformFacts, choose_device, device_problem, footprint_of

OLD_DRIVER = PlatformFacts("cuda", False, torch_cuda="12.8", nvml_gpus=1, driver="470.82.01", driver_cuda="11.4")
HEALTHY = PlatformFacts("cuda", True, torch_cuda="12.8", nvml_gpus=1, driver="570.86", driver_cuda="12.8")
CPU_BUILD = PlatformFacts("cpu", False)


def test_auto_follows_the_installed_vllm() -> None:
    assert choose_device("auto", HEALTHY) == ("cuda", None)
    assert choose_device("auto", CPU_BUILD) == ("cpu", None)
    assert choose_device("cpu", CPU_BUILD) == ("cpu", None)


def test_a_driver_too_old_for_the_cuda_build_is_named() -> None:
    device, problem = choose_device("auto", OLD_DRIVER)
    assert device == "cuda"  # not cpu: the CUDA build cannot run there either
    assert problem is not None
    assert "driver is too old" in problem
    assert "470.82.01" in problem and "CUDA 12.8" in problem and "up to 11.4" in problem
    assert "torch.cuda.is_available() is false" in problem


def test_a_new_enough_driver_points_at_the_other_causes() -> None:
    problem = device_problem(PlatformFacts("cuda", False, torch_cuda="12.8", nvml_gpus=2, driver_cuda="12.9"))
    assert problem is not None and "too old" not in problem
    assert "CUDA_VISIBLE_DEVICES" in problem and "Container Toolkit" in problem
    assert device_problem(HEALTHY) is None and device_problem(CPU_BUILD) is None


def test_the_engine_refuses_with_that_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_engine, "platform_facts", lambda: OLD_DRIVER)
    engine = vllm_engine.VLLMEngine(EngineConfig("standard", "m", 512, 0.3, "cuda", True))
    with pytest.raises(EngineError, match="driver is too old"):
        engine._check_device()


def test_the_backend_logs_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_service import app as app_module

    monkeypatch.setattr("llm_service.engines.vllm.platform_facts", lambda: OLD_DRIVER)
    backend = app_module.vllm_backend("auto")
    assert backend.device == "cuda" and backend.device_memory is None


def test_footprint_prefers_per_process_figures() -> None:
    gib = 1 << 30
    assert footprint_of(10 * gib, 17 * gib, [11, 12], {11: 6 * gib, 12: gib, 99: 5 * gib}) == 7 * gib
    # NVML without our processes (a container's own PID namespace): the device-wide difference.
    assert footprint_of(10 * gib, 17 * gib, [11], {4242: 6 * gib}) == 7 * gib
    assert footprint_of(None, None, [11], None) is None
