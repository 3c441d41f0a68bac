"""Sockets in tests: a free port of 127.0.0.1, and uvicorn embedded in the test's own process."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator

import uvicorn

__all__ = ["EmbeddedServer", "free_port"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (free when asked; a test binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside pytest's process: it must leave pytest's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
