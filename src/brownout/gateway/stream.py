"""Streaming (``stream: true``): server-sent events, watched, checked and carried to a complete answer.

**Before the first token.** An attempt (:func:`open_stream`) sends the request with the endpoint's
breaker permit held and reads until the upstream has sent its first *token* -- the first event with
content, a tool call or a finish reason; a role-only event before it is held back. It has
``first_token_timeout`` seconds for that (never more than what is left of the request's budget).
Anything that goes wrong until then -- a refused connection, an error status, a silent or slow
upstream, a stream that ends, breaks or sends a malformed event -- is an ordinary failed attempt, so
the gateway retries it or falls back *before the client has seen a byte*.

**While relaying** (:func:`relay`), every event is forwarded as soon as it has arrived whole, after
a check: its ``data`` must be ``[DONE]`` or a JSON object that is not an error. An upstream *breaks*
the stream when it

* sends a malformed event (never forwarded: it would crash the client's parser) or an error event,
* goes silent for ``stall_timeout`` seconds between events,
* closes the connection or ends the stream before its final event (the one with a
  ``finish_reason``).

A stream that ends after its final event but without ``data: [DONE]`` is complete: the gateway adds
the ``[DONE]`` itself. The request's budget bounds the wait for the first token and the handling of
every fault, not a stream that keeps flowing: a long answer is not cut because it is long.

**Continuation.** When a stream breaks after tokens went out, the failure counts against the
endpoint's breaker and the request goes on -- within its budget -- on the next endpoint of the group
or its fallbacks (never the broken one again), asked to continue the answer rather than to start it
over: the text already sent is given as a trailing assistant message (*prefill*), which most
servers continue; to an endpoint that does not take prefill (``prefill: false`` in its config, or
learned from its refusal, which the client never sees), as that assistant message followed by an
instruction to continue exactly where it stopped. The continuation's role event is dropped and its
tokens follow the ones sent, so the client reads one uninterrupted answer (an SSE comment, which
clients skip, says who continued: ``: x-brownout-continued-by group/endpoint after N tokens``). Its
``max_tokens`` is lowered by the tokens already sent. Answers with tool calls, or with more than one
choice, are not continued (a half-written call cannot be resumed by prefill). Only when nothing can
continue -- no endpoint left, the budget spent -- does the client get an explicit error event and the
end of the stream, never a silent truncation::

    event: error
    data: {"error": {"message": "...", "type": "service_unavailable", "code": "stream_interrupted", ...}}

(the OpenAI SDKs raise ``APIError`` on it). A client that disconnects ends the upstream request at
once; that counts against nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.types import Receive, Send

import brownout.gateway.tracing as tracing
from brownout import telemetry
from brownout.gateway.router import (
    Answer,
    Endpoint,
    Gateway,
    GatewayUnavailable,
    Group,
    Passthrough,
    UpstreamFailed,
    context_overflow,
    forwarded,
)
from brownout.gateway.upstream import Response, UpstreamError, UpstreamTimeout
from brownout.llm.sse import DONE_EVENT, BrokenStream, EventReader, complete_events
from brownout.policies.limiter import Permit
from brownout.server.errors import error_bytes

__all__ = [
    "CONTINUE_INSTRUCTION",
    "EventReader",
    "OpenStream",
    "complete_events",
    "discard",
    "error_event",
    "open_stream",
    "relay",
]

CONTINUE_INSTRUCTION: Final = (
    "Your previous answer was cut off. Continue it exactly where it stopped: do not repeat any of it, "
    "do not comment, write only the rest."
)
"""The user message that follows the text already sent, for an endpoint that does not take prefill."""


def error_event(message: str, code: str = "stream_interrupted") -> bytes:
    """The SSE event that ends a stream nothing could complete (the server's one error shape)."""
    return (
        b"event: error\ndata: " + error_bytes(502, message, type="service_unavailable", code=code) + b"\n\n"
    )


@dataclass(slots=True)
class OpenStream:
    """An upstream stream that has delivered its first token, not yet relayed."""

    group: Group
    endpoint: Endpoint
    reader: EventReader[Response]
    permit: Any
    """The breaker's permit for the attempt, released when the stream ends."""
    slot: Permit | None
    """The slot of a shared model server the stream holds (None: it shares none), freed when it ends."""
    headers: list[tuple[bytes, bytes]]
    first: bytes
    """The checked events read so far (up to and including the first token's)."""
    served_by: bytes = b""
    path: bytes = b""
    attempts: int = 1
    upstream: float = 0.0


async def open_stream(
    gateway: Gateway, group: Group, ep: Endpoint, content: bytes, deadline: float, *, resume: bool = False
) -> OpenStream:
    """One streaming attempt on ``ep``: returns once the first token has arrived.

    Raises :class:`~brownout.gateway.router.UpstreamFailed` for a failure before that (recorded by the
    breaker) and :class:`~brownout.gateway.router.Passthrough` for an answer to forward as it is (a 4xx
    that blames the request, or a whole JSON answer from an upstream that does not stream -- unless
    ``resume``: a continuation must stream).
    """
    clock = gateway.clock
    slot = await ep.take_slot(group.name, deadline)
    permit = ep.breaker.guard()
    try:
        await permit.__aenter__()  # takes the permit without awaiting anything: raises CircuitOpen if refused
    except BaseException:
        ep.free_slot(slot, answered=False)
        raise
    stats = ep.stats
    stats.requests += 1
    ep.load.begin()
    start = clock.now()
    limit = min(group.first_token_timeout, deadline - start)
    until = start + limit
    response: Response | None = None
    try:
        try:
            response = await gateway.send(group, ep, content, limit)
            status = response.status
            if status >= 400:
                body = await response.read(max(0.001, until - clock.now()))
                gateway.refuse(group, ep, response, body, clock.now() - start)
            if not (response.header(b"content-type") or b"").startswith(b"text/event-stream"):
                body = await response.read(max(0.001, until - clock.now()))
                if resume:
                    stats.failures += 1
                    raise UpstreamFailed(
                        f"{group.name}/{ep.label}: answered a continuation whole, not as a stream",
                        elapsed=clock.now() - start,
                    )
                # An upstream that ignores ``stream`` answers whole: pass that answer on.
                answer = Answer(
                    status,
                    forwarded(response.headers),
                    body,
                    served_by=ep.served_by,
                    upstream=clock.now() - start,
                )
                raise Passthrough(answer)
            reader = EventReader(response, resume=resume)
            first: list[bytes] = []
            while True:
                got = await reader.read(max(0.001, until - clock.now()))
                if got is None:
                    stats.failures += 1
                    raise UpstreamFailed(
                        f"{group.name}/{ep.label}: the stream ended before its first token",
                        elapsed=clock.now() - start,
                    )
                events, token = got
                first.append(events)
                if token or reader.done:
                    break
        except UpstreamTimeout as e:
            stats.failures += 1
            ep.load.observe(clock.now() - start)  # that slow, as far as the picker is concerned
            raise UpstreamFailed(
                f"{group.name}/{ep.label}: no first token within {limit:g}s",
                elapsed=clock.now() - start,
                timed_out=True,
            ) from e
        except (UpstreamError, BrokenStream) as e:
            stats.failures += 1
            raise UpstreamFailed(
                f"{group.name}/{ep.label}: the stream broke before its first token: {e}",
                elapsed=clock.now() - start,
            ) from e
    except BaseException as e:
        ep.load.end()
        if response is not None:
            response.close()
        # A request the server refused for itself (Passthrough) was answered.
        ep.free_slot(slot, answered=isinstance(e, Passthrough))
        await permit.__aexit__(type(e), e, e.__traceback__)
        raise
    elapsed = clock.now() - start
    ep.load.observe(elapsed)
    stats.latency.observe(elapsed)
    return OpenStream(
        group=group,
        endpoint=ep,
        reader=reader,
        permit=permit,
        slot=slot,
        headers=forwarded(response.headers),
        first=b"".join(first),
        upstream=elapsed,
    )


@dataclass(slots=True)
class _Continuation:
    """How to ask an endpoint for the rest of an answer of which ``text`` was sent."""

    gateway: Gateway
    origin: Group
    """The group the request asked for: its counters count the continuation."""
    body: dict[str, Any]
    text: str
    tokens: int
    forms: dict[tuple[str | None, bool], bytes] = field(default_factory=dict)

    def content(self, ep: Endpoint, prefill: bool) -> bytes:
        key = (ep.model, prefill)
        cached = self.forms.get(key)
        if cached is not None:
            return cached
        messages = list(self.body.get("messages") or ())
        messages.append({"role": "assistant", "content": self.text})
        if not prefill:
            messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
        again: dict[str, Any] = {**self.body, "messages": messages}
        if ep.model is not None:
            again["model"] = ep.model
        for key_name in ("max_tokens", "max_completion_tokens"):
            limit = again.get(key_name)
            if type(limit) is int:
                again[key_name] = max(1, limit - self.tokens)
        data = json.dumps(again, separators=(",", ":"), ensure_ascii=False).encode()
        self.forms[key] = data
        return data

    async def attempt(self, g: Group, ep: Endpoint, _: bytes, deadline: float) -> OpenStream:
        """Open a continuation on ``ep``: prefill where it is taken, else the instruction form."""
        gateway = self.gateway
        if ep.prefill is not False:
            try:
                return await open_stream(gateway, g, ep, self.content(ep, True), deadline, resume=True)
            except Passthrough as e:
                status = e.answer.status
                # A prefill is refused as a malformed conversation (400 or 422); any other refusal
                # (credentials, a missing model, a context overflow) says nothing of prefill.
                if ep.prefill is True or status not in (400, 422) or context_overflow(e.answer):
                    raise _refused(g, ep, e.answer) from e
                # Refused the prefill: remember, and ask the way it takes.
                ep.prefill = False
                self.origin.stats.continuations["prefill_refused"] += 1
        try:
            return await open_stream(gateway, g, ep, self.content(ep, False), deadline, resume=True)
        except Passthrough as e:
            raise _refused(g, ep, e.answer) from e


def _refused(g: Group, ep: Endpoint, answer: Answer) -> UpstreamFailed:
    # A continuation refused is not the caller's final answer: the next endpoint is asked instead.
    return UpstreamFailed(
        f"{g.name}/{ep.label}: refused to continue the answer (HTTP {answer.status})",
        status=answer.status,
        elapsed=answer.upstream,
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


async def _end(stream: OpenStream, error: BaseException | None) -> None:
    """Release ``stream``'s endpoint: its load, connection and breaker permit (``error``: the failure
    that counts against it, a CancelledError that counts against nobody, or None for a success)."""
    stream.endpoint.load.end()
    stream.reader.response.close()
    stream.endpoint.free_slot(stream.slot, answered=error is None)
    if error is None:
        await stream.permit.__aexit__(None, None, None)
    else:
        await stream.permit.__aexit__(type(error), error, None)


async def discard(stream: OpenStream) -> None:
    """Close a stream that was opened but will not be relayed (a hedged attempt that lost the race);
    its endpoint is not blamed."""
    await _end(stream, asyncio.CancelledError())


async def relay(
    gateway: Gateway,
    group: Group,
    stream: OpenStream,
    body: dict[str, Any],
    deadline: float,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
) -> str:
    """Send the stream to the client (status 200, ``headers`` after the upstream's), event by event,
    continuing it elsewhere when it breaks (see the module docstring).

    ``group`` is the group the request asked for: a continuation starts from it (the broken endpoints
    left out), whichever group served the part before. Returns ``"served"``, ``"stream_error"`` (it
    broke and nothing could continue it; the client got an error event) or ``"disconnected"`` (the
    client went away; the upstream request was closed).
    """
    clock = gateway.clock
    task = asyncio.current_task()
    watch = _Watch(task)
    watcher = asyncio.ensure_future(_watch(receive, watch))
    sent: list[str] = []
    tokens = 0
    broken: list[Endpoint] = []
    current: OpenStream | None = stream
    outcome = "served"
    try:
        await send({"type": "http.response.start", "status": 200, "headers": stream.headers + headers})
        await send({"type": "http.response.body", "body": stream.first, "more_body": True})
        last = b""
        while current is not None:
            reader = current.reader
            ep = current.endpoint
            failure: UpstreamFailed | None = None
            try:
                while True:
                    got = await reader.read(current.group.stall_timeout)
                    if got is None:
                        break
                    if got[0]:
                        await send({"type": "http.response.body", "body": got[0], "more_body": True})
                if not reader.done:
                    if not reader.finished:
                        raise BrokenStream("the stream ended before its final event")
                    # Complete but for the end marker: the client's parser waits for it.
                    last = DONE_EVENT
            except (UpstreamError, BrokenStream) as e:
                if reader.finished or reader.done:
                    # The answer was whole before the upstream misbehaved: the client has it all.
                    failure = None
                    last = b"" if reader.done else DONE_EVENT
                elif isinstance(e, UpstreamTimeout):
                    stall = current.group.stall_timeout
                    failure = UpstreamFailed(
                        f"{current.group.name}/{ep.label}: no data for {stall:g}s mid-stream",
                        elapsed=0.0,
                        timed_out=True,
                    )
                else:
                    failure = UpstreamFailed(
                        f"{current.group.name}/{ep.label}: the stream broke: {e}", elapsed=0.0
                    )
            if failure is None:
                done, current = current, None
                await _end(done, None)
                break
            # The endpoint broke the stream: counted against it, then the answer goes on elsewhere.
            ep.stats.failures += 1
            broken.append(ep)
            sent.extend(reader.text)
            tokens += reader.tokens
            failed, current = current, None
            await _end(failed, failure)
            if reader.tools or reader.choices or clock.now() >= deadline:
                outcome = "stream_error"
                last = error_event(str(failure))
                break
            current, last = await _continue(
                gateway, group, body, "".join(sent), tokens, broken, deadline, failure
            )
            if current is None:
                outcome = "stream_error"
                break
            group.stats.continuations["served"] += 1
            # The headers named the first endpoint; an SSE comment (which clients skip) names who
            # continued, for whoever reads the raw stream.
            note = b": x-brownout-continued-by " + current.served_by + b" after %d tokens\n\n" % tokens
            await send({"type": "http.response.body", "body": note + current.first, "more_body": True})
        watch.finished = True
        await send({"type": "http.response.body", "body": last, "more_body": False})
    except asyncio.CancelledError as e:
        if current is not None:
            await _end(current, e)
            current = None
        if not (watch.disconnected and task is not None and task.uncancel() == 0):
            raise
        outcome = "disconnected"
    except BaseException as e:
        # Sending to the client failed: nothing the endpoint did; its permit is given back uncounted.
        if current is not None:
            await _end(current, asyncio.CancelledError())
            current = None
        raise e
    finally:
        watch.finished = True
        watcher.cancel()
    return outcome


async def _continue(
    gateway: Gateway,
    group: Group,
    body: dict[str, Any],
    text: str,
    tokens: int,
    broken: list[Endpoint],
    deadline: float,
    failure: UpstreamFailed,
) -> tuple[OpenStream | None, bytes]:
    """A stream continuing the answer on another endpoint, or (None, the error event to end with)."""
    plan = _Continuation(gateway, group, body, text, tokens)
    traced = telemetry.SWITCH.tracer is not None
    try:
        with tracing.continuation(group, tokens, broken) if traced else contextlib.nullcontext():
            opened: OpenStream = await gateway.route(
                group,
                body,
                None,
                plan.attempt,
                deadline=deadline,
                skip=broken,
                content_for=lambda ep: b"",
            )
    except (GatewayUnavailable, Passthrough) as e:
        group.stats.continuations["failed"] += 1
        return None, error_event(f"{failure}; no endpoint could continue it: {e}")
    return opened, b""
