"""A durable local write spool: writes that cannot reach the database now are kept on disk, not lost.

Pending database writes kept in a Python list, dropped when their flush fails, are lost on a crash or a
second failure -- after the request was acknowledged. :class:`Spool` instead appends each write to its
own SQLite file and returns only once the transaction is committed with ``PRAGMA synchronous=FULL`` --
the write is on disk before the request is acknowledged. When the database is back, :meth:`Spool.replay`
hands the entries to a *sink* (for briefs, :meth:`brownout.durable.store.BriefStore.save`), oldest first
and strictly in order, and deletes each entry only after its sink call succeeded::

    spool = Spool(Path("var/spool.db"), name="briefs")
    try:
        await store.save(record)
    except Exception:
        await spool.append(record.request_id, "brief", payload)   # durable when this returns

    replayer = SpoolReplayer(spool, sink)   # retries every interval, backing off while the sink fails
    replayer.start()
    ...
    replayer.wake()                          # the database is known to be back: try now

Guarantees and their reasons:

* **Nothing acknowledged is lost.** :meth:`~Spool.append` returns after the commit; entries survive a
  crash or restart (a new :class:`Spool` on the same path sees them).
* **Nothing is written twice.** Entries carry an idempotency key (the request id). A duplicate key is
  not spooled again, and the sink must be idempotent by key, which covers the one unavoidable window:
  a crash between the sink's success and the entry's delete replays that entry once more.
* **Order.** Replay stops at the first failing entry and keeps it at the head (recording ``attempts``
  and ``last_error`` on it); nothing newer overtakes it. A caller that wants its writes in order overall
  must also spool new writes while entries are pending, instead of writing them straight through.
* **Back-pressure.** At ``max_pending`` entries, :meth:`~Spool.append` raises
  :class:`~brownout.errors.Overloaded` (reason ``"spool_full"``) instead of growing without bound.
* **No poison entry blocks the rest, and none is dropped.** An entry the sink refuses ``max_attempts``
  times for a reason that is not an outage (``transient(error)`` is false) moves to the file's
  ``dead_letters`` table, where it stays until an operator looks at it (:meth:`~Spool.dead_letters`)
  and sends it back (:meth:`~Spool.requeue_dead`). An entry refused for its *data*
  (``data_fault(error)``: a NUL or an untranslatable character, a constraint violation) moves there
  on the first refusal: no retry can succeed, and retrying it would hold every healthy entry behind it.
  Outage errors (connection refused, timeouts, a read-only database) never count toward that limit:
  a long outage must not dead-letter everything.

Replay is fastest with a *batch sink* (``batch_sink=``), which takes up to ``batch`` entries in one call
(one database transaction). When a batch fails, its entries are tried one at a time, so the entry at
fault is found and the others still go through in order.

Every SQLite call runs on one worker thread owned by the spool, never on the event loop. Concurrent
appends are *group-committed*: those that arrive while a commit is in progress share the next
transaction and its one fsync, so a thousand concurrent writes cost a handful of fsyncs, each still
durable before its caller returns. One :class:`Spool` (one process) owns a file at a time; other
connections may read it.

**The spool knows what it promised.** A crash can leave a damaged file behind -- a truncated
write-ahead log, a main file cut short or overwritten -- and SQLite then opens what is left without a
word: acknowledged entries would be gone and the spool would say it holds nothing. So every append
is also recorded in a *ledger* beside the file (``<spool>.ledger``, its own SQLite file, committed with
``synchronous=FULL`` in the same group commit, after the spool's own commit and before ``append``
returns). An entry leaves the ledger only *before* it leaves the spool after a successful replay, so a
crash between the two only replays the entry again (sinks are idempotent), never reports a false loss;
dead letters stay in the ledger, since they are still kept. On open, ledger entries whose key is in
neither the entries nor the dead letters are **lost**: they are logged as an error (file, count, keys),
recorded in the ledger's ``lost`` table with when and where they were found missing, dropped from the
promised set, and shown by :attr:`Spool.lost` and ``stats().lost`` until an operator calls
:meth:`Spool.clear_lost`. Entries are matched by key, not sequence number: a damaged file can hand out
an old sequence number again, a key names the write itself. A spool file SQLite cannot read at all ("file
is not a database", "malformed") does not stop the owner: it is renamed aside (``.unreadable-<time>``,
kept for forensics), a fresh spool is started, and every promised entry is reported lost.

**One owner per file.** The spool holds an exclusive, non-blocking ``flock`` on ``<spool>.lock`` for as
long as it is open; a second :class:`Spool` on the same file -- in another process or this one -- gets
:class:`SpoolInUse` at once, naming the file and the owner's process id.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar, TypeVarTuple

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import BrownoutError, ConfigError, Overloaded, Rejected
from brownout.events import (
    DEFAULT_BUS,
    CallRejected,
    EventBus,
    SpoolAppended,
    SpoolDeadLettered,
    SpoolReplayed,
)
from brownout.policies.retry import capped_exponential

__all__ = [
    "BatchSink",
    "DeadLetter",
    "LostEntry",
    "ReplayResult",
    "Sink",
    "Spool",
    "SpoolEntry",
    "SpoolInUse",
    "SpoolReplayer",
    "SpoolStats",
    "default_data_fault",
    "default_transient",
    "error_summary",
]

_log = logging.getLogger("brownout.spool")

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

Sink = Callable[[str, str, dict[str, Any]], Awaitable[object]]
"""Where replayed entries go: ``await sink(key, kind, payload)``; must be idempotent by ``key``."""

BatchSink = Callable[[list[tuple[str, str, dict[str, Any]]]], Awaitable[object]]
"""A sink for several entries at once: ``await sink([(key, kind, payload), ...])``, all or nothing,
idempotent by key (one database transaction, say)."""

_TRANSIENT_NAMES: Final = frozenset(
    {
        # redis-py
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
        "ReadOnlyError",
        "MasterDownError",
        # SQLAlchemy wrappers of driver errors that mean "the database is not reachable now"
        "OperationalError",
        "InterfaceError",
        "DisconnectionError",
        # asyncpg
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "ConnectionFailureError",
        "ReadOnlySQLTransactionError",
        "AdminShutdownError",
        "TooManyConnectionsError",
        "ConnectionRejectionError",
        # ours: the store refuses writes while only a read-only host is reachable
        "ReadOnlyDatabase",
    }
)


def default_transient(error: BaseException) -> bool:
    """True when ``error`` looks like an outage (retry later) rather than a refusal of the entry.

    Looks at the error, its causes and a wrapped driver error (SQLAlchemy's ``orig``), by type name, so
    the spool needs neither redis-py nor SQLAlchemy to classify their errors.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError | TimeoutError | ConnectionError | Rejected):
            return True
        if getattr(e, "connection_invalidated", False):
            return True
        if any(t.__name__ in _TRANSIENT_NAMES for t in type(e).__mro__):
            return True
        orig = getattr(e, "orig", None)
        todo.extend([e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None])
    return False


