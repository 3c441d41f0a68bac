"""The durable write spool: durability, idempotency, order, back-pressure, replay and its replayer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import sys
import tempfile
import textwrap
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brownout.durable.spool import ReplayResult, Spool, SpoolReplayer
from brownout.durable.store import BriefRecord, BriefStore
from brownout.errors import ConfigError, Overloaded
from brownout.events import CallRejected, Event, EventBus, SpoolAppended, SpoolReplayed
from brownout.testing import FakeClock
from support.wait import until

# ---------------------------------------------------------------------------------------- helpers


class Sink:
    """Records what it was given; fails while ``failures`` is positive (before writing anything)."""

    def __init__(self, failures: int = 0, *, fail_keys: set[str] | None = None) -> None:
        self.failures = failures
        self.fail_keys = fail_keys or set()
        self.written: list[str] = []
        self.payloads: dict[str, dict[str, Any]] = {}
        self.calls = 0

    async def __call__(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("database is down")
        if key in self.fail_keys:
            raise ConnectionError(f"cannot write {key}")
        self.written.append(key)
        self.payloads[key] = payload


def rows(path: Path) -> list[tuple[str, str, str, int]]:
    """The spool table as a second, independent connection sees it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT key, kind, payload, attempts FROM spool ORDER BY seq").fetchall()
    finally:
        conn.close()


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal", "-shm") if os.path.exists(f"{path}{s}"))


@pytest.fixture
async def spool(tmp_path: Path, clock: FakeClock, bus: EventBus) -> Any:
    s = Spool(tmp_path / "spool.db", name="briefs", clock=clock, events=bus)
    yield s
    await s.aclose()


# ---------------------------------------------------------------------------------------- durability


