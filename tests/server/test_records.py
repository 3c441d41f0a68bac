"""Served briefs made durable before they are acknowledged (brownout.server.records): the database
first, the local spool when it fails, and the watch that brings spooled briefs home.

A real SQLite database where it stays up; the session's private PostgreSQL where it goes down and
comes back (the watch then runs on the real clock, every 50 ms); a closed port where it is never
there. Elsewhere the clock is a FakeClock that never moves, so the watch stays asleep.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from brownout.chaos.servers import PostgresDatabase, PostgresServer
from brownout.config import DatabaseSection
from brownout.errors import ServiceUnavailable
from brownout.server.records import BriefRecords
from brownout.testing import FakeClock
from support.net import free_port
from support.wait import until


def answer(request_id: str) -> dict[str, Any]:
    """The parts of a served brief's response that a record keeps."""
    return {
        "request_id": request_id,
        "requested_mode": "balanced",
        "served_mode": "fast",
        "degraded": True,
        "brief": {"style": "fresh"},
    }


class Outbox:
    """Stands in for the event outbox: keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def section(tmp_path: Path, url: str, check_interval: float = 2.0) -> DatabaseSection:
    return DatabaseSection(
        url=url, spool_path=tmp_path / "spool.db", check_interval=check_interval, connect_timeout=2.0
    )


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


async def test_a_brief_goes_to_the_database_and_its_event_out(tmp_path: Path, outbox: Outbox) -> None:
    records = BriefRecords(
        section(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'briefs.db'}"), outbox=outbox, clock=FakeClock()
    )  # type: ignore[arg-type]
    await records.open()
    try:
        assert (records.ok, records.error) == (True, None)
        await records.record("  lemon and sea  ", answer("r1"))
        assert await records.store.request_ids() == ["r1"]
        assert records.spool.pending == 0
        assert outbox.events == [
            (
                "brief_created",
                {"request_id": "r1", "requested_mode": "balanced", "served_mode": "fast", "degraded": True},
            )
        ]
    finally:
        await records.aclose()
    await records.aclose()  # twice is harmless


async def test_a_database_down_at_start_spools_and_the_watch_brings_the_briefs_home(
    tmp_path: Path,
    outbox: Outbox,
    postgres_server: PostgresServer,
    fresh_postgres_db: PostgresDatabase,
) -> None:
    await asyncio.to_thread(postgres_server.stop)
    records = BriefRecords(section(tmp_path, fresh_postgres_db.url, check_interval=0.05), outbox=outbox)  # type: ignore[arg-type]
    await records.open()
    try:
        assert records.ok is False
        assert records.error  # the driver's error class and short message
        await records.record("iris and suede", answer("r1"))
        await records.record("neroli at dawn", answer("r2"))
        assert records.spool.pending == 2
        # Spooled briefs are acknowledged: their events go out as for stored ones.
        assert [data["request_id"] for _, data in outbox.events] == ["r1", "r2"]

        await asyncio.to_thread(postgres_server.start)  # the watch creates the schema, wakes the replayer
        await until(lambda: records.ok and records.spool.pending == 0, "the spooled briefs to be stored")
        assert sorted(await records.store.request_ids()) == ["r1", "r2"]
        assert records.error is None
        # With nothing spooled, a new brief goes straight to the database again.
        await records.record("fig and tea", answer("r3"))
        assert records.spool.pending == 0
        assert sorted(await records.store.request_ids()) == ["r1", "r2", "r3"]
    finally:
        await records.aclose()


async def test_nothing_is_acknowledged_when_neither_the_database_nor_the_spool_takes_it(
    tmp_path: Path,
) -> None:
    nowhere = f"postgresql+asyncpg://brownout@127.0.0.1:{free_port()}/briefs"  # nothing listens there
    records = BriefRecords(section(tmp_path, nowhere), clock=FakeClock())
    await records.open()
    try:
        await records.spool.aclose()  # the spool can no longer write either
        with pytest.raises(ServiceUnavailable, match="could not be stored") as caught:
            await records.record("amber", answer("r1"))
        assert caught.value.retry_after == 30.0
    finally:
        await records.aclose()
