"""The private Redis and PostgreSQL servers that outage tests run against (brownout.chaos.servers).

Real processes on free 127.0.0.1 ports: they start and answer, refuse connections when stopped, come
back on the same port (PostgreSQL with its data), die on kill, hang on pause, and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import brownout.chaos.servers as servers
import brownout.chaos.servers.base as servers_base
from brownout.chaos.servers import (
    PostgresDatabase,
    PostgresServer,
    RedisServer,
    ServerBinaryMissing,
    ServerStartError,
    binaries,
    processes,
    reap_orphans,
)
from support import ROOT

SHARED_PORTS = {5432, 6379}

MakeRedis = Callable[..., RedisServer]
MakePostgres = Callable[..., PostgresServer]


def redis_client(server: RedisServer, timeout: float = 2.0) -> aioredis.Redis:
    """A client that fails at once instead of retrying, so an outage shows as an error."""
    return aioredis.Redis.from_url(
        server.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def state(pid: int) -> str | None:
    """The process state letter from /proc (None when gone or a zombie)."""
    stat = processes.proc_stat(pid)
    return None if stat is None else stat[0]


def refused(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:port is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def processes_using(path: Path) -> list[int]:
    """Live processes working in ``path`` or naming it on their command line."""
    return [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and processes.alive(int(pid)) and processes.uses_dir(int(pid), path)
    ]


# -- scripts/services -------------------------------------------------------------------------------


def test_services_script_finds_both_binaries() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "services"), "where"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"redis-server: {servers.find_redis_server()}" in result.stdout
    assert f"initdb:       {servers.find_postgres_bindir() / 'initdb'}" in result.stdout


# -- Redis ------------------------------------------------------------------------------------------


async def test_redis_answers_set_and_get(fresh_redis: RedisServer) -> None:
    assert fresh_redis.port not in SHARED_PORTS
    assert fresh_redis.url == f"redis://127.0.0.1:{fresh_redis.port}/0"
    client = redis_client(fresh_redis)
    try:
        assert await client.dbsize() == 0  # fresh_redis flushed it
        assert await client.set("greeting", "hello") is True
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()
    assert fresh_redis.command("GET", "greeting") == b"hello"


async def test_redis_stop_refuses_then_starts_empty_on_the_same_port(make_redis_server: MakeRedis) -> None:
    server = make_redis_server()
    port, data_dir = server.port, server.data_dir
    client = redis_client(server)
    try:
        await client.set("k", "v")
        await server.astop()
        assert not server.running
        assert refused(port)
        with pytest.raises(RedisConnectionError):
            await client.ping()

        await server.astart()
        assert (server.port, server.data_dir, server.starts) == (port, data_dir, 2)
        assert await client.ping() is True
        assert await client.get("k") is None  # no persistence: a cache node comes back empty
    finally:
        await client.aclose()


async def test_redis_kill_and_start_again(make_redis_server: MakeRedis) -> None:
    server = make_redis_server()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert state(pid) is None
    assert server.pid is None
    assert refused(server.port)
    server.start()
    assert server.pid not in (None, pid)
    assert server.command("PING") == b"PONG"


async def test_redis_pause_hangs_and_resume_answers(make_redis_server: MakeRedis) -> None:
    server = make_redis_server()
    client = redis_client(server, timeout=0.2)
    try:
        assert await client.ping() is True  # the connection now exists
        server.pause()
        assert server.paused
        assert server.pid is not None
        assert state(server.pid) == "T"
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        server.resume()
        assert not server.paused
        assert state(server.pid) != "T"
        # The client dropped the timed-out connection; a new one is served again.
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_ensure_running_resumes_and_restarts(make_redis_server: MakeRedis) -> None:
    server = make_redis_server()
    server.pause()
    server.ensure_running()
    assert not server.paused
    assert server.command("PING") == b"PONG"
    server.stop()
    server.ensure_running()
    assert server.running
    assert server.starts == 2


# -- PostgreSQL -------------------------------------------------------------------------------------


async def test_postgres_answers_with_asyncpg_and_sqlalchemy(
    postgres_server: PostgresServer, fresh_postgres_db: PostgresDatabase
) -> None:
    port = postgres_server.port
    assert port not in SHARED_PORTS
    assert postgres_server.url == f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    assert postgres_server.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert fresh_postgres_db.dsn == f"postgresql://postgres@127.0.0.1:{port}/{fresh_postgres_db.name}"

    conn = await asyncpg.connect(fresh_postgres_db.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        await conn.executemany("INSERT INTO items VALUES ($1, $2)", [(1, "a"), (2, "b")])
        assert await conn.fetchval("SELECT count(*) FROM items") == 2
    finally:
        await conn.close()

    engine = create_async_engine(fresh_postgres_db.url)
    try:
        async with engine.connect() as sa_conn:
            result = await sa_conn.execute(text("SELECT name FROM items ORDER BY id"))
            assert result.scalars().all() == ["a", "b"]
    finally:
        await engine.dispose()
    # The driver-free helper sees the same data.
    assert postgres_server.execute("SELECT count(*) FROM items", database=fresh_postgres_db.name) == [("2",)]


async def test_postgres_stop_refuses_then_restart_keeps_data(make_postgres_server: MakePostgres) -> None:
    server = make_postgres_server()
    port, data_dir = server.port, server.data_dir
    conn = await asyncpg.connect(server.dsn)
    await conn.execute("CREATE TABLE t (x int)")
    await conn.execute("INSERT INTO t VALUES (1), (2), (3)")

    await server.astop()
    assert not server.running
    assert refused(port)
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(server.dsn, timeout=2)
    assert conn.is_closed() or not await _still_answers(conn)
    conn.terminate()

    await server.astart()
    assert (server.port, server.data_dir, server.starts) == (port, data_dir, 2)
    conn = await asyncpg.connect(server.dsn)
    try:
        assert await conn.fetchval("SELECT sum(x) FROM t") == 6
    finally:
        await conn.close()


async def _still_answers(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return False
    return True


async def test_postgres_kill_then_recovery_keeps_committed_rows(make_postgres_server: MakePostgres) -> None:
    server = make_postgres_server()
    conn = await asyncpg.connect(server.dsn)
    await conn.execute("CREATE TABLE t (x int)")
    await conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    pids = server.pids()
    assert len(pids) > 3  # postmaster, auxiliary processes and our backend

    server.kill()
    assert [pid for pid in pids if state(pid) is not None] == []
    assert refused(server.port)
    conn.terminate()

    server.start()  # crash recovery replays the WAL
    assert server.execute("SELECT count(*) FROM t") == [("100",)]


async def test_postgres_pause_hangs_and_resume_answers(make_postgres_server: MakePostgres) -> None:
    server = make_postgres_server()
    conn = await asyncpg.connect(server.dsn)
    try:
        server.pause()
        assert {state(pid) for pid in server.pids()} == {"T"}
        with pytest.raises(TimeoutError):
            await asyncpg.connect(server.dsn, timeout=0.3)
        server.resume()
        assert "T" not in {state(pid) for pid in server.pids()}
        assert await conn.fetchval("SELECT 41 + 1") == 42  # the connection made before the pause
        other = await asyncpg.connect(server.dsn, timeout=5)
        await other.close()
    finally:
        await conn.close()


async def test_async_start_and_stop_keep_the_event_loop_running(make_postgres_server: MakePostgres) -> None:
    server = make_postgres_server()
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await server.astop()
    during_stop = ticks - before
    before = ticks
    await server.astart()
    during_start = ticks - before
    running = False
    await task
    assert during_stop > 0
    assert during_start > 0
    assert server.execute("SELECT 1") == [("1",)]


def test_postgres_errors_are_reported(make_postgres_server: MakePostgres) -> None:
    server = make_postgres_server()
    with pytest.raises(servers.PostgresError, match="42P01"):
        server.execute("SELECT * FROM no_such_table")
    database = server.create_database("made_here")
    assert server.execute("SELECT current_database()", database="made_here") == [("made_here",)]
    server.drop_database(database.name)
    assert server.execute("SELECT count(*) FROM pg_database WHERE datname = 'made_here'") == [("0",)]


def test_scratch_and_durable_postgres(make_postgres_server: MakePostgres) -> None:
    scratch = make_postgres_server()
    assert scratch.execute("SHOW fsync") == [("off",)]
    durable = make_postgres_server(durable=True)
    assert durable.execute("SHOW fsync") == [("on",)]
    if os.path.isdir("/dev/shm") and "BROWNOUT_SERVERS_TMPDIR" not in os.environ:
        assert scratch.base_dir.parent == Path("/dev/shm")  # memory-backed
        assert durable.base_dir.parent != Path("/dev/shm")  # on a real disk


# -- Leaving nothing behind -------------------------------------------------------------------------


def test_cleanup_stops_every_process_and_removes_the_directory() -> None:
    redis_server = RedisServer()
    postgres_server = PostgresServer()
    with redis_server, postgres_server:
        bases = [redis_server.base_dir, postgres_server.base_dir]
        pids = redis_server.pids() + postgres_server.pids()
        assert all(base.is_dir() for base in bases)
        assert len(pids) > 4
    assert [pid for pid in pids if state(pid) is not None] == []
    assert [base for base in bases if base.exists()] == []
    assert [pid for base in bases for pid in processes_using(base)] == []
    assert redis_server not in servers_base._LIVE
    redis_server.cleanup()  # idempotent


_CHILD_SCRIPT = """
import json, os, sys
from brownout.chaos.servers import PostgresServer, RedisServer, postgres
r = RedisServer(); r.start()
p = PostgresServer(); p.start()
templates = [str(t) for t in postgres._PG_TEMPLATES.values()]
bases = [str(r.base_dir), str(p.base_dir)]
print(json.dumps({"bases": bases, "pids": r.pids() + p.pids(), "templates": templates}))
sys.stdout.flush()
if sys.argv[1] == "crash":
    os._exit(0)  # no atexit: the servers are orphaned