async def test_append_is_committed_before_it_returns(spool: Spool) -> None:
    assert await spool.append("r1", "brief", {"text": "citrus", "n": 1}) is True
    # A second connection, while the spool is still open, sees the committed row.
    assert rows(spool.path) == [("r1", "brief", '{"text":"citrus","n":1}', 0)]
    conn = sqlite3.connect(spool.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    # synchronous is per connection: ask the spool's own, on its worker thread. 2 = FULL.
    (sync,) = await spool._call(lambda: spool._db().execute("PRAGMA synchronous").fetchone())
    assert sync == 2


async def test_sqlite_work_runs_off_the_event_loop_thread(spool: Spool) -> None:
    await spool.append("r1", "brief", {})
    worker = await spool._call(threading.current_thread)
    assert worker is not threading.current_thread()
    assert worker.name.startswith("brownout-spool-briefs")


async def test_acknowledged_appends_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    code = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from brownout.durable.spool import Spool

        async def main():
            spool = Spool({str(path)!r})
            for i in range(20):
                await spool.append(f"r{{i}}", "brief", {{"i": i}})
            print("acked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: a crash

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == -9, err.decode()
    assert out == b"acked\n"

    sink = Sink()
    async with Spool(path) as reopened:
        assert reopened.pending == 20
        result = await reopened.replay(sink)
    assert result == ReplayResult(replayed=20, remaining=0)
    assert sink.written == [f"r{i}" for i in range(20)]
    assert [sink.payloads[f"r{i}"]["i"] for i in range(20)] == list(range(20))


async def test_reopened_spool_sees_pending_entries_and_replays_them(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "nested" / "dir" / "spool.db"  # the directory is created
    first = Spool(path, clock=clock)
    for key in ("a", "b", "c"):
        await first.append(key, "brief", {"key": key})
    await first.aclose()
    assert first.closed

    second = Spool(path, clock=clock)
    try:
        await second.open()
        assert second.pending == 3
        assert [e.key for e in await second.entries()] == ["a", "b", "c"]
        # Keys stay unique across the restart too.
        assert await second.append("b", "brief", {"key": "again"}) is False
        await second.append("d", "brief", {"key": "d"})
        sink = Sink()
        assert (await second.replay(sink)).replayed == 4
        assert sink.written == ["a", "b", "c", "d"]
        assert sink.payloads["b"] == {"key": "b"}
    finally:
        await second.aclose()
    assert rows(path) == []


async def test_close_finishes_appends_in_flight(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    tasks = [asyncio.create_task(spool.append(f"k{i}", "brief", {"i": i})) for i in range(50)]
    await asyncio.sleep(0)  # the appends are queued
    await spool.aclose()
    assert [t.result() for t in tasks] == [True] * 50
    assert len(rows(spool.path)) == 50
    with pytest.raises(RuntimeError, match="closed"):
        await spool.append("late", "brief", {})
    with pytest.raises(RuntimeError, match="closed"):
        await spool.replay(Sink())


# ---------------------------------------------------------------------------------------- idempotency


async def test_duplicate_keys_are_ignored(spool: Spool) -> None:
    assert await spool.append("r1", "brief", {"v": 1}) is True
    assert await spool.append("r1", "brief", {"v": 2}) is False
    # Duplicates within one group commit, too.
    results = await asyncio.gather(*(spool.append("r2", "brief", {"v": i}) for i in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert results[0] is True  # the first caller's write is the one kept
    assert [(k, p) for k, _, p, _ in rows(spool.path)] == [("r1", '{"v":1}'), ("r2", '{"v":0}')]
    stats = spool.stats()
    assert (stats.pending, stats.appended, stats.duplicates) == (2, 2, 5)


async def test_unserialisable_payload_is_refused_and_nothing_is_spooled(spool: Spool) -> None:
    with pytest.raises(TypeError):
        await spool.append("r1", "brief", {"when": datetime(2024, 1, 1)})
    assert spool.pending == 0
    assert await spool.append("r1", "brief", {"when": "2024-01-01"}) is True


async def test_payload_is_captured_at_append_time(spool: Spool) -> None:
    payload: dict[str, Any] = {"v": 1}
    task = asyncio.create_task(spool.append("r1", "brief", payload))
    await asyncio.sleep(0)
    payload["v"] = 2  # mutated while the commit is in progress
    await task
    sink = Sink()
    await spool.replay(sink)
    assert sink.payloads["r1"] == {"v": 1}


async def test_1000_concurrent_appends_are_persisted_exactly_once(spool: Spool) -> None:
    keys = [f"req-{i:04d}" for i in range(1000)]
    # Every key twice, concurrently: 2000 appends in flight at once.
    calls = [spool.append(k, "brief", {"k": k}) for k in keys for _ in range(2)]
    results = await asyncio.gather(*calls)
    assert results.count(True) == 1000
    assert results.count(False) == 1000
    assert all(results[2 * i] is True for i in range(1000))  # the first of each pair won
    stored = rows(spool.path)
    assert [k for k, *_ in stored] == keys  # once each, in call order
    assert spool.stats().pending == 1000
    sink = Sink()
    assert (await spool.replay(sink, batch=64)).replayed == 1000
    assert sink.written == keys
    assert rows(spool.path) == []


# ---------------------------------------------------------------------------------------- order


async def test_replay_stops_at_first_failure_and_keeps_that_entry_at_the_head(spool: Spool) -> None:
    for key in ("a", "b", "c", "d"):
        await spool.append(key, "brief", {})
    sink = Sink(fail_keys={"c"})
    result = await spool.replay(sink)
    assert result == ReplayResult(
        replayed=2, remaining=2, error="ConnectionError: cannot write c", failed_key="c"
    )
    assert sink.written == ["a", "b"]
    assert sink.calls == 3  # "d" was not tried: it must not overtake "c"
    assert (await spool.replay(sink)).replayed == 0
    entries = await spool.entries()
    assert [(e.key, e.attempts, e.last_error) for e in entries] == [
        ("c", 2, "ConnectionError: cannot write c"),
        ("d", 0, None),
    ]
    sink.fail_keys.clear()
    assert (await spool.replay(sink)).ok
    assert sink.written == ["a", "b", "c", "d"]


async def test_ordering_is_preserved_across_partial_failures(spool: Spool) -> None:
    appended: list[str] = []
    sink = Sink()
    n = 0
    for round_ in range(12):
        for _ in range(round_ % 4 + 1):
            key = f"k{n:03d}"
            n += 1
            await spool.append(key, "brief", {})
            appended.append(key)
        sink.failures = round_ % 3  # 0, 1 or 2 failures before this round's replay gets through
        for _ in range(3):
            result = await spool.replay(sink, batch=2, limit=3)
            assert sink.written == appended[: len(sink.written)]
            assert result.remaining == len(appended) - len(sink.written)
    await spool.replay(sink)
    assert sink.written == appended


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 4)),
            st.tuples(st.just("replay"), st.integers(0, 3), st.integers(1, 3), st.none() | st.integers(1, 5)),
            st.tuples(st.just("reopen")),
        ),
        max_size=14,
    )
)
def test_property_every_key_written_once_in_append_order(ops: list[tuple[Any, ...]]) -> None:
    async def scenario(path: Path) -> None:
        spool = Spool(path, clock=FakeClock())
        appended: list[str] = []
        sink = Sink()
        try:
            for op in ops:
                if op[0] == "append":
                    for _ in range(op[1]):
                        key = f"k{len(appended)}"
                        appended.append(key)
                        assert await spool.append(key, "brief", {"key": key})
                        assert not await spool.append(key, "brief", {"key": "dup"})
                elif op[0] == "replay":
                    _, failures, batch, limit = op
                    sink.failures = failures
                    before = spool.pending
                    result = await spool.replay(sink, batch=batch, limit=limit)
                    assert result.ok == (failures == 0 or before == 0)
                else:
                    await spool.aclose()
                    spool = Spool(path, clock=FakeClock())
                    await spool.open()
                assert sink.written == appended[: len(sink.written)]
                assert spool.pending == len(appended) - len(sink.written)
            sink.failures = 0
            await spool.replay(sink)
            assert sink.written == appended
            assert all(sink.payloads[k] == {"key": k} for k in appended)
        finally:
            await spool.aclose()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(Path(d) / "spool.db"))


