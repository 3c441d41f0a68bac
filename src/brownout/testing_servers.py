"""Private Redis and PostgreSQL servers for tests and drills.

Tests that take a server down on purpose must never touch the machine's shared instances (Redis on
6379, PostgreSQL on 5432). These helpers start a private instance instead, on a free port of
127.0.0.1, with its own temporary data directory, as a child process that the caller controls::

    with PostgresServer() as pg:           # initdb + postgres, ready to accept connections
        engine = create_async_engine(pg.url)
        ...
        pg.stop()                          # outage: connections are refused
        pg.start()                         # back on the same port, with the same data
        pg.kill()                          # crash (SIGKILL): recovery runs on the next start
        pg.pause(); pg.resume()            # hang (SIGSTOP/SIGCONT): connections time out
    # stopped, data directory removed

``RedisServer`` does the same for ``redis-server`` (no persistence: a restarted Redis is empty, as a
cache would be). ``start``/``stop`` block for up to a few hundred milliseconds; from a coroutine that
must keep a load running meanwhile, use ``await server.astart()`` / ``await server.astop()``.

Binaries are found on ``PATH`` and in Debian's layout (``/usr/lib/postgresql/<version>/bin``);
``BROWNOUT_REDIS_SERVER`` and ``BROWNOUT_PG_BINDIR`` override the lookup. When one is missing,
starting fails with :class:`ServerBinaryMissing` naming it and the fix (``scripts/services install``);
:func:`ensure_installed` runs that script once.

PostgreSQL refuses to run as root. When the caller is root (as in CI), the servers run as the
unprivileged ``postgres`` system user (``BROWNOUT_PG_OS_USER`` overrides it), which the Debian package
creates, and their directory is owned by it.

Their directories live in ``/dev/shm`` when it has room (``BROWNOUT_SERVERS_TMPDIR`` overrides):
scratch servers need no disk, and copying a cluster on a cold disk can take seconds.

Nothing outlives the process: servers stop and their directories go on :meth:`~RedisServer.cleanup`,
on leaving the ``with`` block, and at interpreter exit. A process killed outright cannot clean up, so
each directory records its owner, and :func:`reap_orphans` (run before the first start in a process)
stops the servers and removes the directories of owners that are gone. Linux only (it reads /proc).
"""

from __future__ import annotations

import asyncio
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
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

__all__ = [
    "INSTALL_HINT",
    "PostgresDatabase",
    "PostgresError",
    "PostgresServer",
    "RedisServer",
    "ServerBinaryMissing",
    "ServerStartError",
    "ensure_installed",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
    "reap_orphans",
]

INSTALL_HINT = "install it with: scripts/services install (Debian packages redis-server and postgresql)"
"""The fix named in every missing-binary error."""

# Ports of the machine's shared services: a private server never takes one, even where they are free.
_SHARED_PORTS = frozenset({4222, 5432, 5672, 6379, 8222, 15672})
# Searched after PATH; tests replace these to simulate a machine without the binaries.
_REDIS_FALLBACK_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/sbin", "/usr/local/bin")
_PG_LIB_ROOT = "/usr/lib/postgresql"
_PREFIX = "brownout-srv-"
_OWNER_FILE = "owner"
_PID_FILE = "server.pid"
_SERVICES_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "services"


class ServerBinaryMissing(RuntimeError):
    """A server binary (``redis-server``, ``postgres``/``initdb``) is not installed."""


class ServerStartError(RuntimeError):
    """A server process did not become ready (it exited, or did not answer in time)."""


class PostgresError(RuntimeError):
    """An error response from PostgreSQL to :meth:`PostgresServer.execute`."""


