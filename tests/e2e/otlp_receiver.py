"""A small local stand-in for Langfuse's OTLP endpoint: decodes the exported spans for tests."""

from __future__ import annotations

import base64
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

TRACES_PATH = "/api/public/otel/v1/traces"
PUBLIC_KEY = "pk-lf-test"
SECRET_KEY = "sk-lf-test"


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    start_ns: int
    end_ns: int


@dataclass
class ReceivedExport:
    path: str
    headers: dict[str, str]
    spans: list[ReceivedSpan] = field(default_factory=list)


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def decode_export(body: bytes, encoding: str | None) -> list[ReceivedSpan]:
    if encoding == "gzip":
        body = gzip.decompress(body)
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                        resource=resource,
                        status_code=span.status.code,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


class OTLPReceiver:
    """An HTTP server on a fixed free port that records every OTLP/HTTP trace export.

    stop() closes the port (exports then fail with connection refused); start() opens it again.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.exports: list[ReceivedExport] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                export = ReceivedExport(self.path, {k.lower(): v for k, v in self.headers.items()})
                if self.path == TRACES_PATH:
                    export.spans = decode_export(body, self.headers.get("Content-Encoding"))
                with receiver._lock:
                    receiver.exports.append(export)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == TRACES_PATH else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return [span for export in self.exports for span in export.spans]

    def wait_for_span(self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 60.0) -> ReceivedSpan:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for span in self.spans():
                if predicate(span):
                    return span
            time.sleep(0.1)
        raise AssertionError(
            f"no matching span arrived within {timeout:.0f} s; got {len(self.spans())} spans"
        )

    def service_env(self) -> dict[str, str]:
        """What a service needs to trace here."""
        return {
            "LANGFUSE_ENABLED": "true",
            "LANGFUSE_HOST": self.base_url,
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_FLUSH_INTERVAL": "0.2",
            "LANGFUSE_TIMEOUT": "2",
        }

    @staticmethod
    def expected_auth() -> str:
        return "Basic " + base64.b64encode(f"{PUBLIC_KEY}:{SECRET_KEY}".encode()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """The Langfuse stand-in the shared e2e service exports its traces to."""
    receiver = OTLPReceiver()
    receiver.start()
    yield receiver
    receiver.stop()
