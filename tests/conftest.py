"""Shared fixtures for the test suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import (
    PostgresDatabase,
    PostgresServer,
    RedisServer,
    ensure_installed,
)
from brownout.config import ROLES
from brownout.events import EventBus
from brownout.testing import FakeClock

# The shared helpers (tests/support/) assert too: rewrite their asserts as pytest does the tests'.
pytest.register_assert_rewrite("support")


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock that moves only when told to."""
    return FakeClock()


@pytest.fixture
def bus() -> EventBus:
    """A private event bus, so tests can assert what a policy emitted."""
    return EventBus()


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeLLM]]:
    """One healthy fault-injecting model server per role of the brief pipeline (``fake.set(...)``)."""
    started: dict[str, FakeLLM] = {}
    try:
        for role in ROLES:
            fake = FakeLLM(model=role)
            await fake.start()
            started[role] = fake
        yield started
    finally:
        await asyncio.gather(*(fake.stop() for fake in started.values()))


# ---- Real Redis and PostgreSQL servers ------------------------------------------------------------
# Private instances on free 127.0.0.1 ports with their own data directories (brownout.chaos.servers):
# the machine's shared servers on 6379/5432 are never used by tests that take a server down. A missing
# binary is installed once with scripts/services install, as CI starts from a clean clone; tests are
# never skipped for it.

S = TypeVar("S", RedisServer, PostgresServer)

_SERVICES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session; stopped and its directory removed at the end.

    Tests may stop, kill or pause it: ``fresh_redis`` brings it back for the next test.
    """
    ensure_installed(_SERVICES_SCRIPT)
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL for the whole session; stopped and its directory removed at the end.

    Tests may stop, kill or pause it: ``fresh_postgres_db`` brings it back for the next test.
    """
    ensure_installed(_SERVICES_SCRIPT)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, running and empty (FLUSHALL) for this test."""
    redis_server.ensure_running()
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture
def fresh_postgres_db(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A new empty database on the session's PostgreSQL (``.name``, ``.url``, ``.dsn``), dropped after."""
    postgres_server.ensure_running()
    database = postgres_server.create_database()
    yield database
    postgres_server.ensure_running()
    postgres_server.drop_database(database.name)


def _private_servers(cls: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """Yield a factory starting private servers of ``cls``; all are stopped and removed afterwards."""
    ensure_installed(_SERVICES_SCRIPT)
    servers: list[S] = []

    def make(**kwargs: Any) -> S:
        server = cls(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Start private Redis servers of this test's own (``make_redis_server(**kwargs)``)."""
    yield from _private_servers(RedisServer)


@pytest.fixture
def make_postgres_server() -> Iterator[Callable[..., PostgresServer]]:
    """Start private PostgreSQL servers of this test's own (``make_postgres_server(**kwargs)``)."""
    yield from _private_servers(PostgresServer)


# A hang's report: shortly before pytest-timeout stops a test, print what its asyncio tasks await.
# (Imported after register_assert_rewrite above, which must see `support` first.)
from support.hangs import HangReporter  # noqa: E402

_HANG_REPORTERS = pytest.StashKey[HangReporter]()


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm a :class:`HangReporter` beside pytest-timeout's own timer (which still runs: no result)."""
    reporter = HangReporter(item.nodeid, float(settings.timeout))
    item.stash[_HANG_REPORTERS] = reporter
    reporter.start()


def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    """Disarm this test's :class:`HangReporter`."""
    reporter = item.stash.get(_HANG_REPORTERS, None)
    if reporter is not None:
        reporter.cancel()
