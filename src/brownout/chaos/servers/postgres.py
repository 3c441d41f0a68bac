"""A private PostgreSQL for tests and drills: scratch or durable, primary or hot standby.

Every server of a process copies one ``initdb`` template (faster than running initdb each time).
:meth:`PostgresServer.execute` runs a statement through asyncpg and returns its rows in PostgreSQL's
text form, for fixtures and drills that call from synchronous code.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from brownout.chaos.servers.base import ManagedServer, ServerStartError
from brownout.chaos.servers.binaries import find_postgres_bindir, unprivileged_user
from brownout.chaos.servers.processes import make_private_dir

__all__ = ["PostgresDatabase", "PostgresError", "PostgresServer"]

_T = TypeVar("_T")


class PostgresError(RuntimeError):
    """An error response from PostgreSQL to :meth:`PostgresServer.execute` (``"SQLSTATE: message"``)."""


@dataclass(frozen=True, slots=True)
class PostgresDatabase:
    """A database on a :class:`PostgresServer`: its ``name``, SQLAlchemy ``url`` and plain ``dsn``."""

    name: str
    url: str
    dsn: str


# One initdb per (binaries, OS user) and process; every further server copies it (faster than initdb).
_PG_TEMPLATES: dict[tuple[str, str, str, bool], Path] = {}
_PG_TEMPLATE_LOCK = threading.Lock()


def _remove_templates() -> None:
    for template in list(_PG_TEMPLATES.values()):
        shutil.rmtree(template, ignore_errors=True)
    _PG_TEMPLATES.clear()


atexit.register(_remove_templates)


async def _text_rows(
    host: str, port: int, user: str, database: str, sql: str, timeout: float
) -> list[tuple[str | None, ...]]:
    """Run one statement and return its rows, every scalar value in PostgreSQL's text form."""
    try:
        connection = await asyncpg.connect(
            host=host, port=port, user=user, database=database, ssl=False, timeout=timeout
        )
        try:
            statement = await connection.prepare(sql, timeout=timeout)
            columns = {a.type for a in statement.get_attributes() if a.type.kind == "scalar"}
            if columns:
                # Read the columns as text ("t", "2"), as psql shows them, rather than as Python values.
                for column in columns:
                    await connection.set_type_codec(
                        column.name, schema=column.schema, encoder=str, decoder=str, format="text"
                    )
                statement = await connection.prepare(sql, timeout=timeout)
            return [tuple(record) for record in await statement.fetch(timeout=timeout)]
        finally:
            await connection.close(timeout=timeout)
    except asyncpg.PostgresError as error:
        raise PostgresError(f"{error.sqlstate}: {error}") from error


