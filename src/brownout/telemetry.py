"""Traces and the logs that join them: the application's side of the observability side channel.

**Spans.** The request paths (the brief route, the pipeline's stages, the model client's calls and
attempts, the gateway's requests and upstream attempts) open spans through :func:`span`. While
tracing is off -- the default -- :data:`SWITCH` holds no tracer and :func:`span` hands back a shared
do-nothing context: one attribute check, no OpenTelemetry call at all. The gateway's chat route goes
further and checks :data:`SWITCH` itself, so its hot path costs that one check and nothing else.

**On** when the ``telemetry:`` section says ``enabled: true`` or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set (:func:`wanted`), and the
``telemetry`` extra (OpenTelemetry's SDK and OTLP/HTTP exporter) is installed: :func:`start` builds a
tracer provider of our own (never the process-wide one, which a library may set too) with a batching
OTLP/HTTP exporter, and subscribes :class:`EventSpans` to the server's event bus.

**Policies stay free of OpenTelemetry** (DESIGN: observability is a side channel). They emit events on
their :class:`~brownout.events.EventBus`; :class:`EventSpans` turns each event emitted inside a traced
request -- a retry, a breaker's refusal or state change, a fallback served, a guard's re-ask, a
downshift -- into an event on the span current in the emitting task.

**Context.** A caller's W3C ``traceparent`` is the parent of the server's span
(:func:`extract`); every upstream request carries the current span's (:func:`inject`,
:func:`header_lines`).

**Logs.** :class:`JsonLogFormatter` writes one JSON object per line with ``trace_id`` and ``span_id``
when a span is current (``brownout serve --log-format json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

from brownout import __version__
from brownout.events import Event, EventBus

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from brownout.config import TelemetrySection

__all__ = [
    "ENDPOINT_VARIABLES",
    "SWITCH",
    "EventSpans",
    "JsonLogFormatter",
    "Switch",
    "Telemetry",
    "event_name",
    "extract",
    "header_lines",
    "inject",
    "span",
    "start",
    "wanted",
]

_log = logging.getLogger("brownout.telemetry")

ENDPOINT_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""The standard variables that switch tracing on when set (OpenTelemetry's exporter reads them too)."""

CLIENT: Final = SpanKind.CLIENT
SERVER: Final = SpanKind.SERVER
INTERNAL: Final = SpanKind.INTERNAL


class Switch:
    """Whether tracing is on: ``tracer`` is None while it is off (the code paths check just that)."""

    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: Tracer | None = None


SWITCH: Final = Switch()
"""The process's switch: tracing is one process-wide setting, as OpenTelemetry's context is."""

_OFF: Final[AbstractContextManager[None]] = contextlib.nullcontext()


def span(
    name: str,
    *,
    kind: SpanKind = INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    context: Context | None = None,
) -> AbstractContextManager[Span | None]:
    """A span made current for the ``with`` block, or (tracing off) a context that yields None.

    An exception leaving the block is recorded on the span and sets its status to error.
    """
    tracer = SWITCH.tracer
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's ``traceparent`` (and ``tracestate``, baggage) to ``headers``; returns it."""
    propagate.inject(headers)
    return headers


def header_lines() -> bytes:
    """The current span's propagation headers as raw HTTP/1.1 header lines (the gateway's upstream
    requests are written by hand)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return "".join(f"{name}: {value}\r\n" for name, value in carrier.items()).encode("latin-1")


def extract(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The trace context a caller sent (its ``traceparent``), from ASGI ``headers``."""
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
    return propagate.extract(carrier)


# -- events as span events ------------------------------------------------------------------------------

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def event_name(kind: type[Event]) -> str:
    """The span event's name for an event class: ``RetryAttempted`` -> ``brownout.retry_attempted``."""
    return "brownout." + _CAMEL.sub("_", kind.__name__).lower()


def _value(value: Any) -> AttributeValue:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return str(value)


class EventSpans:
    """An event-bus subscriber that turns events into span events on the emitting task's current span.

    An event emitted outside any recording span (a background loop's, tracing off) costs one check.
    ``source`` becomes ``brownout.source``; every other field but the clock time ``at`` becomes
    ``brownout.<field>`` (None fields are left out).
    """

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: dict[type[Event], tuple[str, tuple[str, ...]]] = {}

    def __call__(self, event: Event) -> None:
        """Record ``event`` on the current span, when one is recording."""
        current = trace.get_current_span()
        if not current.is_recording():
            return
        kind = type(event)
        known = self._names.get(kind)
        if known is None:
            fields = tuple(f.name for f in dataclasses.fields(event) if f.name != "at")
            known = self._names[kind] = (event_name(kind), fields)
        name, fields = known
        attributes = {
            f"brownout.{field}": _value(value)
            for field in fields
            if (value := getattr(event, field)) is not None
        }
        current.add_event(name, attributes)


# -- switching it on ------------------------------------------------------------------------------------


def wanted(section: TelemetrySection, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing should be on: the section enables it, or an OTLP endpoint variable is set;
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off either way."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return section.enabled or any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


class Telemetry:
    """Tracing switched on: the tracer provider, its exporter and the event-bus subscription."""

    def __init__(self, provider: TracerProvider, unsubscribe: Callable[[], None]) -> None:
        self.provider = provider
        self._unsubscribe = unsubscribe

    def shutdown(self) -> None:
        """Switch tracing off, then send what is still buffered (bounded by the exporter's timeout)."""
        SWITCH.tracer = None
        self._unsubscribe()
        self.provider.shutdown()


def start(
    section: TelemetrySection,
    events: EventBus,
    *,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> Telemetry | None:
    """Switch tracing on when :func:`wanted` says so; None (and nothing built) otherwise.

    ``exporter``: where spans go (default: OTLP/HTTP to ``section.endpoint`` or as the ``OTEL_*``
    variables say). Without the ``telemetry`` extra, tracing stays off with one warning -- or, when
    the config asked for it explicitly, a :class:`~brownout.errors.ConfigError`.
    """
    from brownout.errors import ConfigError

    env = os.environ if environ is None else environ
    if not wanted(section, env):
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:
        message = "traces need the telemetry extra: pip install 'brownout[server,telemetry]'"
        if section.enabled:
            raise ConfigError("telemetry.enabled", message) from e
        _log.warning("%s; tracing stays off", message)
        return None
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = section.endpoint
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None)
    attributes: dict[str, AttributeValue] = {SERVICE_VERSION: __version__}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = section.service_name
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(TraceIdRatioBased(section.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    unsubscribe = events.subscribe(EventSpans())
    SWITCH.tracer = provider.get_tracer("brownout", __version__)
    return Telemetry(provider, unsubscribe)


# -- logs -----------------------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, and
    ``trace_id``/``span_id`` (hex, as trace viewers show them) when a span is current.

    uvicorn's access lines also carry ``client``, ``method``, ``path`` and ``status``; a record with
    an exception carries ``exception`` (the formatted traceback).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        created = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            doc["trace_id"] = format(context.trace_id, "032x")
            doc["span_id"] = format(context.span_id, "016x")
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) >= 5:
            # uvicorn's access record: (client address, method, path with query, HTTP version, status).
            doc.update(client=str(args[0]), method=str(args[1]), path=str(args[2]), status=args[4])
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)
