"""What ``brownout serve`` allows a connection: time limits, a cap per client address, and its Host.

uvicorn reads requests for us, but leaves a client that sends slowly holding its connection forever:
it has no limit on the time a request's line and headers take, none on a body that stops arriving
(a ``Content-Length`` larger than what is sent), and none on a connection that never sends anything.
320 such connections were all still held after 90 s. :class:`ConnectionPolicy` sets those limits, and
:func:`protocol_class` builds the uvicorn HTTP protocol (httptools) that applies them:

* **headers** (``server.header_timeout``): from the moment a connection opens, or the first byte of
  the next request on a kept-alive one, the request line and headers must be complete within this
  time -- a total, so a client trickling one byte at a time gains nothing. A connection that sent
  part of a request is answered 408 (in the one error shape) and closed; one that sent nothing is
  closed.
* **body** (``server.body_timeout``): a request body may stall for at most this long between two
  pieces. Then the request is answered 408 when no answer has started yet, and the connection is
  closed; the app reading the body sees the client as gone. Time during which the server itself
  stopped reading (the app has not consumed what it was sent) does not count against the client.
* **idle keep-alive** (``server.keepalive_timeout``): uvicorn's own ``timeout_keep_alive``.
* **per client address** (``server.max_connections_per_client``): a connection beyond the cap is
  answered 503 with ``Retry-After`` at once, without reading its request, and closed; the client's
  other connections carry on. WebSocket connections leave the count when they upgrade: the live
  view caps them itself (``server.live_max_clients``).
* **header size**: a request's line and headers may take at most ``ConnectionPolicy.max_header_bytes``
  (64 KiB); past that it is answered 431 and the connection closed. uvicorn's httptools parser has
  no limit: a 1 MB header, or 10,000 of them, used to be read and served.
* **malformed requests**: what uvicorn's parser cannot read is answered 400 in the one error shape
  (uvicorn's own answer is plain text).
* **closing while the client still sends**: an answer that closes the connection before the request
  was read whole (413 on a declared size, 400, 431, a refused Host) first half-closes and reads and
  drops what still comes for up to 2 s. Closing with unread data resets the connection, and a
  client busy sending its body then lost the 413 it was meant to read.
* **Host** (``server.allowed_hosts``): a request whose ``Host`` header is not allowed is answered 400
  before the app sees it. A web page on a domain whose DNS the attacker points at 127.0.0.1 (DNS
  rebinding) sends its own domain as ``Host``; the default accepts only ``localhost``, the name
  ``server.host`` gives, and IP addresses -- a Host that is an IP address cannot come from a
  rebound name. A request without Host (HTTP/1.0) is not from a browser and passes.

uvicorn's ``limit_concurrency`` is not used: it counts every client together, so one busy client
would get others refused, and its 503 is plain text outside the error shape.

The checks run in the protocol, before any ASGI app: ``create_app`` served in-process (tests with
``httpx.ASGITransport``) has no connection to limit and no browser to fear.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from brownout.config import ServerSection
from brownout.server.errors import DEFAULT_RETRY_AFTER, error_bytes

__all__ = ["ConnectionPolicy", "ConnectionStats", "host_allowed", "protocol_class", "uvicorn_options"]

_log = logging.getLogger("brownout.connections")

_LINGER = 2.0
"""Seconds a refused connection is kept half-open so that the client reads its 503 before the close
(closing with its request unread would reset the connection and lose the answer)."""

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


@dataclass(slots=True)
class ConnectionStats:
    """Connections closed or refused by the policy, since the server started."""

    header_timeouts: int = 0
    """Connections closed because their request's headers were not complete in time."""
    body_timeouts: int = 0
    """Requests whose body stalled past ``body_timeout``."""
    over_client_cap: int = 0
    """Connections refused because their client address had ``max_connections_per_client`` open."""
    bad_host: int = 0
    """Requests refused because their ``Host`` is not allowed."""
    malformed: int = 0
    """Requests the HTTP parser could not read (answered 400)."""
    headers_too_large: int = 0
    """Requests whose line and headers passed ``max_header_bytes`` (answered 431)."""


