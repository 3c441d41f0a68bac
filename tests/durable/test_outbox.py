"""Domain events through the durable outbox to Redis Streams: batches, outages, dead letters, once only."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from brownout.chaos.servers import RedisServer
from brownout.durable.outbox import EventOutbox, RedisStreamPublisher
from brownout.events import BreakerStateChanged, EventBus, SystemModeChanged
from brownout.testing import FakeClock
from support.wait import until

STREAM = "test:events"


@pytest.fixture
async def client(fresh_redis: RedisServer) -> AsyncIterator[Redis]:
    c: Redis = Redis.from_url(fresh_redis.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    yield c
    await c.aclose()


async def stream(client: Redis) -> list[tuple[str, str, dict[str, object]]]:
    """(id, type, data) of every stream entry, in order."""
    entries = await client.xrange(STREAM)
    return [(f[b"id"].decode(), f[b"type"].decode(), json.loads(f[b"data"])) for _, f in entries]


async def test_events_reach_the_stream_in_order_and_once(
    client: Redis, tmp_path: Path, clock: FakeClock
) -> None:
    publisher = RedisStreamPublisher(client, stream=STREAM)
    outbox = EventOutbox(tmp_path / "outbox.db", publisher, clock=clock, events=EventBus())
    await outbox.start()
    try:
        ids = [await outbox.add("brief_created", {"request_id": f"r{i}"}) for i in range(5)]
        await until(lambda: outbox.stats().pending == 0 and publisher.published == 5, "publication")
        got = await stream(client)
        assert [g[0] for g in got] == ids
        assert got[0][1:] == ("brief_created", {"request_id": "r0"})
        # The same events again (a replay after a crash between publish and delete): nothing added.
        await publisher.publish([(ids[0], "brief_created", {"at": "x", "data": {}})])
        assert len(await stream(client)) == 5
    finally:
        await outbox.aclose()


async def test_broker_outage_spools_durably_and_replays_in_batches_of_100(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path, clock: FakeClock
) -> None:
    server = make_redis_server()
    client: Redis = Redis.from_url(server.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    publisher = RedisStreamPublisher(client, stream=STREAM)
    path = tmp_path / "outbox.db"
    outbox = EventOutbox(path, publisher, clock=clock, events=EventBus())
    try:
        await outbox.start()
        server.stop()
        ids = [await outbox.add("brief_created", {"n": i}) for i in range(250)]
        await until(lambda: outbox.replayer.consecutive_failures >= 1, "a failed attempt")
        assert outbox.stats().pending == 250
        assert outbox.stats().dead == 0  # an outage never dead-letters
        # The process stops while the broker is down: the events wait on disk.
        await outbox.aclose()
        server.start()
        outbox = EventOutbox(path, publisher, clock=clock, events=EventBus())
        batches_before = publisher.batches
        await outbox.start()  # entries left by the earlier process go out at once
        await until(lambda: outbox.stats().pending == 0, "the replay")
        assert publisher.batches - batches_before == 3  # 100 + 100 + 50
        assert [g[0] for g in await stream(client)] == ids
    finally:
        await outbox.aclose()
        await client.aclose()


async def test_refused_events_go_to_dead_letters_after_5_attempts(
    client: Redis, tmp_path: Path, clock: FakeClock
) -> None:
    publisher = RedisStreamPublisher(client, stream=STREAM)
    outbox = EventOutbox(tmp_path / "outbox.db", publisher, clock=clock, events=EventBus())
    await client.set(STREAM, "not a stream")  # XADD now fails with WRONGTYPE: a refusal, not an outage
    await outbox.start()
    try:
        event_id = await outbox.add("brief_created", {"n": 1})
        r = outbox.replayer
        # Each refusal makes the replayer wait its backoff: move the clock until the fifth try is done.
        for _ in range(2000):
            if outbox.stats().dead:
                break
            assert r.consecutive_failures < 5
            clock.advance(1.0)
            await asyncio.sleep(0.005)
        assert r.attempts == 5
        await until(lambda: outbox.stats().dead == 1, "the dead letter")
        dead = await outbox.dead_letters()
        assert [d.key for d in dead] == [event_id]
        assert dead[0].attempts == 5
        assert "WRONGTYPE" in (dead[0].last_error or "")
        # The cause is fixed; the operator sends it again.
        await client.delete(STREAM)
        assert await outbox.requeue_dead() == 1
        await until(lambda: outbox.stats().pending == 0 and publisher.published == 1, "the re-send")
        assert [g[0] for g in await stream(client)] == [event_id]
    finally:
        await outbox.aclose()


async def test_breaker_and_mode_changes_are_taken_from_the_bus(
    client: Redis, tmp_path: Path, clock: FakeClock
) -> None:
    bus = EventBus()
    publisher = RedisStreamPublisher(client, stream=STREAM)
    outbox = EventOutbox(tmp_path / "outbox.db", publisher, clock=clock, events=bus)
    await outbox.start()
    try:
        bus.emit(BreakerStateChanged("qwen", 1.0, "closed", "open", "failure rate 5/5"))
        bus.emit(SystemModeChanged("modes", 2.0, "normal", "degraded", "qwen unhealthy", ("creative",)))
        await until(lambda: publisher.published == 2, "both events")
        got = await stream(client)
        assert [g[1] for g in got] == ["breaker_changed", "mode_changed"]
        assert got[0][2] == {"breaker": "qwen", "old": "closed", "new": "open", "reason": "failure rate 5/5"}
        assert got[1][2]["new"] == "degraded"
    finally:
        await outbox.aclose()
    bus.emit(BreakerStateChanged("qwen", 3.0, "open", "half_open", "wait"))  # unsubscribed: ignored
    await asyncio.sleep(0)
    assert publisher.published == 2


def crash_damaged_copy(path: Path, into: Path) -> Path:
    """The outbox's files as a kill -9 leaves them (main file, log, ledger), with the log cut to 0."""
    into.mkdir()
    for suffix in ("", "-wal", ".ledger", ".ledger-wal"):
        if Path(f"{path}{suffix}").exists():
            shutil.copyfile(f"{path}{suffix}", into / f"{path.name}{suffix}")
    copy = into / path.name
    os.truncate(f"{copy}-wal", 0)
    return copy


async def test_events_lost_from_a_damaged_outbox_are_reported_and_the_rest_still_go_out(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path, clock: FakeClock
) -> None:
    server = make_redis_server()
    client: Redis = Redis.from_url(server.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    publisher = RedisStreamPublisher(client, stream=STREAM)
    path = tmp_path / "outbox.db"
    outbox = EventOutbox(path, publisher, clock=clock, events=EventBus())
    try:
        await outbox.start()
        server.stop()  # the broker is down: events wait in the outbox file
        ids = [await outbox.add("brief_created", {"n": i}) for i in range(12)]
        damaged = await asyncio.to_thread(crash_damaged_copy, path, tmp_path / "crashed")
        await outbox.aclose()
        server.start()
        outbox = EventOutbox(damaged, publisher, clock=clock, events=EventBus())
        await outbox.start()
        assert [e.key for e in outbox.spool.lost] == ids
        assert outbox.stats().lost == 12
        later = await outbox.add("brief_created", {"n": 99})
        await until(lambda: outbox.stats().pending == 0, "the new event to go out")
        assert [g[0] for g in await stream(client)] == [later]
        assert await outbox.clear_lost(ids[:2]) == 2
        assert outbox.stats().lost == 10
    finally:
        await outbox.aclose()
        await client.aclose()