async def test_cancelled_replay_deletes_what_the_sink_took(spool: Spool) -> None:
    for key in ("a", "b", "c", "d"):
        await spool.append(key, "brief", {})
    entered = asyncio.Event()
    written: list[str] = []

    async def sink(key: str, kind: str, payload: dict[str, Any]) -> None:
        if key == "c":
            entered.set()
            await asyncio.Event().wait()  # hangs until cancelled
        written.append(key)

    task = asyncio.create_task(spool.replay(sink))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written == ["a", "b"]
    assert [k for k, *_ in rows(spool.path)] == ["c", "d"]  # a and b will not be sent again
    assert spool.stats().replayed == 2


async def test_replay_arguments_are_checked(spool: Spool) -> None:
    with pytest.raises(ValueError, match="batch"):
        await spool.replay(Sink(), batch=0)
    with pytest.raises(ValueError, match="limit"):
        await spool.replay(Sink(), limit=-1)
    await spool.append("a", "brief", {})
    assert await spool.replay(Sink(), limit=0) == ReplayResult(0, 1)


# ---------------------------------------------------------------------------------------- back-pressure


async def test_full_spool_raises_overloaded_with_retry_after(
    tmp_path: Path, clock: FakeClock, bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append, CallRejected)
    spool = Spool(tmp_path / "s.db", name="briefs", clock=clock, events=bus, max_pending=3)
    try:
        for key in ("a", "b", "c"):
            assert await spool.append(key, "brief", {})
        with pytest.raises(Overloaded) as info:
            await spool.append("d", "brief", {})
        assert info.value.reason == "spool_full"
        assert info.value.policy == "briefs"
        assert info.value.retry_after == 1.0  # no replay scheduled: the minimum hint
        assert info.value.queue_size == 3
        assert seen == [
            CallRejected(source="briefs", at=clock.now(), kind="spool", reason="spool_full", retry_after=1.0)
        ]
        # Retrying a write that is already spooled is still fine when full: it is not lost.
        assert await spool.append("b", "brief", {}) is False
        # In one group: the first fits after a slot frees, the rest do not.
        await spool.replay(Sink(), limit=1)
        results = await asyncio.gather(
            spool.append("e", "brief", {}), spool.append("f", "brief", {}), return_exceptions=True
        )
        assert results[0] is True
        assert isinstance(results[1], Overloaded)
        assert [k for k, *_ in rows(spool.path)] == ["b", "c", "e"]
        stats = spool.stats()
        assert (stats.appended, stats.rejected, stats.duplicates, stats.pending) == (4, 2, 1, 3)
    finally:
        await spool.aclose()


async def test_full_spool_retry_after_follows_the_replayer_schedule(tmp_path: Path, clock: FakeClock) -> None:
    spool = Spool(tmp_path / "s.db", clock=clock, max_pending=2)
    sink = Sink(failures=100)
    replayer = SpoolReplayer(spool, sink, interval=2.0, max_interval=30.0)
    try:
        await spool.append("a", "brief", {})
        await spool.append("b", "brief", {})
        replayer.start()
        await until(
            lambda: replayer.consecutive_failures == 1 and replayer.next_attempt_at is not None,
            "the first failed attempt",
            timeout=20,
            interval=0,
        )
        # First attempt at once (entries already pending), failed: next in 2 s.
        assert replayer.next_attempt_at == clock.now() + 2.0
        await clock.run(2.0)
        await until(
            lambda: replayer.consecutive_failures == 2 and replayer.next_attempt_at is not None,
            "the second failed attempt",
            timeout=20,
            interval=0,
        )
        assert replayer.next_attempt_at == clock.now() + 4.0
        clock.advance(1.5)
        with pytest.raises(Overloaded) as info:
            await spool.append("c", "brief", {})
        assert info.value.retry_after == pytest.approx(2.5)
    finally:
        await replayer.aclose()
        await spool.aclose()


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Spool(tmp_path / "s.db", max_pending=0)
    assert info.value.key == "max_pending"
    with pytest.raises(ConfigError) as info:
        Spool(tmp_path / "s.db", alert_pending=-1)
    assert info.value.key == "alert_pending"
    spool = Spool(tmp_path / "s.db")
    for kwargs, key in [
        ({"interval": 0}, "interval"),
        ({"interval": 5, "max_interval": 1}, "max_interval"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"batch": 0}, "batch"),
    ]:
        with pytest.raises(ConfigError) as info:
            SpoolReplayer(spool, Sink(), **kwargs)
        assert info.value.key == key


# ---------------------------------------------------------------------------------------- stats, events