@dataclass(slots=True)
class ConnectionPolicy:
    """The limits of :mod:`brownout.server.connections`, and the open connections per client address.

    One policy serves one server: its protocol instances share the per-client counts.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_per_client: int = 256
    """0: no cap."""
    allowed_hosts: frozenset[str] | None = None
    """Lower-case names and ``*.suffix`` patterns; None: localhost, ``bind_host`` and IP addresses."""
    bind_host: str = "127.0.0.1"
    max_header_bytes: int = 65536
    """The most bytes a request's line and headers may take (uvicorn's parser has no limit)."""
    open_by_client: Counter[str] = field(default_factory=Counter)
    stats: ConnectionStats = field(default_factory=ConnectionStats)

    @classmethod
    def from_config(cls, section: ServerSection) -> ConnectionPolicy:
        """The policy ``server.*`` settings describe."""
        hosts = section.allowed_hosts
        return cls(
            header_timeout=section.header_timeout,
            body_timeout=section.body_timeout,
            max_per_client=section.max_connections_per_client,
            allowed_hosts=None if hosts is None else frozenset(hosts),
            bind_host=section.host,
        )

    def host_allowed(self, host_header: bytes | None) -> bool:
        """True when a request with this ``Host`` header value (None: no header) may be served."""
        return host_allowed(host_header, self.allowed_hosts, self.bind_host)


def _host_name(value: str) -> str:
    """The host part of a Host header value: no port, lower case, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    name, _, _port = value.partition(":")
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: bytes | None, allowed: frozenset[str] | None, bind_host: str) -> bool:
    """Whether ``host_header`` passes ``allowed`` (see :class:`ConnectionPolicy.allowed_hosts`)."""
    if host_header is None:
        return True
    try:
        name = _host_name(host_header.decode("ascii"))
    except UnicodeDecodeError:
        return False
    if allowed is None:
        return name in _LOCAL_NAMES or name == _host_name(bind_host) or _is_ip(name)
    if "*" in allowed or name in allowed:
        return True
    return any(p.startswith("*.") and name.endswith(p[1:]) for p in allowed)


def _raw_response(
    status: int, reason: str, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A whole HTTP/1.1 answer that closes its connection, for answers written outside any ASGI app."""
    lines = [
        f"HTTP/1.1 {status} {reason}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in extra),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _timeout_answer(what: str, seconds: float, key: str) -> bytes:
    message = f"the request's {what} did not arrive within {seconds:g} s (server.{key})"
    return _raw_response(408, "Request Timeout", error_bytes(408, message, code="request_timeout"))


def _malformed_answer(reason: str) -> bytes:
    message = f"the request is not valid HTTP/1.1 and cannot be read ({reason})"
    return _raw_response(400, "Bad Request", error_bytes(400, message, code="malformed_request"))


def _headers_too_large_answer(limit: int) -> bytes:
    message = f"the request line and headers are over {limit} bytes"
    body = error_bytes(431, message, code="headers_too_large", limit_bytes=limit)
    return _raw_response(431, "Request Header Fields Too Large", body)


class _HeadersTooLarge(Exception):
    """Raised in the parser's callbacks when a request's line and headers pass the limit."""


class _LingeringClose:
    """The transport a request's answer is written to: its ``close()`` lingers (see
    :meth:`GuardedHttpToolsProtocol._close`) when the request was not read whole, and the answer's
    head goes out together with the first piece of its body.

    uvicorn writes an answer's status line and headers, then its body, in two writes: two system
    calls and two packets, and the client woken twice, for every answer. The head is held instead
    until the body's first piece is written -- one write for both, in the usual case of an app that
    sends them one after the other -- or, when the app waits between them (a stream before its
    first event), until the event loop's next turn.
    """

    __slots__ = ("_awaiting_head", "_cycle", "_flush_soon", "_head", "_protocol", "_transport")

    def __init__(
        self, protocol: GuardedHttpToolsProtocol, transport: asyncio.Transport, cycle: RequestResponseCycle
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._cycle = cycle
        self._awaiting_head = True
        self._head: bytes | None = None
        self._flush_soon: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``; the answer's head is held for the first piece of its body (class docstring)."""
        head = self._head
        if head is not None:
            self._head = None
            if self._flush_soon is not None:
                self._flush_soon.cancel()
                self._flush_soon = None
            self._transport.write(head + data)
            return
        if self._awaiting_head and self._cycle.response_started:
            # The first write once the answer has started is its head (a "100 Continue" comes before).
            self._awaiting_head = False
            self._head = bytes(data)
            self._flush_soon = self._protocol.loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write a head still held, alone."""
        head = self._head
        if head is None:
            return
        self._head = None
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        """Close after what was written (lingering when the request was not read whole)."""
        self.flush()
        self._protocol._close()

    def __getattr__(self, name: str) -> Any:
        # Anything else the answer does with its transport comes after the head it wrote.
        self.flush()
        return getattr(self._transport, name)


def _over_cap_answer(cap: int) -> bytes:
    body = error_bytes(
        503,
        f"this client address already has {cap} connections open (server.max_connections_per_client); "
        "reuse them, or retry after the given time",
        code="too_many_connections",
        retry_after=DEFAULT_RETRY_AFTER,
    )
    return _raw_response(
        503, "Service Unavailable", body, ((b"retry-after", str(DEFAULT_RETRY_AFTER).encode()),)
    )


class _BadHost:
    """The ASGI app that answers a request whose Host is not allowed: 400, and the connection closed."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = error_bytes(
            400,
            "this Host is not served here (server.allowed_hosts); a page on another site may be "
            "trying to reach this server through its own domain name",
            code="host_not_allowed",
            param="Host",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


