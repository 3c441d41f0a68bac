"""The brief store: every served brief and its request, through SQLAlchemy 2 async.

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) when the URL says so. The schema is created at
start. Writes are idempotent by ``request_id``: writing the same request twice stores it once, so a
write can always be retried safely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Boolean, Column, DateTime, MetaData, String, Table, Text, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["BriefRecord", "BriefStore"]

metadata = MetaData()

briefs = Table(
    "briefs",
    metadata,
    Column("request_id", String(64), primary_key=True),  # the idempotency key
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("text", Text, nullable=False),
    Column("requested_mode", String(16), nullable=False),
    Column("served_mode", String(16), nullable=False),
    Column("degraded", Boolean, nullable=False),
    Column("response", Text, nullable=False),
)


@dataclass(frozen=True, slots=True)
class BriefRecord:
    """One served request, as stored."""

    request_id: str
    text: str
    requested_mode: str
    served_mode: str
    degraded: bool
    response: dict[str, Any]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class BriefStore:
    """Stores :class:`BriefRecord` rows; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: AsyncEngine = create_async_engine(url, pool_pre_ping=True)
        self._dialect = self._engine.dialect.name

    async def init(self) -> None:
        """Create the schema if it does not exist."""
        async with self._engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def save(self, record: BriefRecord) -> bool:
        """Store ``record`` unless its request_id is already there; True when it was new."""
        values = {
            "request_id": record.request_id,
            "created_at": record.created_at,
            "text": record.text,
            "requested_mode": record.requested_mode,
            "served_mode": record.served_mode,
            "degraded": record.degraded,
            "response": json.dumps(record.response, separators=(",", ":"), default=str),
        }
        if self._dialect == "postgresql":
            stmt: Any = (
                pg_insert(briefs).values(**values).on_conflict_do_nothing(index_elements=["request_id"])
            )
        else:
            stmt = (
                sqlite_insert(briefs).values(**values).on_conflict_do_nothing(index_elements=["request_id"])
            )
        async with self._engine.begin() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount)

    async def get(self, request_id: str) -> BriefRecord | None:
        """The record of ``request_id``, or None."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(briefs).where(briefs.c.request_id == request_id))).first()
        if row is None:
            return None
        return BriefRecord(
            request_id=row.request_id,
            text=row.text,
            requested_mode=row.requested_mode,
            served_mode=row.served_mode,
            degraded=row.degraded,
            response=json.loads(row.response),
            created_at=row.created_at,
        )

    async def count(self) -> int:
        """How many records are stored."""
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(briefs))).scalar_one())

    async def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()
