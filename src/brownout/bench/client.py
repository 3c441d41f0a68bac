"""A light HTTP/1.1 client for load: keep-alive connections on asyncio streams, framed by h11.

A load generator must cost far less than the server it measures, or it measures itself. On this
2-core machine, 200 closed-loop httpx clients hammering ``brownout serve`` with requests it refuses at
once took most of a core in the client, and the refusals the server answered in a few milliseconds
came back to the clients after seconds (p95 4.5 s): the answers waited in the client's own event
loop. This client does only what a load needs -- ``POST`` or ``GET`` a small body, read the answer
whole -- with h11 (the HTTP/1.1 state machine httpx itself is built on) over plain asyncio streams and
a pool of kept-alive connections; it costs about a tenth of httpx per request.

:func:`brief_text` makes the distinct request texts the loads send (the drills and ``brownout bench
overload``), so that each reaches the pipeline rather than the response cache.

It talks to 127.0.0.1 only (loads and drills never go to the network) and understands what
``brownout serve`` answers: a ``Content-Length`` or chunked body, keep-alive or close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

__all__ = ["LoadClient", "LoadResponse", "LocalOnly", "brief_text", "retry_pause"]

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# uvicorn closes an idle kept-alive connection after 5 s; one idle for this long is not reused, so a
# request never goes out on a connection the server is closing at that very moment.
_IDLE_EXPIRY = 4.0


_STYLES = ("fresh", "warm", "woody", "floral", "oriental", "aquatic", "gourmand", "green")
_NOTES = ("lemon", "bergamot", "vanilla", "amber", "sandalwood", "rose", "jasmine", "sea salt", "fig", "tea")
_OCCASIONS = ("summer days", "winter evenings", "the office", "a wedding", "weekends", "night out")


def brief_text(i: int) -> str:
    """The ``i``-th request text of a load: varied wording, unique by its number."""
    style = _STYLES[i % len(_STYLES)]
    a = _NOTES[i % len(_NOTES)]
    b = _NOTES[(i * 7 + 3) % len(_NOTES)]
    occasion = _OCCASIONS[(i // 3) % len(_OCCASIONS)]
    return f"A {style} scent with {a} and {b} for {occasion}, customer request {i}"


def retry_pause(retry_after: float | None, rng: random.Random | None = None) -> float:
    """How long a polite client waits after a refusal that said ``Retry-After: retry_after`` seconds.

    That long, plus up to half again at random, so that clients refused together do not all come back
    in the same instant (a synchronised return is a burst the server must refuse again); 1 s when the
    answer gave no usable value; at most 60 s, the longest Retry-After the OpenAI SDK honours.
    """
    base = retry_after if retry_after is not None and retry_after >= 0 else 1.0
    base = min(base, 60.0)
    return base * (1.0 + 0.5 * (rng or random).random())


class LocalOnly(ValueError):
    """A load aimed anywhere but this machine."""


@dataclass(frozen=True, slots=True)
class LoadResponse:
    """One answer: status, headers (names lower-cased; the last of a repeated name) and body, and
    ``connect``: the seconds the request spent opening its connection (0.0 on a kept-alive one)."""

    status: int
    headers: dict[str, str]
    body: bytes
    connect: float = 0.0

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.body)


class _Connection:
    __slots__ = ("conn", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class LoadClient:
    """Requests to ``base_url`` (``http://127.0.0.1:PORT``) on a pool of kept-alive connections.

    ``timeout`` bounds each request whole (connect, send, the answer read to its end): past it the
    request raises TimeoutError and its connection is closed. At most ``max_connections`` are kept
    idle; a request with none idle opens a new one, so the caller bounds concurrency.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, max_connections: int = 1024) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname not in _LOCAL_HOSTS:
            raise LocalOnly(f"load goes to http://127.0.0.1 only, not {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = parts.netloc
        self._idle: list[_Connection] = []
        self._max_idle = max_connections
        self._closed = False

    async def post_json(
        self, path: str, payload: Any, *, headers: dict[str, str] | None = None
    ) -> LoadResponse:
        """``POST path`` with ``payload`` as its JSON body."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        extra = {"content-type": "application/json", **(headers or {})}
        return await self.request("POST", path, body, extra)

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> LoadResponse:
        """``GET path``."""
        return await self.request("GET", path, b"", headers or {})

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> LoadResponse:
        """One request, its answer read whole. Raises TimeoutError past ``timeout``, OSError or
        ``h11.ProtocolError`` when the connection fails (a pooled connection the server had closed
        is retried once on a new one, as any HTTP client does for an idempotent failure to send)."""
        if self._closed:
            raise RuntimeError("the load client is closed")
        async with asyncio.timeout(self.timeout):
            pooled = self._take()
            if pooled is not None:
                try:
                    return await self._exchange(pooled, method, path, body, headers, reused=True)
                except _StaleConnection:
                    pass  # the server closed it while idle: nothing was answered, try a new one
            began = time.monotonic()
            fresh = await self._open()
            connect = time.monotonic() - began
            answer = await self._exchange(fresh, method, path, body, headers, reused=False)
            return dataclasses.replace(answer, connect=connect)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if now - c.idle_since < _IDLE_EXPIRY and not c.reader.at_eof():
                return c
            c.close()
        return None

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return _Connection(reader, writer)

    async def _exchange(
        self,
        c: _Connection,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        reused: bool,
    ) -> LoadResponse:
        answered = False
        try:
            wire = [("host", self._authority), *headers.items()]
            if method != "GET" or body:
                wire.append(("content-length", str(len(body))))
            data = c.conn.send(h11.Request(method=method, target=path, headers=wire))
            if body:
                data += c.conn.send(h11.Data(data=body))
            data += c.conn.send(h11.EndOfMessage())
            c.writer.write(data)
            await c.writer.drain()
            status = 0
            answer_headers: dict[str, str] = {}
            chunks: list[bytes] = []
            while True:
                event = c.conn.next_event()
                if event is h11.NEED_DATA:
                    received = await c.reader.read(65536)
                    if not received and not answered and reused:
                        raise _StaleConnection
                    c.conn.receive_data(received)
                    continue
                if isinstance(event, h11.Response):
                    answered = True
                    status = event.status_code
                    # h11 gives header names lower-cased.
                    answer_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("the server closed the connection before answering")
        except (ConnectionResetError, BrokenPipeError) as e:
            c.close()
            if reused and not answered:
                # A kept-alive connection the server had closed: writing to it draws a reset instead
                # of an end of stream. Nothing was answered; a new connection may try again.
                raise _StaleConnection from e
            raise
        except BaseException:
            c.close()
            raise
        self._give_back(c)
        return LoadResponse(status, answer_headers, b"".join(chunks))

    def _give_back(self, c: _Connection) -> None:
        if (
            self._closed
            or len(self._idle) >= self._max_idle
            or c.conn.our_state is not h11.DONE
            or c.conn.their_state is not h11.DONE
        ):
            c.close()
            return
        c.conn.start_next_cycle()
        c.idle_since = time.monotonic()
        self._idle.append(c)

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        for c in idle:
            with contextlib.suppress(Exception):
                await c.writer.wait_closed()

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _StaleConnection(ConnectionError):
    """A kept-alive connection the server had closed: no byte of an answer came back."""