_BAD_HOST = _BadHost()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :attr:`policy` (see the module docstring).

    One timer per connection at most: it fires at the earliest deadline that can apply and works out
    then which phase the connection is in, re-arming itself when the client is still within its time.
    """

    policy: ConnectionPolicy = ConnectionPolicy()
    app_logs_access: bool = False
    """True when the app writes the access lines (:mod:`brownout.server.access`): uvicorn's are off."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if self.app_logs_access:
            self.access_log = False
        self._timer: asyncio.TimerHandle | None = None
        # Waiting for a request's headers since then (None: not waiting), and whether any byte came.
        self._headers_since: float | None = None
        self._sent_some = False
        # Reading a request body: when its last piece came (None: not reading one).
        self._body_since: float | None = None
        self._counted: str | None = None  # the client address this connection is counted under
        self._refused = False
        self._host_ok = True
        self._header_bytes = 0  # received while a request's headers were being read
        self._parsed_header_bytes = 0  # of the request line and headers parsed so far
        self._lingering = False  # half-closed: what the client still sends is dropped

    # ------------------------------------------------------------------------------------- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection under its client address, or refuse it when that address is at its cap."""
        super().connection_made(transport)
        policy = self.policy
        address = self.client[0] if self.client else None
        if address is not None and policy.max_per_client:
            if policy.open_by_client[address] >= policy.max_per_client:
                self._refuse(policy)
                return
            policy.open_by_client[address] += 1
            self._counted = address
        self._headers_since = self.loop.time()
        self._arm(self.policy.header_timeout)

    def _refuse(self, policy: ConnectionPolicy) -> None:
        self._refused = True
        policy.stats.over_client_cap += 1
        _log.info(
            "refused a connection from %s: %d already open (server.max_connections_per_client)",
            self.client[0] if self.client else "?",
            policy.max_per_client,
        )
        self.transport.write(_over_cap_answer(policy.max_per_client))
        if self.transport.can_write_eof():
            # Half-close: the client reads the answer and closes; its request is read and dropped.
            self.transport.write_eof()
            self._timer = self.loop.call_later(_LINGER, self.transport.close)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the connection's place in its client's count and its timer."""
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted is not None:
            counts = self.policy.open_by_client
            counts[self._counted] -= 1
            if counts[self._counted] <= 0:
                del counts[self._counted]
            self._counted = None

    def handle_websocket_upgrade(self) -> None:
        """A WebSocket leaves this protocol (and the per-client count; the live view caps streams)."""
        self._release()
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, then start the header clock when a new request begins."""
        if self._refused or self._lingering:
            return  # the answer is on its way and the connection closing: the rest is not read
        if self._headers_since is None and self._body_since is None and self._idle():
            # The first byte after a finished exchange: the next request's headers are on the clock.
            self._headers_since = self.loop.time()
        if self._headers_since is not None and data:
            self._sent_some = True
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._headers_since is not None
            and self._header_bytes > self.policy.max_header_bytes
            and not self.transport.is_closing()
            and not self._lingering
        ):
            self._headers_too_large()
            return
        if self._timer is None and not self.transport.is_closing():
            if self._headers_since is not None:
                self._arm(self._headers_since + self.policy.header_timeout - self.loop.time())
            elif self._body_since is not None:
                self._arm(self.policy.body_timeout)

    def on_url(self, url: bytes) -> None:
        """Count the request line against ``max_header_bytes``."""
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count the header against ``max_header_bytes``."""
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        # Exact, for headers that arrive in one read (data_received only sees them whole). Raising
        # stops the parser, which reports it through send_400_response.
        self._parsed_header_bytes += size
        if self._parsed_header_bytes > self.policy.max_header_bytes:
            raise _HeadersTooLarge

    def send_400_response(self, msg: str) -> None:
        """What the parser cannot read is answered 400 in the one error shape (uvicorn's is plain
        text); headers past ``max_header_bytes`` stopped it, 431."""
        if self._parsed_header_bytes > self.policy.max_header_bytes:
            self._headers_too_large()
            return
        self.policy.stats.malformed += 1
        self.transport.write(_malformed_answer(msg.rstrip(".")))
        self._close(lingering=True)

    def _headers_too_large(self) -> None:
        policy = self.policy
        policy.stats.headers_too_large += 1
        _log.info(
            "refused a request from %s: its headers passed %d bytes",
            self.client[0] if self.client else "?",
            policy.max_header_bytes,
        )
        self.transport.write(_headers_too_large_answer(policy.max_header_bytes))
        self._close(lingering=True)

    def _close(self, *, lingering: bool | None = None) -> None:
        """Close the connection; first, when the client may still be sending (``lingering``, by
        default: its request's body was not read whole), half-close and drop what comes for up to
        ``_LINGER`` seconds, so that it reads the answer instead of a reset."""
        transport = self.transport
        if lingering is None:
            lingering = self._body_since is not None
        if self._lingering or transport.is_closing():
            return
        if not lingering or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self.pipeline.clear()  # requests sent after this one are not answered: the connection ends
        transport.write_eof()  # after what was written: the answer goes out, then the end
        self.flow.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(_LINGER, transport.close)

    def _idle(self) -> bool:
        """No request in progress on this connection (none yet, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    # ---------------------------------------------------------------------------------- parser callbacks

    def on_headers_complete(self) -> None:
        """Headers are in: stop their clock, start the body's, and refuse a Host that is not allowed."""
        self._headers_since = None
        self._sent_some = False
        self._header_bytes = 0
        self._parsed_header_bytes = 0
        self._body_since = self.loop.time()
        host = next((value for name, value in self.headers if name == b"host"), None)
        self._host_ok = self.policy.host_allowed(host)
        if self._host_ok:
            super().on_headers_complete()
            self._linger_on_close()
            return
        self.policy.stats.bad_host += 1
        _log.info(
            "refused a request for Host %r (server.allowed_hosts)", host.decode("latin-1") if host else None
        )
        app, self.app = self.app, _BAD_HOST
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self._linger_on_close()

    def _linger_on_close(self) -> None:
        # The answer closes through _close: a request not read whole gets its answer, not a reset.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _LingeringClose):
            cycle.transport = cast(asyncio.Transport, _LingeringClose(self, self.transport, cycle))

    def _should_upgrade(self) -> bool:
        # A WebSocket handshake for a Host not allowed is answered 400 like any other request.
        return self._host_ok and super()._should_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if self._host_ok:
            super()._unsupported_upgrade_warning()

    def on_body(self, body: bytes) -> None:
        """A piece of body: the client is making progress (unless its request was answered already)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self._body_since = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        """The whole body is in: nothing more is waited for from the client until the answer is sent."""
        self._body_since = None
        super().on_message_complete()

    # -------------------------------------------------------------------------------------------- timer

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(max(delay, 0.0), self._check)

    def _check(self) -> None:
        """The timer: close the connection whose client ran out of time, else re-arm for the next deadline."""
        self._timer = None
        if self.transport.is_closing():
            return
        policy = self.policy
        now = self.loop.time()
        if self._headers_since is not None:
            deadline = self._headers_since + policy.header_timeout
            if now >= deadline:
                self._headers_expired()
            else:
                self._arm(deadline - now)
        elif self._body_since is not None:
            if self.flow.read_paused:
                # The server stopped reading (the app has not taken what came): not the client's fault.
                self._body_since = now
            deadline = self._body_since + policy.body_timeout
            if now >= deadline:
                self._body_expired()
            else:
                self._arm(deadline - now)
        # Otherwise the app is answering (its own deadlines apply) or the connection is idle between
        # requests, which uvicorn's keep-alive timeout closes.

    def _headers_expired(self) -> None:
        policy = self.policy
        policy.stats.header_timeouts += 1
        _log.info(
            "closed a connection from %s: no complete request headers within %g s (server.header_timeout)",
            self.client[0] if self.client else "?",
            policy.header_timeout,
        )
        if self._sent_some:
            self.transport.write(_timeout_answer("headers", policy.header_timeout, "header_timeout"))
        self.transport.close()

    def _body_expired(self) -> None:
        policy = self.policy
        policy.stats.body_timeouts += 1
        _log.info(
            "closed a connection from %s: its request body stalled for %g s (server.body_timeout)",
            self.client[0] if self.client else "?",
            policy.body_timeout,
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(_timeout_answer("body", policy.body_timeout, "body_timeout"))
        if cycle is not None:
            # The app waiting for the rest of the body hears that the client is gone; anything it
            # still sends is dropped (the 408 is the answer).
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_class(
    policy: ConnectionPolicy, *, app_logs_access: bool = False
) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass bound to ``policy``, for ``uvicorn.Config(http=...)``;
    ``app_logs_access``: uvicorn writes no access line (the app does, :mod:`brownout.server.access`)."""
    return type(
        "BrownoutHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"policy": policy, "app_logs_access": app_logs_access},
    )


def uvicorn_options(
    section: ServerSection, policy: ConnectionPolicy | None = None, *, app_logs_access: bool = False
) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that apply ``section``'s connection limits (``app_logs_access``:
    see :func:`protocol_class`)."""
    return {
        "http": protocol_class(
            policy or ConnectionPolicy.from_config(section), app_logs_access=app_logs_access
        ),
        "timeout_keep_alive": section.keepalive_timeout,
    }
