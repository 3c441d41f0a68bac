"""Streaming (``stream: true``) pass-through, server-sent event by event.

An attempt (:func:`open_stream`) sends the request with the endpoint's breaker permit held and reads
until the upstream has sent its first whole SSE event. Anything that goes wrong until then -- a
refused connection, an error status, a timeout, a stream that ends or breaks before an event -- is an
ordinary failed attempt, so the gateway retries it or falls back *before the client has seen a byte*.

From the first event on, :func:`relay` forwards each event as soon as it has arrived whole (a read
that ends inside an event keeps that partial event until the rest comes, so the events forwarded are
always whole). Nothing else is held back. If the upstream then fails -- a broken connection, no byte
for ``timeout`` seconds, or an end without ``data: [DONE]`` -- the client gets an explicit error
event and the end of the stream, never a silent truncation::

    event: error
    data: {"error": {"message": "...", "type": "service_unavailable", "code": "stream_interrupted", ...}}

(the OpenAI SDKs raise ``APIError`` on it). The failure counts against the endpoint's breaker. A
client that disconnects ends the upstream request at once; that counts against nobody.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Send

from brownout.gateway.router import (
    Answer,
    Endpoint,
    Gateway,
    Group,
    Passthrough,
    UpstreamFailed,
    forwarded,
)
from brownout.gateway.upstream import Response, UpstreamError, UpstreamTimeout
from brownout.server.errors import error_bytes

__all__ = ["OpenStream", "complete_events", "error_event", "open_stream", "relay"]


@dataclass(slots=True)
class OpenStream:
    """An upstream stream that has delivered its first event, not yet relayed."""

    group: Group
    endpoint: Endpoint
    response: Response
    permit: Any
    """The breaker's permit for the attempt, released when the stream ends."""
    headers: list[tuple[bytes, bytes]]
    first: bytes
    """The whole events received so far."""
    tail: bytes
    """Bytes after the last whole event."""
    done: bool
    """``data: [DONE]`` was among the events received."""
    served_by: bytes = b""
    path: bytes = b""
    attempts: int = 1
    upstream: float = 0.0


def complete_events(buf: bytes) -> int:
    """Length of the prefix of ``buf`` made of whole SSE events (0 when none has ended yet)."""
    cut = buf.rfind(b"\n\n")
    cut = cut + 2 if cut >= 0 else 0
    crlf = buf.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > cut:
        cut = crlf + 4
    return cut


def _is_done(events: bytes) -> bool:
    return b"data: [DONE]" in events or b"data:[DONE]" in events


def error_event(message: str, code: str = "stream_interrupted") -> bytes:
    """The SSE event that ends a stream the upstream broke off (the server's one error shape)."""
    return (
        b"event: error\ndata: " + error_bytes(502, message, type="service_unavailable", code=code) + b"\n\n"
    )


async def open_stream(gateway: Gateway, group: Group, ep: Endpoint, content: bytes) -> OpenStream:
    """One streaming attempt on ``ep``: returns once the first whole event has arrived.

    Raises :class:`~brownout.gateway.router.UpstreamFailed` for a failure before that (recorded by the
    breaker) and :class:`~brownout.gateway.router.Passthrough` for an answer to forward as it is (a 4xx
    that blames the request, or a whole JSON answer from an upstream that does not stream).
    """
    permit = ep.breaker.guard()
    await permit.__aenter__()  # takes the permit without awaiting anything: raises CircuitOpen if refused
    clock = gateway.clock
    timeout = group.timeout
    stats = ep.stats
    stats.requests += 1
    ep.load.begin()
    start = clock.now()
    response: Response | None = None
    try:
        try:
            response = await gateway.send(group, ep, content)
            status = response.status
            if status >= 400:
                body = await response.read(timeout)
                gateway.refuse(group, ep, response, body, clock.now() - start)
            if not (response.header(b"content-type") or b"").startswith(b"text/event-stream"):
                # An upstream that ignores ``stream`` answers whole: pass that answer on.
                body = await response.read(timeout)
                answer = Answer(
                    status,
                    forwarded(response.headers),
                    body,
                    served_by=ep.served_by,
                    upstream=clock.now() - start,
                )
                raise Passthrough(answer)
            buf = b""
            while True:
                chunk = await response.next_piece(timeout)
                if chunk is None:
                    stats.failures += 1
                    raise UpstreamFailed(
                        f"{group.name}/{ep.label}: the stream ended before its first event",
                        elapsed=clock.now() - start,
                    )
                buf = buf + chunk if buf else chunk
                cut = complete_events(buf)
                if cut:
                    break
        except UpstreamTimeout as e:
            stats.failures += 1
            raise UpstreamFailed(
                f"{group.name}/{ep.label}: no first event within {timeout:g}s ({e})",
                elapsed=clock.now() - start,
            ) from e
        except UpstreamError as e:
            stats.failures += 1
            raise UpstreamFailed(
                f"{group.name}/{ep.label}: the stream broke before its first event: {e}",
                elapsed=clock.now() - start,
            ) from e
    except BaseException as e:
        ep.load.end()
        if response is not None:
            response.close()
        await permit.__aexit__(type(e), e, e.__traceback__)
        raise
    elapsed = clock.now() - start
    ep.load.observe(elapsed)
    stats.latency.observe(elapsed)
    first = buf[:cut]
    return OpenStream(
        group=group,
        endpoint=ep,
        response=response,
        permit=permit,
        headers=forwarded(response.headers),
        first=first,
        tail=buf[cut:],
        done=_is_done(first),
        upstream=elapsed,
    )


