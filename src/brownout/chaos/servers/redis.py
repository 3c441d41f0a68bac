"""A private ``redis-server`` for tests and drills, without persistence.

:meth:`RedisServer.command` sends one command and returns its decoded reply, for fixtures such as
``command("FLUSHALL")``.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from brownout.chaos.servers.base import ManagedServer
from brownout.chaos.servers.binaries import find_redis_server

__all__ = ["RedisServer"]


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


class RedisServer(ManagedServer):
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
