"""vLLM engines: the only package of the service that imports vllm."""

from llm_service.engines.vllm.engine import (
    VLLMEngine,
    cpu_dtype_args,
    device_memory_bytes,
    free_memory_bytes,
    gpu_available,
)

__all__ = ["VLLMEngine", "cpu_dtype_args", "device_memory_bytes", "free_memory_bytes", "gpu_available"]
