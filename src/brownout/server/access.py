"""The access log of ``brownout serve``: a line per request, and one per interval for refusals under load.

uvicorn writes an access line for every answer, and under overload most answers are refusals: 200
clients refused with 503 + ``Retry-After`` wrote about thirty lines a second, each about an eighth of
the CPU a refusal costs -- taken from the cores the models run on, and burying the requests that were
served. :class:`AccessLog` writes the lines instead (uvicorn's own are off, see
:func:`brownout.server.connections.protocol_class`), with uvicorn's logger (``uvicorn.access``) and
record, so the line, its format, ``--log-format json`` and the probe filter are as before -- except
for refusals (429 or 503 with a ``Retry-After``: shed for load, the CPU budget, a draining server):
the first of a run of them is logged as usual, the ones after it are counted, and one line per
:data:`SHED_WINDOW` seconds says how many there were, until a window passes without any. At
``--log-level debug`` every refusal has its own line. Every refusal is also in ``/metrics``
(``brownout_shed_seconds``, ``brief_rejections_total``).
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout.clock import SYSTEM_CLOCK, Clock, TimerHandle

__all__ = ["SHED_WINDOW", "AccessLines", "AccessLog"]

SHED_WINDOW: Final = 10.0
"""Seconds between two lines that count refusals (see the module docstring)."""

_ACCESS = logging.getLogger("uvicorn.access")
_SUMMARY = logging.getLogger("brownout.server")


class AccessLines:
    """What :class:`AccessLog` writes, and whether it writes at all (``enabled``: off until the server
    turns uvicorn's own lines off, so that an app served some other way is logged once, by uvicorn)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, window: float = SHED_WINDOW) -> None:
        self.enabled = False
        self.clock = clock
        self.window = window
        self.refusals_counted = 0
        """Refusals so far that had no line of their own (in a summary line, or about to be)."""
        self._pending = 0
        self._timer: TimerHandle | None = None

    def answered(self, scope: Scope, status: int, shed: bool) -> None:
        """Log an answer: ``status`` to the request of ``scope``; ``shed``: a refusal with Retry-After."""
        if not _ACCESS.isEnabledFor(logging.INFO):
            return
        if shed and not _ACCESS.isEnabledFor(logging.DEBUG):
            if self._timer is not None:  # inside a run of refusals: count it
                self._pending += 1
                self.refusals_counted += 1
                return
            self._timer = self.clock.call_later(self.window, self._summarize)
        client = scope.get("client")
        query = scope.get("query_string", b"")
        path = scope.get("raw_path") or scope["path"].encode()
        target = path.decode("latin1") + (f"?{query.decode('ascii', 'replace')}" if query else "")
        # uvicorn's own record (its formatter and the probe filter read these five arguments).
        _ACCESS.info(
            '%s - "%s %s HTTP/%s" %d',
            f"{client[0]}:{client[1]}" if client else "",
            scope["method"],
            target.replace('"', "%22"),
            scope.get("http_version", "1.1"),
            status,
        )

    def _summarize(self) -> None:
        pending, self._pending = self._pending, 0
        if not pending:
            self._timer = None  # a quiet window: the next refusal has a line of its own again
            return
        _SUMMARY.info(
            "%d more request%s refused (503/429 with Retry-After) in the last %g s; "
            "each one is logged at --log-level debug and counted in /metrics",
            pending,
            "" if pending == 1 else "s",
            self.window,
        )
        self._timer = self.clock.call_later(self.window, self._summarize)

    def close(self) -> None:
        """Write the count of refusals not written yet, and stop the timer (at shutdown)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._pending:
            pending, self._pending = self._pending, 0
            _SUMMARY.info("%d more request(s) refused (503/429 with Retry-After) before shutdown", pending)


class AccessLog:
    """ASGI middleware: an access line per answer through :class:`AccessLines` (module docstring)."""

    def __init__(self, app: ASGIApp, lines: AccessLines) -> None:
        self.app = app
        self.lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lines = self.lines
        if scope["type"] != "http" or not lines.enabled:
            await self.app(scope, receive, send)
            return

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                shed = status in (429, 503) and any(
                    k == b"retry-after" for k, _ in message.get("headers", ())
                )
                lines.answered(scope, status, shed)
            await send(message)

        await self.app(scope, receive, logging_send)