"""


def _run_child(mode: str) -> dict[str, list[str] | list[int]]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, mode], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    info: dict[str, list[str] | list[int]] = json.loads(result.stdout)
    return info


def test_interpreter_exit_stops_the_servers_it_forgot() -> None:
    info = _run_child("exit")
    assert [pid for pid in info["pids"] if state(int(pid)) is not None] == []
    leftovers = [path for path in [*info["bases"], *info["templates"]] if Path(str(path)).exists()]
    assert leftovers == []


def test_reap_orphans_cleans_up_after_a_crashed_owner() -> None:
    info = _run_child("crash")
    bases = [Path(str(base)) for base in [*info["bases"], *info["templates"]]]
    redis_pid = int(info["pids"][0])
    assert state(redis_pid) is not None  # orphaned, still running
    assert all(base.is_dir() for base in bases)

    removed = reap_orphans()
    assert set(map(str, bases)) <= set(removed)
    assert [pid for pid in info["pids"] if state(int(pid)) is not None] == []
    assert [base for base in bases if base.exists()] == []


def test_reap_orphans_spares_live_owners(make_redis_server: MakeRedis) -> None:
    server = make_redis_server()
    assert str(server.base_dir) not in reap_orphans()
    assert server.command("PING") == b"PONG"


# -- Errors -----------------------------------------------------------------------------------------


def test_missing_binaries_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("BROWNOUT_REDIS_SERVER", raising=False)
    monkeypatch.delenv("BROWNOUT_PG_BINDIR", raising=False)
    monkeypatch.setattr(binaries, "_REDIS_FALLBACK_DIRS", ())
    monkeypatch.setattr(binaries, "_PG_LIB_ROOT", str(tmp_path / "postgresql"))
    with pytest.raises(ServerBinaryMissing, match=r"redis-server not found.*scripts/services install"):
        RedisServer()
    with pytest.raises(ServerBinaryMissing, match=r"initdb, postgres.*scripts/services install"):
        PostgresServer()


def test_ensure_installed_runs_the_script_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("BROWNOUT_REDIS_SERVER", raising=False)
    monkeypatch.setattr(binaries, "_REDIS_FALLBACK_DIRS", ())
    monkeypatch.setattr(binaries, "_install_ran", False)
    marker = tmp_path / "ran"
    script = tmp_path / "services"
    script.write_text(f'#!/bin/sh\necho "$1" >> {marker}\n')
    script.chmod(0o755)
    with pytest.raises(ServerBinaryMissing, match="redis-server not found"):
        servers.ensure_installed(script)
    with pytest.raises(ServerBinaryMissing, match="redis-server not found"):
        servers.ensure_installed(script)
    assert marker.read_text() == "install\n"  # run once, with "install"


def test_a_taken_port_fails_with_the_log() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = RedisServer(port=port)
        try:
            with pytest.raises(
                ServerStartError, match=rf"(?s)redis on port {port} exited.*(?i:address already in use)"
            ):
                server.start()
            assert not server.running
        finally:
            server.cleanup()
