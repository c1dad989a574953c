"""vLLM engines: the only package of the service that imports vllm."""

from llm_service.engines.vllm.device import (
    choose_device,
    device_memory_bytes,
    free_memory_bytes,
    gpu_available,
    platform_facts,
)
from llm_service.engines.vllm.engine import VLLMEngine, cpu_dtype_args

__all__ = ["VLLMEngine", "choose_device", "cpu_dtype_args", "device_memory_bytes", "free_memory_bytes",
           "gpu_available", "platform_facts"]
