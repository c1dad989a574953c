"""Tracing: one Langfuse trace per request, exported off the request path; a no-op when disabled."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
from langfuse import Langfuse, propagate_attributes
from langfuse._client.resource_manager import LangfuseResourceManager
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from llm_service import __version__
from llm_service.config.settings import Settings
from llm_service.engines.base import SamplingOptions

log = structlog.get_logger(__name__)

TRACE_NAME = "llm-service"
OBSERVATION_NAME = "generation"
# The SDK's own OTLP path and headers (langfuse/_client/span_processor.py); ingestion version 4
# lets a Langfuse v4 server process spans in real time.
OTLP_PATH = "/api/public/otel/v1/traces"


class Trace(Protocol):
    """One request's trace; `end` is called exactly once and never raises."""

    trace_id: str | None

    def end(
        self,
        *,
        outputs: list[str],
        prompt_tokens: int,
        completion_tokens: int,
        time_to_first_token: float | None,
        cache: str,
        outcome: str,
        error: str | None,
        details: dict[str, Any] | None = None,
    ) -> None: ...


class Tracer(Protocol):
    """Starts traces; never raises and never blocks on the network."""

    def start(
        self,
        *,
        request_id: str,
        slot: str,
        model_id: str,
        input: Any,
        sampling: SamplingOptions,
        adapter: str | None = None,
    ) -> Trace:
        """A generation's trace; `adapter` (a LoRA adapter's name) goes into its metadata."""
        ...

    def start_retrieval(
        self, *, request_id: str, slot: str, model_id: str, operation: str, input: Any, parameters: dict[str, Any]
    ) -> Trace:
        """A trace of an embeddings or rerank request (`operation` "embedding" or "rerank"): counts
        and tokens, `input` (the texts) only when content is captured, never the vectors."""
        ...

    def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class NoTrace:
    trace_id: str | None = None

    def end(self, **_: Any) -> None:
        return None


NO_TRACE = NoTrace()


class NoTracer:
    """The tracer when LANGFUSE_ENABLED=false."""

    def start(self, **_: Any) -> Trace:
        return NO_TRACE

    def start_retrieval(self, **_: Any) -> Trace:
        return NO_TRACE

    def health(self) -> dict[str, Any]:
        return {"status": "disabled", "enabled": False}

    async def close(self) -> None:
        return None


def model_parameters(sampling: SamplingOptions) -> dict[str, Any]:
    """Sampling parameters as Langfuse model parameters (scalars and string lists only)."""
    params: dict[str, Any] = {
        "max_tokens": sampling.max_tokens or None,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": sampling.seed,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "n": sampling.n,
        "stop": list(sampling.stop) or None,
        "logprobs": sampling.logprobs,
        "json_schema": sampling.json_schema is not None or None,
    }
    return {k: v for k, v in params.items() if v is not None}


