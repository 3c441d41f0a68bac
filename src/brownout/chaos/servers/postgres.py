"""A private PostgreSQL for tests and drills: scratch or durable, primary or hot standby.

Every server of a process copies one ``initdb`` template (faster than running initdb each time).
:meth:`PostgresServer.execute` runs SQL over just enough of the wire protocol to return its rows as
text, for fixtures and drills that must not depend on a driver.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from brownout.chaos.servers.base import ManagedServer, ServerStartError
from brownout.chaos.servers.binaries import find_postgres_bindir, unprivileged_user
from brownout.chaos.servers.processes import make_private_dir

__all__ = ["PostgresDatabase", "PostgresError", "PostgresServer"]


class PostgresError(RuntimeError):
    """An error response from PostgreSQL to :meth:`PostgresServer.execute`."""


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


def _pg_message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


class _PgConnection:
    """Just enough of the PostgreSQL protocol for readiness probes and simple statements (trust auth)."""

    def __init__(self, host: str, port: int, user: str, database: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
            self.sock.sendall(struct.pack("!ii", len(params) + 8, 196608) + params)
            self._until_ready()
        except BaseException:
            self.sock.close()
            raise

    def _recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise ConnectionError("connection closed by postgres")
            chunks += chunk
        return bytes(chunks)

    def _message(self) -> tuple[bytes, bytes]:
        header = self._recv_exact(5)
        (length,) = struct.unpack("!i", header[1:])
        return header[:1], self._recv_exact(length - 4)

    def _until_ready(self) -> list[tuple[str | None, ...]]:
        rows: list[tuple[str | None, ...]] = []
        error: str | None = None
        while True:
            kind, body = self._message()
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise PostgresError("postgres asked for a password: the test server expects trust auth")
            if kind == b"E":
                fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
                error = f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"
                if _is_fatal(fields):
                    raise PostgresError(error)
            elif kind == b"D":
                (count,) = struct.unpack("!h", body[:2])
                offset = 2
                row: list[str | None] = []
                for _ in range(count):
                    (size,) = struct.unpack("!i", body[offset : offset + 4])
                    offset += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[offset : offset + size].decode())
                        offset += size
                rows.append(tuple(row))
            elif kind == b"Z":
                if error is not None:
                    raise PostgresError(error)
                return rows

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        self.sock.sendall(_pg_message(b"Q", sql.encode() + b"\0"))
        return self._until_ready()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(_pg_message(b"X", b""))
        self.sock.close()


def _is_fatal(fields: Mapping[bytes, str]) -> bool:
    # A FATAL error ends the session (no ReadyForQuery follows): raise at once rather than wait.
    return fields.get(b"S") in ("FATAL", "PANIC") or fields.get(b"V") in ("FATAL", "PANIC")


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
    replication, read-only until :meth:`promote`) -- seed 003's primary/replica pair for failover tests.
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
        try:
            connection = _PgConnection(self.host, self._port, self.user, "postgres", 0.5)
        except (OSError, PostgresError):
            return False  # refused, or "the database system is starting up"
        connection.close()
        return True

    def execute(
        self, sql: str, *, database: str | None = None, timeout: float = 10.0
    ) -> list[tuple[str | None, ...]]:
        """Run SQL (simple protocol, one or more statements) and return the rows as text.

        For fixtures and drills that must not depend on a driver; code under test uses asyncpg.
        """
        connection = _PgConnection(self.host, self._port, self.user, database or self.database, timeout)
        try:
            return connection.query(sql)
        finally:
            connection.close()

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