async def test_stats_are_exact(tmp_path: Path, clock: FakeClock) -> None:
    spool = Spool(tmp_path / "s.db", clock=clock, alert_pending=4)
    try:
        await spool.open()
        empty = spool.stats()
        assert (empty.pending, empty.oldest_age, empty.alert, empty.last_error) == (0, 0.0, False, None)
        for key in ("a", "b", "c"):
            await spool.append(key, "brief", {})
        clock.advance(5)
        await spool.append("d", "brief", {})
        await spool.append("d", "brief", {})
        clock.advance(2)
        s = spool.stats()
        assert (s.pending, s.oldest_age, s.appended, s.duplicates, s.alert) == (4, 7.0, 4, 1, False)
        await spool.append("e", "brief", {})
        assert spool.stats().alert is True  # more than 4 pending
        assert spool.alert is True

        result = await spool.replay(Sink(fail_keys={"d"}))
        assert result.replayed == 3
        s = spool.stats()
        assert (s.pending, s.replayed, s.failed_attempts, s.alert) == (2, 3, 1, False)
        assert s.last_error == "ConnectionError: cannot write d"
        assert s.oldest_age == 2.0  # "d" was appended 2 s ago
        assert s.bytes_on_disk == disk_bytes(spool.path) > 0

        await spool.replay(Sink(failures=1))
        assert spool.stats().failed_attempts == 2
        await spool.replay(Sink())
        s = spool.stats()
        assert (s.pending, s.oldest_age, s.replayed, s.failed_attempts, s.last_error) == (0, 0.0, 5, 2, None)
        assert s.bytes_on_disk == disk_bytes(spool.path)
    finally:
        await spool.aclose()


async def test_drained_spool_gives_disk_space_back(spool: Spool) -> None:
    big = "x" * 2000
    for i in range(1000):
        await spool.append(f"k{i}", "brief", {"pad": big})
    full = spool.stats().bytes_on_disk
    assert full > 2_000_000
    await spool.replay(Sink(), batch=500)
    assert spool.stats().bytes_on_disk == disk_bytes(spool.path) < full // 10


