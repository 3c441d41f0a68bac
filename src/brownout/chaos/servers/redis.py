"""A private ``redis-server`` for tests and drills, without persistence.

:meth:`RedisServer.command` sends one command through redis-py and returns the server's reply as it
came (no per-command reshaping), for fixtures such as ``command("FLUSHALL")``.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

from redis import Connection
from redis.exceptions import RedisError

from brownout.chaos.servers.base import ManagedServer
from brownout.chaos.servers.binaries import find_redis_server

__all__ = ["RedisServer"]


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
            return self.command("PING", timeout=0.5) == b"PONG"
        except (OSError, RedisError):
            return False  # refused while starting, or -LOADING

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> object:
        """Send one command on a connection of its own and return the reply as the server sent it.

        Strings come back as bytes, integers as ints, arrays as lists and nil as None (RESP2, with
        none of redis-py's per-command reshaping). An error reply raises
        :class:`redis.exceptions.ResponseError`; no connection, :class:`redis.exceptions.ConnectionError`.
        """
        # One connection, no retries: a fixture or a drill's audit asks once, and an outage is an error.
        # (redis-py's Connection carries no type annotations, hence the ignores.)
        connection = Connection(  # type: ignore[no-untyped-call]
            host=self.host,
            port=self._port,
            protocol=2,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        try:
            connection.send_command(*args)  # type: ignore[no-untyped-call]
            return connection.read_response()
        finally:
            connection.disconnect()  # type: ignore[no-untyped-call]
