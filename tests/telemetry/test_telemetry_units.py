"""The tracing switch, events as span events, propagation headers and the JSON log lines."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from brownout import telemetry
from brownout.config import TelemetrySection
from brownout.errors import ConfigError
from brownout.events import BreakerStateChanged, EventBus, RetryAttempted
from brownout.telemetry import EventSpans, JsonLogFormatter, event_name, header_lines, span, start, wanted
from support.otlp import memory_tracing

OFF = TelemetrySection()
ON = TelemetrySection(enabled=True)


@pytest.mark.parametrize(
    ("section", "environ", "expected"),
    [
        (OFF, {}, False),
        (ON, {}, True),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (OFF, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        (ON, {"OTEL_SDK_DISABLED": "true"}, False),
        (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_what_switches_tracing_on(section: TelemetrySection, environ: dict[str, str], expected: bool) -> None:
    assert wanted(section, environ) is expected


def test_off_builds_nothing_and_spans_cost_a_shared_null_context() -> None:
    bus = EventBus()
    assert start(OFF, bus, environ={}) is None
    assert telemetry.SWITCH.tracer is None
    assert not bus.active  # nobody subscribed
    first, second = span("a"), span("b", kind=telemetry.CLIENT)
    assert first is second
    with first as current:
        assert current is None
    assert header_lines() == b""


def test_on_without_the_sdk_fails_when_asked_for_and_warns_when_only_the_environment_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were missing
    with pytest.raises(ConfigError, match="telemetry extra"):
        start(ON, EventBus(), environ={})
    with caplog.at_level(logging.WARNING, "brownout.telemetry"):
        assert start(OFF, EventBus(), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}) is None
    assert "tracing stays off" in caplog.text
    assert telemetry.SWITCH.tracer is None


def test_an_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        TelemetrySection(endpoint="127.0.0.1:4318")


def test_events_become_events_of_the_current_span_and_nothing_outside_one() -> None:
    bus = EventBus()
    with memory_tracing(bus) as finished:
        assert bus.active
        bus.emit(RetryAttempted("qwen", 1.0, attempt=2, delay=0.5, error="HTTP 500"))  # no span: dropped
        with span("call"):
            bus.emit(RetryAttempted("qwen", 2.0, attempt=2, delay=0.5, error="HTTP 500"))
            bus.emit(BreakerStateChanged("qwen", 3.0, old="closed", new="open", reason="failure rate"))
        (call,) = finished()
    assert [e.name for e in call.events] == ["brownout.retry_attempted", "brownout.breaker_state_changed"]
    retry, breaker = (dict(e.attributes or {}) for e in call.events)
    assert retry == {
        "brownout.source": "qwen",
        "brownout.attempt": 2,
        "brownout.delay": 0.5,
        "brownout.error": "HTTP 500",
    }
    assert breaker["brownout.new"] == "open"
    assert not bus.active  # shut down: unsubscribed


def test_event_names_are_snake_case() -> None:
    assert event_name(RetryAttempted) == "brownout.retry_attempted"
    spans = EventSpans()
    spans(RetryAttempted("x", 0.0, 1, 0.1, "e"))  # no span current: nothing to do, nothing raised


def test_header_lines_carry_the_current_span() -> None:
    with memory_tracing() as finished, span("attempt") as current:
        assert current is not None
        context = current.get_span_context()
        line = header_lines()
        flags = int(context.trace_flags)
        assert flags & 1  # sampled
        expected = f"traceparent: 00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}\r\n"
        assert line == expected.encode()
        headers = telemetry.inject({"authorization": "Bearer x"})
        assert headers["traceparent"] == line.decode().split(": ", 1)[1].strip()
    assert [s.name for s in finished()] == ["attempt"]


def test_a_caller_traceparent_is_the_parent() -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with memory_tracing() as finished:
        with span("POST /v1/briefs", context=telemetry.extract([(b"traceparent", caller.encode())])):
            pass
        (served,) = finished()
    assert f"{served.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert served.parent is not None
    assert f"{served.parent.span_id:016x}" == "b7ad6b7169203331"


def _record(name: str, message: str, args: tuple[object, ...] | None = None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)


def test_json_log_lines_carry_the_trace_while_a_span_is_current() -> None:
    formatter = JsonLogFormatter()
    plain = json.loads(formatter.format(_record("brownout.x", "hello %s", ("world",))))
    assert plain["message"] == "hello world"
    assert plain["level"] == "INFO"
    assert plain["logger"] == "brownout.x"
    assert plain["time"].endswith("Z")
    assert "trace_id" not in plain
    with memory_tracing(), span("request") as current:
        assert current is not None
        context = current.get_span_context()
        access = _record(
            "uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5555", "POST", "/v1/briefs", "1.1", 200)
        )
        line = json.loads(formatter.format(access))
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/briefs", 200)


def test_json_log_lines_carry_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = json.loads(JsonLogFormatter().format(record))
    assert "RuntimeError: boom" in line["exception"]
