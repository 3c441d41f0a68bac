"""Private Redis and PostgreSQL servers for tests and drills.

Tests that take a server down on purpose must never touch the machine's shared instances (Redis on
6379, PostgreSQL on 5432). These launchers start a private instance instead, on a free port of
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

The modules, by concern:

* :mod:`~brownout.chaos.servers.binaries` -- finding ``redis-server`` and PostgreSQL, installing them
  (``scripts/services install``) when missing, and the unprivileged user PostgreSQL runs as under root;
* :mod:`~brownout.chaos.servers.processes` -- free ports, the process tree's signals, private
  directories, and reaping what a crashed owner left behind (Linux only: it reads /proc);
* :mod:`~brownout.chaos.servers.base` -- the lifecycle both servers share (start, stop, kill, pause,
  resume, clean up, also at interpreter exit);
* :mod:`~brownout.chaos.servers.redis` and :mod:`~brownout.chaos.servers.postgres` -- the two
  launchers, whose ``command`` and ``execute`` talk to their server through redis-py and asyncpg.
"""

from __future__ import annotations

from brownout.chaos.servers.base import ServerStartError
from brownout.chaos.servers.binaries import (
    INSTALL_HINT,
    ServerBinaryMissing,
    ensure_installed,
    find_postgres_bindir,
    find_redis_server,
)
from brownout.chaos.servers.postgres import PostgresDatabase, PostgresError, PostgresServer
from brownout.chaos.servers.processes import free_port, reap_orphans
from brownout.chaos.servers.redis import RedisServer

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
