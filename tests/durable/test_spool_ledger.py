"""The spool knows what it promised: lost entries are found and reported, never invented; one owner.

A *crash image* here is a copy of the spool's and the ledger's files (main file and write-ahead log,
not the shared-memory index) taken while the spool is open and idle: exactly what a ``kill -9`` leaves
on disk, since every commit is synced before it returns. Damage is then done to the copy (a truncated
log, a main file cut short or overwritten) and a new :class:`Spool` opens it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from brownout.durable.spool import Spool, SpoolInUse
from brownout.testing import FakeClock

FILES = ("", "-wal")
"""What a crash leaves that matters: the main file and its write-ahead log (the index is rebuilt)."""


def crash_image(spool: Spool, into: Path, *, ledger_from: Spool | None = None) -> Path:
    """Copy the spool's files (and its ledger's, or ``ledger_from``'s) into ``into``; the new spool path."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / spool.path.name
    for suffix in FILES:
        source = Path(f"{spool.path}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{target}{suffix}")
    ledger = (ledger_from or spool).ledger_path
    for suffix in FILES:
        source = Path(f"{ledger}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{target}.ledger{suffix}")
    return target


def checkpoint(path: Path) -> None:
    """Move everything committed so far from the log into the main file (another connection may)."""
    conn = sqlite3.connect(path)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


def remove(path: Path | str) -> None:
    """Delete a file if it is there."""
    Path(path).unlink(missing_ok=True)


def replace_spool_file(path: Path, source: Path) -> None:
    """Put ``source``'s spool file (main file and log) in place of ``path``'s; the ledger stays."""
    for suffix in FILES:
        remove(f"{path}{suffix}")
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{path}{suffix}")


def moved_aside(path: Path) -> list[Path]:
    """The main files a damaged ``path`` was moved aside to (not their -wal/-shm companions)."""
    return [p for p in path.parent.glob(f"{path.name}.unreadable-*") if not p.name.endswith(("-wal", "-shm"))]