async def test_events_are_emitted_on_transitions_only(
    tmp_path: Path, clock: FakeClock, bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    spool = Spool(tmp_path / "s.db", name="briefs", clock=clock, events=bus, alert_pending=2)
    try:
        await spool.append("a", "brief", {})  # became non-empty
        await spool.append("b", "brief", {})
        await spool.append("b", "brief", {})
        await spool.append("c", "brief", {})  # crossed the alert threshold (3 > 2)
        await spool.append("d", "brief", {})
        assert seen == [
            SpoolAppended(source="briefs", at=clock.now(), key="a", pending=1, alert=False),
            SpoolAppended(source="briefs", at=clock.now(), key="c", pending=3, alert=True),
        ]
        seen.clear()
        await spool.replay(Sink(fail_keys={"c"}))
        await spool.replay(Sink())
        await spool.replay(Sink())  # nothing to do: no event
        assert seen == [
            SpoolReplayed(
                source="briefs",
                at=clock.now(),
                replayed=2,
                remaining=2,
                error="ConnectionError: cannot write c",
            ),
            SpoolReplayed(source="briefs", at=clock.now(), replayed=2, remaining=0),
        ]
    finally:
        await spool.aclose()


# ---------------------------------------------------------------------------------------- replayer


async def test_replayer_backs_off_while_the_sink_fails(tmp_path: Path, bus: EventBus) -> None:
    clock = FakeClock(autojump=True)
    drained = asyncio.Event()
    bus.subscribe(lambda e: e.remaining == 0 and drained.set(), SpoolReplayed)
    spool = Spool(tmp_path / "s.db", clock=clock, events=bus)
    for key in ("a", "b", "c"):
        await spool.append(key, "brief", {})
    sink = Sink(failures=7)
    replayer = SpoolReplayer(spool, sink, interval=1.0, multiplier=2.0, max_interval=20.0)
    try:
        replayer.start()
        await asyncio.wait_for(drained.wait(), 20)
        # Tried at once (entries were already there), then 1, 2, 4, 8, 16, capped at 20, 20.
        assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
        assert replayer.attempts == 8
        assert replayer.consecutive_failures == 0
        assert sink.written == ["a", "b", "c"]
        assert spool.stats().failed_attempts == 7

        # Idle now (no sleeping while empty); a new entry is replayed one interval later.
        drained.clear()
        await spool.append("d", "brief", {})
        await asyncio.wait_for(drained.wait(), 20)
        assert clock.sleeps[7:] == [1.0]
        assert sink.written == ["a", "b", "c", "d"]
        assert replayer.running
    finally:
        await replayer.aclose()
        await spool.aclose()
    assert not replayer.running


async def test_replayer_wake_retries_at_once(tmp_path: Path, clock: FakeClock) -> None:
    spool = Spool(tmp_path / "s.db", clock=clock)
    await spool.append("a", "brief", {})
    sink = Sink(failures=2)
    async with spool, SpoolReplayer(spool, sink, interval=10.0) as replayer:
        # Pending at start: tried at once, fails; next in 10 s.
        await until(
            lambda: replayer.consecutive_failures == 1 and clock.pending_timers == 1,
            "the first backoff",
            timeout=20,
            interval=0,
        )
        assert replayer.next_attempt_at == clock.now() + 10.0
        replayer.wake()  # fails again; next in 20 s
        await until(
            lambda: replayer.consecutive_failures == 2 and clock.pending_timers == 1,
            "the second backoff",
            timeout=20,
            interval=0,
        )
        assert replayer.next_attempt_at == clock.now() + 20.0
        replayer.wake()  # "the database is back"
        await until(lambda: spool.pending == 0, "the replay", timeout=20, interval=0)
        assert clock.now() == 1000.0  # no clock time had to pass
        assert sink.written == ["a"]
        assert replayer.attempts == 3
        await until(
            lambda: replayer.next_attempt_at is None and clock.pending_timers == 0,
            "no attempt planned",
            timeout=20,
            interval=0,
        )


async def test_replayer_waits_an_interval_after_new_entries(tmp_path: Path, clock: FakeClock) -> None:
    spool = Spool(tmp_path / "s.db", clock=clock)
    sink = Sink()
    async with spool, SpoolReplayer(spool, sink, interval=5.0) as replayer:
        await until(lambda: replayer.idle, "the replayer to idle", timeout=20, interval=0)
        await spool.append("a", "brief", {})
        await until(lambda: clock.pending_timers == 1, "the interval to start", timeout=20, interval=0)
        assert replayer.next_attempt_at == clock.now() + 5.0
        await clock.run(4.9)
        assert sink.calls == 0
        await clock.run(0.1)
        await until(lambda: spool.pending == 0, "the replay", timeout=20, interval=0)
        assert sink.written == ["a"]
        assert clock.sleeps == [5.0]
        await until(lambda: replayer.idle, "the replayer to idle again", timeout=20, interval=0)
        assert replayer.next_attempt_at is None


async def test_replayer_survives_a_spool_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(autojump=True)
    spool = Spool(tmp_path / "s.db", clock=clock)
    await spool.append("a", "brief", {})
    real_replay = Spool.replay
    calls = [0]

    async def replay(self: Spool, sink: Any, **kwargs: Any) -> ReplayResult:
        calls[0] += 1
        if calls[0] == 1:  # the spool's own file fails once (raised, not reported in a result)
            raise sqlite3.OperationalError("disk I/O error")
        return await real_replay(self, sink, **kwargs)

    monkeypatch.setattr(Spool, "replay", replay)
    sink = Sink()
    replayer = SpoolReplayer(spool, sink)
    try:
        replayer.start()
        await until(lambda: sink.written == ["a"], "the second attempt", timeout=20, interval=0)
        assert clock.sleeps == [1.0]
        assert calls[0] == 2
        assert "disk I/O error" in caplog.text
    finally:
        await replayer.aclose()
        await spool.aclose()


async def test_replayer_retries_a_spool_file_it_cannot_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(autojump=True)
    path = tmp_path / "spool.db"
    path.mkdir()  # a directory where the file should be: SQLite cannot open it
    spool = Spool(path, clock=clock)
    sink = Sink()
    replayer = SpoolReplayer(spool, sink, interval=1.0, max_interval=4.0)
    try:
        replayer.start()
        await until(lambda: len(clock.sleeps) >= 4, "a few failed opens", timeout=20, interval=0)
        assert clock.sleeps[:4] == [1.0, 2.0, 4.0, 4.0]
        assert replayer.attempts == 0  # no replay could start
        with pytest.raises(sqlite3.OperationalError):
            await spool.append("a", "brief", {})  # refused, so never acknowledged
        path.rmdir()
        await spool.append("a", "brief", {})
        replayer.wake()
        await until(lambda: sink.written == ["a"], "the replay", timeout=20, interval=0)
        assert "unable to open database file" in caplog.text
    finally:
        await replayer.aclose()
        await spool.aclose()


async def test_replayer_stops_when_its_spool_closes(tmp_path: Path, clock: FakeClock) -> None:
    spool = Spool(tmp_path / "s.db", clock=clock)
    await spool.append("a", "brief", {})
    replayer = SpoolReplayer(spool, Sink(failures=1), interval=3.0)
    replayer.start()
    await until(
        lambda: replayer.consecutive_failures == 1 and clock.pending_timers == 1,
        "the first backoff",
        timeout=20,
        interval=0,
    )
    await spool.aclose()
    await clock.run(3.0)
    await until(lambda: not replayer.running, "the replayer to stop", timeout=20, interval=0)
    assert replayer.attempts == 1
    assert replayer.next_attempt_at is None
    await replayer.aclose()


# ---------------------------------------------------------------------------------------- with the store


def record(i: int) -> BriefRecord:
    return BriefRecord(
        request_id=f"req-{i:03d}",
        text=f"a fresh scent number {i}",
        requested_mode="balanced",
        served_mode="fast",
        degraded=True,
        response={"request_id": f"req-{i:03d}", "brief": {"notes": ["bergamot", str(i)]}},
    )


def to_payload(r: BriefRecord) -> dict[str, Any]:
    return {
        "text": r.text,
        "requested_mode": r.requested_mode,
        "served_mode": r.served_mode,
        "degraded": r.degraded,
        "response": r.response,
        "created_at": r.created_at.isoformat(),
    }


def same(stored: BriefRecord | None, original: BriefRecord) -> bool:
    """Equal records; SQLite gives datetimes back without their zone, so compare naive UTC times."""
    assert stored is not None
    return dataclasses.replace(stored, created_at=stored.created_at.replace(tzinfo=None)) == (
        dataclasses.replace(original, created_at=original.created_at.replace(tzinfo=None))
    )


class StoreSink:
    """Replays into a real BriefStore; counts calls and the saves that were new."""

    def __init__(self, store: BriefStore, *, crash_after_save_of: str | None = None) -> None:
        self.store = store
        self.crash_after_save_of = crash_after_save_of
        self.calls = 0
        self.new = 0

    async def __call__(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        assert kind == "brief"
        self.calls += 1
        fields = dict(payload, created_at=datetime.fromisoformat(payload["created_at"]))
        if await self.store.save(BriefRecord(request_id=key, **fields)):
            self.new += 1
        if key == self.crash_after_save_of:
            self.crash_after_save_of = None
            # Written, but the spool never hears so: the entry stays and is replayed again.
            raise ConnectionError("connection lost after commit")


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'briefs.db'}")
    await s.init()
    yield s
    await s.aclose()


async def test_store_gets_every_record_exactly_once_when_replayed_twice(
    spool: Spool, store: BriefStore
) -> None:
    records = [record(i) for i in range(30)]
    for r in records:
        await spool.append(r.request_id, "brief", to_payload(r))
    sink = StoreSink(store)
    assert (await spool.replay(sink, batch=7)).replayed == 30
    assert (await spool.replay(sink)).replayed == 0
    # Even if the same entries were spooled again (a retried request), the store keeps one of each.
    for r in records[:5]:
        await spool.append(r.request_id, "brief", to_payload(r))
    assert (await spool.replay(sink)).replayed == 5
    assert await store.count() == 30
    assert sink.new == 30
    for r in records:
        assert same(await store.get(r.request_id), r)


async def test_store_crash_between_write_and_delete_writes_nothing_twice(
    spool: Spool, store: BriefStore
) -> None:
    records = [record(i) for i in range(10)]
    for r in records:
        await spool.append(r.request_id, "brief", to_payload(r))
    sink = StoreSink(store, crash_after_save_of="req-004")
    first = await spool.replay(sink)
    assert (first.replayed, first.remaining, first.failed_key) == (4, 6, "req-004")
    assert await store.count() == 5  # req-004 is in the store and still spooled
    second = await spool.replay(sink)
    assert (second.replayed, second.remaining) == (6, 0)
    assert sink.calls == 11  # req-004 twice
    assert sink.new == 10  # but stored once
    assert await store.count() == 10
    for r in records:
        assert same(await store.get(r.request_id), r)


async def test_writes_spooled_during_a_real_outage_reach_the_store(tmp_path: Path, bus: EventBus) -> None:
    clock = FakeClock(autojump=True)
    db_dir = tmp_path / "db"  # missing: SQLite cannot open the database, as when the server is down
    store = BriefStore(f"sqlite+aiosqlite:///{db_dir / 'briefs.db'}")
    spool = Spool(tmp_path / "spool.db", clock=clock, events=bus)
    drained = asyncio.Event()
    bus.subscribe(lambda e: e.remaining == 0 and drained.set(), SpoolReplayed)
    records = [record(i) for i in range(20)]
    acknowledged: list[str] = []

    async def write(r: BriefRecord) -> None:
        """What the runtime does: try the store, spool on failure; acknowledge either way."""
        try:
            if spool.pending:
                raise ConnectionError("spool not drained yet: keep the order")
            await store.save(r)
        except Exception:
            await spool.append(r.request_id, "brief", to_payload(r))
        acknowledged.append(r.request_id)

    sink = StoreSink(store)
    replayer = SpoolReplayer(spool, sink, interval=1.0, max_interval=4.0)
    try:
        # One at a time: more than 15 concurrent saves against a database that cannot connect stall
        # in SQLAlchemy's pool for its 30 s timeout (a store matter, not the spool's).
        for r in records:
            await write(r)
        assert len(acknowledged) == 20
        assert spool.pending == 20
        replayer.start()
        await until(
            lambda: replayer.consecutive_failures >= 3, "failed attempts while down", timeout=20, interval=0
        )
        db_dir.mkdir()
        await store.init()  # the database is back
        replayer.wake()
        await asyncio.wait_for(drained.wait(), 20)
        assert await store.count() == 20
        assert sink.new == 20
        assert {r.request_id for r in records} == set(acknowledged)
        for r in records:
            assert same(await store.get(r.request_id), r)
    finally:
        await replayer.aclose()
        await spool.aclose()
        await store.aclose()


# ---------------------------------------------------------------------------------------- dead letters


class Refusing:
    """A sink that refuses some keys for good (a data error, not an outage) and takes the rest."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.written: list[str] = []

    async def __call__(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        if key in self.refuse:
            raise ValueError(f"value too long for column in {key}")
        self.written.append(key)


async def test_a_refused_entry_moves_to_dead_letters_and_stops_blocking(
    tmp_path: Path, bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    async with Spool(tmp_path / "s.db", max_attempts=3, events=bus) as spool:
        for key in ("a", "b", "c"):
            await spool.append(key, "brief", {"k": key})
        sink = Refusing({"b"})
        first = await spool.replay(sink)
        assert (first.replayed, first.failed_key, first.remaining) == (1, "b", 2)
        second = await spool.replay(sink)
        assert (second.replayed, second.remaining, second.dead_lettered) == (0, 2, 0)
        third = await spool.replay(sink)  # the third refusal: b is moved aside, c goes through
        assert third.ok
        assert (third.replayed, third.remaining, third.dead_lettered) == (1, 0, 1)
        assert sink.written == ["a", "c"]
        dead = await spool.dead_letters()
        assert [(d.key, d.attempts, d.payload) for d in dead] == [("b", 3, {"k": "b"})]
        assert dead[0].last_error is not None
        assert "too long" in dead[0].last_error
        assert spool.stats().dead == 1
        assert any(e.__class__.__name__ == "SpoolDeadLettered" for e in seen)

        sink.refuse.clear()  # the cause is fixed: send it back
        assert await spool.requeue_dead() == 1
        assert spool.pending == 1
        assert spool.stats().dead == 0
        assert (await spool.replay(sink)).replayed == 1
        assert sink.written == ["a", "c", "b"]


async def test_outage_errors_never_dead_letter(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.db", max_attempts=2) as spool:
        await spool.append("a", "brief", {})
        sink = Sink(failures=50)  # ConnectionError: the database is down, not refusing the entry
        for _ in range(10):
            assert not (await spool.replay(sink)).ok
        assert spool.pending == 1
        assert spool.stats().dead == 0
        assert (await spool.entries())[0].attempts == 10


async def test_dead_letters_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Spool(path, max_attempts=1) as spool:
        await spool.append("x", "event", {"n": 1})
        await spool.replay(Refusing({"x"}))
        assert spool.stats().dead == 1
    async with Spool(path, max_attempts=1) as again:
        assert again.stats().dead == 1
        assert again.pending == 0
        assert [d.key for d in await again.dead_letters()] == ["x"]


async def test_spool_file_from_before_dead_letters_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, "
        "kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)"
    )
    conn.execute("INSERT INTO spool (key, kind, payload, created_at) VALUES ('old', 'brief', '{}', 0)")
    conn.commit()
    conn.close()
    async with Spool(path, max_attempts=1) as spool:
        assert spool.pending == 1
        sink = Sink()
        assert (await spool.replay(sink)).replayed == 1
        assert sink.written == ["old"]


async def test_a_key_refused_twice_keeps_both_dead_letters_and_replay_goes_on(tmp_path: Path) -> None:
    # Two writes under one key, each refused for its data: both are kept for the operator, and the
    # entries behind the second are not held up.
    path = tmp_path / "s.db"
    async with Spool(path, max_attempts=1) as spool:
        sink = Refusing({"b"})
        await spool.append("b", "brief", {"v": 1})
        assert (await spool.replay(sink)).dead_lettered == 1
        assert await spool.append("b", "brief", {"v": 2})  # no longer pending: a new write
        await spool.append("c", "brief", {"v": 3})
        result = await spool.replay(sink)
        assert (result.ok, result.replayed, result.dead_lettered) == (True, 1, 1)
        assert sink.written == ["c"]
        assert [(d.key, d.payload) for d in await spool.dead_letters()] == [
            ("b", {"v": 1}),
            ("b", {"v": 2}),
        ]
        assert spool.stats().dead == 2

        sink.refuse.clear()
        assert await spool.requeue_dead(["b"]) == 1  # a key is pending once: the older goes back
        assert [(d.key, d.payload) for d in await spool.dead_letters()] == [("b", {"v": 2})]
        assert (await spool.replay(sink)).replayed == 1
    async with Spool(path, max_attempts=1) as again:
        # The key's promise outlived the first write's replay: the second is still dead, not lost.
        assert again.lost == ()
        assert again.stats().dead == 1
        assert await again.requeue_dead() == 1
        await again.replay(sink)
        assert sink.written == ["c", "b", "b"]
        assert again.stats().dead == 0


async def test_a_key_promised_while_dead_is_reported_lost_when_its_dead_letter_goes(
    tmp_path: Path,
) -> None:
    # The first write's replay must not drop the promise the second (dead) write still needs.
    path = tmp_path / "s.db"
    async with Spool(path, max_attempts=1) as spool:
        await spool.append("b", "brief", {"v": 1})
        await spool.replay(Refusing({"b"}))
        await spool.requeue_dead()
        await spool.append("d", "brief", {})
        await spool.replay(Refusing({"d"}))  # b taken; d dead
        await spool.append("d", "brief", {"v": 2})
        await spool.replay(Refusing(set()))  # the second d taken; the first still dead
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM dead_letters")  # damage: the dead letter vanishes
    conn.commit()
    conn.close()
    async with Spool(path, max_attempts=1) as again:
        assert [entry.key for entry in again.lost] == ["d"]


async def test_spool_file_whose_dead_letter_keys_were_unique_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, "
        "kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, refusals INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
        "kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL, "
        "last_error TEXT, dead_at REAL NOT NULL);"
        # The dead letter keeps its spool seq (1); the later write under its key came after it.
        "INSERT INTO spool (seq, key, kind, payload, created_at) VALUES (2, 'b', 'brief', '{\"v\": 2}', 5);"
        "INSERT INTO dead_letters VALUES (1, 'b', 'brief', '{\"v\": 1}', 1, 1, 'refused', 2);"
    )
    conn.commit()
    conn.close()
    async with Spool(path, max_attempts=1) as spool:
        assert (spool.pending, spool.stats().dead) == (1, 1)
        assert (await spool.replay(Refusing({"b"}))).dead_lettered == 1
        assert [(d.key, d.payload) for d in await spool.dead_letters()] == [
            ("b", {"v": 1}),
            ("b", {"v": 2}),
        ]
    check = sqlite3.connect(path)
    indexes = {row[1]: row[2] for row in check.execute("PRAGMA index_list(dead_letters)")}
    check.close()
    assert indexes == {"dead_letters_key": 0}


class BatchSink:
    """Takes whole batches, or refuses a batch holding a poisoned key (all or nothing)."""

    def __init__(self, poison: set[str] | None = None, outage: int = 0) -> None:
        self.poison = poison or set()
        self.outage = outage
        self.batches: list[list[str]] = []

    async def __call__(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        if self.outage:
            self.outage -= 1
            raise ConnectionError("down")
        keys = [key for key, _, _ in entries]
        if self.poison & set(keys):
            raise ValueError(f"constraint violated by one of {keys}")
        self.batches.append(keys)


async def test_batch_sink_takes_batches_in_order(spool: Spool) -> None:
    for i in range(250):
        await spool.append(f"k{i:03}", "brief", {"i": i})
    sink = BatchSink()
    result = await spool.replay(batch=100, batch_sink=sink)
    assert result.replayed == 250
    assert [len(b) for b in sink.batches] == [100, 100, 50]
    assert [k for b in sink.batches for k in b] == [f"k{i:03}" for i in range(250)]


async def test_failed_batch_is_retried_one_by_one_to_find_the_poisoned_entry(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.db", max_attempts=1) as spool:
        for i in range(5):
            await spool.append(f"k{i}", "brief", {})
        sink = BatchSink(poison={"k2"})
        result = await spool.replay(batch=10, batch_sink=sink)
        # k0 and k1 go one by one, k2 is refused (and, at max_attempts=1, dead), k3 and k4 follow.
        assert result.dead_lettered == 1
        assert [k for b in sink.batches for k in b] == ["k0", "k1", "k3", "k4"]
        assert [d.key for d in await spool.dead_letters()] == ["k2"]


async def test_batch_outage_keeps_everything_pending(spool: Spool) -> None:
    for i in range(3):
        await spool.append(f"k{i}", "brief", {})
    sink = BatchSink(outage=1)
    result = await spool.replay(batch_sink=sink)
    assert not result.ok
    assert result.failed_key == "k0"
    assert spool.pending == 3
    assert sink.batches == []  # no one-by-one tries during an outage
    assert (await spool.replay(batch_sink=sink)).replayed == 3


async def test_replay_needs_a_sink(spool: Spool) -> None:
    with pytest.raises(TypeError, match="sink"):
        await spool.replay()
    with pytest.raises(ConfigError, match="sink"):
        SpoolReplayer(spool)


async def test_read_ahead_keeps_order_across_a_poisoned_batch_and_a_limit(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.db", max_attempts=1) as spool:
        for i in range(250):
            await spool.append(f"k{i:03}", "brief", {"i": i})
        sink = BatchSink(poison={"k150"})
        # The third batch is read ahead while the second (holding k150) is written; the second fails,
        # so the read-ahead is dropped and the second batch goes one by one from its head.
        result = await spool.replay(batch=100, batch_sink=sink, limit=220)
        assert result.replayed == 220
        assert result.dead_lettered == 1
        written = [k for b in sink.batches for k in b]
        assert written == [f"k{i:03}" for i in range(221) if i != 150]
        assert spool.pending == 29
        rest = await spool.replay(batch=100, batch_sink=sink)
        assert rest.replayed == 29
        assert [k for b in sink.batches for k in b][-29:] == [f"k{i:03}" for i in range(221, 250)]
