"""The device the installed vLLM runs on, its memory, and what an engine's processes hold of it.

Everything marked GPU-only runs only with vLLM's CUDA build on an NVIDIA GPU; the pure parts
(`choose_device`, `device_problem`, `footprint_of`) take plain facts so tests simulate devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import structlog
import torch
from vllm.platforms import current_platform
from vllm.utils.cpu_resource_utils import get_memory_node_info

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PlatformFacts:
    """What decides the device: vLLM's platform (found through NVML) and what torch can use."""

    vllm_platform: str  # "cuda" for vLLM's CUDA build on a machine whose NVML sees a GPU
    torch_sees_gpu: bool  # torch.cuda.is_available() and a device count above 0
    torch_cuda: str | None = None  # the CUDA version torch was built for (torch.version.cuda)
    nvml_gpus: int = 0
    driver: str | None = None  # the NVIDIA driver's version, from NVML
    driver_cuda: str | None = None  # the newest CUDA version that driver supports, from NVML


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit()) if text else ()


def device_problem(facts: PlatformFacts) -> str | None:
    """Why the CUDA build of vLLM cannot use the GPU its platform found, or None if it can."""
    if facts.vllm_platform != "cuda" or facts.torch_sees_gpu:
        return None
    found = (
        f"vLLM's platform is CUDA (NVML sees {facts.nvml_gpus} GPU(s), NVIDIA driver "
        f"{facts.driver or 'unknown'}, which supports CUDA up to {facts.driver_cuda or 'unknown'}), "
        f"but torch cannot use it (torch.cuda.is_available() is false; torch is built for CUDA "
        f"{facts.torch_cuda or 'unknown'})"
    )
    if facts.driver_cuda and facts.torch_cuda and _version(facts.driver_cuda) < _version(facts.torch_cuda):
        return (
            f"{found}: the NVIDIA driver is too old for this CUDA build; install a driver that supports "
            f"CUDA {facts.torch_cuda} or newer (or a vLLM/torch build for CUDA {facts.driver_cuda})"
        )
    return (
        f"{found}: check that the driver supports CUDA {facts.torch_cuda or 'of this build'}, "
        "CUDA_VISIBLE_DEVICES, and the container's GPU runtime (NVIDIA Container Toolkit)"
    )


def choose_device(setting: str, facts: PlatformFacts) -> tuple[str, str | None]:
    """The device for LLM_DEVICE=`setting` and why it cannot work (None: it can).

    "auto" follows the installed vLLM: its CUDA build only runs on "cuda", so a GPU that torch
    cannot use is reported as such rather than turned into a CPU start that cannot work either.
    """
    device = setting
    if setting == "auto":
        device = "cuda" if facts.vllm_platform == "cuda" else "cpu"
    problem = device_problem(facts) if device == "cuda" else None
    return device, problem


def platform_facts() -> PlatformFacts:
    """The facts of this machine (NVML only with vLLM's CUDA platform)."""
    platform = "cuda" if current_platform.is_cuda_alike() else current_platform.device_type
    sees = torch.cuda.is_available() and torch.cuda.device_count() > 0
    facts = PlatformFacts(platform, sees, torch.version.cuda)
    if platform != "cuda":
        return facts
    # GPU-only: NVML answers even when the CUDA runtime cannot start (the case device_problem names).
    try:
        from vllm.utils.import_utils import import_pynvml

        nvml = import_pynvml()
        nvml.nvmlInit()
        try:
            cuda = nvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12020
            return PlatformFacts(
                platform, sees, torch.version.cuda, nvml.nvmlDeviceGetCount(),
                str(nvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}",
            )
        finally:
            nvml.nvmlShutdown()
    except Exception as exc:  # the facts stay partial; the message says "unknown"
        log.warning("nvml_unavailable", error=str(exc))
        return facts


def gpu_available() -> bool:
    """True if the installed vLLM runs on CUDA and torch can use a GPU."""
    # GPU-only: the CPU build of vLLM pins a +cpu torch, which never sees a GPU.
    return current_platform.is_cuda_alike() and torch.cuda.is_available() and torch.cuda.device_count() > 0


def device_memory_bytes(device: str) -> int | None:
    """Total memory that `gpu_memory_utilization` is a fraction of on `device`, None if unknown."""
    if device == "cuda":
        # GPU-only: vLLM budgets against the total memory of each engine's GPU (rank 0 here).
        return int(torch.cuda.get_device_properties(0).total_memory) if gpu_available() else None
    if device == "cpu":
        # vLLM's CPU worker reads NUMA node 0's MemTotal, clamped to the cgroup memory limit.
        return int(get_memory_node_info(0).total_memory)
    return None


def free_memory_bytes(device: str) -> int | None:
    """Memory a new engine on `device` could take now: what vLLM's start-up check compares
    `gpu_memory_utilization` x total with. None if unknown."""
    if device == "cuda":
        # GPU-only: device-wide free memory (cudaMemGetInfo), other processes' engines included.
        return int(torch.cuda.mem_get_info()[0]) if gpu_available() else None
    if device == "cpu":
        # vLLM's CPU worker compares with NUMA node 0's available memory (cgroup-clamped).
        return int(get_memory_node_info(0).available_memory)
    return None


def footprint_of(
    before_used: int | None, after_used: int | None, pids: Iterable[int], per_process: dict[int, int] | None
) -> int | None:
    """What one engine holds on its device: the sum of its processes' memory where NVML gives it
    per process, else the device-wide used memory after its start minus before (engines start one
    at a time in this process, so the difference is this engine's). None when neither is known."""
    owned = set(pids)
    if per_process and owned & per_process.keys():
        return sum(used for pid, used in per_process.items() if pid in owned)
    if before_used is None or after_used is None:
        return None
    return max(0, after_used - before_used)


def child_pids() -> set[int]:
    """This process's descendants (an engine's processes are the ones its start added)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def used_memory_bytes(device: str) -> int | None:
    """Device-wide used memory; None off the GPU."""
    if device != "cuda" or not gpu_available():
        return None
    # GPU-only
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def process_memory_bytes(device: str) -> dict[int, int] | None:
    """Memory each process holds on the first visible GPU, by NVML (None off the GPU, or when NVML cannot tell:
    in a container without the host's PID namespace it reports no usable figures)."""
    if device != "cuda" or not gpu_available():
        return None
    # GPU-only
    try:
        from vllm.utils.import_utils import import_pynvml

        nvml = import_pynvml()
        nvml.nvmlInit()
        try:
            # NVML counts physical GPUs; torch's device 0 is the first of CUDA_VISIBLE_DEVICES.
            handle = nvml.nvmlDeviceGetHandleByIndex(current_platform.visible_device_id_to_physical_device_id(0))
            return {
                p.pid: int(p.usedGpuMemory)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.usedGpuMemory is not None
            }
        finally:
            nvml.nvmlShutdown()
    except Exception as exc:
        log.warning("nvml_process_memory_unavailable", error=str(exc))
        return None
