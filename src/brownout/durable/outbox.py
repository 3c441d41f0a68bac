"""Domain events to a broker (Redis Streams), through a durable outbox: never dropped silently.

Buffering events in memory while the broker is down, and dropping them after 5 failed retries, loses
them silently. Here every event first goes to an :class:`EventOutbox` -- a
:class:`~brownout.durable.spool.Spool` file, committed with fsync -- and a replayer publishes what the
outbox holds in batches of 100 (one broker round trip each). While the broker is down events wait on
disk, across restarts; when it returns they go out in order. An event the broker *refuses* (not an
outage: a wrong-type key, an out-of-memory refusal) is retried ``max_attempts`` times (default 5) and
then moved to the outbox file's dead-letter table, where :meth:`EventOutbox.dead_letters` shows it and
:meth:`EventOutbox.requeue_dead` sends it back.

The publisher is a small interface, :class:`EventPublisher`: one async method that takes a batch. The
shipped one is :class:`RedisStreamPublisher`; a Kafka one (aiokafka) fits the same interface.

Delivery is exactly once per event id within ``dedupe_ttl`` (a day by default): the Redis publisher adds
each event with a Lua script that skips ids it has already added, so replaying a batch after a crash
between publishing and deleting it from the outbox adds nothing twice. Each stream entry has the fields
``id``, ``type``, ``at`` (wall-clock ISO time) and ``data`` (JSON).

Which events: ``brief_created`` (from the runtime, for each stored brief), ``breaker_changed``
(:class:`~brownout.events.BreakerStateChanged`) and ``mode_changed``
(:class:`~brownout.events.SystemModeChanged`), the last two taken from the event bus. A request served
below its mode is not an event of its own (under an outage that would be one per request): its
``brief_created`` event carries the requested and served modes.

The outbox file is a :class:`~brownout.durable.spool.Spool`, with its ledger: events acknowledged by
:meth:`EventOutbox.add` that a crash-damaged file lost are reported on open (``spool.lost``), and one
process owns the file (a second one gets :class:`~brownout.durable.spool.SpoolInUse`).

The bus calls subscribers synchronously, so the outbox appends from a task: an
event emitted in the instant before a crash can be lost; nothing the service acknowledged depends on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from brownout.background import TaskSet
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.durable.spool import DeadLetter, Spool, SpoolReplayer, SpoolStats
from brownout.events import DEFAULT_BUS, BreakerStateChanged, EventBus, SystemModeChanged

__all__ = ["EventOutbox", "EventPublisher", "OutboxEvent", "RedisStreamPublisher"]

_log = logging.getLogger("brownout.outbox")

OutboxEvent = tuple[str, str, dict[str, Any]]
"""One event as the publisher gets it: (id, type, payload with ``at`` and ``data``)."""


class EventPublisher(Protocol):
    """Where the outbox sends events. ``publish`` takes a batch in order, all or nothing, and must be
    idempotent by event id (a batch may be sent again after a crash)."""

    async def publish(self, events: list[OutboxEvent], /) -> None:
        """Publish ``events``; raise on failure (an outage error keeps them for a later retry)."""


_XADD_ONCE = """
-- KEYS[1] stream; ARGV: maxlen, dedupe ttl (s), then id, type, at, data for each event
-- A script is not rolled back when a command fails, so the id is marked seen only after its XADD
-- succeeded: a refused XADD leaves nothing behind and the retry adds the event.
local added = 0
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local seen = KEYS[1] .. ':seen:' .. id
  if redis.call('EXISTS', seen) == 0 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
               'id', id, 'type', ARGV[i + 1], 'at', ARGV[i + 2], 'data', ARGV[i + 3])
    redis.call('SET', seen, '1', 'EX', ARGV[2])
    added = added + 1
  end
