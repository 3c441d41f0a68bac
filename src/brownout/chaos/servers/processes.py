"""Ports, processes and private directories: what every launched server needs from the machine.

A server gets a free 127.0.0.1 port (never one of the machine's shared services' ports) and a private
directory in ``/dev/shm`` when it has room (``BROWNOUT_SERVERS_TMPDIR`` overrides): scratch servers
need no disk, and copying a cluster on a cold disk can take seconds. Faults are signals to the whole
process tree: SIGSTOP/SIGCONT to pause and resume, SIGKILL to crash.

Nothing outlives the process that started it. A process killed outright cannot clean up, so each
directory records its owner, and :func:`reap_orphans` stops the servers and removes the directories of
owners that are gone. Linux only (it reads /proc).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PID_FILE",
    "alive",
    "children",
    "free_port",
    "freeze",
    "kill_tree",
    "make_private_dir",
    "proc_stat",
    "reap_orphans",
    "send_signal",
    "uses_dir",
    "wait_gone",
    "wait_stopped",
]

# Ports of the machine's shared services: a private server never takes one, even where they are free.
_SHARED_PORTS = frozenset({4222, 5432, 5672, 6379, 8222, 15672})
_PREFIX = "brownout-srv-"
_OWNER_FILE = "owner"
PID_FILE = "server.pid"
"""The file in a server's directory that holds its main process id (for :func:`reap_orphans`)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (never one of the shared services' ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _SHARED_PORTS:
            return port
    raise RuntimeError("no free port found")  # pragma: no cover - the kernel always offers one


# -- processes --------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
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


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    return proc_stat(pid) is not None


def children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (PostgreSQL's backends and auxiliary processes)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append(int(entry))
    return found


def uses_dir(pid: int, base: Path) -> bool:
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


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; False if some still are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def send_signal(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; a process already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_stopped(pids: Sequence[int], timeout: float = 5.0) -> None:
    """Wait until each process has really stopped (or is gone): signal delivery is asynchronous."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [proc_stat(pid) for pid in pids]
        if all(state is None or state[0] in ("T", "t") for state in states):
            return
        time.sleep(0.001)


def freeze(pid: int) -> list[int]:
    """Stop ``pid`` (SIGSTOP) and return its children, once it can fork no more of them."""
    send_signal(pid, signal.SIGSTOP)
    wait_stopped([pid])
    return children(pid)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and its children; return them all.

    The children are listed while the parent is frozen: once it dies they belong to init and can no
    longer be found by their parent's pid, and a running parent could fork one more meanwhile.
    """
    victims = [pid, *freeze(pid)]
    for victim in victims:
        send_signal(victim, signal.SIGKILL)
    return victims


# -- private directories ----------------------------------------------------------------------------

_SHM = "/dev/shm"
_SHM_MIN_FREE = 1 << 30  # leave memory-backed storage alone when it is nearly full


def _traversable_by_all(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _temp_roots() -> list[str]:
    """Where server directories may go, preferred first (also where :func:`reap_orphans` looks)."""
    roots = [os.environ.get("BROWNOUT_SERVERS_TMPDIR", ""), _SHM, tempfile.gettempdir(), "/tmp"]
    return list(dict.fromkeys(root for root in roots if root))


def _temp_root(drop_to: pwd.struct_passwd | None, *, memory: bool) -> str:
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
    stat = proc_stat(os.getpid())
    return f"{os.getpid()} {stat[2] if stat else 0}"


def _owner_alive(token: str) -> bool:
    try:
        pid_text, start_text = token.split()
        stat = proc_stat(int(pid_text))
    except ValueError:
        return False
    # The start time tells a reused pid from the owner itself.
    return stat is not None and str(stat[2]) == start_text


def make_private_dir(kind: str, drop_to: pwd.struct_passwd | None, *, memory: bool = True) -> Path:
    """Create a server's directory, recording this process as its owner (for :func:`reap_orphans`).

    ``drop_to`` is the user the server will run as (the directory becomes theirs); ``memory`` allows
    memory-backed ``/dev/shm``.
    """
    base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{kind}-", dir=_temp_root(drop_to, memory=memory)))
    try:
        (base / _OWNER_FILE).write_text(_owner_token())
        if drop_to is not None:
            os.chown(base, drop_to.pw_uid, drop_to.pw_gid)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base


def reap_orphans(root: str | None = None) -> list[str]:
    """Stop the servers and remove the directories left by processes that died without cleaning up.

    Only directories made by this package whose owner process is gone are touched, and only a process
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
                pid = int((base / PID_FILE).read_text())
                if alive(pid) and uses_dir(pid, base):
                    wait_gone(kill_tree(pid), 5.0)
            shutil.rmtree(base, ignore_errors=True)
            removed.append(str(base))
    return removed
