"""What a drill measures: the server's state over time, detection and recovery times, lost writes.

:class:`HealthWatcher` polls ``GET /health`` every ``interval`` seconds and keeps a
:class:`HealthSample` per poll: each role's availability and breaker state, the local model servers'
states, the database and spool, the queue. From those samples and the load's
:class:`~brownout.chaos.drills.load.Sample` s:

* :func:`detection_time` -- fault to the first sign the server noticed: a hit role unavailable or its
  breaker not closed in ``/health``, or a degraded answer (downshifted, fallback, rejected);
* :func:`recovery_time` -- restore to full mode again: every role the requested mode needs available
  with its breakers closed (and, for data drills, the database healthy and the spool empty), and a
  request sent after the restore served in full;
* :class:`EventRecorder` -- the server's live stream (``GET /api/v1/events``, Server-Sent Events):
  breaker transitions, mode changes, recovery actions, resource alerts, loop blocks, each with the time
  the drill received it;
* :func:`lost_writes` -- acknowledged briefs (HTTP 200 with a request_id, not from the cache) that are
  neither rows of the ``briefs`` table nor still waiting in the spool.

:class:`ScenarioResult` gathers a scenario's figures, checks and timeline for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from brownout.chaos.drills.load import Sample
from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "MODE_ROLES",
    "ROLES",
    "Check",
    "EventRecorder",
    "HealthSample",
    "HealthWatcher",
    "ScenarioResult",
    "ServerEvent",
    "WriteAudit",
    "best_mode",
    "broker_ok",
    "database_ok",
    "redis_ok",
    "detection_time",
    "lost_writes",
    "recovery_time",
    "spooled_keys",
    "sqlite_request_ids",
]

ROLES = ("qwen", "mistral", "llama")
MODE_ROLES: dict[str, tuple[str, ...]] = {
    "fast": ("qwen",),
    "balanced": ("qwen", "mistral"),
    "creative": ("qwen", "mistral", "llama"),
}
"""The model roles each pipeline mode needs."""


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One poll of ``/health`` (``reachable`` False when the poll itself failed)."""

    t: float
    reachable: bool
    status: str = ""
    available: dict[str, bool] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe_errors: dict[str, str] = field(default_factory=dict)
    system_mode: str = ""
    redis_status: str = ""
    events_pending: int = 0
    events_dead: int = 0
    database_ok: bool = True
    spool_pending: int = 0
    queue_size: int = 0
    in_flight: int = 0

    @classmethod
    def parse(cls, t: float, body: dict[str, Any]) -> HealthSample:
        """Read the parts a drill needs from a ``/health`` body."""
        models = body.get("models") or {}
        available: dict[str, bool] = {}
        breakers: dict[str, str] = {}
        servers: dict[str, dict[str, Any]] = {}
        probe_errors: dict[str, str] = {}
        for role, info in models.items():
            check = info.get("last_check") or {}
            if check.get("error"):
                probe_errors[role] = str(check["error"])
            available[role] = info.get("status") == "healthy"
            states = list((info.get("breakers") or {}).values())
            # Several endpoints: the role's worst breaker is what the chart shows.
            order = ("open", "forced_open", "half_open", "closed", "forced_closed", "disabled")
            breakers[role] = (
                min(states, key=lambda s: order.index(s) if s in order else 0) if states else "closed"
            )
            if info.get("server"):
                servers[role] = dict(info["server"])
        spool = body.get("spool") or {}
        database = body.get("database") or {}
        redis = body.get("redis") or {}
        events = body.get("events") or {}
        return cls(
            t=t,
            reachable=True,
            status=str(body.get("status", "")),
            available=available,
            breakers=breakers,
            servers=servers,
            probe_errors=probe_errors,
            system_mode=str(body.get("system_mode", "")),
            redis_status=str(redis.get("status", "")),
            events_pending=int(events.get("pending", 0) or 0),
            events_dead=int(events.get("dead_letters", 0) or 0),
            database_ok=database.get("status", "healthy") == "healthy",
            spool_pending=int(spool.get("pending", 0) or 0),
            queue_size=int(body.get("queue_size", 0) or 0),
            in_flight=int(body.get("in_flight", 0) or 0),
        )

    def mode_available(self, mode: str) -> bool:
        """True when every role ``mode`` needs is available."""
        return all(self.available.get(r, False) for r in MODE_ROLES[mode])


def best_mode(sample: HealthSample) -> str:
    """The richest mode the server could serve at ``sample``: creative > balanced > fast > fallback
    (generator down, others up) > emergency (every model down)."""
    if not sample.reachable:
        return "unreachable"
    for mode in ("creative", "balanced", "fast"):
        if sample.mode_available(mode):
            return mode
    return "fallback" if any(sample.available.values()) else "emergency"


class HealthWatcher:
    """Polls ``base_url/health`` every ``interval`` seconds in the background (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        interval: float = 0.1,
        timeout: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        on_sample: Callable[[HealthSample], object] | None = None,
    ) -> None:
        self.base_url = base_url
        self.interval = interval
        self.clock = clock
        self.samples: list[HealthSample] = []
        self._on_sample = on_sample
        self._task: asyncio.Task[None] | None = None
        # Its own client: the load's connection limit must never delay a health poll.
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False)

    async def poll(self) -> HealthSample:
        """Poll once now; the sample is recorded and returned."""
        t = self.clock.now()
        try:
            response = await self._http.get("/health")
            body = response.json()
            sample = (
                HealthSample.parse(t, body)
                if isinstance(body, dict) and "models" in body
                else HealthSample(t, reachable=False, status=f"HTTP {response.status_code}")
            )
        except (httpx.HTTPError, ValueError) as e:
            sample = HealthSample(t, reachable=False, status=type(e).__name__)
        self.samples.append(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        return sample

    async def wait_for(
        self, condition: Callable[[HealthSample], bool], timeout: float
    ) -> HealthSample | None:
        """Poll until ``condition`` holds (the sample), or None after ``timeout`` seconds."""
        end = self.clock.now() + timeout
        while True:
            latest = self.samples[-1] if self.samples and self._task is not None else await self.poll()
            if condition(latest):
                return latest
            if self.clock.now() >= end:
                return None
            await self.clock.sleep(self.interval)

    def start(self) -> None:
        """Start polling in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="drill-health")

    async def _run(self) -> None:
        while True:
            started = self.clock.now()
            await self.poll()
            await self.clock.sleep(self.interval - (self.clock.now() - started))

    async def aclose(self) -> None:
        """Stop polling and close the client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One ``event`` (or ``alert``) message of the server's live stream, with the drill's receipt time."""

    t: float
    kind: str
    name: str
    category: str
    source: str
    summary: str
    fields: dict[str, Any] = field(default_factory=dict)


