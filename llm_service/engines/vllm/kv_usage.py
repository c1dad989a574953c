"""The engine core's KV cache usage, kept from vLLM's scheduler stats without vLLM's Prometheus collectors."""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import PrometheusStatLogger


class KVUsageRecorder(PrometheusStatLogger):
    """Keeps the last KV cache usage (0..1) the engine core reported.

    Passed to AsyncLLM as its only stat logger: with stats off vLLM starts no default loggers, and
    since this one is a PrometheusStatLogger it also adds none of its own (whose global `vllm:*`
    collectors unregister each other across engines). So nothing of PrometheusStatLogger's __init__
    runs: this class records one float per engine step and registers nothing.
    """

    def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int] | None = None) -> None:
        self.usage: float | None = None

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None:
            self.usage = float(scheduler_stats.kv_cache_usage)

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass
