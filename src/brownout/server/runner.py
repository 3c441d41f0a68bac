"""The server runner: uvicorn, with a graceful drain, quiet health checks and connection limits.

:func:`run_server` runs an app made by :func:`~brownout.server.app.create_app` (``brownout serve``
calls it). On SIGINT/SIGTERM it first ends the live streams and drains the server
(:mod:`brownout.server.drain`); it keeps health checks, metric scrapes and live polls out of the
access log below ``debug`` (:func:`quiet_probes`), whose lines the app writes in uvicorn's place
(:mod:`brownout.server.access`: refusals under load are counted, not logged one by one); and it
holds every connection to the ``server`` limits (:mod:`brownout.server.connections`). Once the app
has started it settles the heap (:func:`settle_heap`), so that Python's garbage collector stops
pausing every request in flight.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from brownout.errors import ConfigError
from brownout.server.access import AccessLines
from brownout.server.connections import uvicorn_options
from brownout.server.priority import yield_to_models
from brownout.server.runtime import Runtime

__all__ = ["PROBE_PATHS", "ProbeAccessFilter", "make_server", "quiet_probes", "run_server", "settle_heap"]


PROBE_PATHS = frozenset(
    {"/health", "/health/llm", "/health/gateway", "/metrics", "/api/v1/status", "/api/v1/events"}
)
"""Paths that load balancers, Prometheus, ``brownout status`` and the dashboard ask over and over."""


class ProbeAccessFilter(logging.Filter):
    """Moves the access-log lines of health checks, metric scrapes and live polls to DEBUG.

    Probes used to be two thirds of the log at the default level (351 of 516 lines), burying the
    requests someone made. Attached to uvicorn's access logger: a probe's line becomes a DEBUG record,
    written only when that logger is at DEBUG (``--log-level debug``); every other request logs as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False to drop a probe's line at INFO; probe lines that pass are relabelled DEBUG."""
        args = record.args
        # uvicorn's access record: (client address, method, path with query, HTTP version, status).
        if not isinstance(args, tuple) or len(args) < 5 or record.levelno != logging.INFO:
            return True
        if str(args[2]).partition("?")[0] not in PROBE_PATHS:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_probes(log_level: str = "info") -> None:
    """Keep health checks out of the log below ``debug``: the probes' access lines (see
    :class:`ProbeAccessFilter`) and httpx's line per outgoing request -- the server's own model health
    probes (every role, every ``models.health_interval``) and model calls, which the metrics count.
    """
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ProbeAccessFilter) for f in access.filters):
        access.addFilter(ProbeAccessFilter())
    debug = log_level.lower() in ("debug", "trace")
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)


def settle_heap() -> int:
    """Collect once, then move every object alive now out of the garbage collector's sight
    (``gc.freeze()``); returns how many objects that was.

    What a started server holds -- modules, the app, its configuration, pools -- lives as long as
    the process, yet every full collection walked all of it: about 140,000 objects once the app is
    up, 50 to 90 ms per collection, and under load a full collection came every second or two, each
    holding every request in flight (the gateway's added p99 was +65 to +75 ms, its median under
    1 ms). Frozen, a full collection walks only what was made since: about 1 ms. Frozen objects are
    still freed when nothing refers to them; only cycles among them are never collected, and the
    ones alive at startup are the server's own, kept to the end anyway.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def make_server(app: FastAPI, **options: Any) -> uvicorn.Server:
    """The uvicorn server :func:`run_server` runs: ``uvicorn.Config(app, **options)`` over the
    runtime's connection limits, probes quiet in the log, a drain on the first signal, and the heap
    settled (:func:`settle_heap`) once the app has started."""
    runtime: Runtime = app.state.runtime
    drain = getattr(app.state, "drain", None)
    drain_seconds = float(runtime.config.drain_seconds)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                # The app's startup made what the server keeps for good: out of the collector's way.
                settle_heap()
                # Its local model servers get the cores first (brownout.server.priority).
                local = runtime.config.models.local
                budgeted = runtime.service.cpu_budget is not None
                nice = local.effective_api_nice(runtime.local, runtime.cores, budgeted=budgeted)
                yield_to_models(nice, bool(runtime.local))

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime.live.close_clients_soon()
            if drain is None or self.force_exit:
                super().handle_exit(sig, frame)
                return
            if self.should_exit:  # a signal after the drain: quit without waiting any more
                self.force_exit = True
                return
            # Graceful drain (brownout.server.drain): uvicorn's own shutdown -- sockets closed, then
            # the app's -- starts only once in-flight requests are answered; a second signal cuts
            # the wait short. The signal is not re-raised after shutdown (uvicorn's default), so a
            # drained server exits 0.
            drain.begin_soon(drain_seconds, self._drained)

        def _drained(self) -> None:
            self.should_exit = True

    # Time limits on every connection, a cap per client address and the Host allow-list
    # (brownout.server.connections); explicit options win. The app writes the access lines
    # (brownout.server.access: refusals under load are counted, not logged one by one) unless the
    # caller chose uvicorn's protocol or access log itself.
    access_lines: AccessLines | None = getattr(app.state, "access_lines", None)
    ours = access_lines is not None and "http" not in options and options.get("access_log", True)
    options = {**uvicorn_options(runtime.config.server, app_logs_access=bool(ours)), **options}
    config = uvicorn.Config(app, **options)  # sets up uvicorn's loggers: quiet them after
    quiet_probes(str(options.get("log_level") or "info"))
    if access_lines is not None:
        access_lines.enabled = bool(ours)
    return _Server(config)


def run_server(app: FastAPI, *, sockets: list[socket.socket] | None = None, **options: Any) -> None:
    """``uvicorn.run(app, **options)``, except that Ctrl-C (SIGINT/SIGTERM) first ends the live streams
    and drains the server (:mod:`brownout.server.drain`: no new requests, in-flight ones finish within
    ``server.drain_timeout``, the rest answered 503), health checks stay out of the log below
    ``log_level="debug"`` (:func:`quiet_probes`), and every connection is held to the runtime's
    ``server`` limits (:mod:`brownout.server.connections`: header, body and keep-alive timeouts,
    connections per client address, allowed Hosts); once started, the heap is settled
    (:func:`settle_heap`). The server is :func:`make_server`'s.

    uvicorn's graceful shutdown waits for every open response, and an SSE or WebSocket stream never
    ends by itself: without this a dashboard left open would hold the shutdown up.

    ``sockets`` are listening sockets bound beforehand (:func:`brownout.server.listener.listen`):
    uvicorn runs the app's startup -- model servers, database, spool -- *before* it binds, so a port
    already in use must be found first. When the startup fails on a setting, its :class:`ConfigError`
    is raised here; any other failed startup ends in uvicorn's ``SystemExit(3)``.
    """
    runtime: Runtime = app.state.runtime
    server = make_server(app, **options)
    try:
        # uvicorn re-raises the SIGINT it handled once it has shut down; uvicorn.run swallows it too.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
    except SystemExit:
        # uvicorn exits (status 3) when the startup failed; a setting at fault is named instead.
        error = runtime.start_error
        if isinstance(error, ConfigError):
            raise error from None
        raise