class EventRecorder:
    """Keeps the messages of ``GET base_url/api/v1/events`` (SSE) but snapshots; see the module docstring.

    A server without the live stream (404) leaves :attr:`available` False and records nothing. The
    stream ends when the server stops; that is not an error.
    """

    PATH = "/api/v1/events"

    def __init__(self, base_url: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.base_url = base_url
        self.clock = clock
        self.events: list[ServerEvent] = []
        self.available: bool | None = None
        self.reconnects = 0
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(5.0, read=None), trust_env=False
        )

    def start(self) -> None:
        """Subscribe in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="drill-events")

    async def _run(self) -> None:
        # Like a browser's EventSource: when the server drops the stream (a reader too slow for its
        # queue), reconnect and resume after the last message seen.
        last_id: str | None = None
        while True:
            headers = {"accept": "text/event-stream"}
            if last_id is not None:
                headers["last-event-id"] = last_id
            try:
                async with self._http.stream("GET", self.PATH, headers=headers) as r:
                    self.available = r.status_code == 200
                    self.connected.set()
                    if not self.available:
                        return
                    kind, data = "", ""
                    async for line in r.aiter_lines():
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                        elif line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data += line[5:].strip()
                        elif not line and data:
                            self._record(kind, data)
                            kind, data = "", ""
            except (httpx.HTTPError, ValueError):
                pass  # the server stopped, or the stream was cut: reconnect while it answers
            self.connected.set()
            self.reconnects += 1
            await self.clock.sleep(0.2)

    def _record(self, kind: str, data: str) -> None:
        if kind not in ("event", "alert"):
            return
        try:
            body = json.loads(data)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        fields = body.get("fields")
        self.events.append(
            ServerEvent(
                t=self.clock.now(),
                kind=kind,
                name=str(body.get("name", body.get("alert", kind))),
                category=str(body.get("category", "")),
                source=str(body.get("source", "")),
                summary=str(body.get("summary", body.get("message", ""))),
                fields=dict(fields) if isinstance(fields, dict) else {},
            )
        )

    def first(self, since: float, name: str | None = None, **match: Any) -> ServerEvent | None:
        """The first event received at or after ``since`` named ``name`` whose fields match ``match``."""
        for e in self.events:
            if e.t < since or (name is not None and e.name != name):
                continue
            if all(e.fields.get(k) == v for k, v in match.items()):
                return e
        return None

    async def aclose(self) -> None:
        """Unsubscribe."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()


# ---------------------------------------------------------------------------------------------- figures


Component = Callable[[HealthSample], bool]
"""Whether a non-model part of the stack (database, Redis, broker) is back to normal in a sample."""


def database_ok(h: HealthSample) -> bool:
    """The database takes writes and nothing waits in the spool."""
    return h.database_ok and h.spool_pending == 0


def redis_ok(h: HealthSample) -> bool:
    """Redis is healthy (by the server's Redis health detector)."""
    return h.redis_status == "healthy"


def broker_ok(h: HealthSample) -> bool:
    """The broker (Redis) is healthy and no event waits in the outbox."""
    return h.redis_status == "healthy" and h.events_pending == 0


def detection_time(
    fault_at: float,
    health: Sequence[HealthSample],
    samples: Sequence[Sample],
    roles: Iterable[str],
    *,
    component: Component | None = None,
) -> float | None:
    """Seconds from ``fault_at`` to the first sign of the fault (module docstring); None if never seen.

    ``component`` (for data drills) is the part of the stack the fault hit: a sample where it is not
    fine counts as noticed too."""
    hit = tuple(roles)
    first: float | None = None
    for h in health:
        if h.t < fault_at or not h.reachable:
            continue
        noticed = any(not h.available.get(r, True) or h.breakers.get(r, "closed") != "closed" for r in hit)
        if component is not None:
            noticed = noticed or not component(h)
        if noticed:
            first = h.t
            break
    for s in samples:
        if s.done >= fault_at and s.outcome in ("downshifted", "fallback", "rejected"):
            if first is None or s.done < first:
                first = s.done
            break
    return None if first is None else max(0.0, first - fault_at)


def recovery_time(
    restore_at: float,
    health: Sequence[HealthSample],
    samples: Sequence[Sample],
    mode: str,
    *,
    component: Component | None = None,
) -> float | None:
    """Seconds from ``restore_at`` to full mode again (module docstring); None if it never came back."""
    healthy_at: float | None = None
    for h in health:
        if h.t < restore_at or not h.reachable:
            continue
        roles = MODE_ROLES[mode]
        ok = h.mode_available(mode) and all(h.breakers.get(r) == "closed" for r in roles)
        if component is not None:
            ok = ok and component(h)
        if ok:
            healthy_at = h.t
            break
    served_at: float | None = None
    for s in sorted(samples, key=lambda s: s.done):
        if s.sent >= restore_at and s.outcome == "full":
            served_at = s.done
            break
    if healthy_at is None or served_at is None:
        return None
    return max(healthy_at, served_at) - restore_at