async def _connects(host: str, port: int, user: str, timeout: float) -> bool:
    try:
        connection = await asyncpg.connect(
            host=host, port=port, user=user, database="postgres", ssl=False, timeout=timeout
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False  # refused, or "the database system is starting up"
    await connection.close(timeout=timeout)
    return True


def _blocking(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to its end on an event loop of its own, in a worker thread.

    The callers are synchronous: fixtures, drills' worker threads, and async tests calling the blocking
    API. A thread of its own works from each, and leaves the caller's event loop (if any) alone.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class PostgresServer(ManagedServer):
    """A private PostgreSQL on a free 127.0.0.1 port with its own data directory (trust auth).

    ``url`` is the SQLAlchemy URL ``postgresql+asyncpg://postgres@127.0.0.1:<port>/postgres`` and
    ``dsn`` the plain ``postgresql://...`` one (asyncpg, psql). It listens on 127.0.0.1 only, with its
    unix socket inside its own directory. A restart keeps port and data; after :meth:`kill` the next
    start runs crash recovery, so every committed transaction is still there.

    By default it is a scratch server: its directory is in memory (``/dev/shm``) and it runs with
    ``fsync=off``. A killed *process* still loses nothing committed (the writes are in the kernel's
    memory), only a crash of the whole machine would, which tests never do. ``durable=True`` (for
    benchmarks that must pay for the disk) puts it on disk with ``fsync=on``. ``settings`` adds
    ``-c name=value`` options.

    ``standby_of=primary`` makes a hot standby of a running primary (``pg_basebackup -R``: streaming
    replication, read-only until :meth:`promote`) -- a primary/replica pair for failover tests.
    """

    kind = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint, exit

    def __init__(
        self,
        port: int | None = None,
        *,
        user: str = "postgres",
        database: str = "postgres",
        settings: Mapping[str, str] | None = None,
        durable: bool = False,
        start_timeout: float = 30.0,
        standby_of: PostgresServer | None = None,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`. ``user`` is the superuser's name."""
        self.bindir = find_postgres_bindir()
        super().__init__(port, start_timeout=start_timeout)
        self.user: str = standby_of.user if standby_of is not None else user
        self.database = database
        self.settings = dict(settings or {})
        self.durable = durable
        self.standby_of = standby_of

    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+asyncpg://USER@127.0.0.1:<port>/postgres``."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """Plain DSN: ``postgresql://USER@127.0.0.1:<port>/postgres``."""
        return self.dsn_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy (asyncpg) URL of another database on this server."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self._port}/{database}"

    def dsn_for(self, database: str) -> str:
        """Plain DSN of another database on this server."""
        return f"postgresql://{self.user}@{self.host}:{self._port}/{database}"

    @property
    def socket_dir(self) -> Path:
        """The directory of the unix socket (inside the server's own directory)."""
        return self.base_dir / "sock"

    def _drop_to(self) -> pwd.struct_passwd | None:
        return unprivileged_user() if os.geteuid() == 0 else None

    def _in_memory(self) -> bool:
        return not self.durable  # a durable server is measured on a real disk

    def _as_user(self, command: list[str], log: Path, cwd: Path) -> None:
        drop_to = self._drop_to()
        extra: dict[str, object] = {}
        if drop_to is not None:
            extra = {"user": drop_to.pw_uid, "group": drop_to.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        with open(log, "ab") as out:
            result = subprocess.run(  # type: ignore[call-overload]
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                check=False, **extra,
            )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise ServerStartError(f"{command[0]} failed with exit code {result.returncode}:\n{tail}")

    def _template(self, drop_to: pwd.struct_passwd | None) -> Path:
        key = (str(self.bindir), drop_to.pw_name if drop_to else "", self.user, self._in_memory())
        with _PG_TEMPLATE_LOCK:
            template = _PG_TEMPLATES.get(key)
            if template is not None and (template / "data" / "PG_VERSION").is_file():
                return template
            template = make_private_dir("pgtemplate", drop_to, memory=self._in_memory())
            try:
                self._as_user(
                    [
                        str(self.bindir / "initdb"),
                        "-D", str(template / "data"),
                        "-U", self.user,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-sync",  # a scratch cluster: no need to wait for the disk
                    ],
                    template / "initdb.log",
                    template,
                )  # fmt: skip
            except BaseException:
                shutil.rmtree(template, ignore_errors=True)
                raise
            _PG_TEMPLATES[key] = template
            return template

    def _prepare(self, base: Path) -> None:
        if self.standby_of is not None:
            primary = self.standby_of
            self._as_user(
                [
                    str(self.bindir / "pg_basebackup"),
                    "-h", primary.host, "-p", str(primary.port), "-U", primary.user,
                    "-D", str(base / "data"),
                    "-R",  # write the standby's primary_conninfo and standby.signal
                    "-X", "stream",
                    "-c", "fast",  # checkpoint now, not spread over minutes
                    "--no-sync",
                ],
                base / "server.log",
                base,
            )  # fmt: skip
            self._as_user(["mkdir", "-m", "0700", str(base / "sock")], base / "server.log", base)
            return
        drop_to = self._drop_to()
        template = self._template(drop_to)
        # cp -a as the server's user keeps the owner and the 0700 mode that postgres insists on.
        self._as_user(["cp", "-a", str(template / "data"), str(base / "data")], base / "server.log", base)
        self._as_user(["mkdir", "-m", "0700", str(base / "sock")], base / "server.log", base)

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "logging_collector": "off",
        }
        if not self.durable:
            settings |= {"fsync": "off", "full_page_writes": "off"}
        settings |= self.settings
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self._port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _probe(self) -> bool:
        return _blocking(_connects(self.host, self._port, self.user, 0.5))

    def execute(
        self, sql: str, *, database: str | None = None, timeout: float = 10.0
    ) -> list[tuple[str | None, ...]]:
        """Run one SQL statement on a connection of its own and return the rows, values as text.

        Blocking, for fixtures and drills; it works from any thread, one running an event loop
        included (the loop waits meanwhile). An error from the server raises :class:`PostgresError`.
        """
        database = database or self.database
        return _blocking(_text_rows(self.host, self._port, self.user, database, sql, timeout))

    @property
    def in_recovery(self) -> bool:
        """True while this server is a standby (read-only, replaying its primary's WAL)."""
        return self.execute("SELECT pg_is_in_recovery()")[0][0] == "t"

    def promote(self, timeout: float = 30.0) -> None:
        """Promote a standby to a writable primary and wait until it accepts writes."""
        self.execute("SELECT pg_promote(true, 60)", timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.in_recovery:
            if time.monotonic() > deadline:
                raise ServerStartError(f"standby on port {self.port} was not promoted within {timeout} s")
            time.sleep(0.05)

    def create_database(self, name: str | None = None) -> PostgresDatabase:
        """Create an empty database (a fresh unique name by default) and describe it."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and underscores")
        self.execute(f"CREATE DATABASE {name}")
        return PostgresDatabase(name, self.url_for(name), self.dsn_for(name))

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and underscores")
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
