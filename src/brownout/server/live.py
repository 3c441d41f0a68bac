"""The live view's hub: the server's state and events fanned out to live streams, and alert webhooks.

:class:`LiveHub` subscribes to the server's :class:`~brownout.events.EventBus` and fans messages out
to every connected client, each through its own bounded queue. The bus calls subscribers
synchronously, so the hub never waits: a client whose queue is full is *dropped* (told so, and its
stream ends) -- a slow browser tab must never slow down a breaker. Messages are JSON, serialised once
for all clients:

* ``snapshot`` -- the live state (system mode, each model's health and breakers, queue depth, cache
  hit rate, spool, database), every ``server.live_interval`` seconds and right after a breaker, mode,
  health or recovery event;
* ``history`` and ``sample`` -- to clients that ask for them (the dashboard: ``?charts=1``), the
  charts' points of the last minutes once at connect, then each new point
  (:class:`~brownout.server.history.LiveHistory`);
* ``event`` -- a breaker transition, a mode change (``ModeDownshifted``, ``SystemModeChanged``), a
  model's health change, a recovery action, a model server restart, a spool or Redis status change.
  Per-call events (rejections, retries, deadlines, guard re-asks) are not streamed: under load they
  would be thousands a second, and metrics count them. A burst of one kind from one source is cut to
  ``burst`` per ``burst_window`` seconds, the next message saying how many were suppressed.

The hub is given the function that takes the snapshot (:meth:`~brownout.server.status.ServerStatus.snapshot`),
never the runtime. Its routes -- ``GET /api/v1/events`` (Server-Sent Events), ``GET /api/v1/ws``
(WebSocket), ``GET /api/v1/status`` and ``GET /dashboard`` -- are in :mod:`brownout.server.routes.live`;
the server runner, which ends the streams at shutdown, in :mod:`brownout.server.runner`.

Alerts go to the configured webhooks (``webhooks.endpoints``; generic JSON or Slack-compatible), sent
by :class:`WebhookSender` in the background with a timeout and retries: a circuit breaker opened, a
model became unhealthy, the write spool rose over its threshold, the system mode became emergency.
Each alert fires once when its condition starts and sends ``resolved`` when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import WebhooksSection
from brownout.events import DEFAULT_BUS, BreakerStateChanged, Event, EventBus, SpoolAppended
from brownout.policies.retry import Retry, RetryConfig
from brownout.server.history import LiveHistory
from brownout.server.status import display_time, plain

__all__ = [
    "Alert",
    "LiveClient",
    "LiveHub",
    "LiveMessage",
    "Snapshot",
    "TooManyClients",
    "WebhookSender",
    "event_id",
]

_log = logging.getLogger("brownout.live")

# Per-call events: emitted on every rejection, retry or guard re-ask -- metrics count them; the live
# feed shows state changes only.
_QUIET = frozenset(
    {
        "CallRejected",
        "RetryAttempted",
        "RetryGaveUp",
        "DeadlineExpired",
        "CacheRefreshFailed",
        "FallbackServed",
        "GuardRetried",
        "GuardGaveUp",
    }
)
# Events after which the state shown has changed: a fresh snapshot follows at once.
_STATEFUL = frozenset({"breaker", "mode", "health", "recovery", "spool", "load"})


class TooManyClients(Exception):
    """The hub already serves ``server.live_max_clients`` streams."""


# ---------------------------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True, slots=True)
class LiveMessage:
    """One message of the live stream: ``seq`` orders them, ``data`` is the JSON text sent."""

    seq: int
    type: str
    data: str

    def sse(self) -> str:
        """The message as one Server-Sent Events frame."""
        return f"id: {self.seq}\nevent: {self.type}\ndata: {self.data}\n\n"


def _summary(name: str, event: Event, fields: Mapping[str, Any]) -> str:
    if isinstance(event, BreakerStateChanged):
        return f"breaker {event.source}: {event.old} -> {event.new} ({event.reason})"
    if name == "RecoveryActionRun":
        action, target, status = fields.get("action"), fields.get("target"), fields.get("status")
        return f"recovery {action} ({target}, {fields.get('trigger')}) {status}: {fields.get('detail')}"
    if name == "SystemModeChanged":
        off = fields.get("switched_off") or ()
        text = f"system mode: {fields.get('old')} -> {fields.get('new')} ({fields.get('reason')})"
        return text + (f"; off: {', '.join(off)}" if off else "")
    if name == "LimitChanged":
        old, new, reason = fields.get("old"), fields.get("new"), fields.get("reason")
        return f"concurrency limit {event.source}: {old} -> {new} ({reason})"
    if name == "ModeDownshifted":
        served, requested, reason = fields.get("served"), fields.get("requested"), fields.get("reason")
        return f"{event.source}: served {served} instead of {requested} ({reason})"
    details = ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("source", "at"))
    return f"{name} {event.source}" + (f": {details}" if details else "")


def _category(name: str) -> str:
    if name == "BreakerStateChanged":
        return "breaker"
    if name in ("LimitChanged", "DimmerChanged"):
        return "load"  # overload is not failure: how the limits and the dimmer follow the load
    if "Recovery" in name or name == "ModelServerRestarted":
        return "recovery"
    if "Health" in name or "Status" in name or name == "ResourceAlert":
        return "health"
    if "Mode" in name.replace("Model", ""):
        return "mode"
    if name.startswith("Spool"):
        return "spool"
    return "other"


def _new_state(event: Event) -> str | None:
    """The state an event moved to, whatever its field is called (``new``, ``mode``, ``to``, ``status``)."""
    for attr in ("new", "mode", "to", "status", "current"):
        value = getattr(event, attr, None)
        if value is not None:
            return str(plain(value))
    return None


# ---------------------------------------------------------------------------------------------- webhooks


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """One alert notification: ``status`` is "firing" when the condition starts, "resolved" when it ends."""

    name: str
    status: Literal["firing", "resolved"]
    severity: str
    summary: str
    labels: dict[str, str]
    details: dict[str, Any]
    at: str

    def json_payload(self) -> dict[str, Any]:
        """The generic JSON body."""
        return {
            "source": "brownout",
            "alert": self.name,
            "status": self.status,
            "severity": self.severity,
            "summary": self.summary,
            "labels": self.labels,
            "details": self.details,
            "at": self.at,
        }

    def slack_payload(self) -> dict[str, Any]:
        """A Slack incoming-webhook message (``text`` plus an attachment with the labels)."""
        firing = self.status == "firing"
        icon = ":red_circle:" if firing else ":large_green_circle:"
        word = "FIRING" if firing else "RESOLVED"
        color = ("#d00000" if self.severity == "critical" else "#e8a400") if firing else "#2eb886"
        fields = [{"title": k, "value": v, "short": True} for k, v in self.labels.items()]
        fields.append({"title": "severity", "value": self.severity, "short": True})
        return {
            "text": f"{icon} [{word}] {self.name}: {self.summary}",
            "attachments": [{"color": color, "fields": fields, "footer": f"brownout, {self.at}"}],
        }


def event_id(text: str | None) -> int | None:
    """A decimal integer (an SSE id, a Retry-After), or None; ``isdigit`` alone lets "²" through to int()."""
    if text and text.isascii() and text.isdigit() and len(text) < 20:
        return int(text)
    return None


def _redact(url: str) -> str:
    """scheme://host[:port] only: webhook URLs carry tokens in their path (Slack's do)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class _WebhookFailed(Exception):
    """A receiver answered with a retriable status (5xx, 408, 429)."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.retry_after = retry_after


class WebhookSender:
    """Sends :class:`Alert` s to the configured webhooks in a background task.

    :meth:`submit` never blocks: alerts wait in a bounded queue (the oldest go beyond
    ``queue_size``). Each POST has ``timeout`` seconds; a connection error, a timeout or a 5xx/408/429
    answer is retried up to ``retries`` times with doubling backoff (honouring ``Retry-After``);
    other 4xx answers are not retried. URLs are never logged whole.
    """

    def __init__(
        self,
        section: WebhooksSection,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.section = section
        self._clock = clock
        # Its retries' events go to a private bus: the live feed does not show webhook plumbing.
        self._retry = Retry(
            "webhooks",
            RetryConfig(
                max_attempts=section.retries + 1,
                backoff_base=section.backoff_base,
                jitter="none",
                retry_on=(httpx.TransportError, _WebhookFailed),
                budget_ratio=None,
                max_retry_after=max(60.0, section.backoff_base),
            ),
            clock=clock,
            events=events if events is not None else EventBus(),
        )
        self._queue: deque[Alert] = deque(maxlen=section.queue_size)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # A bare transport, not an httpx.Client: the client logs every request's full URL at INFO,
        # and a webhook URL is a secret (Slack's carry their token in the path).
        self._http: httpx.AsyncHTTPTransport | None = None
        self.sent = 0
        """POSTs a receiver accepted (2xx)."""
        self.failed = 0
        """POSTs given up on (after their retries)."""
        self.dropped = 0
        """Alerts pushed out of a full queue before they were sent."""

    @property
    def enabled(self) -> bool:
        """True when at least one endpoint is configured."""
        return bool(self.section.endpoints)

    @property
    def pending(self) -> int:
        """Alerts waiting to be sent."""
        return len(self._queue)

    def submit(self, alert: Alert) -> None:
        """Queue ``alert`` for every endpoint (a no-op without endpoints)."""
        if not self.enabled:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(alert)
        self._wake.set()

    def start(self) -> None:
        """Start the sending task (idempotent; needs a running loop)."""
        if self.enabled and (self._task is None or self._task.done()):
            self._http = httpx.AsyncHTTPTransport(retries=0)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="brownout-webhooks")

    async def aclose(self) -> None:
        """Stop sending; alerts still queued are dropped (and counted)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue:
            self.dropped += len(self._queue)
            _log.warning("%d webhook alert(s) not sent at shutdown", len(self._queue))
            self._queue.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            alert = self._queue.popleft()
            await asyncio.gather(
                *(self._deliver(ep.url.get_secret_value(), ep.format, alert) for ep in self.section.endpoints)
            )

    async def _post(self, http: httpx.AsyncHTTPTransport, url: str, body: dict[str, Any]) -> httpx.Response:
        timeout = httpx.Timeout(self.section.timeout).as_dict()
        request = httpx.Request("POST", url, json=body, extensions={"timeout": timeout})
        response = await http.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def _deliver(self, url: str, fmt: str, alert: Alert) -> None:
        body = alert.slack_payload() if fmt == "slack" else alert.json_payload()
        http = self._http
        assert http is not None
        try:
            async for attempt in self._retry.attempts():
                with attempt:
                    response = await self._post(http, url, body)
                    if response.status_code >= 500 or response.status_code in (408, 429):
                        hint = response.headers.get("retry-after", "")
                        raise _WebhookFailed(response.status_code, event_id(hint))
                    if response.status_code >= 400:
                        self.failed += 1
                        _log.error(
                            "webhook %s refused alert %s: HTTP %d",
                            _redact(url),
                            alert.name,
                            response.status_code,
                        )
                        return
            self.sent += 1
        except (httpx.TransportError, _WebhookFailed) as e:
            self.failed += 1
            _log.error("webhook %s: alert %s not delivered: %s", _redact(url), alert.name, type(e).__name__)


