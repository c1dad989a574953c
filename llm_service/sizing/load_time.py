"""Estimated engine start times: what a load costs before it is measured (pure, no I/O).

Estimates, not measurements: the figures below are orders of magnitude for vLLM 0.32 on one
H100-class GPU with a local NVMe model cache, and the registry replaces them with each slot's
measured load time after its first load.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.sizing.estimate import GIB

ENGINE_START = 25.0  # seconds: the engine core process, CUDA init, config and tokenizer
READ_RATE = 1.0 * GIB  # bytes/s: weights from the local cache into the GPU
DOWNLOAD_RATE = 100 * 1024**2  # bytes/s: weights from the Hugging Face Hub
COMPILE_COLD = 60.0  # seconds: torch.compile and CUDA graph capture, no compile cache yet
COMPILE_WARM = 25.0  # seconds: with vLLM's compile cache from an earlier start
VISION_PROFILE = 10.0  # seconds: profiling a vision encoder
CPU_READ_RATE = 0.5 * GIB  # bytes/s on the CPU backend (eager there: no compile)


@dataclass(frozen=True)
class LoadTime:
    """Seconds one engine start is expected to take: warm (weights and compile cache on disk) and
    cold (first start on the machine: download, then compile)."""

    warm: float
    cold: float


def load_time(weights: int, device: str, *, enforce_eager: bool, vision: bool) -> LoadTime:
    """The estimate for an engine with `weights` bytes on `device`."""
    if device != "cuda":
        warm = ENGINE_START + weights / CPU_READ_RATE
        return LoadTime(round(warm), round(warm + weights / DOWNLOAD_RATE))
    extra = VISION_PROFILE if vision else 0.0
    warm = ENGINE_START + weights / READ_RATE + (0.0 if enforce_eager else COMPILE_WARM) + extra
    cold = ENGINE_START + weights / DOWNLOAD_RATE + weights / READ_RATE + (0.0 if enforce_eager else COMPILE_COLD)
    return LoadTime(round(warm), round(cold + extra))