# --------------------------------------------------------------------------------------------------
# Finding binaries
# --------------------------------------------------------------------------------------------------


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_redis_server() -> str:
    """The path of ``redis-server``; raise :class:`ServerBinaryMissing` if there is none."""
    override = os.environ.get("BROWNOUT_REDIS_SERVER")
    if override:
        if _executable(override):
            return override
        raise ServerBinaryMissing(f"BROWNOUT_REDIS_SERVER={override} is not an executable file")
    found = shutil.which("redis-server")
    if found:
        return found
    for directory in _REDIS_FALLBACK_DIRS:
        candidate = os.path.join(directory, "redis-server")
        if _executable(candidate):
            return candidate
    raise ServerBinaryMissing(
        f"redis-server not found on PATH or in {', '.join(_REDIS_FALLBACK_DIRS)}; {INSTALL_HINT}"
    )


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,): the newest installed major version wins.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``; raise :class:`ServerBinaryMissing` if none."""
    override = os.environ.get("BROWNOUT_PG_BINDIR")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    for name in ("postgres", "initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            # /usr/local/bin/initdb is often a symlink into the versioned directory: use the target's.
            candidates.append(Path(os.path.realpath(found)).parent)
    root = Path(_PG_LIB_ROOT)
    if root.is_dir():
        candidates.extend(sorted(root.glob("*/bin"), key=_version_key, reverse=True))
    for directory in candidates:
        if _executable(directory / "initdb") and _executable(directory / "postgres"):
            return directory
    if override:
        raise ServerBinaryMissing(
            f"BROWNOUT_PG_BINDIR={override} holds no initdb and postgres; {INSTALL_HINT}"
        )
    raise ServerBinaryMissing(
        f"PostgreSQL server (initdb, postgres) not found on PATH or under {root}/*/bin; {INSTALL_HINT}"
    )


_install_lock = threading.Lock()
_install_ran = False


def ensure_installed(script: Path | None = None) -> None:
    """Make sure both servers are installed, running ``scripts/services install`` (once) if not.

    Raises :class:`ServerBinaryMissing` when they are still missing afterwards, or when the script is
    not there (an installed package rather than a checkout).
    """
    global _install_ran
    with _install_lock:
        try:
            find_redis_server()
            find_postgres_bindir()
            if os.geteuid() == 0:
                _unprivileged_user()
            return
        except ServerBinaryMissing as missing:
            if _install_ran:
                raise
            reason = missing
        _install_ran = True
        path = script or _SERVICES_SCRIPT
        if not path.is_file():
            raise ServerBinaryMissing(f"{reason} (and {path} does not exist to install it)")
        print(f"brownout: {reason}; running {path} install", file=sys.stderr)
        result = subprocess.run([str(path), "install"], check=False)
        if result.returncode != 0:
            raise ServerBinaryMissing(f"{path} install failed with exit code {result.returncode} ({reason})")
        find_redis_server()
        find_postgres_bindir()
        if os.geteuid() == 0:
            _unprivileged_user()


# --------------------------------------------------------------------------------------------------
# Ports, processes, users
# --------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (never one of the shared services' ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _SHARED_PORTS:
            return port
    raise RuntimeError("no free port found")  # pragma: no cover - the kernel always offers one


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live process, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    return state, int(fields[1]), int(fields[19])


def _alive(pid: int) -> bool:
    return _proc_stat(pid) is not None


def _children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (PostgreSQL's backends and auxiliary processes)."""
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pid:
                children.append(int(entry))
    return children