# ---------------------------------------------------------------------------------------------- hub


class LiveClient:
    """One connected stream: a bounded queue of messages; ``None`` ends it."""

    __slots__ = ("charts", "dropped", "queue")

    def __init__(self, size: int, *, charts: bool = False) -> None:
        self.queue: asyncio.Queue[LiveMessage | None] = asyncio.Queue(maxsize=max(3, size))
        self.dropped = False
        """True when the hub dropped this client for falling behind."""
        self.charts = charts
        """True when the client is sent the charts' points (``history`` and ``sample`` messages)."""

    async def get(self) -> LiveMessage | None:
        """The next message, or None when the stream is over."""
        return await self.queue.get()


Snapshot = Callable[[int], dict[str, Any]]
"""Takes the state to show, given how many live clients are connected (:meth:`ServerStatus.snapshot`)."""


class LiveHub:
    """Fans the server's state and events out to live clients and alerts to webhooks (module docstring).

    ``snapshot`` takes the state shown (see :data:`Snapshot`); ``events`` is the bus the hub listens
    to; ``webhooks`` sends the alerts (default: none). ``mode_events`` says whether a mode manager
    reports the system mode on the bus (``SystemModeChanged``, as the server's does); when False, the
    hub derives mode changes from the snapshots. ``charts``, when given, is started and stopped with
    the hub, and its points go to the clients that asked for them.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        interval: float = 5.0,
        max_clients: int = 100,
        client_queue: int = 256,
        history: int = 200,
        burst: int = 5,
        burst_window: float = 10.0,
        webhooks: WebhookSender | None = None,
        mode_events: bool = True,
        charts: LiveHistory | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.charts = charts
        """The charts' points (None: the hub sends none)."""
        if charts is not None:
            charts.publish = self._sample
        self.clock = clock
        self.events = events
        self.interval = interval
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.burst = burst
        self.burst_window = burst_window
        self.webhooks = webhooks if webhooks is not None else WebhookSender(WebhooksSection(), clock=clock)
        self._mode_events = mode_events
        self._clients: set[LiveClient] = set()
        self._history: deque[LiveMessage] = deque(maxlen=history)
        self._seq = 0
        self._latest: LiveMessage | None = None
        self._unsubscribe: Any = None
        self._ticker = Periodic("brownout-live", self.tick, lambda: self.interval, clock=clock, logger=_log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._snapshot_due = False
        self._bursts: dict[tuple[str, str], list[float]] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._alerting: set[tuple[str, ...]] = set()
        self._roles: dict[str, str] = {}
        self._mode: str | None = None
        self._bus_modes = False
        self.dropped_clients = 0
        """Clients dropped because their queue was full."""
        self.alerts: deque[Alert] = deque(maxlen=100)
        """The latest alerts raised (fired or resolved), newest last."""

    # -------------------------------------------------------------- lifecycle

    @property
    def client_count(self) -> int:
        """Streams connected now."""
        return len(self._clients)

    def start(self) -> None:
        """Subscribe to the bus and start the periodic snapshots and the webhook sender."""
        if self._ticker.running:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        # With a mode manager, its SystemModeChanged events are the mode changes; without one, the hub
        # derives them from the snapshots.
        self._bus_modes = self._mode_events
        self._unsubscribe = self.events.subscribe(self._on_event)
        self.webhooks.start()
        self._ticker.start()
        if self.charts is not None:
            self.charts.start()

    async def aclose(self) -> None:
        """Unsubscribe, end every stream, stop the sender."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self._ticker.stop()
        if self.charts is not None:
            await self.charts.stop()
        self.close_clients()
        await self.webhooks.aclose()

    def close_clients(self) -> None:
        """End every stream now (at shutdown, so open streams do not hold the server up)."""
        for client in list(self._clients):
            self._end(client)

    def close_clients_soon(self) -> None:
        """:meth:`close_clients` from a signal handler or another thread (scheduled on the hub's loop)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.close_clients)

    # -------------------------------------------------------------- clients

    def connect(self, after: int | None = None, *, charts: bool = False) -> LiveClient:
        """A new client, primed with the latest snapshot and the recent events (those after ``after``).

        With ``charts`` (and a :class:`LiveHistory`), the client also gets the charts' points: all
        those kept, in one ``history`` message right after the snapshot, then a ``sample`` per new point.
        """
        if len(self._clients) >= self.max_clients:
            raise TooManyClients(f"{self.max_clients} live clients already connected")
        client = LiveClient(self.client_queue, charts=charts and self.charts is not None)
        backlog = [m for m in self._history if after is None or m.seq > after]
        latest = self._latest if self._latest is not None else self._make_snapshot()
        first = [latest]
        if client.charts and self.charts is not None:
            first.append(self._message("history", {"data": self.charts.export()}, record=False))
        room = client.queue.maxsize - len(first) - 1  # and one for the end of the stream
        for message in [*first, *backlog[max(0, len(backlog) - room) :]]:
            client.queue.put_nowait(message)
        self._clients.add(client)
        return client

    def disconnect(self, client: LiveClient) -> None:
        """Forget ``client`` (its stream has ended)."""
        self._clients.discard(client)

    def _end(self, client: LiveClient, reason: str | None = None) -> None:
        self._clients.discard(client)
        q = client.queue
        while not q.empty():
            q.get_nowait()
        if reason is not None:
            q.put_nowait(self._message("dropped", {"reason": reason}, record=False))
        q.put_nowait(None)

    def publish(self, kind: str, data: Mapping[str, Any], *, record: bool = True) -> LiveMessage:
        """Send a message of type ``kind`` to every client; ``record`` keeps it for late joiners."""
        message = self._message(kind, data, record=record)
        self._send(message, self._clients)
        return message

    def _sample(self, point: dict[str, Any]) -> None:
        # A new point of the charts, for the clients that draw them (nobody else wants one every 2 s).
        charted = [c for c in self._clients if c.charts]
        if charted:
            self._send(self._message("sample", {"data": point}, record=False), charted)

    def _send(self, message: LiveMessage, clients: Iterable[LiveClient]) -> None:
        for client in list(clients):
            try:
                client.queue.put_nowait(message)
            except asyncio.QueueFull:
                # Never wait for a slow reader: drop it. EventSource reconnects by itself and
                # resumes from its Last-Event-ID.
                client.dropped = True
                self.dropped_clients += 1
                self._end(client, "too slow: the stream fell more than the queue's length behind")

    def _message(self, kind: str, data: Mapping[str, Any], *, record: bool) -> LiveMessage:
        self._seq += 1
        message = LiveMessage(
            self._seq, kind, json.dumps({"seq": self._seq, "type": kind, **data}, default=str)
        )
        if record:
            self._history.append(message)
        return message

    @property
    def recent(self) -> list[dict[str, Any]]:
        """The recent events kept for late joiners, oldest first, as data."""
        return [json.loads(m.data) for m in self._history]

    # -------------------------------------------------------------- snapshots

    def _make_snapshot(self) -> LiveMessage:
        message = self._message("snapshot", {"data": self._snapshot(self.client_count)}, record=False)
        self._latest = message
        return message

    def tick(self) -> dict[str, Any]:
        """Take a snapshot now, publish it, and raise what changed (health, mode, recovery actions)."""
        self._snapshot_due = False
        state = self._snapshot(self.client_count)
        self._diff(state)
        message = self.publish("snapshot", {"data": state}, record=False)
        self._latest = message
        return state

    def _snapshot_soon(self) -> None:
        if not self._snapshot_due and self._loop is not None:
            self._snapshot_due = True
            self._loop.call_soon(self.tick)

    def _diff(self, state: Mapping[str, Any]) -> None:
        if state.get("status") == "starting":
            return
        for role, model in state["models"].items():
            new = model["status"]
            old = self._roles.get(role)
            self._roles[role] = new
            if old != new and old is not None:
                self._feed(
                    "ModelHealthChanged", role, {"old": old, "new": new}, f"model {role}: {old} -> {new}"
                )
            if new == "unhealthy":
                probe = model.get("last_check") or {}
                self._fire(
                    ("model", role),
                    "LLMModelUnhealthy",
                    "critical",
                    f"LLM model {role} is unhealthy",
                    {"model": role},
                    {"breakers": model["breakers"], "last_check": probe},
                )
            else:
                self._resolve(
                    ("model", role),
                    "LLMModelUnhealthy",
                    f"LLM model {role} is healthy again",
                    {"model": role},
                )
        if not self._bus_modes:
            self._mode_now(state["system_mode"], "snapshot", self._mode is not None)
        if not state["spool"]["alert"]:
            self._resolve(("spool",), "SpoolBacklog", "the write spool is back under its threshold", {})

    def _mode_now(self, mode: str, source: str, announce: bool) -> None:
        old, self._mode = self._mode, mode
        if announce and old != mode:
            self._feed(
                "SystemModeChanged", source, {"old": old, "new": mode}, f"system mode: {old} -> {mode}"
            )
        if mode == "emergency":
            self._fire(
                ("mode",),
                "SystemEmergencyMode",
                "critical",
                "the system mode is emergency: no model can serve",
                {"mode": mode},
                {"previous": old},
            )
        else:
            self._resolve(("mode",), "SystemEmergencyMode", f"the system mode is {mode}", {"mode": mode})

    # -------------------------------------------------------------- events and alerts

    def _on_event(self, event: Event) -> None:
        if type(event).__name__ in _QUIET:
            return
        if threading.get_ident() != self._thread:
            # Emitted from a worker thread: the hub's state belongs to its loop.
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._handle, event)
            return
        self._handle(event)

    def _handle(self, event: Event) -> None:
        name = type(event).__name__
        fields = {f.name: plain(getattr(event, f.name)) for f in dataclasses.fields(event)}
        category = _category(name)
        if self._allowed(name, event.source):
            key = (name, event.source)
            extra = {"suppressed": self._suppressed.pop(key)} if key in self._suppressed else {}
            self.publish(
                "event",
                {
                    "name": name,
                    "category": category,
                    "source": event.source,
                    "summary": _summary(name, event, fields),
                    "fields": {k: v for k, v in fields.items() if k not in ("source", "at")},
                    "at": display_time(),
                    **extra,
                },
            )
        self._alerts_for(name, event)
        if category in _STATEFUL:
            self._snapshot_soon()

    def _feed(self, name: str, source: str, fields: Mapping[str, Any], summary: str) -> None:
        self.publish(
            "event",
            {
                "name": name,
                "category": _category(name),
                "source": source,
                "summary": summary,
                "fields": dict(fields),
                "at": display_time(),
            },
        )

    def _allowed(self, name: str, source: str) -> bool:
        key = (name, source)
        now = self.clock.now()
        times = [t for t in self._bursts.get(key, ()) if now - t < self.burst_window]
        if len(times) >= self.burst:
            self._bursts[key] = times
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        times.append(now)
        self._bursts[key] = times
        if len(self._bursts) > 1000:  # sources come and go (endpoints); keep the map bounded
            self._bursts = {k: v for k, v in self._bursts.items() if v and now - v[-1] < self.burst_window}
        return True

    def _alerts_for(self, name: str, event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            labels = {"model": event.source.split("@", 1)[0], "breaker": event.source}
            if event.new == "open":
                self._fire(
                    ("breaker", event.source),
                    "CircuitBreakerOpen",
                    "critical",
                    f"circuit breaker {event.source} is OPEN ({event.reason})",
                    labels,
                    {"old": event.old, "reason": event.reason},
                )
            elif event.new == "closed":
                self._resolve(
                    ("breaker", event.source),
                    "CircuitBreakerOpen",
                    f"circuit breaker {event.source} closed",
                    labels,
                )
        elif isinstance(event, SpoolAppended) and event.alert:
            self._fire(
                ("spool",),
                "SpoolBacklog",
                "warning",
                f"{event.pending} writes wait in the spool (database down?)",
                {"spool": event.source},
                {"pending": event.pending},
            )
        elif name == "SystemModeChanged":
            # A mode manager reports modes itself: stop deriving them from health.
            self._bus_modes = True
            mode = _new_state(event)
            if mode is not None:
                self._mode_now(mode, event.source, False)
        elif name == "ModelHealthChanged":
            state = _new_state(event)
            if state == "unhealthy":
                self._fire(
                    ("model", event.source),
                    "LLMModelUnhealthy",
                    "critical",
                    f"LLM model {event.source} is unhealthy",
                    {"model": event.source},
                    {},
                )

    def _fire(
        self,
        key: tuple[str, ...],
        name: str,
        severity: str,
        summary: str,
        labels: dict[str, str],
        details: dict[str, Any],
    ) -> None:
        if key in self._alerting:
            return
        self._alerting.add(key)
        self._raise(Alert(name, "firing", severity, summary, labels, details, display_time()))

    def _resolve(self, key: tuple[str, ...], name: str, summary: str, labels: dict[str, str]) -> None:
        if key not in self._alerting:
            return
        self._alerting.discard(key)
        self._raise(Alert(name, "resolved", "info", summary, labels, {}, display_time()))

    def _raise(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self.webhooks.submit(alert)
        self.publish("alert", alert.json_payload())
