"""The live view: the event hub's fan-out, the SSE and WebSocket streams, and alert webhooks.

Hub unit tests run a :class:`LiveHub` on a runtime that is not started, with a fake clock; stream and
webhook tests run the app on uvicorn (127.0.0.1, free port) over fake model servers and a real
webhook receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import free_port
from brownout.config import BrownoutConfig, WebhooksSection, load_config
from brownout.errors import ConfigError
from brownout.events import BreakerStateChanged, CallRejected, EventBus, ModeDownshifted, SpoolAppended
from brownout.policies.breaker import BreakerState
from brownout.server.live import Alert, LiveClient, LiveHub, TooManyClients, WebhookSender
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock
from support.live import LiveStack, Receiver, live_stack, serve_app
from support.stack import make_config
from support.wait import until

TRIP: dict[str, Any] = {"circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600}}
# Snapshots and system-mode evaluations every 0.2 s, so changes show up quickly.
FAST_LIVE: dict[str, Any] = {"server": {"live_interval": 0.2}, "modes": {"interval": 0.2}}
TOKEN = "adm1n-t0ken-for-live-tests"


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
    return out


# ------------------------------------------------------------------------------------ hub unit tests


@pytest.fixture
async def hub(tmp_path: Path, clock: FakeClock, bus: EventBus) -> AsyncIterator[LiveHub]:
    """A started hub on a runtime that was never started (its snapshots say "starting")."""
    config = make_config(
        {"qwen": "http://127.0.0.1:9", "mistral": "http://127.0.0.1:9", "llama": "http://127.0.0.1:9"},
        tmp_path / "b.db",
    )
    runtime = Runtime(config, clock=clock, events=bus)
    live = LiveHub(
        runtime.status.snapshot, clock=clock, events=bus, client_queue=4, burst=5, burst_window=10.0
    )
    live.start()
    try:
        yield live
    finally:
        await live.aclose()


def drain(client: LiveClient) -> list[dict[str, Any]]:
    out = []
    while not client.queue.empty():
        message = client.queue.get_nowait()
        out.append({"end": True} if message is None else json.loads(message.data))
    return out


def breaker_event(source: str, clock: FakeClock, new: str = "open") -> BreakerStateChanged:
    return BreakerStateChanged(source, clock.now(), "closed", new, "failure rate 1.0 >= 0.5")


async def test_a_slow_client_is_dropped_and_the_bus_never_waits(
    hub: LiveHub, bus: EventBus, clock: FakeClock
) -> None:
    reader = hub.connect()
    slow = hub.connect()
    assert drain(reader)[0]["type"] == "snapshot"
    for i in range(10):
        bus.emit(breaker_event(f"model-{i}", clock))  # returns at once: the hub only enqueues
        got = [m for m in drain(reader) if m["type"] == "event"]
        assert [m["source"] for m in got] == [f"model-{i}"]
    # The slow client's queue (4) overflowed: it was told why and its stream ended.
    assert slow.dropped is True
    tail = drain(slow)
    assert tail[-2]["type"] == "dropped"
    assert "too slow" in tail[-2]["reason"]
    assert tail[-1] == {"end": True}
    assert hub.dropped_clients == 1
    assert hub.client_count == 1
    assert reader.dropped is False


async def test_per_call_events_are_not_streamed_and_bursts_are_cut(
    hub: LiveHub, bus: EventBus, clock: FakeClock
) -> None:
    client = hub.connect()
    drain(client)
    bus.emit(CallRejected("qwen", clock.now(), "breaker", "open", 60.0))
    assert drain(client) == []
    seen = []
    for _ in range(8):
        bus.emit(ModeDownshifted("briefs", clock.now(), "creative", "balanced", "llama unavailable"))
        seen += [m for m in drain(client) if m["type"] == "event"]
    assert len(seen) == 5  # burst=5 per 10 s from one source
    assert seen[0]["category"] == "mode"
    assert seen[0]["summary"] == "briefs: served balanced instead of creative (llama unavailable)"
    clock.advance(10.0)
    bus.emit(ModeDownshifted("briefs", clock.now(), "creative", "balanced", "llama unavailable"))
    (after,) = [m for m in drain(client) if m["type"] == "event"]
    assert after["suppressed"] == 3


async def test_late_joiners_get_the_recent_events_and_resume_after_last_event_id(
    hub: LiveHub, bus: EventBus, clock: FakeClock
) -> None:
    hub.client_queue = 64  # room for the whole backlog
    for i in range(3):
        bus.emit(breaker_event(f"m{i}", clock))
    first = hub.connect()
    messages = drain(first)
    assert messages[0]["type"] == "snapshot"
    events = [m for m in messages if m["type"] == "event"]
    assert [m["source"] for m in events] == ["m0", "m1", "m2"]
    resumed = hub.connect(after=events[1]["seq"])
    assert [m["source"] for m in drain(resumed) if m["type"] == "event"] == ["m2"]


async def test_too_many_clients_are_refused(hub: LiveHub) -> None:
    hub.max_clients = 2
    a, b = hub.connect(), hub.connect()
    with pytest.raises(TooManyClients):
        hub.connect()
    hub.disconnect(a)
    hub.connect()
    assert hub.client_count == 2
    hub.close_clients()
    assert drain(b)[-1] == {"end": True}
    assert hub.client_count == 0


async def test_events_from_a_worker_thread_reach_the_loop(
    hub: LiveHub, bus: EventBus, clock: FakeClock
) -> None:
    client = hub.connect()
    drain(client)
    thread = threading.Thread(target=lambda: bus.emit(breaker_event("threaded", clock)))
    thread.start()
    thread.join()
    await until(lambda: not client.queue.empty(), "the event from the thread")
    (event,) = [m for m in drain(client) if m["type"] == "event"]
    assert event["source"] == "threaded"


async def test_alerts_fire_once_and_resolve(hub: LiveHub, bus: EventBus, clock: FakeClock) -> None:
    hub.client_queue = 64
    client = hub.connect()
    bus.emit(breaker_event("qwen", clock, "open"))
    bus.emit(BreakerStateChanged("qwen", clock.now(), "open", "half_open", "open wait elapsed"))
    bus.emit(BreakerStateChanged("qwen", clock.now(), "half_open", "open", "probe failed"))
    bus.emit(BreakerStateChanged("qwen", clock.now(), "open", "closed", "probes succeeded"))
    bus.emit(SpoolAppended("briefs-spool", clock.now(), "r1", 101, True))
    alerts = [(a.name, a.status) for a in hub.alerts]
    assert alerts == [
        ("CircuitBreakerOpen", "firing"),  # once, though it opened twice before closing
        ("CircuitBreakerOpen", "resolved"),
        ("SpoolBacklog", "firing"),
    ]
    streamed = [m for m in drain(client) if m["type"] == "alert"]
    assert [(m["alert"], m["status"]) for m in streamed] == alerts
    assert streamed[0]["labels"] == {"model": "qwen", "breaker": "qwen"}


# ------------------------------------------------------------------------------------ webhook sender


def _alert(status: str = "firing") -> Alert:
    return Alert(
        "CircuitBreakerOpen",
        "firing" if status == "firing" else "resolved",
        "critical",
        "circuit breaker qwen is OPEN (failure rate 1.0 >= 0.4)",
        {"model": "qwen"},
        {"reason": "failure rate"},
        "2026-01-01T00:00:00.000Z",
    )


async def test_webhooks_retry_a_failing_receiver_and_send_json_and_slack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = Receiver(fail_first=2)
    slack = Receiver()
    async with (
        serve_app(flaky.app(), lifespan="off") as flaky_url,
        serve_app(slack.app(), lifespan="off") as slack_url,
    ):
        section = WebhooksSection.model_validate(
            {
                "endpoints": [
                    {"url": f"{flaky_url}/hook/T0KEN-json", "format": "json"},
                    {"url": f"{slack_url}/hook/T0KEN-slack", "format": "slack"},
                ],
                "retries": 3,
                "backoff_base": 0.0,
                "timeout": 5.0,
            }
        )
        sender = WebhookSender(section)
        sender.start()
        try:
            with caplog.at_level(logging.DEBUG):
                sender.submit(_alert())
                await until(lambda: sender.sent == 2, "both deliveries")
        finally:
            await sender.aclose()
    assert flaky.attempts == 3  # two 503s, then accepted
    assert flaky.received == [
        {
            "source": "brownout",
            "alert": "CircuitBreakerOpen",
            "status": "firing",
            "severity": "critical",
            "summary": "circuit breaker qwen is OPEN (failure rate 1.0 >= 0.4)",
            "labels": {"model": "qwen"},
            "details": {"reason": "failure rate"},
            "at": "2026-01-01T00:00:00.000Z",
        }
    ]
    (message,) = slack.received
    assert message["text"].startswith(
        ":red_circle: [FIRING] CircuitBreakerOpen: circuit breaker qwen is OPEN"
    )
    assert {"title": "model", "value": "qwen", "short": True} in message["attachments"][0]["fields"]
    assert sender.failed == 0
    assert "T0KEN" not in caplog.text


async def test_webhooks_give_up_on_a_client_error_and_after_the_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusing = Receiver(fail_first=100, status=400)
    down = Receiver(fail_first=100, status=503)
    async with (
        serve_app(refusing.app(), lifespan="off") as r_url,
        serve_app(down.app(), lifespan="off") as d_url,
    ):
        section = WebhooksSection.model_validate(
            {
                "endpoints": [{"url": f"{r_url}/hook/SECRET1"}, {"url": f"{d_url}/hook/SECRET2"}],
                "retries": 2,
                "backoff_base": 0.0,
            }
        )
        sender = WebhookSender(section)
        sender.start()
        try:
            with caplog.at_level(logging.DEBUG):
                sender.submit(_alert())
                await until(lambda: sender.failed == 2, "both deliveries to give up")
        finally:
            await sender.aclose()
    assert refusing.attempts == 1  # a 400 is not retried
    assert down.attempts == 3  # 1 + 2 retries
    assert sender.sent == 0
    assert "SECRET" not in caplog.text
    assert f"webhook {r_url} refused alert CircuitBreakerOpen: HTTP 400" in caplog.text


def test_webhook_queue_is_bounded() -> None:
    sender = WebhookSender(
        WebhooksSection.model_validate({"endpoints": [{"url": "http://127.0.0.1:9/x"}], "queue_size": 3})
    )
    for _ in range(5):
        sender.submit(_alert())
    assert sender.pending == 3
    assert sender.dropped == 2


def test_webhook_urls_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.endpoints\.0: url must be an http"):
        load_config(None, environ={"BROWNOUT__WEBHOOKS__ENDPOINTS": "[{url: 'ftp://x/y'}]"})
    assert BrownoutConfig().webhooks.endpoints == []


# ------------------------------------------------------------------------------------ the streams


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The messages of an SSE response (``type`` from the event field, the rest from its JSON data)."""
    kind, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            message = json.loads(data)
            assert message["type"] == kind
            yield message
            kind, data = "message", ""