def _uses_dir(pid: int, base: Path) -> bool:
    """Whether the process runs inside ``base`` (its working directory) or names it on its command line.

    Both servers rewrite their command line (``redis-server 127.0.0.1:PORT``, ``postgres: checkpointer``)
    but keep working in their directory: the server is started there, and postgres moves to its data dir.
    """
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    if cwd == str(base) or cwd.startswith(f"{base}/"):
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(base) in f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(_alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_stopped(pids: Sequence[int], timeout: float = 5.0) -> None:
    # Signal delivery is asynchronous: wait until each process has really stopped (or is gone).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_proc_stat(pid) for pid in pids]
        if all(state is None or state[0] in ("T", "t") for state in states):
            return
        time.sleep(0.001)


def _freeze(pid: int) -> list[int]:
    """Stop ``pid`` (SIGSTOP) and return its children, once it can fork no more of them."""
    _signal(pid, signal.SIGSTOP)
    _wait_stopped([pid])
    return _children(pid)


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and its children; return them all.

    The children are listed while the parent is frozen: once it dies they belong to init and can no
    longer be found by their parent's pid, and a running parent could fork one more meanwhile.
    """
    victims = [pid, *_freeze(pid)]
    for victim in victims:
        _signal(victim, signal.SIGKILL)
    return victims


def _unprivileged_user() -> pwd.struct_passwd:
    name = os.environ.get("BROWNOUT_PG_OS_USER", "postgres")
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise ServerBinaryMissing(
            f"PostgreSQL refuses to run as root and there is no '{name}' user to run it as; "
            f"{INSTALL_HINT} (the package creates the user), or set BROWNOUT_PG_OS_USER"
        ) from None
    if user.pw_uid == 0:
        raise ServerBinaryMissing(
            f"BROWNOUT_PG_OS_USER={name} is root; PostgreSQL needs an unprivileged user"
        )
    return user


def _traversable_by_all(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


_SHM = "/dev/shm"
_SHM_MIN_FREE = 1 << 30  # leave memory-backed storage alone when it is nearly full


def _temp_roots() -> list[str]:
    """Where server directories may go, preferred first (also where :func:`reap_orphans` looks)."""
    roots = [os.environ.get("BROWNOUT_SERVERS_TMPDIR", ""), _SHM, tempfile.gettempdir(), "/tmp"]
    return list(dict.fromkeys(root for root in roots if root))


def _temp_root(drop_to: pwd.struct_passwd | None, *, memory: bool = True) -> str:
    """The directory to create a server's directory in.

    ``BROWNOUT_SERVERS_TMPDIR`` if set; else memory-backed ``/dev/shm`` when ``memory`` allows it (a
    scratch server needs no disk, and on these machines the disk can take seconds to copy a 40 MB
    cluster); else the usual temporary directory.
    """
    override = os.environ.get("BROWNOUT_SERVERS_TMPDIR")
    if override:
        return override
    if memory and os.path.isdir(_SHM) and os.access(_SHM, os.W_OK | os.X_OK):
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(_SHM)
            if usage.free >= _SHM_MIN_FREE:
                return _SHM
    root = Path(tempfile.gettempdir())
    # A server running as another user must reach its directory: fall back to /tmp when TMPDIR sits
    # somewhere private (such as /root/tmp).
    if drop_to is not None and not _traversable_by_all(root):
        return "/tmp"
    return str(root)


def _owner_token() -> str:
    stat = _proc_stat(os.getpid())
    return f"{os.getpid()} {stat[2] if stat else 0}"


def _owner_alive(token: str) -> bool:
    try:
        pid_text, start_text = token.split()
        stat = _proc_stat(int(pid_text))
    except ValueError:
        return False
    # The start time tells a reused pid from the owner itself.
    return stat is not None and str(stat[2]) == start_text


def reap_orphans(root: str | None = None) -> list[str]:
    """Stop the servers and remove the directories left by processes that died without cleaning up.

    Only directories made by this module whose owner process is gone are touched, and only a process
    that works in that directory is killed. Returns the directories removed.
    """
    removed: list[str] = []
    roots = [root] if root else _temp_roots()
    for base_root in roots:
        try:
            entries = [e for e in os.scandir(base_root) if e.name.startswith(_PREFIX) and e.is_dir()]
        except OSError:
            continue
        for entry in entries:
            base = Path(entry.path)
            try:
                token = (base / _OWNER_FILE).read_text()
            except OSError:
                continue  # being created right now, or not ours
            if _owner_alive(token):
                continue
            with contextlib.suppress(OSError, ValueError):
                pid = int((base / _PID_FILE).read_text())
                if _alive(pid) and _uses_dir(pid, base):
                    _wait_gone(_kill_tree(pid), 5.0)
            shutil.rmtree(base, ignore_errors=True)
            removed.append(str(base))
    return removed


# Every server not yet cleaned up, so that interpreter exit stops them all.
_LIVE: set[_ManagedServer] = set()
_LIVE_LOCK = threading.Lock()
_reaped = False


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.cleanup()
    for template in list(_PG_TEMPLATES.values()):
        shutil.rmtree(template, ignore_errors=True)
    _PG_TEMPLATES.clear()


atexit.register(_cleanup_all)


# --------------------------------------------------------------------------------------------------
# The common lifecycle
# --------------------------------------------------------------------------------------------------


class _ManagedServer:
    """A server process on 127.0.0.1 with its own directory; subclasses say how to run and probe it."""

    kind = "server"
    _stop_signal = signal.SIGTERM

    def __init__(self, port: int | None = None, *, start_timeout: float = 30.0) -> None:
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._starts = 0
        self._lock = threading.RLock()

    # -- what subclasses provide --------------------------------------------------------------------

    def _drop_to(self) -> pwd.struct_passwd | None:
        return None

    def _in_memory(self) -> bool:
        return True

    def _prepare(self, base: Path) -> None:
        """Make the data directory (runs once, before the first start)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    # -- properties ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port, kept across restarts."""
        return self._port

    @property
    def base_dir(self) -> Path:
        """The server's private directory (data, socket, log); removed by :meth:`cleanup`."""
        if self._base is None:
            raise RuntimeError(f"{self.kind} has not been started yet")
        return self._base

    @property
    def data_dir(self) -> Path:
        """The data directory, kept across restarts."""
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr of every start, appended)."""
        return self.base_dir / "server.log"

    @property
    def pid(self) -> int | None:
        """The main process id while the process exists (also while paused), else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the process exists (paused counts as running)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """Whether the server is stopped with SIGSTOP."""
        return self._paused and self.running

    @property
    def starts(self) -> int:
        """How many times the process was started."""
        return self._starts

    def pids(self) -> list[int]:
        """Every live process of the server (the main one first)."""
        pid = self.pid
        return [] if pid is None else [pid, *_children(pid)]

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers; a no-op when running (it resumes a paused one).

        Restarts keep the port and the data directory. Raises :class:`ServerBinaryMissing` when the
        binary is not installed and :class:`ServerStartError` when it does not come up.
        """
        global _reaped
        with self._lock:
            if self.running:
                self.resume()
                return
            if not _reaped:
                _reaped = True
                reap_orphans()
            if self._base is None:
                self._create()
            attempts = 1 if (self._fixed_port or self._starts) else 3
            for attempt in range(attempts):
                try:
                    self._spawn()
                    return
                except ServerStartError:
                    # An automatically chosen port can be taken between choosing and binding: choose
                    # again, but only before the first successful start (later the port is the identity).
                    if attempt == attempts - 1 or not self._port_in_use_error():
                        raise
                    self._port = free_port()

    def _create(self) -> None:
        drop_to = self._drop_to()  # fails early, naming the missing user
        root = _temp_root(drop_to, memory=self._in_memory())
        base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{self.kind}-", dir=root))
        (base / _OWNER_FILE).write_text(_owner_token())
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._base = base
        try:
            if drop_to is not None:
                os.chown(base, drop_to.pw_uid, drop_to.pw_gid)
            self._prepare(base)
        except BaseException:
            self.cleanup()
            raise

    def _spawn(self) -> None:
        command = self._command()
        drop_to = self._drop_to()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "REDIS"))}
        env["LC_ALL"] = "C"
        extra: dict[str, object] = {}
        if drop_to is not None:
            extra = {"user": drop_to.pw_uid, "group": drop_to.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.base_dir)
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self._starts + 1}: {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: a Ctrl-C in the terminal reaches pytest, which then stops the
            # servers in order, rather than the servers directly.
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=env,
                start_new_session=True,
                **extra,
            )
        assert self._proc is not None
        self._paused = False
        (self.base_dir / _PID_FILE).write_text(str(self._proc.pid))
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServerStartError(
                    f"{self.kind} on port {self._port} exited with code {code} while starting; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            if self._probe():
                self._starts += 1
                return
            if time.monotonic() >= deadline:
                self._terminate(force=True)
                raise ServerStartError(
                    f"{self.kind} on port {self._port} did not answer within {self.start_timeout}s; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _port_in_use_error(self) -> bool:
        tail = self._log_tail(5).lower()
        return "address already in use" in tail or "could not bind" in tail

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly (connections are refused afterwards); a no-op when stopped."""
        with self._lock:
            self._terminate(force=False, timeout=timeout)

    def kill(self) -> None:
        """Kill every process of the server with SIGKILL, as a crash would, and wait until they are gone."""
        with self._lock:
            self._terminate(force=True)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same data directory."""
        with self._lock:
            self.stop()
            self.start()

    def _terminate(self, *, force: bool, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if force:
                victims = _kill_tree(proc.pid)
                proc.wait()
                _wait_gone(victims, 10.0)
            else:
                children = _children(proc.pid)
                self.resume()  # a stopped process cannot act on the shutdown signal
                _signal(proc.pid, self._stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc = proc
                    self._terminate(force=True)
                    return
                _wait_gone(children, 5.0)
        else:
            proc.wait()
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """Freeze every process of the server (SIGSTOP): connections hang instead of being refused."""
        with self._lock:
            pids = self.pids()
            if not pids:
                raise RuntimeError(f"{self.kind} is not running")
            children = _freeze(pids[0])  # first, so that it forks nothing new meanwhile
            for pid in children:
                _signal(pid, signal.SIGSTOP)
            self._paused = True
            # Return only once every process has really stopped, so that the caller's next request
            # meets a frozen server.
            _wait_stopped(children)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT); a no-op when it is not paused."""
        with self._lock:
            if not self._paused:
                return
            pids = self.pids()
            for pid in reversed(pids):
                _signal(pid, signal.SIGCONT)
            self._paused = False

    def ensure_running(self) -> None:
        """Resume it if paused and start it if stopped (fixtures call this for a shared server)."""
        self.start()

    def cleanup(self) -> None:
        """Stop the server (killing it if it does not stop) and remove its directory. Idempotent."""
        with self._lock:
            try:
                if self.running:
                    try:
                        self._terminate(force=False, timeout=5.0)
                    except Exception:
                        self._terminate(force=True)
            finally:
                if self._base is not None:
                    shutil.rmtree(self._base, ignore_errors=True)
                    self._base = None
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    close = cleanup

    async def astart(self) -> None:
        """:meth:`start` in a worker thread, so the event loop keeps running meanwhile."""
        await asyncio.to_thread(self.start)

    async def astop(self, timeout: float = 10.0) -> None:
        """:meth:`stop` in a worker thread, so the event loop keeps running meanwhile."""
        await asyncio.to_thread(self.stop, timeout)

    async def arestart(self) -> None:
        """:meth:`restart` in a worker thread, so the event loop keeps running meanwhile."""
        await asyncio.to_thread(self.restart)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self._port} {state}>"


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