_DATA_FAULT_NAMES: Final = frozenset(
    {
        # DB-API (sqlite3, psycopg) and SQLAlchemy's wrappers of them: the statement was refused for
        # the values it carried, which no retry changes
        "DataError",
        "IntegrityError",
        # asyncpg: SQLSTATE classes 22 (data exception: NUL or an untranslatable character, a value
        # too long or out of range) and 23 (constraint violation)
        "IntegrityConstraintViolationError",
        "CharacterNotInRepertoireError",
        "UntranslatableCharacterError",
        "StringDataRightTruncationError",
        "NumericValueOutOfRangeError",
        # Python: a payload that cannot be encoded or does not have the record's shape
        "UnicodeError",
        "ValidationError",
    }
)


def default_data_fault(error: BaseException) -> bool:
    """True when the sink refused ``error``'s entry for its *data* (a NUL the database cannot hold, a
    constraint it breaks): retrying cannot help, so the spool moves it to the dead letters at once
    rather than retrying it, ``max_attempts`` times, ahead of the healthy entries queued behind it.

    An outage (:func:`default_transient`) is never a data fault, whatever else the error chain holds.
    Looks at the error, its causes and a wrapped driver error by type name, like :func:`default_transient`.
    """
    if default_transient(error):
        return False
    return any(any(t.__name__ in _DATA_FAULT_NAMES for t in type(e).__mro__) for e in _chain(error))


def _chain(error: BaseException) -> list[BaseException]:
    """``error``, its causes and contexts, and wrapped driver errors (SQLAlchemy's ``orig``), once each."""
    out: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        orig = getattr(e, "orig", None)
        todo.extend([e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None])
    return out


_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'|\([^()]*\)=\([^()]*\)")


def error_summary(error: BaseException, limit: int = 200) -> str:
    """A short, safe description of a storage error for logs, ``/health`` and the spool's records:
    the driver's error class and the first line of its message, without the SQL statement, its
    parameters, or quoted values (which may be a customer's text)."""
    chain = _chain(error)
    # The innermost driver error says what went wrong; SQLAlchemy's wrapper adds SQL and parameters.
    inner = next((e for e in reversed(chain) if str(e).strip()), error)
    message = str(inner).split("[SQL:", 1)[0].strip()
    message = message.splitlines()[0].strip() if message else ""
    # SQLAlchemy's "(driver.ErrorClass) message" prefix names the class again.
    message = re.sub(r"^\([\w.<>: ]+\)\s*", "", message)
    message = _QUOTED.sub("...", message)
    text = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spool (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE,
    kind       TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    refusals   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq        INTEGER PRIMARY KEY,
    key        TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    dead_at    REAL    NOT NULL
);
"""
_DEAD_KEY_INDEX: Final = "CREATE INDEX IF NOT EXISTS dead_letters_key ON dead_letters (key)"
# A key may be dead more than once: a write refused for its data, then a new write under the same key
# (append takes it: the key is no longer pending) refused too. Both are acknowledged writes an operator
# must see, so dead letters are unique by seq only; files written before this had ``key UNIQUE`` there
# and are rebuilt at open (:func:`_dead_keys_not_unique`).
# ``attempts`` counts every failed try (shown to operators); ``refusals`` only the tries the sink
# refused for a reason that is not an outage, which is what ``max_attempts`` limits.
# AUTOINCREMENT (not plain rowid) so a seq is never reused after the newest entry is deleted: order is
# the order of appends over the file's whole life, across restarts.

_LEDGER_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS promised (
    key           TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL,
    kind          TEXT    NOT NULL,
    appended_at   REAL    NOT NULL,
    appended_wall REAL    NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lost (
    id            INTEGER PRIMARY KEY,
    key           TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    kind          TEXT    NOT NULL,
    appended_at   REAL    NOT NULL,
    appended_wall REAL    NOT NULL,
    detected_at   REAL    NOT NULL,
    file          TEXT    NOT NULL,
    reason        TEXT    NOT NULL
);
"""
# ``promised``: every acknowledged entry still in the spool file (pending or dead), by key.
# ``lost``: promised entries found missing on open, kept until an operator clears them.
# ``appended_at`` is the spool clock's stamp (as in the spool file); ``appended_wall`` and
# ``detected_at`` are wall-clock Unix times, for the people reading the report.

_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
"""SQLite's "this file is damaged" answers (primary codes); any other error is not the file's fault."""

_LOG_KEYS: Final = 20
"""Lost keys named in one log line (the rest are counted)."""

_NEW: Final = 0
_DUPLICATE: Final = 1
_FULL: Final = 2

_MAX_GROUP: Final = 1000
"""Most appends committed in one transaction (bounds how long the first of them waits)."""

_MIN_RETRY_AFTER: Final = 1.0
"""``retry_after`` of a full spool when no replay attempt is scheduled later than that."""

