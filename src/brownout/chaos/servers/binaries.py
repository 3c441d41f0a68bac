"""Finding the server binaries (``redis-server``, PostgreSQL's ``initdb``, ``postgres``) and installing them.

Binaries are found on ``PATH`` and in Debian's layout (``/usr/lib/postgresql/<version>/bin``);
``BROWNOUT_REDIS_SERVER`` and ``BROWNOUT_PG_BINDIR`` override the lookup. When one is missing,
starting fails with :class:`ServerBinaryMissing` naming it and the fix (``scripts/services install``);
:func:`ensure_installed` runs that script once.

PostgreSQL refuses to run as root. When the caller is root (as in CI), the servers run as the
unprivileged ``postgres`` system user (``BROWNOUT_PG_OS_USER`` overrides it), which the Debian package
creates: :func:`unprivileged_user` finds it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "INSTALL_HINT",
    "ServerBinaryMissing",
    "ensure_installed",
    "find_postgres_bindir",
    "find_redis_server",
    "unprivileged_user",
]

INSTALL_HINT = "install it with: scripts/services install (Debian packages redis-server and postgresql)"
"""The fix named in every missing-binary error."""

# Searched after PATH; tests replace these to simulate a machine without the binaries.
_REDIS_FALLBACK_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/sbin", "/usr/local/bin")
_PG_LIB_ROOT = "/usr/lib/postgresql"
# src/brownout/chaos/servers/binaries.py -> the checkout's scripts/services.
_SERVICES_SCRIPT = Path(__file__).resolve().parents[4] / "scripts" / "services"


class ServerBinaryMissing(RuntimeError):
    """A server binary (``redis-server``, ``postgres``/``initdb``) is not installed."""


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


def unprivileged_user() -> pwd.struct_passwd:
    """The system user PostgreSQL runs as when the caller is root; :class:`ServerBinaryMissing` if none."""
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
                unprivileged_user()
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
            unprivileged_user()