@dataclass(frozen=True, slots=True)
class WriteAudit:
    """Acknowledged writes against what the database (and the spool) holds."""

    acknowledged: int
    found: int
    spooled: int
    lost: tuple[str, ...]

    @property
    def lost_count(self) -> int:
        """How many acknowledged writes are nowhere."""
        return len(self.lost)


def lost_writes(samples: Iterable[Sample], rows: set[str], spooled: set[str]) -> WriteAudit:
    """Compare the acknowledged request ids of ``samples`` with database ``rows`` and ``spooled`` keys."""
    acked = {s.request_id for s in samples if s.acknowledged and s.request_id is not None}
    lost = tuple(sorted(acked - rows - spooled))
    return WriteAudit(len(acked), len(acked & rows), len((acked - rows) & spooled), lost)


def sqlite_request_ids(path: Path) -> set[str]:
    """Every ``request_id`` in the ``briefs`` table of a SQLite file (empty if there is none)."""
    if not path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            return {str(row[0]) for row in db.execute("SELECT request_id FROM briefs")}
        except sqlite3.OperationalError:
            return set()


def spooled_keys(path: Path) -> set[str]:
    """Keys still waiting in a spool file (durable, not yet in the database)."""
    if not path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            return {str(row[0]) for row in db.execute("SELECT key FROM spool")}
        except sqlite3.OperationalError:
            return set()


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Check:
    """One line of a verdict: what was checked, whether it held, and the figure behind it."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    """Everything one drill produced: figures, checks, verdict and the timeline for the chart.

    ``status`` is ``passed``, ``failed`` (a check did not hold), ``error`` (the drill could not run to
    the end; ``error`` says why) or ``waiting`` (a piece of the stack it needs is missing; ``waits_on``).
    Times in the timeline are clock seconds; ``t0`` is the start of the load.
    """

    name: str
    title: str
    kind: str
    status: str = "waiting"
    error: str | None = None
    waits_on: list[str] = field(default_factory=list)
    mode: str = "creative"
    rate: float = 0.0
    duration_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    detection_s: float | None = None
    detection_budget_s: float | None = None
    recovery_s: float | None = None
    recovery_budget_s: float | None = None
    writes: WriteAudit | None = None
    computations: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    t0: float = 0.0
    marks: list[tuple[float, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    health: list[HealthSample] = field(default_factory=list)
    events: list[ServerEvent] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """True/False for a drill that ran to a verdict; None when it could not run."""
        if self.status in ("passed", "failed"):
            return self.status == "passed"
        return None

    @property
    def sent(self) -> int:
        """Requests sent."""
        return sum(self.counts.values())

    def verdict(self) -> None:
        """Set ``status`` from the checks."""
        self.status = "passed" if self.checks and all(c.passed for c in self.checks) else "failed"

    def figures(self) -> dict[str, Any]:
        """The JSON figures of the report (no timeline)."""
        w = self.writes
        return {
            "name": self.name,
            "title": self.title,
            "kind": self.kind,
            "status": self.status,
            "passed": self.passed,
            "error": self.error,
            "waits_on": list(self.waits_on),
            "mode": self.mode,
            "rate": self.rate,
            "duration_s": _round(self.duration_s),
            "sent": self.sent,
            "full": self.counts.get("full", 0),
            "downshifted": self.counts.get("downshifted", 0),
            "fallback": self.counts.get("fallback", 0),
            "rejected": self.counts.get("rejected", 0),
            "failed": self.counts.get("failed", 0),
            "detection_s": _round(self.detection_s),
            "detection_budget_s": _round(self.detection_budget_s),
            "recovery_s": _round(self.recovery_s),
            "recovery_budget_s": _round(self.recovery_budget_s),
            "acknowledged_writes": w.acknowledged if w else None,
            "rows_found": w.found if w else None,
            "spooled": w.spooled if w else None,
            "lost_writes": w.lost_count if w else None,
            "computations": self.computations,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
            **({"extra": self.extra} if self.extra else {}),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