_MAX_ERROR_CHARS: Final = 500


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of a :class:`Spool` (for ``/health`` and ``/metrics``).

    ``pending`` entries wait for replay; ``oldest_age`` is the clock age in seconds of the oldest of them
    (0 when empty; entries left by an earlier process are aged by this clock, clamped at 0).
    ``appended``, ``duplicates`` and ``rejected`` count :meth:`Spool.append` calls of this instance that
    spooled a write, found its key already spooled, or were refused because the spool was full.
    ``replayed`` counts entries handed to a sink successfully and deleted; ``failed_attempts`` counts
    replay runs stopped by a sink error, and ``last_error`` is the error of the latest run (None once a
    run succeeds). ``alert`` is true above ``alert_pending`` entries (by default, more than 100).
    ``bytes_on_disk`` is the size of the database file with its WAL and shared-memory files.
    ``dead`` entries were refused ``max_attempts`` times and wait in the dead-letter table.
    ``lost`` entries were acknowledged but found missing from the file on open (see :attr:`Spool.lost`).
    """

    pending: int
    oldest_age: float
    appended: int
    duplicates: int
    rejected: int
    replayed: int
    failed_attempts: int
    last_error: str | None
    alert: bool
    bytes_on_disk: int
    dead: int = 0
    lost: int = 0


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one :meth:`Spool.replay` run did.

    ``replayed`` entries reached the sink and were deleted; ``remaining`` are still pending. When a sink
    call failed, ``error`` describes it and ``failed_key`` names the entry, which stays at the head.
    """

    replayed: int
    remaining: int
    error: str | None = None
    failed_key: str | None = None
    dead_lettered: int = 0

    @property
    def ok(self) -> bool:
        """True when no sink call failed."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One pending entry, as stored (see :meth:`Spool.entries`)."""

    seq: int
    key: str
    kind: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry the sink refused ``attempts`` times, moved aside at ``dead_at`` (clock time)."""

    seq: int
    key: str
    kind: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None
    dead_at: float


@dataclass(frozen=True, slots=True)
class LostEntry:
    """An acknowledged entry found missing from the spool file when it was opened.

    ``seq``, ``kind`` and ``appended_at`` (the spool clock's stamp) are as the entry was spooled;
    ``appended_wall`` and ``detected_at`` are wall-clock Unix times. ``file`` is the spool file it was
    missing from -- or, when that file could not be read at all, where the file was moved aside -- and
    ``reason`` says what was wrong with it. The payload is gone with the entry: the ledger records
    only what is needed to say *which* writes were lost.
    """

    key: str
    seq: int
    kind: str
    appended_at: float
    appended_wall: float
    detected_at: float
    file: str
    reason: str


class SpoolInUse(BrownoutError):
    """Another :class:`Spool` (in this or another process) has the file open: one owner per file.

    ``path`` is the spool file, ``owner_pid`` the process holding it when it could be read (else None).
    """

    def __init__(self, path: Path, owner_pid: int | None) -> None:
        owner = f"process {owner_pid}" if owner_pid is not None else "another process"
        super().__init__(f"spool file {path} is already in use by {owner} (one owner per spool file)")
        self.path = path
        self.owner_pid = owner_pid


_Append = tuple[str, str, str, float, asyncio.Future[int]]
_Entry = tuple[int, str, str, dict[str, Any]]


async def _discard(future: asyncio.Future[Any]) -> None:
    """Drop a read-ahead that will not be used (a read of the file: letting it finish is harmless).

    Waits for it without taking its outcome as ours, so a cancellation of the caller still propagates,
    and marks its error (if any) as retrieved."""
    future.cancel()
    await asyncio.wait([future])
    if not future.cancelled():
        future.exception()


class Spool:
    """A durable, ordered, idempotent write spool in one SQLite file; see the module docstring.

    ``max_pending`` bounds the entries held (then :meth:`append` raises
    :class:`~brownout.errors.Overloaded`); above ``alert_pending`` entries :attr:`alert` is true. The
    file is opened on first use (or :meth:`open`), created with its directory when missing.
    """

    __slots__ = (
        "_appended",
        "_bytes",
        "_clock",
        "_closed",
        "_conn",
        "_dead",
        "_duplicates",
        "_events",
        "_executor",
        "_failed",
        "_flusher",
        "_last_error",
        "_ledger",
        "_lock_fd",
        "_lost",
        "_next_replay_at",
        "_nonempty",
        "_oldest",
        "_pending",
        "_queue",
        "_rejected",
        "_replay_lock",
        "_replayed",
        "alert_pending",
        "data_fault",
        "max_attempts",
        "max_pending",
        "name",
        "path",
        "transient",
    )

    def __init__(
        self,
        path: Path | str,
        *,
        name: str = "spool",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        max_pending: int = 100_000,
        alert_pending: int = 100,
        max_attempts: int | None = 10,
        transient: Callable[[BaseException], bool] = default_transient,
        data_fault: Callable[[BaseException], bool] = default_data_fault,
    ) -> None:
        if max_pending < 1:
            raise ConfigError("max_pending", f"must be at least 1, got {max_pending}")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError("max_attempts", f"must be at least 1 (or None: never), got {max_attempts}")
        if alert_pending < 0:
            raise ConfigError("alert_pending", f"must not be negative, got {alert_pending}")
        self.path = Path(path)
        self.name = name
        self.max_pending = max_pending
        self.alert_pending = alert_pending
        self.max_attempts = max_attempts
        self.transient = transient
        self.data_fault = data_fault
        self._clock = clock
        self._events = events
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only on the worker thread
        self._ledger: sqlite3.Connection | None = None  # likewise
        self._lock_fd: int | None = None  # the owner lock, held from open to close
        # Lost entries not cleared yet (replaced whole by the worker thread, so reads are consistent).
        self._lost: tuple[LostEntry, ...] = ()
        self._queue: list[_Append] = []
        self._flusher: asyncio.Task[None] | None = None
        self._replay_lock = asyncio.Lock()
        self._nonempty = asyncio.Event()  # set while entries are pending; the replayer waits on it
        # Written by the worker thread after each commit, read by the loop: plain values, so a read is
        # atomic under the GIL and always reflects some committed state.
        self._pending = 0
        self._dead = 0
        self._oldest: float | None = None
        self._bytes = 0
        self._appended = 0
        self._duplicates = 0
        self._rejected = 0
        self._replayed = 0
        self._failed = 0
        self._last_error: str | None = None
        # When the replayer will try next (it sets this), so a full spool can say when to come back.
        self._next_replay_at: float | None = None

    @property
    def clock(self) -> Clock:
        """The clock that stamps entries and ages them."""
        return self._clock

    @property
    def pending(self) -> int:
        """How many entries wait for replay (exact once the file is open)."""
        return self._pending

    @property
    def alert(self) -> bool:
        """True when more than ``alert_pending`` entries are pending."""
        return self._pending > self.alert_pending

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._closed

    @property
    def ledger_path(self) -> Path:
        """The ledger file beside the spool: what was acknowledged, and what was found lost."""
        return self.path.with_name(self.path.name + ".ledger")

    @property
    def lock_path(self) -> Path:
        """The file the owner lock is taken on (it holds the owner's process id)."""
        return self.path.with_name(self.path.name + ".lock")

    @property
    def lost(self) -> tuple[LostEntry, ...]:
        """Acknowledged entries found missing on open, oldest first, until :meth:`clear_lost`.

        Complete once the file is open; they survive restarts (the ledger keeps them).
        """
        return self._lost

    def stats(self) -> SpoolStats:
        """A snapshot of the counters; see :class:`SpoolStats`. Costs no I/O."""
        oldest = self._oldest
        age = 0.0 if oldest is None or self._pending == 0 else max(0.0, self._clock.now() - oldest)
        return SpoolStats(
            pending=self._pending,
            oldest_age=age,
            appended=self._appended,
            duplicates=self._duplicates,
            rejected=self._rejected,
            replayed=self._replayed,
            failed_attempts=self._failed,
            last_error=self._last_error,
            alert=self._pending > self.alert_pending,
            bytes_on_disk=self._bytes,
            dead=self._dead,
            lost=len(self._lost),
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open (or create) the file now and load the pending count; later calls do nothing."""
        self._check_open()
        await self._call(self._db)
        self._sync_nonempty()

    async def aclose(self) -> None:
        """Finish the appends in progress, wait for a running replay, and close the file."""
        if self._closed:
            return
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            await asyncio.wait([flusher])
        async with self._replay_lock:
            executor, self._executor = self._executor, None
            if executor is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, self._close_db)
                finally:
                    executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ append

    async def append(self, key: str, kind: str, payload: Mapping[str, Any]) -> bool:
        """Spool one write durably; True when it was new, False when ``key`` is already pending.

        Returns only after the entry is committed to disk. Raises :class:`~brownout.errors.Overloaded`
        (reason ``"spool_full"``) when ``max_pending`` entries are pending, ``TypeError`` when
        ``payload`` is not JSON-serialisable (nothing is spooled), and the ``sqlite3`` error when the
        file cannot be written (disk full, say) -- in every error case the write was not acknowledged.
        If the caller is cancelled while waiting, the write may still be committed (and later replayed);
        the sink's idempotency makes that harmless.
        """
        self._check_open()
        # Serialise now, in the caller: an unserialisable payload fails here, and later mutations of
        # the caller's dict cannot change what was spooled.
        text = json.dumps(payload, separators=(",", ":"))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.append((key, kind, text, self._clock.now(), future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name=f"brownout-spool-{self.name}-flush")
        code = await future
        if code == _NEW:
            return True
        if code == _DUPLICATE:
            return False
        raise self._full()

    async def _flush(self) -> None:
        """Commit queued appends in groups until the queue is empty (one fsync per group)."""
        try:
            while self._queue:
                group = self._queue[:_MAX_GROUP]
                del self._queue[:_MAX_GROUP]
                rows = [(key, kind, text, at) for key, kind, text, at, _ in group]
                try:
                    codes, before, after = await self._call(self._write, rows)
                except asyncio.CancelledError:
                    for *_, future in group:
                        if not future.done():
                            future.set_exception(RuntimeError(f"spool {self.name!r} writer was cancelled"))
                    raise
                except Exception as e:
                    for *_, future in group:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (*_, future), code in zip(group, codes, strict=True):
                    if code == _NEW:
                        self._appended += 1
                    elif code == _DUPLICATE:
                        self._duplicates += 1
                    if not future.done():
                        future.set_result(code)
                self._sync_nonempty()
                if after > before and self._events.active:
                    self._emit_appended(group, codes, before, after)
        finally:
            self._flusher = None

    def _emit_appended(self, group: list[_Append], codes: list[int], before: int, after: int) -> None:
        # Transitions only: the spool became non-empty, or rose above the alert threshold.
        became_nonempty = before == 0
        crossed_alert = before <= self.alert_pending < after
        if not (became_nonempty or crossed_alert):
            return
        key = next(g[0] for g, c in zip(reversed(group), reversed(codes), strict=True) if c == _NEW)
        self._events.emit(
            SpoolAppended(
                source=self.name,
                at=self._clock.now(),
                key=key,
                pending=after,
                alert=after > self.alert_pending,
            )
        )

    def _full(self) -> Overloaded:
        self._rejected += 1
        now = self._clock.now()
        retry_after = _MIN_RETRY_AFTER
        if self._next_replay_at is not None:
            # Slots free up when a replay succeeds; the next one is not before this.
            retry_after = max(retry_after, self._next_replay_at - now)
        if self._events.active:
            self._events.emit(
                CallRejected(
                    source=self.name, at=now, kind="spool", reason="spool_full", retry_after=retry_after
                )
            )
        return Overloaded(
            self.name, "spool_full", retry_after=retry_after, queue_size=self._pending, in_flight=0
        )

    # ------------------------------------------------------------------ replay

    async def replay(
        self,
        sink: Sink | None = None,
        *,
        batch: int = 100,
        limit: int | None = None,
        batch_sink: BatchSink | None = None,
    ) -> ReplayResult:
        """Hand pending entries to the sink oldest first, deleting them once the sink took them.

        Entries are read ``batch`` at a time. With ``batch_sink`` each batch goes in one call; if that
        call fails, the batch's entries are tried one at a time (through ``sink`` when given) so the
        entry at fault is found. The run ends when the spool is empty, after ``limit`` entries, or at
        the first entry the sink does not take: that entry stays at the head with ``attempts``
        incremented and ``last_error`` recorded, and the error is reported in the result rather than
        raised -- unless the sink has now refused it ``max_attempts`` times for a reason other than an
        outage, in which case it moves to the dead-letter table and the run goes on. Runs are
        serialised: a second concurrent call waits. Entries appended during a run are replayed by it.
        """
        if sink is None and batch_sink is None:
            raise TypeError("replay needs a sink or a batch_sink")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")

        async def one(key: str, kind: str, payload: dict[str, Any]) -> None:
            if sink is not None:
                await sink(key, kind, payload)
            else:
                assert batch_sink is not None
                await batch_sink([(key, kind, payload)])

        self._check_open()
        async with self._replay_lock:
            self._check_open()
            replayed = 0
            dead_lettered = 0
            error: str | None = None
            failed_key: str | None = None
            # The next batch, read and decoded on the spool's thread while the sink writes this one.
            # Used only when this batch went through whole; otherwise the head is read again.
            prefetch: asyncio.Future[list[_Entry]] | None = None
            while limit is None or replayed < limit:
                want = batch if limit is None else min(batch, limit - replayed)
                if prefetch is not None:
                    entries, prefetch = await prefetch, None
                else:
                    entries = await self._call(self._fetch_entries, 0, want)
                if not entries:
                    break
                done: list[int] = []
                # (seq, error, refused for a reason other than an outage, refused for its data)
                failure: tuple[int, str, bool, bool] | None = None
                moved = False
                try:
                    if batch_sink is not None and len(entries) > 1:
                        ahead = batch if limit is None else min(batch, limit - replayed - len(entries))
                        if ahead > 0:
                            prefetch = asyncio.ensure_future(
                                self._call(self._fetch_entries, entries[-1][0], ahead)
                            )
                        try:
                            await batch_sink([(key, kind, payload) for _, key, kind, payload in entries])
                            done = [seq for seq, *_ in entries]
                        except Exception as e:
                            if self.transient(e):
                                # An outage: trying the entries one by one would only fail again.
                                failure = (entries[0][0], _describe(e), False, False)
                                failed_key = entries[0][1]
                    if not done and failure is None:
                        for seq, key, kind, payload in entries:
                            try:
                                await one(key, kind, payload)
                            except Exception as e:
                                transient = self.transient(e)
                                failure = (seq, _describe(e), not transient, self.data_fault(e))
                                failed_key = key
                                break
                            done.append(seq)
                finally:
                    if prefetch is not None and len(done) != len(entries):
                        await _discard(prefetch)
                        prefetch = None
                    # Also on cancellation: what the sink took is deleted, so it is not sent again.
                    if done or failure is not None:
                        moved = await self._call(self._settle, done, failure)
                        self._replayed += len(done)
                        self._sync_nonempty()
                replayed += len(done)
                if moved:
                    assert failure is not None
                    assert failed_key is not None
                    dead_lettered += 1
                    _log.error(
                        "spool %r: entry %r refused %d times, moved to dead letters: %s",
                        self.name,
                        failed_key,
                        self.max_attempts,
                        failure[1],
                    )
                    if self._events.active:
                        self._events.emit(
                            SpoolDeadLettered(
                                self.name, self._clock.now(), failed_key, failure[1], self._dead
                            )
                        )
                    failed_key = None
                    continue
                if failure is not None:
                    error = failure[1]
                    break
            if prefetch is not None:  # the limit was reached with a batch read ahead
                await _discard(prefetch)
            if error is None:
                self._last_error = None
                if self._pending == 0 and replayed:
                    await self._call(self._compact)
            else:
                self._failed += 1
                self._last_error = error
            result = ReplayResult(replayed, self._pending, error, failed_key, dead_lettered)
            if (replayed or error is not None) and self._events.active:
                self._events.emit(
                    SpoolReplayed(
                        source=self.name,
                        at=self._clock.now(),
                        replayed=replayed,
                        remaining=result.remaining,
                        error=error or "",
                    )
                )
            return result

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (entries the sink refused ``max_attempts`` times)."""
        self._check_open()
        rows = await self._call(self._peek_dead, limit)
        return [
            DeadLetter(seq, key, kind, json.loads(text), created, attempts, last_error, dead_at)
            for seq, key, kind, text, created, attempts, last_error, dead_at in rows
        ]

    async def requeue_dead(self, keys: list[str] | None = None) -> int:
        """Move dead letters (those of ``keys``, or all) back to the end of the spool; returns how many.

        For after the cause is fixed (a migration, a bigger column). They get fresh attempt counts and
        are replayed after what is pending now. A key that is pending again meanwhile stays dead, and
        of a key dead twice (two writes under it, both refused) only the older goes back this time.
        """
        self._check_open()
        moved = await self._call(self._requeue, keys)
        self._sync_nonempty()
        return moved

    async def entries(self, limit: int = 100) -> list[SpoolEntry]:
        """The oldest ``limit`` pending entries, for inspection (replay order)."""
        self._check_open()
        rows = await self._call(self._peek, limit)
        return [
            SpoolEntry(seq, key, kind, json.loads(text), created, attempts, last_error)
            for seq, key, kind, text, created, attempts, last_error in rows
        ]

    async def clear_lost(self, keys: list[str] | None = None) -> int:
        """Forget lost entries (those of ``keys``, or all) once they are dealt with; returns how many.

        For after an operator has looked at them (asked the clients to send those writes again, say).
        """
        self._check_open()
        return await self._call(self._clear_lost, keys)

    # ------------------------------------------------------------------ loop-side helpers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"spool {self.name!r} is closed")

    def _sync_nonempty(self) -> None:
        if self._pending:
            self._nonempty.set()
        else:
            self._nonempty.clear()

    async def _call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        # One dedicated thread: SQLite work stays off the event loop, and operations on the file are
        # serialised in submission order without locks.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"brownout-spool-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ worker thread only

    def _db(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim()
        unreadable: str | None = None
        try:
            conn, stored = self._open_file()
        except sqlite3.DatabaseError as e:
            if not _is_damaged(e):
                raise  # locked, I/O error, a directory in the way: not the file's content; retry later
            # The file's content is damaged beyond what SQLite can read: keep it for forensics, start
            # a fresh spool so the service keeps taking writes, and report every promised entry lost.
            aside = _move_aside(self.path, ("", "-wal", "-shm"))
            unreadable = f"{_describe(e)}; moved aside to {aside}"
            _log.error("spool %r: %s could not be read (%s)", self.name, self.path, unreadable)
            conn, stored = self._open_file()
        try:
            self._ledger = self._open_ledger()
            self._reconcile(stored, unreadable)
        except BaseException:
            conn.close()
            self._close_ledger()
            raise
        self._conn = conn
        self._refresh_bytes()
        return conn

    def _open_file(self) -> tuple[sqlite3.Connection, dict[str, tuple[int, str, float]]]:
        """Open the spool file, load the counters; returns it with every stored key (pending or dead)."""
        created = not self.path.exists()
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            # Must precede the first table for the file to be able to give pages back (see _compact).
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit syncs the WAL, so an acknowledged append survives power loss too.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(spool)")}
            if "refusals" not in columns:  # a spool file written before dead letters existed
                conn.execute("ALTER TABLE spool ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0")
            _dead_keys_not_unique(conn)
            if created:
                _fsync_dir(self.path.parent)  # the new file's directory entry must be durable too
            # Reading every key walks the tables' pages: a file damaged where the counts do not look
            # fails here, at open, instead of in the middle of a replay.
            stored: dict[str, tuple[int, str, float]] = {}
            for table in ("dead_letters", "spool"):  # a key pending again wins over its dead letter
                for key, seq, kind, created_at in conn.execute(
                    f"SELECT key, seq, kind, created_at FROM {table}"
                ):
                    stored[key] = (int(seq), str(kind), float(created_at))
            (pending,) = conn.execute("SELECT COUNT(*) FROM spool").fetchone()
            row = conn.execute("SELECT created_at FROM spool ORDER BY seq LIMIT 1").fetchone()
            (dead,) = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        except BaseException:
            conn.close()
            raise
        self._pending = int(pending)
        self._dead = int(dead)
        self._oldest = None if row is None else float(row[0])
        return conn, stored

    def _open_ledger(self) -> sqlite3.Connection:
        path = self.ledger_path
        for attempt in (1, 2):
            created = not path.exists()
            ledger = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            try:
                ledger.execute("PRAGMA journal_mode=WAL")
                # FULL, like the spool: a promise recorded is on disk before append returns, and an
                # entry's removal is on disk before the entry leaves the spool.
                ledger.execute("PRAGMA synchronous=FULL")
                ledger.executescript(_LEDGER_SCHEMA)
                ledger.execute("SELECT COUNT(*) FROM promised").fetchone()
                if created:
                    _fsync_dir(path.parent)
                return ledger
            except sqlite3.DatabaseError as e:
                ledger.close()
                if attempt == 2 or not _is_damaged(e):
                    raise
                # A damaged ledger cannot say what was promised: say so, keep it, and start a new one
                # (the entries the spool still holds are promised again by _reconcile).
                aside = _move_aside(path, ("", "-wal", "-shm"))
                _log.error(
                    "spool %r: ledger %s could not be read (%s); moved aside to %s -- entries lost "
                    "before this start cannot be detected",
                    self.name,
                    path,
                    _describe(e),
                    aside,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _reconcile(self, stored: dict[str, tuple[int, str, float]], unreadable: str | None) -> None:
        """Compare what the ledger says was promised with what the file holds (at open)."""
        ledger = self._ledger
        assert ledger is not None
        promised = ledger.execute(
            "SELECT key, seq, kind, appended_at, appended_wall FROM promised ORDER BY seq"
        ).fetchall()
        missing = [row for row in promised if row[0] not in stored]
        keys = {row[0] for row in promised}
        # Kept by the spool but not in the ledger: a crash between the spool's commit and the ledger's,
        # a crash between an entry's removal from the ledger and from the spool, or a file written
        # before the ledger existed. Promise them now, so a later loss of them is noticed too.
        adopt = [
            (key, seq, kind, at, time.time()) for key, (seq, kind, at) in stored.items() if key not in keys
        ]
        detected = time.time()
        file = str(self.path)
        reason = "missing from the spool file (damaged or truncated after a crash?)"
        if unreadable is not None:
            reason = f"the spool file could not be read: {unreadable}"
        if missing or adopt:
            ledger.execute("BEGIN IMMEDIATE")
            try:
                ledger.executemany(
                    "INSERT INTO lost (key, seq, kind, appended_at, appended_wall, detected_at, file, "
                    "reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row, detected, file, reason) for row in missing],
                )
                # Out of the promised set: the fresh file's sequence numbers and keys start over.
                ledger.executemany("DELETE FROM promised WHERE key = ?", [(row[0],) for row in missing])
                ledger.executemany(
                    "INSERT OR REPLACE INTO promised (key, seq, kind, appended_at, appended_wall) "
                    "VALUES (?, ?, ?, ?, ?)",
                    adopt,
                )
                ledger.execute("COMMIT")
            except BaseException:
                if ledger.in_transaction:
                    ledger.execute("ROLLBACK")
                raise
        earlier = len(self._load_lost()) - len(missing)
        if missing:
            names = ", ".join(row[0] for row in missing[:_LOG_KEYS])
            more = len(missing) - _LOG_KEYS
            _log.error(
                "spool %r: %d acknowledged entr%s LOST from %s (%s): %s%s",
                self.name,
                len(missing),
                "y" if len(missing) == 1 else "ies",
                file,
                reason,
                names,
                f" and {more} more" if more > 0 else "",
            )
        if earlier > 0:
            _log.error(
                "spool %r: %d entries reported lost earlier are not cleared yet (Spool.clear_lost)",
                self.name,
                earlier,
            )

    def _load_lost(self) -> tuple[LostEntry, ...]:
        ledger = self._ledger
        assert ledger is not None
        rows = ledger.execute(
            "SELECT key, seq, kind, appended_at, appended_wall, detected_at, file, reason FROM lost "
            "ORDER BY id"
        ).fetchall()
        self._lost = tuple(LostEntry(*row) for row in rows)
        return self._lost

    def _clear_lost(self, keys: list[str] | None) -> int:
        self._db()
        ledger = self._ledger
        assert ledger is not None
        if keys is None:
            cleared = ledger.execute("DELETE FROM lost").rowcount
        else:
            cleared = sum(
                ledger.execute("DELETE FROM lost WHERE key = ?", (key,)).rowcount for key in set(keys)
            )
        self._load_lost()
        return int(cleared)

    def _claim(self) -> None:
        """Take the owner lock (non-blocking); raises :class:`SpoolInUse` when someone else holds it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner: int | None = int(os.pread(fd, 32, 0).decode().strip())
            except (OSError, ValueError):
                owner = None
            os.close(fd)
            raise SpoolInUse(self.path, owner) from None
        except BaseException:
            os.close(fd)
            raise
        # The lock file is never deleted (deleting it would let two owners lock two different files);
        # it only says who holds it now.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _ledger_write(self, sql: str, rows: list[Any]) -> None:
        """``sql`` for each of ``rows`` in one ledger transaction (one sync)."""
        ledger = self._ledger
        assert ledger is not None
        ledger.execute("BEGIN IMMEDIATE")
        try:
            ledger.executemany(sql, rows)
            ledger.execute("COMMIT")
        except BaseException:
            if ledger.in_transaction:
                ledger.execute("ROLLBACK")
            raise

    def _close_ledger(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger.close()

    def _close_db(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                conn.close()  # the last connection checkpoints and removes the WAL
                self._refresh_bytes()
            self._close_ledger()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # releases the owner lock

    def _write(self, rows: list[tuple[str, str, str, float]]) -> tuple[list[int], int, int]:
        conn = self._db()
        before = pending = self._pending
        first_created: float | None = None
        codes: list[int] = []
        promised: list[tuple[str, int, str, float]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for key, kind, text, created in rows:
                if pending >= self.max_pending:
                    known = conn.execute("SELECT 1 FROM spool WHERE key = ?", (key,)).fetchone()
                    codes.append(_FULL if known is None else _DUPLICATE)
                    continue
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO spool (key, kind, payload, created_at) VALUES (?, ?, ?, ?)",
                    (key, kind, text, created),
                )
                if cursor.rowcount == 1:
                    pending += 1
                    if first_created is None:
                        first_created = created
                    codes.append(_NEW)
                    assert cursor.lastrowid is not None
                    promised.append((key, cursor.lastrowid, kind, created))
                else:
                    codes.append(_DUPLICATE)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if before == 0 and first_created is not None:
            self._oldest = first_created
        self._pending = pending
        if promised:
            # Recorded after the spool's commit: a crash in between leaves an entry the ledger does not
            # know (promised at the next open), never a promise the spool did not keep. If this fails
            # the appends fail too -- not acknowledged, yet spooled and replayed (idempotent by key).
            wall = time.time()
            self._ledger_write(
                "INSERT OR REPLACE INTO promised (key, seq, kind, appended_at, appended_wall) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*row, wall) for row in promised],
            )
        self._refresh_bytes()
        return codes, before, pending

    def _fetch_entries(self, after: int, limit: int) -> list[_Entry]:
        """The oldest ``limit`` entries after seq ``after``, payloads decoded (here, off the loop)."""
        conn = self._db()
        rows = conn.execute(
            "SELECT seq, key, kind, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )
        return [(seq, key, kind, json.loads(text)) for seq, key, kind, text in rows]

    def _peek(self, limit: int) -> list[tuple[int, str, str, str, float, int, str | None]]:
        conn = self._db()
        rows = conn.execute(
            "SELECT seq, key, kind, payload, created_at, attempts, last_error FROM spool "
            "ORDER BY seq LIMIT ?",
            (limit,),
        )
        return rows.fetchall()

    def _settle(self, done: list[int], failure: tuple[int, str, bool, bool] | None) -> bool:
        """Delete what the sink took and record a failure; True when the failed entry went dead."""
        conn = self._db()
        if done:
            # Out of the ledger first, durably: a crash before the spool's delete below then replays
            # these entries once more (the sink is idempotent) instead of reporting them lost.
            # A key also dead from an earlier write stays promised: that dead letter is still kept.
            taken = conn.execute(
                "SELECT key FROM spool WHERE seq BETWEEN ? AND ? AND NOT EXISTS "
                "(SELECT 1 FROM dead_letters WHERE dead_letters.key = spool.key)",
                (done[0], done[-1]),
            ).fetchall()
            self._ledger_write("DELETE FROM promised WHERE key = ?", taken)
        conn.execute("BEGIN IMMEDIATE")
        moved = False
        try:
            deleted = 0
            if done:
                # ``done`` is always the oldest entries fetched, in order, and nothing older than its
                # last one can appear meanwhile (appends get higher seqs): one range delete does.
                deleted = conn.execute(
                    "DELETE FROM spool WHERE seq BETWEEN ? AND ?", (done[0], done[-1])
                ).rowcount
            if failure is not None:
                seq, error, refused, data_fault = failure
                conn.execute(
                    "UPDATE spool SET attempts = attempts + 1, last_error = ?, refusals = refusals + ? "
                    "WHERE seq = ?",
                    (error, int(refused), seq),
                )
                if refused and self.max_attempts is not None:
                    # Refused for its data: no retry can succeed, so it goes now, not after
                    # max_attempts tries that would hold every healthy entry behind it.
                    least = 1 if data_fault else self.max_attempts
                    moved = (
                        conn.execute(
                            "INSERT INTO dead_letters "
                            "(seq, key, kind, payload, created_at, attempts, last_error, dead_at) "
                            "SELECT seq, key, kind, payload, created_at, attempts, last_error, ? "
                            "FROM spool WHERE seq = ? AND refusals >= ?",
                            (self._clock.now(), seq, least),
                        ).rowcount
                        == 1
                    )
                    if moved:
                        deleted += conn.execute("DELETE FROM spool WHERE seq = ?", (seq,)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        row = conn.execute("SELECT created_at FROM spool ORDER BY seq LIMIT 1").fetchone()
        self._oldest = None if row is None else float(row[0])
        self._pending -= deleted
        if moved:
            self._dead += 1
        self._refresh_bytes()
        return moved

    def _peek_dead(self, limit: int) -> list[tuple[int, str, str, str, float, int, str | None, float]]:
        conn = self._db()
        rows = conn.execute(
            "SELECT seq, key, kind, payload, created_at, attempts, last_error, dead_at FROM dead_letters "
            "ORDER BY seq LIMIT ?",
            (limit,),
        )
        return rows.fetchall()

    def _requeue(self, keys: list[str] | None) -> int:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if keys is None:
                rows = conn.execute(
                    "SELECT seq, key, kind, payload, created_at FROM dead_letters ORDER BY seq"
                ).fetchall()
            else:
                rows = [
                    row
                    for key in keys
                    for row in conn.execute(
                        "SELECT seq, key, kind, payload, created_at FROM dead_letters WHERE key = ? "
                        "ORDER BY seq",
                        (key,),
                    ).fetchall()
                ]
            moved = 0
            renumbered: list[tuple[int, str]] = []
            # Oldest first; a key dead twice goes back once (a key is pending at most once) and its
            # later dead letter waits for the next requeue, after the first has been replayed.
            for dead_seq, key, kind, text, created in rows:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO spool (key, kind, payload, created_at) VALUES (?, ?, ?, ?)",
                    (key, kind, text, created),
                )
                if cursor.rowcount == 1:
                    conn.execute("DELETE FROM dead_letters WHERE seq = ?", (dead_seq,))
                    moved += 1
                    assert cursor.lastrowid is not None
                    renumbered.append((cursor.lastrowid, key))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if renumbered:
            # Still promised (the key is what counts); only the sequence number shown changes.
            self._ledger_write("UPDATE promised SET seq = ? WHERE key = ?", renumbered)
        self._pending += moved
        self._dead -= moved
        if moved and self._oldest is None:
            row = conn.execute("SELECT created_at FROM spool ORDER BY seq LIMIT 1").fetchone()
            self._oldest = None if row is None else float(row[0])
        return moved

    def _compact(self) -> None:
        # Drained: give the freed pages back and empty the WAL, so a spool that once held 100k entries
        # does not keep their space (and report it in bytes_on_disk) forever.
        conn = self._db()
        if self._pending == 0:
            conn.executescript("PRAGMA incremental_vacuum;")  # executescript steps it to completion
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._refresh_bytes()

    def _refresh_bytes(self) -> None:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        self._bytes = total


class SpoolReplayer:
    """Replays a :class:`Spool` into ``sink`` in the background while entries are pending.

    Idle while the spool is empty. Once entries appear it waits ``interval`` seconds (the write that
    spooled them has just failed), then replays; while the sink keeps failing it waits
    ``interval * multiplier ** (failures - 1)`` seconds between attempts, at most ``max_interval``, on
    the spool's clock. Entries left by an earlier process are replayed at once on :meth:`start`.
    :meth:`wake` (the database is known to be back) makes it try immediately. A full spool's
    :class:`~brownout.errors.Overloaded` uses the next attempt time as its ``retry_after``.
    """

    __slots__ = (
        "_attempts",
        "_failures",
        "_idle",
        "_next_at",
        "_task",
        "_wake",
        "batch",
        "batch_sink",
        "interval",
        "max_interval",
        "multiplier",
        "sink",
        "spool",
    )

    def __init__(
        self,
        spool: Spool,
        sink: Sink | None = None,
        *,
        batch_sink: BatchSink | None = None,
        interval: float = 1.0,
        max_interval: float = 60.0,
        multiplier: float = 2.0,
        batch: int = 100,
    ) -> None:
        if not interval > 0:
            raise ConfigError("interval", f"must be greater than 0, got {interval}")
        if not max_interval >= interval:
            raise ConfigError("max_interval", f"must be at least interval ({interval}), got {max_interval}")
        if not multiplier >= 1:
            raise ConfigError("multiplier", f"must be at least 1, got {multiplier}")
        if batch < 1:
            raise ConfigError("batch", f"must be at least 1, got {batch}")
        if sink is None and batch_sink is None:
            raise ConfigError("sink", "a SpoolReplayer needs a sink or a batch_sink")
        self.spool = spool
        self.sink = sink
        self.batch_sink = batch_sink
        self.interval = float(interval)
        self.max_interval = float(max_interval)
        self.multiplier = float(multiplier)
        self.batch = batch
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._attempts = 0
        self._failures = 0
        self._next_at: float | None = None
        self._idle = False

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`aclose` (unless the task died)."""
        return self._task is not None and not self._task.done()

    @property
    def attempts(self) -> int:
        """Replay runs started so far."""
        return self._attempts

    @property
    def consecutive_failures(self) -> int:
        """Replay runs in a row that a sink error stopped (0 after a success)."""
        return self._failures

    @property
    def idle(self) -> bool:
        """True while it waits for the spool to get entries (nothing pending, nothing scheduled)."""
        return self._idle

    @property
    def next_attempt_at(self) -> float | None:
        """Clock time of the next scheduled attempt, or None when idle or replaying."""
        return self._next_at

    def start(self) -> None:
        """Start the background task (needs a running loop); a second call does nothing."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"brownout-spool-{self.spool.name}-replayer"
            )

    def wake(self) -> None:
        """Try a replay now instead of waiting for the next scheduled attempt."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop the background task; a replay in progress is cancelled after its current entry."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._next_at = None
        self.spool._next_replay_at = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _backoff(self) -> float:
        return capped_exponential(self.interval, self.multiplier, self._failures - 1, self.max_interval)

    async def _run(self) -> None:
        spool = self.spool
        clock = spool.clock
        opened = False
        delay = 0.0  # entries left by an earlier process are tried at once
        while not spool.closed:
            if opened and spool.pending == 0:
                self._failures = 0
                self._idle = True
                try:
                    woken = await self._wait(None)
                finally:
                    self._idle = False
                if spool.pending == 0:
                    continue
                # Fresh entries mean a write just failed: give the database a moment, unless told
                # it is back.
                delay = 0.0 if woken else self.interval
            if delay > 0:
                self._next_at = spool._next_replay_at = clock.now() + delay
                await self._wait(delay)
                self._next_at = spool._next_replay_at = None
            if spool.closed:
                break
            try:
                if not opened:
                    await spool.open()  # loads the pending count of a spool left by an earlier process
                    opened = True
                    if spool.pending == 0:
                        continue
                self._attempts += 1
                result = await spool.replay(self.sink, batch=self.batch, batch_sink=self.batch_sink)
                failed = not result.ok
                if failed:
                    _log.warning(
                        "spool %r: replay stopped at %r (%d pending): %s",
                        spool.name,
                        result.failed_key,
                        result.remaining,
                        result.error,
                    )
            except Exception:
                if spool.closed:
                    break
                # The spool's own file failed (disk full, I/O error): keep trying on the same schedule.
                _log.exception("spool %r: replay failed", spool.name)
                failed = True
            if failed:
                self._failures += 1
                delay = self._backoff()
            else:
                self._failures = 0
                delay = 0.0
        self._next_at = spool._next_replay_at = None

    async def _wait(self, delay: float | None) -> bool:
        """Wait ``delay`` clock seconds (None: until the spool has entries) or until woken.

        Returns True when :meth:`wake` ended the wait.
        """
        other: Awaitable[object] = (
            self.spool._nonempty.wait() if delay is None else self.spool.clock.sleep(delay)
        )
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(other)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        woken = self._wake.is_set()
        self._wake.clear()
        return woken


def _describe(error: BaseException) -> str:
    # Shown in /health and kept with the entry: never the SQL, its parameters or the entry's text.
    return error_summary(error, _MAX_ERROR_CHARS)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dead_keys_not_unique(conn: sqlite3.Connection) -> None:
    """Rebuild a ``dead_letters`` table whose ``key`` is UNIQUE (files from before a key could be dead
    twice), in one transaction, then make sure the by-key index exists."""
    unique = any(
        row[2] and row[3] == "u" for row in conn.execute("PRAGMA index_list(dead_letters)")
    )  # (seq, name, unique, origin, partial): origin "u" is a UNIQUE column constraint
    if unique:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE dead_letters_rebuilt (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, "
                "kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL, "
                "attempts INTEGER NOT NULL, last_error TEXT, dead_at REAL NOT NULL)"
            )
            conn.execute("INSERT INTO dead_letters_rebuilt SELECT * FROM dead_letters")
            conn.execute("DROP TABLE dead_letters")
            conn.execute("ALTER TABLE dead_letters_rebuilt RENAME TO dead_letters")
            conn.execute(_DEAD_KEY_INDEX)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    else:
        conn.execute(_DEAD_KEY_INDEX)


def _is_damaged(error: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file's content is damaged (not locked, not an I/O or open error)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    # An error raised by the sqlite3 module itself carries no code; its text still says it.
    text = str(error).lower()
    return "not a database" in text or "malformed" in text


def _move_aside(path: Path, suffixes: tuple[str, ...]) -> Path:
    """Rename ``path`` (with its ``suffixes`` files) to ``<name>.unreadable-<UTC time>``; returns it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.unreadable-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.unreadable-{stamp}-{n}")
    for suffix in suffixes:
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    _fsync_dir(path.parent)
    return aside
