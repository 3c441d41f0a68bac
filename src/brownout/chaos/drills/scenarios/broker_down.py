"""Event broker down: the Redis stream of the events freezes; each event is published once when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.measure import broker_ok
from brownout.chaos.drills.scenarios._shared import redis_config, start_redis
from brownout.chaos.drills.spec import DetectionRow, Fault, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="broker-down",
    title="Event broker down",
    category="Infrastructure",
    severity="High",
    kind="data",
    seed="002 (buffered publishing)",
    event="The event broker -- the Redis stream the server publishes its domain events to -- freezes "
    "(SIGSTOP) for 4 s under load, then answers again with its data.",
    detection=(
        DetectionRow("Event outbox", "publish error or timeout", "redis socket timeout"),
        DetectionRow("/health", "events pending in the outbox", "immediate"),
    ),
    response=(
        "Each brief's brief_created event waits in the durable outbox (an fsync'd SQLite spool) instead "
        "of being dropped (a plain retrying publisher drops events after 5 retries).",
        "When the broker answers, the outbox publishes in order, once per event id; none is lost, "
        "duplicated or dead-lettered.",
    ),
    impact=(("Failed requests", "0"), ("Lost events", "0"), ("Event delay", "the outage's length")),
    verification=(
        "bounded load; the broker frozen for 4 s, then resumed",
        "events pending in the outbox during the outage; none dead-lettered",
        "every acknowledged brief's brief_created event in the stream exactly once",
        "0 failed requests",
    ),
    play="broker_outage",
    fault=Fault("sigstop", hold=4.0),
    requires=("fakellm", "redis", "event-broker"),
)


async def play(d: Drill) -> None:
    """Freeze the broker (the Redis holding the event stream) under load; every brief's event must
    reach the stream exactly once when it is back."""
    d.component = broker_ok
    s = d.scenario
    d.phase("starting Redis, fakes and server")
    redis = await start_redis(d)
    config = redis_config(d, redis.url)
    load, watcher = await d.begin(config)
    stream = d.server.config.events.stream if d.server is not None else "brownout:events"
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: broker frozen (SIGSTOP)")
    fault_at = d.mark("fault")
    await asyncio.to_thread(redis.pause)
    await d.clock.sleep(s.fault.hold)
    d.phase("restore: broker resumed")
    await asyncio.to_thread(redis.resume)
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    await load.stop()
    d.phase("waiting for the outbox to drain")
    await watcher.wait_for(lambda h: h.reachable and h.events_pending == 0, 30.0)
    await d.end_load()
    pending = max((h.events_pending for h in watcher.samples), default=0)
    dead = max((h.events_dead for h in watcher.samples), default=0)
    d.result.extra.update(max_events_pending=pending, dead_letters=dead)
    d.check("events waited in the outbox during the outage", pending > 0, f"max pending {pending}")
    d.check("no event moved to dead letters", dead == 0, f"{dead} dead letters")
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    published = await asyncio.to_thread(_stream_request_ids, redis, stream)
    assert d.load is not None
    acked = [x.request_id for x in d.load.samples if x.acknowledged and x.request_id]
    counts = {rid: published.count(rid) for rid in acked}
    lost = [rid for rid, n in counts.items() if n == 0]
    twice = [rid for rid, n in counts.items() if n > 1]
    d.result.extra.update(
        events_published=len(published), events_lost=len(lost), events_duplicated=len(twice)
    )
    d.check(
        "every stored brief's event published exactly once",
        not lost and not twice and bool(acked),
        f"{len(acked)} briefs, {len(lost)} events missing, {len(twice)} published twice",
    )
    await d.finish_sqlite()


def _stream_request_ids(redis: Any, stream: str) -> list[str]:
    """The ``request_id`` of every ``brief_created`` entry of the Redis stream (in order)."""
    entries = redis.command("XRANGE", stream, "-", "+", timeout=30.0)
    out: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        fields = entry[1] if isinstance(entry, list) and len(entry) == 2 else []
        pairs = dict(zip(fields[::2], fields[1::2], strict=False))
        if pairs.get(b"type") != b"brief_created":
            continue
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(pairs.get(b"data", b"{}"))
            if isinstance(data, dict) and data.get("request_id"):
                out.append(str(data["request_id"]))
    return out
