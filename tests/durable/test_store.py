"""The brief store: schema migration, batched idempotent writes, multi-host failover, read-only mode."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from brownout.chaos.servers import PostgresDatabase, PostgresServer
from brownout.durable.store import BriefRecord, BriefStore, ReadOnlyDatabase, split_hosts
from brownout.testing import FakeClock


def record(i: int | str) -> BriefRecord:
    return BriefRecord(
        request_id=f"req-{i}",
        text=f"a fresh citrus scent {i}",
        requested_mode="balanced",
        served_mode="fast",
        degraded=True,
        response={"request_id": f"req-{i}", "n": i},
    )


def test_split_hosts() -> None:
    assert split_hosts("postgresql+asyncpg://u:pw@h1:5432,h2:5433/db?ssl=disable") == [
        "postgresql+asyncpg://u:pw@h1:5432/db?ssl=disable",
        "postgresql+asyncpg://u:pw@h2:5433/db?ssl=disable",
    ]
    assert split_hosts("postgresql+asyncpg://h1,h2/db") == [
        "postgresql+asyncpg://h1/db",
        "postgresql+asyncpg://h2/db",
    ]
    assert split_hosts("sqlite+aiosqlite:///x.db") == ["sqlite+aiosqlite:///x.db"]
    with pytest.raises(ValueError, match="empty host"):
        split_hosts("postgresql+asyncpg://u@h1,,h2/db")


def test_failover_needs_postgresql() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        BriefStore(["sqlite+aiosqlite:///a.db", "sqlite+aiosqlite:///b.db"])


async def test_sqlite_schema_is_created_and_versioned(tmp_path: Path) -> None:
    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        await store.init()
        assert await store.schema_version() == 3
        await store.init()  # a second start finds nothing to do
        assert await store.schema_version() == 3
    finally:
        await store.aclose()


async def test_database_from_before_versions_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE briefs (request_id VARCHAR(64) PRIMARY KEY, created_at DATETIME NOT NULL, "
        "text TEXT NOT NULL, requested_mode VARCHAR(16) NOT NULL, served_mode VARCHAR(16) NOT NULL, "
        "degraded BOOLEAN NOT NULL, response TEXT NOT NULL)"
    )
    conn.execute("INSERT INTO briefs VALUES ('old', '2026-01-01 00:00:00', 't', 'fast', 'fast', 0, '{}')")
    conn.commit()
    conn.close()
    store = BriefStore(f"sqlite+aiosqlite:///{path}")
    try:
        await store.init()
        assert await store.schema_version() == 3
        assert await store.request_ids() == ["old"]
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(briefs)")}
    conn.close()
    assert "ix_briefs_created_at" in indexes


async def test_save_many_is_idempotent_and_all_or_nothing(fresh_postgres_db: PostgresDatabase) -> None:
    store = BriefStore(fresh_postgres_db.url)
    try:
        await store.init()
        assert await store.save_many([record(i) for i in range(150)]) == 150
        # A replayed batch overlapping what is there stores only the new ones.
        assert await store.save_many([record(i) for i in range(100, 200)]) == 50
        assert await store.save(record(5)) is False
        assert await store.count() == 200
        assert sorted(await store.request_ids()) == sorted(f"req-{i}" for i in range(200))
        bad = BriefRecord("x" * 100, "t", "fast", "fast", False, {})  # request_id longer than its column
        with pytest.raises(Exception, match="too long"):
            await store.save_many([record(500), bad])
        assert await store.get("req-500") is None  # nothing of the failed batch was stored
        got = await store.get("req-7")
        assert got is not None
        assert got.response == {"request_id": "req-7", "n": 7}
    finally:
        await store.aclose()


async def test_failover_to_a_promoted_standby_with_read_only_mode_between(
    make_postgres_server: Callable[..., PostgresServer],
) -> None:
    primary = make_postgres_server()
    primary.execute("CREATE DATABASE app")
    standby = make_postgres_server(standby_of=primary)
    clock = FakeClock()
    store = BriefStore(
        [primary.url_for("app"), standby.url_for("app")],
        connect_timeout=2.0,
        recheck_interval=1.0,
        clock=clock,
    )
    try:
        await store.init()
        assert store.writable_host == primary.url_for("app")
        assert await store.save_many([record(i) for i in range(10)]) == 10

        primary.kill()  # the primary dies; the standby is still read-only
        with pytest.raises(OSError, match="Connect call failed"):  # refused by the dead host
            await store.save(record(10))
        clock.advance(1.0)
        with pytest.raises(ReadOnlyDatabase, match="read-only"):
            await store.save(record(10))
        assert store.read_only
        # Fails fast until the recheck interval has passed: no connection storm while read-only.
        with pytest.raises(ReadOnlyDatabase):
            await store.save(record(10))
        # Reads still work, from the standby.
        assert await store.count() == 10

        standby.promote()
        clock.advance(1.0)
        assert await store.save(record(10)) is True
        assert store.writable_host == standby.url_for("app")
        assert store.failovers == 1
        assert await store.count() == 11
        assert await store.schema_version() == 3
    finally:
        await store.aclose()


async def test_multi_host_url_finds_the_writable_host(
    make_postgres_server: Callable[..., PostgresServer],
) -> None:
    primary = make_postgres_server()
    standby = make_postgres_server(standby_of=primary)
    # The standby is listed first: the store must skip it because it is read-only.
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/postgres"
    store = BriefStore(url)
    try:
        await store.init()
        assert store.writable_host == primary.url
        assert await store.save(record(1)) is True
    finally:
        await store.aclose()


async def test_restarted_database_is_used_again(
    postgres_server: PostgresServer, fresh_postgres_db: PostgresDatabase
) -> None:
    clock = FakeClock()
    store = BriefStore(fresh_postgres_db.url, connect_timeout=2.0, clock=clock)
    try:
        await store.init()
        await store.save(record(1))
        postgres_server.stop()
        with pytest.raises(OSError, match="Connect call failed"):
            await store.save(record(2))
        clock.advance(2.0)
        with pytest.raises(ReadOnlyDatabase):
            await store.ping()
        postgres_server.start()
        clock.advance(2.0)
        await store.ping()
        assert await store.save(record(2)) is True
        assert await store.count() == 2
    finally:
        await store.aclose()


async def test_latest_full_answer_by_cache_key(tmp_path: Path) -> None:
    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        await store.init()
        old = BriefRecord("r1", "t", "fast", "fast", False, {"v": 1}, cache_key="fast:k")
        degraded = BriefRecord("r2", "t", "fast", "emergency", True, {"v": 2}, cache_key="fast:k")
        assert await store.save_many([old, degraded]) == 2
        assert await store.latest_full_answer("fast:k") == {"v": 1}  # a degraded answer never serves
        assert await store.latest_full_answer("fast:other") is None
        got = await store.get("r1")
        assert got is not None
        assert got.cache_key == "fast:k"
    finally:
        await store.aclose()


# -------------------------------------------------------------------------------- group commit


async def test_briefs_written_at_once_share_transactions_and_each_caller_hears_of_its_own(
    tmp_path: Path,
) -> None:
    import asyncio

    from sqlalchemy import event

    path = tmp_path / "b.db"
    store = BriefStore(f"sqlite+aiosqlite:///{path}")
    commits: list[int] = []
    try:
        await store.init()
        for engine in store._engines:
            event.listen(engine.sync_engine, "commit", lambda conn: commits.append(1))
        results = await asyncio.gather(*(store.save(record(i)) for i in range(200)), store.save(record(7)))
        # Every write answered once its row was committed: each new one True, the repeat of req-7 False.
        assert sorted(results) == [False] + [True] * 200
        # Far fewer transactions than writes: the writes that arrived while one committed went together.
        assert 1 <= len(commits) <= 10
        assert await store.save(record(7)) is False
    finally:
        await store.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM briefs").fetchone() == (200,)
        # A file database runs in WAL mode, synced on every commit (FULL = 2).
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_row_refused_for_its_data_fails_alone_in_its_group(tmp_path: Path) -> None:
    import asyncio
    from dataclasses import replace

    from sqlalchemy.exc import IntegrityError

    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        await store.init()
        bad = replace(record("bad"), text=None)  # type: ignore[arg-type]  # the NOT NULL column refuses it
        results = await asyncio.gather(
            *(store.save(record(i)) for i in range(20)), store.save(bad), return_exceptions=True
        )
        assert results[:20] == [True] * 20
        assert isinstance(results[20], IntegrityError)
        assert await store.count() == 20
    finally:
        await store.aclose()


async def test_closing_the_store_finishes_the_writes_already_queued(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "b.db"
    store = BriefStore(f"sqlite+aiosqlite:///{path}")
    await store.init()
    writes = [asyncio.create_task(store.save(record(i))) for i in range(50)]
    await asyncio.sleep(0)  # queued, the first batch under way
    await store.aclose()
    assert [w.result() for w in writes] == [True] * 50
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM briefs").fetchone() == (50,)
