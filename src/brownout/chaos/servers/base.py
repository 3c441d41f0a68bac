"""The lifecycle every launched server shares: start and probe, stop, kill, pause, resume, clean up.

A :class:`ManagedServer` is a child process on 127.0.0.1 with its own directory; the Redis and
PostgreSQL launchers say how to prepare, run and probe theirs. Servers stop and their directories go on
:meth:`~ManagedServer.cleanup`, on leaving the ``with`` block, and at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from brownout.chaos.servers.processes import (
    PID_FILE,
    children,
    free_port,
    freeze,
    kill_tree,
    make_private_dir,
    reap_orphans,
    send_signal,
    wait_gone,
    wait_stopped,
)

__all__ = ["ManagedServer", "ServerStartError"]


class ServerStartError(RuntimeError):
    """A server process did not become ready (it exited, or did not answer in time)."""


# Every server not yet cleaned up, so that interpreter exit stops them all.
_LIVE: set[ManagedServer] = set()
_LIVE_LOCK = threading.Lock()
_reaped = False


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.cleanup()


atexit.register(_cleanup_all)


class ManagedServer:
    """A server process on 127.0.0.1 with its own directory; subclasses say how to run and probe it.

    ``start``/``stop`` block for up to a few hundred milliseconds; from a coroutine that must keep a
    load running meanwhile, use ``await server.astart()`` / ``await server.astop()``.
    """

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
        return [] if pid is None else [pid, *children(pid)]

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers; a no-op when running (it resumes a paused one).

        Restarts keep the port and the data directory. Raises
        :class:`~brownout.chaos.servers.binaries.ServerBinaryMissing` when the binary is not installed
        and :class:`ServerStartError` when it does not come up.
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
        base = make_private_dir(self.kind, drop_to, memory=self._in_memory())
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._base = base
        try:
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
        (self.base_dir / PID_FILE).write_text(str(self._proc.pid))
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
                victims = kill_tree(proc.pid)
                proc.wait()
                wait_gone(victims, 10.0)
            else:
                before = children(proc.pid)
                self.resume()  # a stopped process cannot act on the shutdown signal
                send_signal(proc.pid, self._stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc = proc
                    self._terminate(force=True)
                    return
                wait_gone(before, 5.0)
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
            frozen = freeze(pids[0])  # first, so that it forks nothing new meanwhile
            for pid in frozen:
                send_signal(pid, signal.SIGSTOP)
            self._paused = True
            # Return only once every process has really stopped, so that the caller's next request
            # meets a frozen server.
            wait_stopped(frozen)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT); a no-op when it is not paused."""
        with self._lock:
            if not self._paused:
                return
            pids = self.pids()
            for pid in reversed(pids):
                send_signal(pid, signal.SIGCONT)
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
