"""A real OTLP/HTTP trace receiver on 127.0.0.1, for the tracing tests.

Neither Debian nor PyPI packages the OpenTelemetry Collector here, so this is the receiving end of the
protocol itself: ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` (gzip-compressed or
not), decoded with ``opentelemetry-proto`` -- the same message classes the Collector's Python users
decode with -- and answered with an ``ExportTraceServiceResponse``. Every span received is kept as a
:class:`ReceivedSpan`; :meth:`OtlpReceiver.trace` gives one trace's spans and :func:`tree` draws
their parent/child structure.
"""

from __future__ import annotations

import contextlib
import gzip
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from brownout import telemetry
from brownout.config import TelemetrySection
from brownout.events import EventBus

__all__ = ["OtlpReceiver", "ReceivedSpan", "memory_tracing", "tree"]

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        out[pair.key] = _value(pair.value)
    return out


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids in hex, as trace viewers show them)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict[str, Any]
    events: tuple[tuple[str, dict[str, Any]], ...]
    status: str
    """``unset``, ``ok`` or ``error``."""
    start_ns: int
    resource: dict[str, Any] = field(default_factory=dict)

    def event_names(self) -> list[str]:
        """The names of the span's events, in order."""
        return [name for name, _ in self.events]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        if self.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        receiver = self.server.receiver
        receiver.posts += 1
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(raw)
        receiver.add(request)
        body = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test's output is the spans


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: OtlpReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.receiver = receiver


class OtlpReceiver:
    """An OTLP/HTTP receiver on a free port of 127.0.0.1 (``with OtlpReceiver() as receiver:``)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        """Export requests received (a batch of spans each)."""
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL to give an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def add(self, request: ExportTraceServiceRequest) -> None:
        """Keep every span of an export request."""
        received = [
            ReceivedSpan(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_id=span.parent_span_id.hex(),
                kind=_KINDS.get(span.kind, str(span.kind)),
                attributes=_attributes(span.attributes),
                events=tuple((e.name, _attributes(e.attributes)) for e in span.events),
                status={0: "unset", 1: "ok", 2: "error"}.get(span.status.code, "?"),
                start_ns=span.start_time_unix_nano,
                resource=_attributes(resource_spans.resource.attributes),
            )
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self.spans.extend(received)

    def snapshot(self) -> list[ReceivedSpan]:
        """The spans received so far."""
        with self._lock:
            return list(self.spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        """The spans received so far with this name."""
        return [s for s in self.snapshot() if s.name == name]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """One trace's spans, in start order."""
        return sorted((s for s in self.snapshot() if s.trace_id == trace_id), key=lambda s: s.start_ns)


def tree(spans: list[ReceivedSpan]) -> list[str]:
    """The spans as an indented outline (two spaces per level), children in start order."""
    by_parent: dict[str, list[ReceivedSpan]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_parent.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)

    def walk(parent: str, depth: int) -> Iterator[str]:
        for child in by_parent.get(parent, []):
            yield "  " * depth + child.name
            yield from walk(child.span_id, depth + 1)

    return list(walk("", 0))


@contextlib.contextmanager
def memory_tracing(bus: EventBus | None = None) -> Iterator[Callable[[], list[ReadableSpan]]]:
    """Tracing switched on in this process, into memory; yields a function that returns the spans
    finished so far. The in-process tests use it where a whole server process is not needed."""
    exporter = InMemorySpanExporter()
    started = telemetry.start(
        TelemetrySection(enabled=True), bus if bus is not None else EventBus(), environ={}, exporter=exporter
    )
    assert started is not None

    def finished() -> list[ReadableSpan]:
        started.provider.force_flush()
        return list(exporter.get_finished_spans())

    try:
        yield finished
    finally:
        started.shutdown()
        assert telemetry.SWITCH.tracer is None
