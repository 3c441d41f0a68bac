"""The brief store: every served brief and its request, through SQLAlchemy 2 async.

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) when the URL says so. Writes are idempotent by
``request_id``: writing the same request twice stores it once, so a write can always be retried safely
(the spool relies on it).

**Schema.** :meth:`BriefStore.init` creates the tables or migrates them: a ``brownout_schema`` table
records the version, and the steps of :data:`MIGRATIONS` above it run once, in order, in one transaction
(on PostgreSQL under an advisory lock, so replicas starting together migrate once).

**Failover** (no acknowledged write is lost). Give several hosts -- a list of URLs, or one multi-host
URL ``postgresql+asyncpg://user@primary:5432,backup:5432/db`` -- and the store writes to the first host
that accepts writes (not in recovery, not read-only). When a write fails because the host went away, the
next write first looks again, in order, for a writable host. While no host is writable, writes raise
:class:`ReadOnlyDatabase` (the runtime then spools them: read-only mode) and reads use any host that
answers. Looking again is cheap for the caller: at most once per ``recheck_interval`` seconds; between
two looks, writes fail fast with the last error.

**Group commit.** Briefs written at the same moment share one transaction: while one transaction is
being committed, the writes that arrive wait for it to end and then go together, each caller still
answered only once its own row is committed. Under load (hundreds of rule-based answers a second while
the models are saturated) a commit per brief cost more of the server's one event-loop thread than
answering them did; a batch commits as fast as one row. A batch that fails for one row's data is
written again row by row, so one bad row fails alone. On SQLite the database runs in WAL mode (readers
never wait for the writer, and a commit appends to the log instead of rewriting a rollback journal),
still synced on every commit: an acknowledged brief survives a power cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NotRequired, TypedDict

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.durable.spool import default_transient
from brownout.errors import ServiceUnavailable

__all__ = ["MIGRATIONS", "BriefPayload", "BriefRecord", "BriefStore", "ReadOnlyDatabase", "split_hosts"]

_log = logging.getLogger("brownout.store")

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
    # The response cache's key of the request (mode + normalised text, hashed): emergency reads find
    # the last full answer to the same request here when every model is down (schema version 3).
    Column("cache_key", String(48), nullable=True),
)

schema_version = Table("brownout_schema", metadata, Column("version", Integer, nullable=False))


def _v1(conn: Any) -> None:
    briefs.create(conn, checkfirst=True)


def _v2(conn: Any) -> None:
    # Briefs are read back by time (dashboards, drills counting what a run stored).
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_briefs_created_at ON briefs (created_at)"))


def _v3(conn: Any) -> None:
    from sqlalchemy import inspect

    columns = {c["name"] for c in inspect(conn).get_columns("briefs")}
    if "cache_key" not in columns:
        conn.execute(text("ALTER TABLE briefs ADD COLUMN cache_key VARCHAR(48)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_briefs_cache_key ON briefs (cache_key, created_at)"))


MIGRATIONS: Final = ((1, _v1), (2, _v2), (3, _v3))
"""The schema's steps, oldest first: (version, a function run with a sync connection in a transaction).
A database created before versions were recorded (it has ``briefs`` but no ``brownout_schema``) counts
as version 1."""


class ReadOnlyDatabase(ServiceUnavailable):
    """No configured database host accepts writes now (all down, or only a read-only standby answers)."""


class BriefPayload(TypedDict):
    """A served brief as it is written: to the database, to the spool (as JSON), to the event outbox.

    A plain dict at run time (the spool stores it as JSON and hands it back decoded); the types say
    what :meth:`BriefRecord.from_payload` may read.
    """

    request_id: str
    text: str
    requested_mode: str
    served_mode: str
    degraded: bool
    response: dict[str, Any]
    """The whole answer, as sent."""
    created_at: str
    """When it was served, ISO 8601 with its UTC offset."""
    cache_key: NotRequired[str | None]
    """The request's cache key; absent from writes spooled by an earlier version."""


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
    cache_key: str | None = None

    @classmethod
    def from_payload(cls, payload: BriefPayload) -> BriefRecord:
        """The record of a written or spooled brief (``BriefRecords.record``'s payload)."""
        return cls(
            request_id=payload["request_id"],
            text=payload["text"],
            requested_mode=payload["requested_mode"],
            served_mode=payload["served_mode"],
            degraded=payload["degraded"],
            response=payload["response"],
            created_at=datetime.fromisoformat(payload["created_at"]),
            cache_key=payload.get("cache_key"),  # absent from writes spooled by an earlier version
        )


