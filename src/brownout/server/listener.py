"""The listening socket of ``brownout serve``, bound before anything else starts.

uvicorn runs the app's startup -- model servers, the database, the spool -- before it binds its port,
so a second server on the same config would start all of those and only then find the port taken.
``brownout serve`` binds first with :func:`listen` and hands the socket to uvicorn. This module imports
nothing heavy, so that failure comes within a second.
"""

from __future__ import annotations

import errno
import socket

from brownout.errors import ConfigError

__all__ = ["listen"]


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, for :func:`run_server`'s ``sockets``.

    Raises :class:`ConfigError` naming ``server.port`` (``server.host`` when the address itself is
    wrong) when it cannot: another server has the port, say.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError("server.host", f"cannot listen on {host!r}: {e.strerror}") from e
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: quick restarts
        sock.bind(address)
        # Listen at once: on Linux two SO_REUSEADDR sockets may both bind one port until one listens.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                "server.port", f"{where} is already in use (another brownout server?); choose another port"
            ) from e
        raise ConfigError("server.port", f"cannot listen on {where}: {e.strerror or e}") from e
    return sock
