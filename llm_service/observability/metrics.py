"""Every Prometheus collector of the service, in a registry of its own (not vLLM's global one)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 50 ms to 10 min: CPU demo runs are slow, GPU runs fast.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_LOAD_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
# Label values of llm_cache_errors_total{operation}: ping is the health check, not a slot's.
CACHE_OPERATIONS = ("get", "set", "ping", "decode", "purge")


class Metrics:
    """The service's collectors. Names avoid the substring 'vllm' (vLLM owns those)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What every Prometheus client exports by default (the default registry is vLLM's, not
        # ours): process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...,
        # python_gc_collections_total{generation} and python_info.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "llm_requests",
            "Requests to a generation endpoint by slot (unknown before one was named), outcome and HTTP status.",
            ["model", "status", "code"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "llm_adapter_requests",
            "Generation requests on a LoRA adapter, by slot (model) and adapter name.",
            ["model", "adapter"],
            registry=r,
        )
        self.tokens_generated = Counter(
            "llm_tokens_generated", "Completion tokens generated.", ["model"], registry=r
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.inference_duration = Histogram(
            "llm_inference_duration_seconds",
            "Time from request to last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from request to first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llm_requests_in_flight", "Requests holding a slot right now.", ["model"], registry=r
        )
        self.model_loaded = Gauge("llm_model_loaded", "1 when the slot's engine is loaded.", ["model"], registry=r)
        self.model_load_duration = Histogram(
            "llm_model_load_duration_seconds",
            "Time to start a slot's engine.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.model_load_failures = Counter(
            "llm_model_load_failures", "Engine starts that failed.", ["model"], registry=r
        )
        self.model_memory_share = Gauge(
            "llm_model_memory_share", "Budget share held by the slot while loaded.", ["model"], registry=r
        )
        self.model_memory_planned = Gauge(
            "llm_model_memory_planned_bytes", "Device memory the slot's share stands for (share x device).",
            ["model"], registry=r,
        )
        self.model_memory_measured = Gauge(
            "llm_model_memory_measured_bytes",
            "Device memory the slot's engine was measured to hold after its last start (0: not measured).",
            ["model"], registry=r,
        )
        self.evictions = Counter(
            "llm_model_evictions", "Slots unloaded to make room for another.", ["model"], registry=r
        )
        self.model_loads = Counter(
            "llm_model_loads", "Engine starts (successful or not), lazy loads and retries included.", ["model"],
            registry=r,
        )
        self.load_wait = Histogram(
            "llm_model_load_wait_seconds",
            "Time requests waited for their slot to be loaded (or to get room in the budget) before running.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_deaths = Counter(
            "llm_engine_deaths", "Loaded engines that died (the slot reloads after a back-off).", ["model"],
            registry=r,
        )
        self.idle_unloads = Counter(
            "llm_model_idle_unloads", "Slots unloaded after their idle time.", ["model"], registry=r
        )
        self.engine_generations = Counter(
            "llm_engine_generations",
            "Generations the engine actually ran (cache hits and coalesced requests excluded).",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "llm_cache_hits", "Requests answered from the response cache.", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "llm_cache_misses", "Cacheable requests the response cache could not answer.", ["model"],
            registry=r,
        )
        self.cache_local_hits = Counter(
            "llm_cache_local_hits", "Cache lookups answered by this replica's in-process tier.", ["model"], registry=r
        )
        self.cache_local_misses = Counter(
            "llm_cache_local_misses", "Cache lookups the in-process tier passed on to Redis.", ["model"], registry=r
        )
        self.cache_local_entries = Gauge(
            "llm_cache_local_entries", "Entries held in this replica's in-process cache tier.", ["model"], registry=r
        )
        self.cache_local_bytes = Gauge(
            "llm_cache_local_bytes", "Encoded bytes of the entries in the in-process cache tier.", ["model"], registry=r
        )
        self.cache_errors = Counter(
            "llm_cache_errors",
            "Failed Redis operations or unreadable entries (each a miss or a lost write); model empty for ping.",
            ["model", "operation"],
            registry=r,
        )
        self.cache_coalesced = Counter(
            "llm_cache_coalesced", "Requests served by another identical request's generation.", ["model"],
            registry=r,
        )

        self.embedding_inputs = Counter(
            "llm_embedding_inputs", "Inputs embedded by an embedding slot (from the engine or the cache).", ["model"],
            registry=r,
        )
        self.embedding_tokens = Counter(
            "llm_embedding_tokens", "Tokens of the inputs an embedding slot's engine embedded.", ["model"], registry=r
        )
        self.embedding_duration = Histogram(
            "llm_embedding_duration_seconds",
            "Time of one /v1/embeddings request, cache lookups included.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.embedding_cache_hits = Counter(
            "llm_embedding_cache_hits", "Embedding inputs answered from the cache.", ["model"], registry=r
        )
        self.embedding_cache_misses = Counter(
            "llm_embedding_cache_misses", "Embedding inputs the engine embedded (not in the cache).", ["model"],
            registry=r,
        )
        self.rerank_documents = Counter(
            "llm_rerank_documents", "Documents scored against a query by a rerank slot.", ["model"], registry=r
        )
        self.rerank_tokens = Counter(
            "llm_rerank_tokens", "Tokens of the (query, document) pairs a rerank slot's engine scored.", ["model"],
            registry=r,
        )
        self.rerank_duration = Histogram(
            "llm_rerank_duration_seconds",
            "Time of one successful /v1/rerank request (its _count: rerank requests served).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_waiting = Gauge(
            "llm_requests_waiting",
            "Admitted requests not yet running: waiting for the slot to load or queued beyond what "
            "its engine runs at once (KV cache and batch) (scale out on this).",
            ["model"],
            registry=r,
        )
        self.requests_running = Gauge(
            "llm_requests_running", "Admitted requests running in the slot's engine batch.", ["model"], registry=r
        )
        self.requests_refused = Counter(
            "llm_requests_refused",
            "Requests refused with 429 by admission control (reason: queue, could not start before its deadline; "
            "slot or total, a count bound).",
            ["model", "reason"],
            registry=r,
        )
        self.engine_requests = Gauge(
            "llm_engine_requests",
            "Requests the slot's engine holds by its own count (read at scrape time).",
            ["model"],
            registry=r,
        )
        self.engine_kv_cache_usage = Gauge(
            "llm_engine_kv_cache_usage",
            "Share (0-1) of the slot's KV cache in use at its engine's last step (read at scrape time).",
            ["model"],
            registry=r,
        )
        self.event_loop_tasks = Gauge(
            "llm_event_loop_tasks",
            "asyncio tasks alive in the API process (read at scrape time; a steady climb is a leak).",
            registry=r,
        )
        self.requests_timed_out = Counter(
            "llm_requests_timed_out", "Requests that passed their deadline (504).", ["model"], registry=r
        )

    def init_slot(self, slot: str) -> None:
        """Create a slot's series at zero so dashboards see them before the first request."""
        for collector in (
            self.tokens_generated,
            self.prompt_tokens,
            self.inference_duration,
            self.time_to_first_token,
            self.in_flight,
            self.model_loaded,
            self.model_load_duration,
            self.model_load_failures,
            self.model_memory_share,
            self.model_memory_planned,
            self.model_memory_measured,
            self.evictions,
            self.model_loads,
            self.load_wait,
            self.engine_deaths,
            self.idle_unloads,
            self.engine_generations,
            self.cache_hits,
            self.cache_misses,
            self.cache_coalesced,
            self.cache_local_hits,
            self.cache_local_misses,
            self.cache_local_entries,
            self.cache_local_bytes,
            self.embedding_inputs,
            self.embedding_tokens,
            self.embedding_duration,
            self.embedding_cache_hits,
            self.embedding_cache_misses,
            self.rerank_documents,
            self.rerank_tokens,
            self.rerank_duration,
            self.requests_waiting,
            self.requests_running,
            self.engine_requests,
            self.engine_kv_cache_usage,
            self.requests_timed_out,
        ):
            collector.labels(model=slot)
        self.requests.labels(model=slot, status="success", code="200")
        for reason in ("queue", "slot", "total"):
            self.requests_refused.labels(model=slot, reason=reason)
        for operation in CACHE_OPERATIONS:
            if operation not in ("ping", "purge"):
                self.cache_errors.labels(model=slot, operation=operation)

    def render(self) -> bytes:
        return generate_latest(self.registry)