_MULTI_HOST = re.compile(r"^(?P<scheme>[^:/]+://)(?:(?P<auth>[^@/]*)@)?(?P<hosts>[^/?#]*)(?P<rest>.*)$")


def split_hosts(url: str) -> list[str]:
    """One URL per host of a multi-host URL (``scheme://user@h1:5432,h2:5433/db`` -> two URLs).

    A URL with one host comes back as it is. Raises ValueError for an empty host in the list.
    """
    m = _MULTI_HOST.match(url)
    if m is None or "," not in m["hosts"]:
        return [url]
    hosts = m["hosts"].split(",")
    if any(not h.strip() for h in hosts):
        raise ValueError(f"empty host in multi-host database URL {_redact(url)}")
    auth = f"{m['auth']}@" if m["auth"] is not None else ""
    return [f"{m['scheme']}{auth}{h.strip()}{m['rest']}" for h in hosts]


def _redact(url: str) -> str:
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


class BriefStore:
    """Stores :class:`BriefRecord` rows; see the module docstring for schema, failover and group commit.

    ``url`` is one SQLAlchemy async URL (possibly multi-host) or a list of them, primary first.
    ``connect_timeout`` bounds one connection attempt; ``recheck_interval`` is the least time between
    two searches for a writable host.
    """

    GROUP_COMMIT_MAX: Final = 500
    """The most briefs one group commit writes in a transaction (more wait for the next)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        connect_timeout: float = 5.0,
        recheck_interval: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("BriefStore needs at least one database URL")
        self.urls = [u for item in urls for u in split_hosts(item)]
        self.url = self.urls[0]
        self._clock = clock
        self.connect_timeout = connect_timeout
        self.recheck_interval = recheck_interval
        self._engines: list[AsyncEngine] = [self._engine_for(u) for u in self.urls]
        self._dialect = self._engines[0].dialect.name
        if self._dialect != "postgresql" and len(self.urls) > 1:
            raise ValueError("several database hosts (failover) need PostgreSQL URLs")
        self._writer: int | None = 0  # index of the host writes go to; None: none known writable
        # Look (again) for the writable host before the next write: at start, and after it failed.
        self._stale = True
        self._last_search = float("-inf")
        self._last_error: str | None = None
        self._search_lock = asyncio.Lock()
        self.failovers = 0
        self._queued: list[tuple[BriefRecord, asyncio.Future[bool]]] = []
        self._committer: asyncio.Task[None] | None = None

    def _engine_for(self, url: str) -> AsyncEngine:
        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql+asyncpg") or url.startswith("sqlite"):
            connect_args = {"timeout": self.connect_timeout}
        if not url.startswith("sqlite"):
            return create_async_engine(url, pool_pre_ping=True, connect_args=connect_args)
        # A file on this machine: no server to drop a pooled connection, so no ping before each use
        # (it was a second round trip through the driver's thread for every write).
        engine = create_async_engine(url, connect_args=connect_args)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    # ------------------------------------------------------------------ state

    @property
    def writable_host(self) -> str | None:
        """The host URL (password hidden) writes go to now, or None in read-only mode."""
        return None if self._writer is None else _redact(self.urls[self._writer])

    @property
    def read_only(self) -> bool:
        """True while no host is known to accept writes."""
        return self._writer is None

    @property
    def last_error(self) -> str | None:
        """Why the last search for a writable host failed (None when the writer is fine)."""
        return self._last_error

    # ------------------------------------------------------------------ schema

    async def init(self) -> None:
        """Create or migrate the schema on the writable host (finding it first)."""
        engine = await self._write_engine(look=True)
        async with engine.begin() as conn:
            await conn.run_sync(_migrate)

    async def schema_version(self) -> int:
        """The schema version recorded in the database (0: none)."""
        async with self._read_engine().connect() as conn:
            return int(await conn.run_sync(_current_version))

    @property
    def dialect(self) -> str:
        """The database's SQLAlchemy dialect name: ``sqlite`` or ``postgresql``."""
        return self._dialect

    async def engine(self) -> AsyncEngine:
        """The engine of the host that takes writes now (looked for again after it failed).

        Other tables kept in the same database -- the jobs' (:mod:`brownout.durable.jobs`) -- read and
        write through it, so they share this store's connections and its failover."""
        return await self._write_engine()

    # ------------------------------------------------------------------ writes

    async def save(self, record: BriefRecord) -> bool:
        """Store ``record`` unless its request_id is already there; True when it was new.

        Returns once the row is committed, in a transaction shared with the writes made at the same
        moment (group commit, module docstring); raises what writing it raised."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append((record, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued(), name="brief-store-group-commit")
        return await done

    async def _commit_queued(self) -> None:
        """Commit what :meth:`save` queued, a batch at a time, until nothing waits."""
        try:
            while self._queued:
                size = self.GROUP_COMMIT_MAX
                batch, self._queued = self._queued[:size], self._queued[size:]
                await self._commit_batch(batch)
        finally:
            self._committer = None
            if self._queued:  # cancelled (closing) with writes waiting: they fail, never hang
                queued, self._queued = self._queued, []
                for _, done in queued:
                    if not done.done():
                        done.set_exception(RuntimeError("the brief store closed before this write"))

    async def _commit_batch(self, batch: list[tuple[BriefRecord, asyncio.Future[bool]]]) -> None:
        try:
            new = await self._insert([record for record, _ in batch])
        except Exception as e:
            if len(batch) > 1 and not default_transient(e):
                # Refused for some row's data, not for the database's health: each row alone, so only
                # the bad one fails.
                for one in batch:
                    await self._commit_batch([one])
                return
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        for record, done in batch:
            if not done.done():
                done.set_result(record.request_id in new)
                new.discard(record.request_id)  # the same request twice in a batch is new once

    async def save_many(self, records: Sequence[BriefRecord]) -> int:
        """Store ``records`` in one transaction, skipping request_ids already there; returns how many
        were new. All or nothing: on an error none of them is stored."""
        if not records:
            return 0
        return len(await self._insert(records))

    async def _insert(self, records: Sequence[BriefRecord]) -> set[str]:
        """Insert ``records`` in one transaction, skipping request_ids already there; the new ids."""
        rows = [_row(r) for r in records]
        insert = pg_insert if self._dialect == "postgresql" else sqlite_insert
        engine = await self._write_engine()
        try:
            async with engine.begin() as conn:
                if len(rows) == 1:
                    stmt: Any = (
                        insert(briefs).values(**rows[0]).on_conflict_do_nothing(index_elements=["request_id"])
                    )
                    result = await conn.execute(stmt)
                    return {records[0].request_id} if result.rowcount == 1 else set()
                # One cached statement run with the rows as executemany parameters (SQLAlchemy batches
                # them into multi-row INSERTs itself); RETURNING tells which were new. A .values(rows)
                # statement would be compiled anew for every batch, which cost most of the replay time.
                stmt = (
                    insert(briefs)
                    .on_conflict_do_nothing(index_elements=["request_id"])
                    .returning(briefs.c.request_id)
                )
                return {row[0] for row in (await conn.execute(stmt, rows)).all()}
        except Exception as e:
            self._writer_failed(e)
            raise

    def _writer_failed(self, error: BaseException) -> None:
        if default_transient(error):
            self._stale = True
            self._last_error = f"{type(error).__name__}: {error}"

    async def _write_engine(self, *, look: bool = False) -> AsyncEngine:
        """The writer's engine, searching for it first when it failed (``look``: whatever the interval)."""
        if self._writer is not None and not self._stale:
            return self._engines[self._writer]
        async with self._search_lock:
            if self._writer is not None and not self._stale:
                return self._engines[self._writer]
            now = self._clock.now()
            if not look and now - self._last_search < self.recheck_interval:
                raise ReadOnlyDatabase(
                    f"no writable database host (last error: {self._last_error})",
                    retry_after=self.recheck_interval,
                    policy="store",
                )
            self._last_search = now
            await self._find_writer()
        if self._writer is None:
            raise ReadOnlyDatabase(
                f"no writable database host (last error: {self._last_error})",
                retry_after=self.recheck_interval,
                policy="store",
            )
        return self._engines[self._writer]

    async def _find_writer(self) -> None:
        """Ask each host in order whether it accepts writes; the first that does becomes the writer."""
        previous = self._writer
        errors: list[str] = []
        for i, engine in enumerate(self._engines):
            try:
                async with asyncio.timeout(self.connect_timeout + 1.0):
                    async with engine.connect() as conn:
                        writable = await _accepts_writes(conn, self._dialect)
            except Exception as e:
                errors.append(f"{_redact(self.urls[i])}: {type(e).__name__}: {e}")
                await engine.dispose()  # drop the dead host's pooled connections
                continue
            if writable:
                self._writer, self._stale, self._last_error = i, False, None
                if previous != i:
                    self.failovers += previous is not None or i != 0
                    _log.warning("database writes now go to %s", _redact(self.urls[i]))
                return
            errors.append(f"{_redact(self.urls[i])}: read-only (standby)")
        self._writer = None
        self._stale = False
        self._last_error = "; ".join(errors)
        _log.error("no writable database host: %s", self._last_error)

    # ------------------------------------------------------------------ reads

    def _read_engine(self) -> AsyncEngine:
        return self._engines[self._writer if self._writer is not None else 0]

    async def _read(self, fn: Any) -> Any:
        """Run ``await fn(conn)`` on the writer, or on any host that answers."""
        order = [self._writer] if self._writer is not None else []
        order += [i for i in range(len(self._engines)) if i not in order]
        error: BaseException | None = None
        for i in order:
            try:
                async with self._engines[i].connect() as conn:
                    return await fn(conn)
            except Exception as e:
                error = e
                if len(order) == 1:
                    raise
        assert error is not None
        raise error

    async def get(self, request_id: str) -> BriefRecord | None:
        """The record of ``request_id``, or None."""

        async def query(conn: AsyncConnection) -> Any:
            return (await conn.execute(select(briefs).where(briefs.c.request_id == request_id))).first()

        row = await self._read(query)
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
            cache_key=row.cache_key,
        )

    async def latest_full_answer(self, cache_key: str) -> dict[str, Any] | None:
        """The newest stored full-quality (not degraded) response for ``cache_key``, or None."""

        async def query(conn: AsyncConnection) -> Any:
            stmt = (
                select(briefs.c.response)
                .where(briefs.c.cache_key == cache_key, briefs.c.degraded.is_(False))
                .order_by(briefs.c.created_at.desc())
                .limit(1)
            )
            return (await conn.execute(stmt)).scalar()

        raw = await self._read(query)
        if raw is None:
            return None
        value: dict[str, Any] = json.loads(raw)
        return value

    async def count(self) -> int:
        """How many records are stored."""

        async def query(conn: AsyncConnection) -> int:
            return int((await conn.execute(select(func.count()).select_from(briefs))).scalar_one())

        return int(await self._read(query))

    async def request_ids(self) -> list[str]:
        """Every stored request_id, oldest first (for audits: what was acknowledged is here once)."""

        async def query(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(select(briefs.c.request_id).order_by(briefs.c.created_at))
            return [r[0] for r in rows]

        result: list[str] = await self._read(query)
        return result

    async def ping(self) -> None:
        """Raise unless some host can take writes (finding it again if the last one failed)."""
        engine = await self._write_engine(look=True)  # an explicit check always looks
        try:
            async with engine.connect() as conn:
                if not await _accepts_writes(conn, self._dialect):
                    raise ReadOnlyDatabase(
                        f"{self.writable_host} became read-only", retry_after=1.0, policy="store"
                    )
        except Exception as e:
            self._writer_failed(e)
            if isinstance(e, ReadOnlyDatabase):
                self._stale = True
            raise

    async def aclose(self) -> None:
        """Finish the writes already queued, then close every pooled connection."""
        committer = self._committer
        if committer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(committer)
        for engine in self._engines:
            await engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL for a database file (module docstring), synced on every commit."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _row(record: BriefRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "created_at": record.created_at,
        "text": record.text,
        "requested_mode": record.requested_mode,
        "served_mode": record.served_mode,
        "degraded": record.degraded,
        "response": json.dumps(record.response, separators=(",", ":"), default=str),
        "cache_key": record.cache_key,
    }


async def _accepts_writes(conn: AsyncConnection, dialect: str) -> bool:
    if dialect != "postgresql":
        await conn.execute(text("SELECT 1"))
        return True
    row = (
        await conn.execute(text("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"))
    ).one()
    return not row[0] and row[1] == "off"


def _current_version(conn: Any) -> int:
    from sqlalchemy import inspect

    names = set(inspect(conn).get_table_names())
    if "brownout_schema" not in names:
        return 1 if "briefs" in names else 0
    value = conn.execute(select(func.max(schema_version.c.version))).scalar()
    return int(value or 0)


def _migrate(conn: Any) -> None:
    if conn.dialect.name == "postgresql":
        # Several replicas may start at once: one migrates, the others wait, then find nothing to do.
        conn.execute(text("SELECT pg_advisory_xact_lock(4242424242)"))
    current = _current_version(conn)
    schema_version.create(conn, checkfirst=True)
    for version, step in MIGRATIONS:
        if version > current:
            step(conn)
            _log.info("database schema migrated to version %d", version)
    latest = MIGRATIONS[-1][0]
    if latest > current:
        conn.execute(schema_version.delete())
        conn.execute(schema_version.insert().values(version=latest))