class _Watch:
    """What the disconnect watcher and the relaying task share."""

    __slots__ = ("disconnected", "finished", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.finished = False
        self.disconnected = False


async def _watch(receive: Receive, watch: _Watch) -> None:
    # Once the body is read, the ASGI receive channel yields only http.disconnect: when the client goes
    # away, or (ignored here) after the response is complete.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if not watch.finished and watch.task is not None:
        watch.disconnected = True
        watch.task.cancel()


async def relay(stream: OpenStream, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> str:
    """Send the stream to the client (status 200, ``headers`` after the upstream's), event by event.

    Returns ``"served"``, ``"stream_error"`` (the upstream failed mid-stream; the client got an error
    event) or ``"disconnected"`` (the client went away; the upstream request was closed).
    """
    ep = stream.endpoint
    group = stream.group
    task = asyncio.current_task()
    watch = _Watch(task)
    watcher = asyncio.ensure_future(_watch(receive, watch))
    failure: UpstreamFailed | None = None
    cancelled: BaseException | None = None
    outcome = "served"
    try:
        await send({"type": "http.response.start", "status": 200, "headers": stream.headers + headers})
        await send({"type": "http.response.body", "body": stream.first, "more_body": True})
        done = stream.done
        tail = stream.tail
        response = stream.response
        timeout = group.timeout
        try:
            while (chunk := await response.next_piece(timeout)) is not None:
                buf = tail + chunk if tail else chunk
                cut = complete_events(buf)
                if not cut:
                    tail = buf
                    continue
                if cut == len(buf):
                    events, tail = buf, b""
                else:
                    events, tail = buf[:cut], buf[cut:]
                if not done:
                    done = _is_done(events)
                await send({"type": "http.response.body", "body": events, "more_body": True})
            if not done or tail.strip():
                failure = UpstreamFailed(
                    f"{group.name}/{ep.label}: the stream ended without data: [DONE]", elapsed=0.0
                )
        except UpstreamTimeout:
            failure = UpstreamFailed(
                f"{group.name}/{ep.label}: no data for {timeout:g}s mid-stream", elapsed=0.0
            )
        except UpstreamError as e:
            failure = UpstreamFailed(f"{group.name}/{ep.label}: the stream broke: {e}", elapsed=0.0)
        watch.finished = True
        last = b""
        if failure is not None:
            ep.stats.failures += 1
            outcome = "stream_error"
            last = error_event(str(failure))
        await send({"type": "http.response.body", "body": last, "more_body": False})
    except asyncio.CancelledError as e:
        cancelled = e
        if not (watch.disconnected and task is not None and task.uncancel() == 0):
            raise
        outcome = "disconnected"
    except BaseException as e:
        # Sending to the client failed: nothing the endpoint did; its permit is given back uncounted.
        cancelled = e
        raise
    finally:
        watch.finished = True
        watcher.cancel()
        ep.load.end()
        stream.response.close()
        if failure is not None:
            await stream.permit.__aexit__(UpstreamFailed, failure, None)
        elif cancelled is not None:
            await stream.permit.__aexit__(asyncio.CancelledError, asyncio.CancelledError(), None)
        else:
            await stream.permit.__aexit__(None, None, None)
    return outcome