class ExportStatus:
    """Outcome of the latest export, written by the exporter thread, read by /health."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: bool | None = None
        self.at: float | None = None
        self.error: str | None = None
        self.spans = 0

    def record(self, ok: bool, spans: int, error: str | None = None) -> bool:
        """Record one export; True when the outcome changed (worth a log line)."""
        with self._lock:
            changed = ok != self.ok
            self.ok, self.at, self.error = ok, time.time(), error
            if ok:
                self.spans += spans
            return changed

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "last_export": None if self.ok is None else ("ok" if self.ok else "failed"),
                "last_export_at": _iso(self.at),
                "last_error": self.error,
                "exported_spans": self.spans,
            }


class StatusExporter(SpanExporter):
    """Wraps the OTLP exporter: remembers whether the last export worked, logs on changes only."""

    def __init__(self, inner: SpanExporter, status: ExportStatus) -> None:
        self._inner = inner
        self._status = status

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
            failed = result is not SpanExportResult.SUCCESS
            error = "export failed (Langfuse unreachable or refused)" if failed else None
        except Exception as exc:  # the exporter thread must survive anything
            result, error = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        ok = result is SpanExportResult.SUCCESS
        if self._status.record(ok, len(spans), error):
            if ok:
                log.info("langfuse_export_ok", spans=len(spans))
            else:
                log.warning("langfuse_export_failed", spans=len(spans), error=error)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def otlp_exporter(host: str, public_key: str, secret_key: str, timeout: int) -> OTLPSpanExporter:
    """The exporter the SDK would build itself, built here so its outcome can be observed."""
    auth = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")
    return OTLPSpanExporter(
        endpoint=host.rstrip("/") + OTLP_PATH,
        headers={
            "Authorization": f"Basic {auth}",
            "x-langfuse-sdk-name": "python",
            "x-langfuse-public-key": public_key,
            "x-langfuse-ingestion-version": "4",
        },
        timeout=timeout,
        compression=Compression.Gzip,
    )


class LangfuseTrace:
    """A request's trace: a root generation observation, finished in `end`."""

    def __init__(self, generation: Any, capture_content: bool) -> None:
        self._generation = generation
        self._capture = capture_content
        self._started = time.time()
        self.trace_id: str | None = generation.trace_id

    def end(
        self,
        *,
        outputs: list[str],
        prompt_tokens: int,
        completion_tokens: int,
        time_to_first_token: float | None,
        cache: str,
        outcome: str,
        error: str | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """`details`: more metadata (a retrieval request's counts)."""
        try:
            update: dict[str, Any] = {
                "usage_details": {
                    "input": prompt_tokens,
                    "output": completion_tokens,
                    "total": prompt_tokens + completion_tokens,
                },
                "metadata": {"cache": cache, "outcome": outcome, **(details or {})},
            }
            if time_to_first_token is not None:
                first_token = self._started + time_to_first_token
                update["completion_start_time"] = datetime.fromtimestamp(first_token, UTC)
            if self._capture and outputs:
                update["output"] = outputs[0] if len(outputs) == 1 else outputs
            if error is not None:
                update["level"] = "ERROR"
                update["status_message"] = error
            self._generation.update(**update)
            self._generation.end()
        except Exception as exc:
            log.warning("trace_end_failed", error=str(exc))


class LangfuseTracer:
    """Traces to Langfuse with the pinned SDK (langfuse==5.0.4) on a TracerProvider of its own
    (the process-global OpenTelemetry provider is left alone). Spans are exported in batches by
    the SDK's background thread; `close` flushes within LANGFUSE_FLUSH_TIMEOUT_SECONDS."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        lf = settings.langfuse
        assert lf.public_key is not None and lf.secret_key is not None  # checked by the settings
        secret = lf.secret_key.get_secret_value()
        self.host = lf.host
        self._public_key = lf.public_key
        self._capture = lf.capture_content
        self._flush_timeout = lf.flush_timeout_seconds
        self._status = ExportStatus()
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "llm-service", "service.version": __version__}),
            shutdown_on_exit=False,  # close() shuts it down, bounded; never an unbounded atexit flush
        )
        inner = exporter or otlp_exporter(lf.host, lf.public_key, secret, lf.timeout)
        self._client = Langfuse(
            public_key=lf.public_key,
            secret_key=secret,
            base_url=lf.host,
            timeout=lf.timeout,
            flush_interval=lf.flush_interval,
            environment=settings.app.env,
            release=__version__,
            tracer_provider=self._provider,
            span_exporter=StatusExporter(inner, self._status),
        )

    def start(
        self,
        *,
        request_id: str,
        slot: str,
        model_id: str,
        input: Any,
        sampling: SamplingOptions,
        adapter: str | None = None,
    ) -> Trace:
        parameters = model_parameters(sampling)
        return self._observe(
            OBSERVATION_NAME, "generation", request_id, slot, model_id, input, parameters, adapter=adapter
        )

    def start_retrieval(
        self, *, request_id: str, slot: str, model_id: str, operation: str, input: Any, parameters: dict[str, Any]
    ) -> Trace:
        # Langfuse has an "embedding" observation type; a rerank is a generation-like call named "rerank".
        as_type: Literal["generation", "embedding"] = "embedding" if operation == "embedding" else "generation"
        return self._observe(operation, as_type, request_id, slot, model_id, input, parameters)

    def _observe(
        self,
        name: str,
        as_type: Literal["generation", "embedding"],
        request_id: str,
        slot: str,
        model_id: str,
        input: Any,
        parameters: dict[str, Any],
        adapter: str | None = None,
    ) -> Trace:
        try:
            ids = {"request_id": request_id, "slot": slot, **({"adapter": adapter} if adapter else {})}
            with propagate_attributes(trace_name=TRACE_NAME, metadata=ids):
                observation = self._client.start_observation(
                    name=name,
                    as_type=as_type,
                    model=model_id,
                    model_parameters=parameters,
                    input=input if self._capture else None,
                    metadata=ids,
                )
            return LangfuseTrace(observation, self._capture)
        except Exception as exc:
            log.warning("trace_start_failed", error=str(exc))
            return NO_TRACE

    def health(self) -> dict[str, Any]:
        snapshot = self._status.snapshot()
        status = "down" if snapshot["last_export"] == "failed" else "up"
        return {"status": status, "enabled": True, "host": self.host, **snapshot}

    async def close(self) -> None:
        """Export what is left, waiting at most the flush timeout; the rest is dropped."""
        done = threading.Event()

        def shut_down() -> None:
            try:
                self._client.shutdown()  # flushes, stops the SDK's threads, drops its atexit hook
                self._provider.shutdown()
            except Exception as exc:
                log.warning("langfuse_shutdown_failed", error=str(exc))
            finally:
                done.set()

        # A daemon thread: an unreachable Langfuse cannot hold the process past the timeout.
        threading.Thread(target=shut_down, name="langfuse-shutdown", daemon=True).start()
        finished = await asyncio.to_thread(done.wait, self._flush_timeout)
        if not finished:
            log.warning("langfuse_flush_timeout", seconds=self._flush_timeout)
        # The SDK keeps one resource manager per public key for the whole process; a lifespan
        # that starts again (tests, reloads) must get a fresh one, not this shut-down one.
        with LangfuseResourceManager._lock:
            LangfuseResourceManager._instances.pop(self._public_key, None)


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def build_tracer(settings: Settings) -> Tracer:
    """The tracer the lifespan owns: Langfuse when enabled, else the no-op."""
    if not settings.langfuse.enabled:
        return NoTracer()
    try:
        return LangfuseTracer(settings)
    except Exception as exc:  # tracing never stops the service from starting
        log.error("langfuse_init_failed", error=str(exc))
        return NoTracer()