def _resp_encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _resp_read(reader: BinaryIO) -> object:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {body.decode()}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        return reader.read(size + 2)[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_resp_read(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply from redis: {line!r}")


class RedisServer(_ManagedServer):
    """A private ``redis-server`` on a free 127.0.0.1 port, without persistence.

    ``url`` is ``redis://127.0.0.1:<port>/0``. A restart keeps the port but not the data (``--save ""
    --appendonly no``), like a cache node that comes back empty.
    """

    kind = "redis"
    _stop_signal = signal.SIGTERM

    def __init__(
        self, port: int | None = None, *, extra_args: Sequence[str] = (), start_timeout: float = 30.0
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`. ``extra_args`` go to redis-server."""
        self._binary = find_redis_server()
        super().__init__(port, start_timeout=start_timeout)
        self.extra_args = tuple(extra_args)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The URL of logical database ``db``."""
        return f"redis://{self.host}:{self._port}/{db}"

    def _prepare(self, base: Path) -> None:
        (base / "data").mkdir()

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--port", str(self._port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip

    def _probe(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == "PONG"
        except (OSError, RuntimeError):
            return False  # refused while starting, or -LOADING

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> object:
        """Send one command and return its decoded reply (for fixtures: ``command("FLUSHALL")``)."""
        with socket.create_connection((self.host, self._port), timeout=timeout) as sock:
            sock.sendall(_resp_encode(args))
            with sock.makefile("rb") as reader:
                return _resp_read(reader)


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------

# One initdb per (binaries, OS user) and process; every further server copies it (faster than initdb).
_PG_TEMPLATES: dict[tuple[str, str, str, bool], Path] = {}
_PG_TEMPLATE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class PostgresDatabase:
    """A database on a :class:`PostgresServer`: its ``name``, SQLAlchemy ``url`` and plain ``dsn``."""

    name: str
    url: str
    dsn: str


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


class PostgresServer(_ManagedServer):
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
        return _unprivileged_user() if os.geteuid() == 0 else None

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
            root = _temp_root(drop_to, memory=self._in_memory())
            template = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}pgtemplate-", dir=root))
            (template / _OWNER_FILE).write_text(_owner_token())
            try:
                if drop_to is not None:
                    os.chown(template, drop_to.pw_uid, drop_to.pw_gid)
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