async def collect(
    stream: AsyncIterator[dict[str, Any]], done: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def run() -> None:
        async for message in stream:
            seen.append(message)
            if done(seen):
                return
        raise AssertionError("the stream ended")

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out; saw {[(m['type'], m.get('name')) for m in seen]}") from None
    return seen


def has_event(name: str, **fields: Any) -> Callable[[list[dict[str, Any]]], bool]:
    def check(seen: list[dict[str, Any]]) -> bool:
        return any(
            m["type"] == "event"
            and m["name"] == name
            and all(m["fields"].get(k) == v or m.get(k) == v for k, v in fields.items())
            for m in seen
        )

    return check


async def trip_hinter(stack: LiveStack, http: httpx.AsyncClient) -> None:
    """Make llama fail until its breaker opens (TRIP: one creative request does it)."""
    stack.fakes["llama"].set("error")
    response = await http.post("/v1/briefs", json={"text": "a green tea and fig perfume", "mode": "creative"})
    assert response.status_code == 200
    assert stack.breaker("llama").state is BreakerState.OPEN


async def test_sse_streams_a_breaker_opening_its_alert_and_the_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(fail_first=1)
    async with serve_app(receiver.app(), lifespan="off") as hook_url:
        hooks = {"webhooks": {"endpoints": [{"url": f"{hook_url}/hook/HOOKSECRET"}], "backoff_base": 0.0}}
        with caplog.at_level(logging.DEBUG):
            async with (
                live_stack(tmp_path, _merge(TRIP, FAST_LIVE, hooks), admin_token=TOKEN) as stack,
                httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
                http.stream("GET", "/api/v1/events") as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                stream = sse(response)
                (first,) = await collect(stream, lambda seen: True)
                assert first["type"] == "snapshot"
                assert first["data"]["models"]["llama"]["breakers"] == {"llama": "closed"}
                assert first["data"]["system_mode"] == "normal"

                await trip_hinter(stack, http)
                seen = await collect(
                    stream,
                    lambda s: (
                        has_event("BreakerStateChanged", new="open")(s)
                        and any(m["type"] == "alert" for m in s)
                        and has_event("SystemModeChanged", new="degraded")(s)
                        and any(
                            m["type"] == "snapshot"
                            and m["data"]["models"]["llama"]["status"] == "unhealthy"
                            and m["data"]["system_mode"] == "degraded"
                            for m in s
                        )
                    ),
                )
                (opened,) = [m for m in seen if m["type"] == "event" and m["name"] == "BreakerStateChanged"]
                assert opened["source"] == "llama"
                assert opened["category"] == "breaker"
                assert opened["fields"]["old"] == "closed"
                assert opened["summary"].startswith("breaker llama: closed -> open")
                alert = next(m for m in seen if m["type"] == "alert")
                assert (alert["alert"], alert["status"], alert["labels"]["model"]) == (
                    "CircuitBreakerOpen",
                    "firing",
                    "llama",
                )
                snap = next(m for m in reversed(seen) if m["type"] == "snapshot")["data"]
                assert snap["models"]["llama"]["breakers"] == {"llama": "open"}
                assert snap["available_modes"] == ["fast", "balanced"]
                assert "llama" in snap["mode_reason"]
                assert "creative_hints" in snap["switched_off"]

                # The recovery API closes the breaker: the feed shows the action and the transition.
                reset = await http.post(
                    "/api/v1/recovery/trigger",
                    json={"action": "reset_breakers", "target": "llama"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert reset.status_code == 200
                seen = await collect(
                    stream,
                    lambda s: (
                        has_event("RecoveryActionRun", action="reset_breakers")(s)
                        and has_event("BreakerStateChanged", new="closed")(s)
                    ),
                )
                action = next(m for m in seen if m["type"] == "event" and m["name"] == "RecoveryActionRun")
                assert action["category"] == "recovery"
                assert (action["fields"]["target"], action["fields"]["status"]) == ("llama", "ok")
                assert action["summary"].startswith("recovery reset_breakers (llama, manual) ok")
                await until(lambda: len(receiver.received) == 4, "the firing and resolved webhooks")
    # An open breaker also makes its model unhealthy (seed 004 raises both alerts); each fires once
    # and is resolved once the recovery action closed the breaker.
    assert [(r["alert"], r["status"], r["labels"]["model"]) for r in receiver.received] == [
        ("CircuitBreakerOpen", "firing", "llama"),
        ("LLMModelUnhealthy", "firing", "llama"),
        ("CircuitBreakerOpen", "resolved", "llama"),
        ("LLMModelUnhealthy", "resolved", "llama"),
    ]
    assert receiver.attempts == 5  # the first POST got a 503 and was retried
    assert "HOOKSECRET" not in caplog.text
    assert TOKEN not in caplog.text


async def test_emergency_mode_is_streamed_and_alerted(tmp_path: Path) -> None:
    async with (
        live_stack(tmp_path, _merge(TRIP, FAST_LIVE)) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
        http.stream("GET", "/api/v1/events") as response,
    ):
        stream = sse(response)
        for fake in stack.fakes.values():
            fake.set("error")
        for breaker in (stack.breaker(r) for r in ("qwen", "mistral", "llama")):
            breaker.open_for(3600, "test: every model down")
        seen = await collect(
            stream,
            lambda s: (
                has_event("SystemModeChanged", new="emergency")(s)
                and any(m["type"] == "alert" and m["alert"] == "SystemEmergencyMode" for m in s)
            ),
        )
        alerts = [m for m in seen if m["type"] == "alert" and m["alert"] == "SystemEmergencyMode"]
        assert [a["status"] for a in alerts] == ["firing"]
        hub = stack.runtime.live
        unhealthy = {a.labels["model"] for a in hub.alerts if a.name == "LLMModelUnhealthy"}
        assert unhealthy == {"qwen", "mistral", "llama"}
        status = (await http.get("/api/v1/status")).json()
        assert status["system_mode"] == "emergency"
        assert status["available_modes"] == []


async def test_websocket_streams_the_same_messages(tmp_path: Path) -> None:
    async with (
        live_stack(tmp_path, _merge(TRIP, FAST_LIVE)) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
    ):
        ws_url = stack.url.replace("http://", "ws://") + "/api/v1/ws"
        async with ws_connect(ws_url) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["type"] == "snapshot"
            assert stack.runtime.live.client_count == 1
            await trip_hinter(stack, http)

            async def frames() -> AsyncIterator[dict[str, Any]]:
                while True:
                    yield json.loads(await ws.recv())

            seen = await collect(
                frames(),
                lambda s: (
                    has_event("BreakerStateChanged", new="open")(s)
                    and any(m["type"] == "alert" and m["alert"] == "CircuitBreakerOpen" for m in s)
                ),
            )
            assert [m["seq"] for m in seen] == sorted(m["seq"] for m in seen)
        await until(lambda: stack.runtime.live.client_count == 0, "the hub to forget the socket")


async def test_websocket_refuses_a_foreign_origin(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        ws_url = stack.url.replace("http://", "ws://") + "/api/v1/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(ws_url, origin="http://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        host = stack.url.removeprefix("http://")
        async with ws_connect(ws_url, origin=f"http://{host}") as ws:  # type: ignore[arg-type]
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"


async def test_sse_clients_beyond_the_limit_get_503(tmp_path: Path) -> None:
    async with (
        live_stack(tmp_path, {"server": {"live_max_clients": 1}}) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
        http.stream("GET", "/api/v1/events") as first,
    ):
        assert first.status_code == 200
        await until(lambda: stack.runtime.live.client_count == 1, "the first client")
        second = await http.get("/api/v1/events")
        assert second.status_code == 503
        assert second.headers["retry-after"] == "5"


@pytest.mark.parametrize("last_event_id", ["²", "-1", "abc", "9" * 40, "3"])
async def test_any_last_event_id_is_accepted(tmp_path: Path, last_event_id: str) -> None:
    async with (
        live_stack(tmp_path) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
        http.stream(
            "GET", "/api/v1/events", headers={"Last-Event-ID": last_event_id.encode("latin-1")}
        ) as response,
    ):
        assert response.status_code == 200
        (first,) = await collect(sse(response), lambda seen: True)
        assert first["type"] == "snapshot"


async def test_ctrl_c_ends_open_streams_and_the_server_exits_cleanly(tmp_path: Path) -> None:
    """``brownout serve`` with a live stream open: SIGINT ends the stream at once (no graceful-shutdown
    timeout has to cut it) and the process shuts down cleanly."""
    fakes = [FakeLLM(model=r) for r in ("qwen", "mistral", "llama")]
    roles = list(zip(("qwen", "mistral", "llama"), fakes, strict=True))
    for fake in fakes:
        await fake.start()
    port = free_port()
    config = {
        "server": {"port": port},
        "models": {
            "local": {"enabled": False},
            "roles": {r: {"endpoints": [{"url": f.url}]} for r, f in roles},
        },
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "brownout",
        "serve",
        "--config",
        str(tmp_path / "c.yaml"),
        stdout=log,
        stderr=log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/api/v1/status")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            async with http.stream("GET", "/api/v1/events") as response:
                stream = sse(response)
                (first,) = await collect(stream, lambda seen: True)
                assert first["type"] == "snapshot"
                proc.send_signal(signal.SIGINT)
                rest = [m async for m in stream]  # ends when the server closes the stream
        assert all(m["type"] in ("snapshot", "event", "alert") for m in rest)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await asyncio.gather(*(f.stop() for f in fakes))
    text = (tmp_path / "serve.log").read_text()
    assert "graceful shutdown exceeded" not in text
    assert "Traceback" not in text
    assert "Application shutdown complete" in text