end
return added
"""


class RedisStreamPublisher:
    """Publishes to one Redis stream (``XADD``, trimmed to about ``maxlen`` entries), once per event id."""

    def __init__(
        self,
        client: Redis,
        *,
        stream: str = "brownout:events",
        maxlen: int = 100_000,
        dedupe_ttl: int = 86_400,
    ) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.dedupe_ttl = dedupe_ttl
        self._script = client.register_script(_XADD_ONCE)
        self.published = 0
        """Events added to the stream (duplicates of an already published id not counted)."""
        self.batches = 0

    async def publish(self, events: list[OutboxEvent], /) -> None:
        """Add ``events`` to the stream in one atomic script call."""
        args: list[Any] = [self.maxlen, self.dedupe_ttl]
        for event_id, kind, payload in events:
            args += [event_id, kind, payload["at"], json.dumps(payload["data"], separators=(",", ":"))]
        added = await self._script(keys=[self.stream], args=args)
        self.published += int(added)
        self.batches += 1


class EventOutbox:
    """A durable outbox of domain events in front of an :class:`EventPublisher`; see the module docstring.

    ``path`` is the outbox's SQLite file. Call :meth:`start` (subscribes to ``events`` and starts the
    replayer), :meth:`add` for events that do not come from the bus, and :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        path: Path | str,
        publisher: EventPublisher,
        *,
        events: EventBus = DEFAULT_BUS,
        clock: Clock = SYSTEM_CLOCK,
        batch: int = 100,
        max_attempts: int = 5,
        retry_interval: float = 1.0,
        max_retry_interval: float = 10.0,
        max_pending: int = 100_000,
        alert_pending: int = 1000,
    ) -> None:
        self.publisher = publisher
        self.spool = Spool(
            path,
            name="events-outbox",
            clock=clock,
            events=events,
            max_pending=max_pending,
            alert_pending=alert_pending,
            max_attempts=max_attempts,
        )
        self.replayer = SpoolReplayer(
            self.spool,
            batch_sink=self._publish,
            batch=batch,
            interval=retry_interval,
            max_interval=max_retry_interval,
        )
        self._bus = events
        self._unsubscribe: list[Callable[[], None]] = []
        self._tasks = TaskSet("events-outbox", logger=_log)  # appends on their way to the file
        self.dropped = 0
        """Events that could not even be written to the outbox file (logged one by one)."""

    async def _publish(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        await self.publisher.publish(entries)

    async def start(self) -> None:
        """Open the outbox (events left by an earlier process go out first) and subscribe to the bus."""
        await self.spool.open()
        self.replayer.start()
        self._unsubscribe = [
            self._bus.subscribe(self._on_breaker, BreakerStateChanged),
            self._bus.subscribe(self._on_mode, SystemModeChanged),
        ]

    def _on_breaker(self, e: BreakerStateChanged) -> None:
        self.emit("breaker_changed", {"breaker": e.source, "old": e.old, "new": e.new, "reason": e.reason})

    def _on_mode(self, e: SystemModeChanged) -> None:
        self.emit("mode_changed", {k: v for k, v in dataclasses.asdict(e).items() if k != "at"})

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Put an event in the outbox without waiting for the disk (from a task; see :meth:`add`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._tasks.spawn(self.add(kind, data))

    async def add(self, kind: str, data: dict[str, Any], *, event_id: str | None = None) -> str:
        """Put one event in the outbox durably (fsync'd) and have it published; returns its id.

        Never raises: an event that cannot be written (the outbox is full, the disk failed) is logged
        and counted in :attr:`dropped` -- events must not break the request that caused them.
        """
        event_id = event_id or uuid.uuid4().hex
        payload = {"at": datetime.now(UTC).isoformat(), "data": data}
        try:
            await self.spool.append(event_id, kind, payload)
        except Exception as e:
            self.dropped += 1
            _log.error("event %s (%s) could not be written to the outbox: %s", event_id, kind, e)
            return event_id
        self.replayer.wake()
        return event_id

    def stats(self) -> SpoolStats:
        """The outbox's counters (pending, replayed, dead letters...)."""
        return self.spool.stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Events the broker refused ``max_attempts`` times."""
        return await self.spool.dead_letters(limit)

    async def clear_lost(self, ids: list[str] | None = None) -> int:
        """Forget events reported lost from a damaged outbox file (``ids``, or all); returns how many.

        They are listed by ``spool.lost`` (and ``/health``'s ``events.lost``) until then.
        """
        return await self.spool.clear_lost(ids)

    async def requeue_dead(self, ids: list[str] | None = None) -> int:
        """Send dead-lettered events (``ids``, or all) again; returns how many."""
        moved = await self.spool.requeue_dead(ids)
        self.replayer.wake()
        return moved

    async def aclose(self) -> None:
        """Unsubscribe, finish the appends in progress, stop the replayer and close the file."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        await self._tasks.wait()
        await self.replayer.aclose()
        await self.spool.aclose()