class Sink:
    """Takes every entry, except the keys in ``refuse`` (refused for good: a data error)."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.refuse: set[str] = set()

    async def __call__(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        if key in self.refuse:
            raise ValueError(f"column too short for {key}")
        self.written.append(key)


# ---------------------------------------------------------------------------------------- loss found


async def test_truncated_log_after_a_crash_reports_exactly_the_missing_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "live" / "spool.db", name="briefs", clock=clock)
    try:
        for key in ("a", "b", "c"):
            await spool.append(key, "brief", {"k": key})
        checkpoint(spool.path)  # a, b, c now live in the main file
        late = [f"late-{i:02d}" for i in range(25)]
        for key in late:
            await spool.append(key, "brief", {"k": key})  # these only in the log
        crashed = crash_image(spool, tmp_path / "crashed")
    finally:
        await spool.aclose()
    os.truncate(f"{crashed}-wal", 0)

    with caplog.at_level(logging.ERROR, logger="brownout.spool"):
        async with Spool(crashed, name="briefs", clock=clock) as reopened:
            assert reopened.pending == 3
            assert [e.key for e in reopened.lost] == late
            assert reopened.stats().lost == 25
            first = reopened.lost[0]
            assert (first.seq, first.kind, first.file) == (4, "brief", str(crashed))
            assert "missing from the spool file" in first.reason
            # The rest is served as before.
            sink = Sink()
            await reopened.replay(sink)
            assert sink.written == ["a", "b", "c"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(crashed) in errors[0]
    assert "25 acknowledged entries LOST" in errors[0]
    # Twenty keys named, the others counted.
    assert all(k in errors[0] for k in late[:20])
    assert "late-20" not in errors[0]
    assert "and 5 more" in errors[0]


async def test_killed_process_then_truncated_log_reports_every_acknowledged_entry(
    tmp_path: Path,
) -> None:
    """The fault-injection finding: 30 acknowledged writes, kill -9, the log truncated."""
    path = tmp_path / "spool.db"
    code = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from brownout.durable.spool import Spool

        async def main():
            spool = Spool({str(path)!r}, name="briefs")
            await asyncio.gather(*(spool.append(f"req-{{i:02d}}", "brief", {{"i": i}}) for i in range(30)))
            print("acked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: a crash

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert out == b"acked\n"
    os.truncate(f"{path}-wal", 0)

    async with Spool(path, name="briefs") as reopened:
        assert reopened.pending == 0
        assert sorted(e.key for e in reopened.lost) == [f"req-{i:02d}" for i in range(30)]
        # A fresh entry reuses the lost ones' sequence numbers without being taken for one of them.
        await reopened.append("after", "brief", {})
        assert (await reopened.entries())[0].seq == 1
    async with Spool(path, name="briefs") as again:  # reported once, kept until cleared
        assert again.stats().lost == 30
        assert again.pending == 1
        assert await again.clear_lost(["req-00", "req-01", "nope"]) == 2
        assert again.stats().lost == 28
        assert await again.clear_lost() == 28
    async with Spool(path, name="briefs") as cleared:
        assert cleared.lost == ()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_unreadable_main_file_is_moved_aside_and_everything_promised_is_lost(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "live" / "spool.db", max_attempts=1)
    try:
        for i in range(300):  # enough pages that cutting the file short breaks its tables
            await spool.append(f"k{i:03d}", "brief", {"text": "x" * 500})
        await spool.replay(Sink(), limit=5)  # k000..k004 delivered: not promised any more
        checkpoint(spool.path)
        crashed = crash_image(spool, tmp_path / "crashed")
    finally:
        await spool.aclose()
    size = crashed.stat().st_size
    if damage == "garbage":
        crashed.write_bytes(os.urandom(size))
    else:
        os.truncate(crashed, size // 3)

    async with Spool(crashed) as reopened:  # opens: the service keeps taking writes
        assert reopened.pending == 0
        assert [e.key for e in reopened.lost] == [f"k{i:03d}" for i in range(5, 300)]
        aside = moved_aside(crashed)
        assert len(aside) == 1
        assert reopened.lost[0].file == str(crashed)
        assert str(aside[0]) in reopened.lost[0].reason
        assert aside[0].stat().st_size == (size if damage == "garbage" else size // 3)
        assert await reopened.append("new", "brief", {})
        sink = Sink()
        await reopened.replay(sink)
        assert sink.written == ["new"]
    assert any(str(crashed) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_a_damaged_ledger_is_moved_aside_and_the_spool_promises_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as spool:
        await spool.append("a", "brief", {})
    spool.ledger_path.write_bytes(b"not a ledger at all" * 100)
    async with Spool(path) as reopened:
        assert reopened.pending == 1
        assert reopened.lost == ()
    assert len(moved_aside(tmp_path / "spool.db.ledger")) == 1
    assert "cannot be detected" in caplog.text
    # "a" is promised again: losing it now is noticed.
    async with Spool(path) as spool:
        crashed = crash_image(spool, tmp_path / "crashed")
    crashed.write_bytes(b"")
    remove(f"{crashed}-wal")
    async with Spool(crashed) as reopened:
        assert [e.key for e in reopened.lost] == ["a"]


async def test_a_spool_written_before_the_ledger_existed_is_promised_on_open(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path, max_attempts=1) as spool:
        await spool.append("refused", "brief", {})
        sink = Sink()
        sink.refuse = {"refused"}
        await spool.replay(sink)
        await spool.append("pending", "brief", {})
        assert (spool.pending, spool.stats().dead) == (1, 1)
    for suffix in FILES:
        remove(f"{path}.ledger{suffix}")
    async with Spool(path) as reopened:
        assert reopened.lost == ()
        crashed = crash_image(reopened, tmp_path / "crashed")
    os.truncate(crashed, 0)
    remove(f"{crashed}-wal")
    async with Spool(crashed) as damaged:
        assert sorted(e.key for e in damaged.lost) == ["pending", "refused"]


# ---------------------------------------------------------------------------------------- no false loss


async def test_no_loss_reported_after_replay_dead_letters_and_requeue(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    sink = Sink()
    async with Spool(path, max_attempts=1) as spool:
        for key in ("a", "b", "c", "d"):
            await spool.append(key, "brief", {})
        sink.refuse = {"b"}
        await spool.replay(sink)  # a, c, d delivered; b dead
        assert spool.stats().dead == 1
    async with Spool(path, max_attempts=1) as spool:
        assert spool.lost == ()
        assert spool.stats().dead == 1
        assert await spool.requeue_dead() == 1
        # The requeued entry is still promised: losing it now would be noticed.
        crashed = crash_image(spool, tmp_path / "crashed")
    async with Spool(path, max_attempts=1) as spool:
        assert spool.lost == ()
        sink.refuse = set()
        await spool.replay(sink)
        assert sink.written == ["a", "c", "d", "b"]
    async with Spool(path) as spool:
        assert spool.lost == ()
        assert spool.pending == 0
    os.truncate(crashed, 0)
    remove(f"{crashed}-wal")
    async with Spool(crashed) as damaged:
        assert [e.key for e in damaged.lost] == ["b"]


async def test_crash_between_ledger_delete_and_spool_delete_replays_again_and_loses_nothing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "live" / "spool.db")
    try:
        for key in ("a", "b", "c"):
            await spool.append(key, "brief", {})
        before = crash_image(spool, tmp_path / "before")  # the spool file before the delete
        sink = Sink()
        await spool.replay(sink)
        # The ledger after its delete, the spool file before its own: the crash window.
        crashed = crash_image(spool, tmp_path / "crashed")
        replace_spool_file(crashed, before)
    finally:
        await spool.aclose()
    async with Spool(crashed) as reopened:
        assert reopened.lost == ()
        assert reopened.pending == 3
        await reopened.replay(sink)  # sent again: the sink is idempotent by key
        assert sink.written == ["a", "b", "c", "a", "b", "c"]
    async with Spool(crashed) as again:
        assert again.lost == ()
        assert again.pending == 0


class LedgerMachine(RuleBasedStateMachine):
    """Appends, replays, refusals, requeues and crashes: with no damage, nothing is ever reported lost,
    and every acknowledged key is delivered, pending or dead -- exactly as the model says."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-machine-"))
        self.generation = 0
        self.spool = self._open(self.dir / "g0" / "spool.db")
        self.sink = Sink()
        self.acknowledged: set[str] = set()
        self.pending: list[str] = []
        self.dead: list[str] = []

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _open(self, path: Path) -> Spool:
        spool = Spool(path, clock=FakeClock(), max_attempts=1)
        self._run(spool.open())
        return spool

    @rule(key=st.sampled_from("abcdef"))
    def append(self, key: str) -> None:
        new = self._run(self.spool.append(key, "brief", {"k": key}))
        assert new == (key not in self.pending)
        if new:
            self.pending.append(key)
            self.acknowledged.add(key)

    @rule(refuse=st.sets(st.sampled_from("abcdef"), max_size=2), limit=st.none() | st.integers(0, 3))
    def replay(self, refuse: set[str], limit: int | None) -> None:
        self.sink.refuse = refuse
        result = self._run(self.spool.replay(self.sink, batch=2, limit=limit))
        assert result.ok
        taken = 0
        while self.pending and (limit is None or taken < limit):
            key = self.pending.pop(0)
            if key in refuse:
                self.dead.append(key)
            else:
                taken += 1

    @precondition(lambda self: self.dead)
    @rule()
    def requeue(self) -> None:
        moved = self._run(self.spool.requeue_dead())
        # A key goes back once: one not pending, and the older of a key dead twice.
        back = list(dict.fromkeys(k for k in self.dead if k not in self.pending))
        assert moved == len(back)
        self.pending.extend(back)
        for key in back:
            self.dead.remove(key)

    @rule()
    def crash_and_reopen(self) -> None:
        self.generation += 1
        path = crash_image(self.spool, self.dir / f"g{self.generation}")
        self._run(self.spool.aclose())
        self.spool = self._open(path)

    @rule()
    def crash_inside_a_replay(self) -> None:
        """The spool file from before a replay, the ledger from after it: entries come back."""
        self.generation += 1
        before = crash_image(self.spool, self.dir / f"b{self.generation}")
        self.sink.refuse = set()
        self._run(self.spool.replay(self.sink))
        path = crash_image(self.spool, self.dir / f"g{self.generation}")
        replace_spool_file(path, before)
        self._run(self.spool.aclose())
        self.spool = self._open(path)  # pending as before the replay: it runs again later

    @invariant()
    def nothing_lost_and_everything_accounted_for(self) -> None:
        assert self.spool.lost == ()
        stored = [e.key for e in self._run(self.spool.entries(1000))]
        dead = sorted(d.key for d in self._run(self.spool.dead_letters(1000)))
        assert stored == self.pending
        assert dead == sorted(self.dead)
        assert self.acknowledged == set(self.sink.written) | set(stored) | set(dead)

    def teardown(self) -> None:
        self._run(self.spool.aclose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------------------- one owner


async def test_a_second_spool_on_the_same_file_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    async with Spool(path) as owner:
        await owner.append("a", "brief", {})
        with pytest.raises(SpoolInUse) as caught:
            await Spool(path).open()
        assert caught.value.path == path
        assert caught.value.owner_pid == os.getpid()
        assert str(path) in str(caught.value)
    async with Spool(path) as next_owner:  # released on close
        assert next_owner.pending == 1


async def test_a_second_process_cannot_open_an_owned_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from brownout.durable.spool import Spool, SpoolInUse

        async def main():
            try:
                await Spool({str(path)!r}).open()
            except SpoolInUse as e:
                print(e.owner_pid, e, flush=True)
                sys.exit(3)

        asyncio.run(main())
        """
    )
    async with Spool(path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
    assert proc.returncode == 3, err.decode()
    assert out.decode().startswith(f"{os.getpid()} spool file {path} is already in use")
