"""A fault-injecting OpenAI-compatible upstream for the gateway's fail-over scenarios.

A plain asyncio TCP server on 127.0.0.1 that speaks just enough HTTP/1.1 to be a chat-completions
provider, because the faults the scenarios need live *below* a web framework: a TCP reset right after
the request, a connection accepted and never answered, a stream that stops mid-way, stalls, or sends
an event that is not JSON. (:mod:`brownout.chaos.fakellm`, on uvicorn, serves the brief pipeline's
model roles; it cannot cut a chunked body half-way or reset a socket.)

**Answers are deterministic.** For a request, the *full answer* (:func:`full_answer`) is a fixed text
of :data:`ANSWER_WORDS` numbered words derived from the first user message, so a test knows exactly
what a complete answer looks like. A stream carries it one word per ``chat.completion.chunk``: a role
event, the content events, a final event with ``finish_reason: "stop"``, a usage chunk when the request
asked for ``stream_options.include_usage``, then ``data: [DONE]``. A whole (non-streamed) answer is a
``chat.completion`` with ``usage``. Every answer names the upstream's own ``model``, whatever the
request asked for, so a caller can tell who served it.

**Continuations.** When a stream breaks after tokens went out, a gateway may ask another provider to
continue: the original messages plus a trailing ``{"role": "assistant", "content": <text sent>}``
(assistant *prefill*), or those plus a final user message asking to continue (the *instruction*
form). Both are answered with the **remainder** of the full answer after the last assistant message's
text (:func:`remainder`), so a correctly stitched stream equals the full answer exactly; a text that is
not a prefix of the full answer gets the whole answer again (and the stitched text is visibly wrong).
An upstream built with ``rejects_prefill=True`` answers 400 to a request whose last message is the
assistant's, as providers without prefill support do.

**Faults** (:class:`Fault`): an error status (with ``Retry-After`` and an OpenAI error body), a
reset, silence, a slow first event, a cut, a stall, a malformed event, a stream without
``[DONE]``. A fault applies to every chat request, to the first ``times`` of them, or for
``for_seconds`` after the first one; the others are answered normally.

Every chat request is recorded (:class:`Call`: when, the body, what the upstream did) so a scenario can
check who was called, how often and with what. Each connection serves one request
(``connection: close``): every attempt of a gateway opens its own, which keeps the counts exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "ANSWER_WORDS",
    "PREFILL_REFUSAL",
    "Call",
    "Fault",
    "FaultKind",
    "FaultUpstream",
    "full_answer",
    "remainder",
]

ANSWER_WORDS: Final = 80
"""Words in a full answer."""

PREFILL_REFUSAL: Final = "assistant message prefill is not supported by this model"
"""The message of the 400 an upstream built with ``rejects_prefill`` answers to a prefill."""

FaultKind = Literal[
    "healthy", "status", "reset", "silent", "slow_first", "cut", "stall", "malformed", "no_done"
]
"""What a faulty request gets:

* ``healthy`` -- a normal answer;
* ``status`` -- HTTP ``status`` with an OpenAI error body (``code``, ``error_type``, ``message``) and
  ``Retry-After`` when set;
* ``reset`` -- the request is read, then the TCP connection is reset (``SO_LINGER`` 0: an RST, no FIN);
* ``silent`` -- the connection is accepted and the request read; not a byte comes back;
* ``slow_first`` -- the response head at once, the first event only after ``first_delay`` seconds;
* ``cut`` -- ``words`` words streamed, then the connection closes (no final event, no ``[DONE]``, the
  chunked body unterminated);
* ``stall`` -- ``words`` words streamed, then the connection is held open in silence;
* ``malformed`` -- ``words`` words streamed, then an event whose data is invalid JSON, then the end;
* ``no_done`` -- the whole answer with ``finish_reason: "stop"``, and the body ends without
  ``data: [DONE]``.
"""

# Any created timestamp would do; a fixed one keeps answers byte-for-byte reproducible.
_CREATED: Final = 1_767_225_600
_MALFORMED_EVENT: Final = b'data: {"choices": [{"delta": {"content": "oo\n\n'
_HEAD_LIMIT: Final = 65_536
_BODY_LIMIT: Final = 4_194_304


@dataclass(frozen=True, slots=True)
class Fault:
    """What an upstream does wrong, and to which requests (see :data:`FaultKind`)."""

    kind: FaultKind = "healthy"
    status: int = 500
    """The HTTP status of a ``status`` fault."""
    code: str | None = None
    """The OpenAI error ``code`` of a ``status`` fault."""
    error_type: str = "server_error"
    """The OpenAI error ``type`` of a ``status`` fault."""
    message: str = "The server had an error while processing your request."
    """The OpenAI error ``message`` of a ``status`` fault."""
    retry_after: str | None = None
    """``Retry-After`` sent with a ``status`` fault (as the header's text)."""
    words: int = 40
    """Words streamed before a ``cut``, ``stall`` or ``malformed`` fault."""
    first_delay: float = 30.0
    """Seconds before the first event of a ``slow_first`` fault."""
    times: int | None = None
    """The first ``times`` chat requests get the fault, the rest a normal answer; None: every one."""
    for_seconds: float | None = None
    """The fault lasts this long after the first chat request, then the upstream is healthy."""


@dataclass(slots=True)
class Call:
    """One chat request an upstream received."""

    at: float
    """When it arrived (the upstream's clock)."""
    body: dict[str, Any]
    """The request body as sent."""
    did: str
    """What the upstream did: a :data:`FaultKind`, or ``prefill_rejected``."""


def _text(content: Any) -> str:
    """The text of a message's ``content`` (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and "text" in part
        )
    return ""


def full_answer(messages: Sequence[Any], words: int = ANSWER_WORDS) -> str:
    """The full answer to ``messages``: ``words`` numbered words tagged by the first user message."""
    prompt = next(
        (_text(m.get("content")) for m in messages if isinstance(m, Mapping) and m.get("role") == "user"),
        "",
    )
    tag = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    return " ".join(f"w{i:02d}-{tag}" for i in range(1, words + 1))


def remainder(messages: Sequence[Any], words: int = ANSWER_WORDS) -> str:
    """What answers ``messages``: the full answer, or after an assistant message (a continuation,
    prefill or instruction form) the rest of the full answer after that message's text -- or the full
    answer again when that text is not a prefix of it."""
    full = full_answer(messages, words)
    prefix = None
    for m in messages:
        if isinstance(m, Mapping) and m.get("role") == "assistant":
            prefix = _text(m.get("content"))
    if prefix is None or not full.startswith(prefix):
        return full
    return full[len(prefix) :]


def _pieces(text: str) -> list[str]:
    """``text`` cut into stream pieces, one word each with the space before it."""
    return re.findall(r"\s*\S+", text)


def _words(messages: Sequence[Any]) -> int:
    return sum(len(_text(m.get("content")).split()) for m in messages if isinstance(m, Mapping))


class _Gone(Exception):
    """The client closed the connection (or the upstream is stopping)."""


class FaultUpstream:
    """One fault-injecting OpenAI-compatible upstream on 127.0.0.1 (module docstring).

    ``name`` labels it, ``model`` is the model every answer names, ``chunk_delay`` the seconds
    between stream events (a real provider's pace, small enough for a drill).
    """

    def __init__(
        self,
        name: str,
        model: str,
        fault: Fault | None = None,
        *,
        rejects_prefill: bool = False,
        chunk_delay: float = 0.005,
        answer_words: int = ANSWER_WORDS,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.name = name
        self.model = model
        self.fault = fault if fault is not None else Fault()
        self.rejects_prefill = rejects_prefill
        self.chunk_delay = chunk_delay
        self.answer_words = answer_words
        self.clock = clock
        self.calls: list[Call] = []
        """Every chat request received, in order."""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._faulted = 0

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:<port>``) once started."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def healed_at(self) -> float | None:
        """When a ``for_seconds`` fault ends (None before the first request, or for other faults)."""
        if self.fault.for_seconds is None or not self.calls:
            return None
        return self.calls[0].at + self.fault.for_seconds

    def did(self, what: str) -> int:
        """How many chat requests got ``what`` (a :data:`FaultKind` or ``prefill_rejected``)."""
        return sum(1 for c in self.calls if c.did == what)

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening and end every connection still held (silent, stalled, slow ones)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ HTTP

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            method, path, body = request
            if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
                await self._json(writer, 200, {"status": "ok", "object": "list", "data": []})
                return
            try:
                parsed = json.loads(body)
                if not isinstance(parsed, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self._error(writer, 400, "the body is not a JSON object", "invalid_request_error")
                return
            await self._chat(reader, writer, parsed)
        except (_Gone, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        if len(head) > _HEAD_LIMIT:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, *_ = lines[0].split(" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length > _BODY_LIMIT:
            return None
        body = await reader.readexactly(length) if length else b""
        return method, path, body

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            raise _Gone
        writer.write(data)
        await writer.drain()

    async def _json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
        )
        await self._send(writer, head.encode() + body)

    async def _error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        error_type: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        error = {"message": message, "type": error_type, "param": None, "code": code}
        await self._json(writer, status, {"error": error}, headers)

    async def _until_gone(self, reader: asyncio.StreamReader, seconds: float | None = None) -> bool:
        """Wait until the client closes the connection (True) or ``seconds`` pass (False)."""

        async def closed() -> None:
            # A reset counts as gone, like a close.
            with contextlib.suppress(ConnectionError):
                while await reader.read(65_536):
                    pass

        if seconds is None:
            await closed()
            return True
        waiter = asyncio.ensure_future(closed())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return waiter.done() and not waiter.cancelled()

    # ------------------------------------------------------------------ chat

    def _fault_now(self, now: float) -> FaultKind:
        fault = self.fault
        if fault.kind == "healthy":
            return "healthy"
        if fault.times is not None:
            if self._faulted >= fault.times:
                return "healthy"
            self._faulted += 1
            return fault.kind
        healed = self.healed_at
        if healed is not None and now >= healed:
            return "healthy"
        return fault.kind

    async def _chat(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: dict[str, Any]
    ) -> None:
        now = self.clock.now()
        call = Call(at=now, body=body, did="healthy")
        self.calls.append(call)
        kind = self._fault_now(now)
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        last = messages[-1] if messages else None
        if (
            kind == "healthy"
            and self.rejects_prefill
            and isinstance(last, Mapping)
            and last.get("role") == "assistant"
        ):
            call.did = "prefill_rejected"
            await self._error(writer, 400, PREFILL_REFUSAL, "invalid_request_error", "prefill_unsupported")
            return
        call.did = kind
        fault = self.fault
        if kind == "status":
            headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
            await self._error(writer, fault.status, fault.message, fault.error_type, fault.code, headers)
            return
        if kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if kind == "silent":
            await self._until_gone(reader)
            return
        text = remainder(messages, self.answer_words)
        if not body.get("stream"):
            await self._whole(reader, writer, kind, messages, text)
            return
        await self._stream(reader, writer, kind, body, messages, text)

    def _usage(self, messages: Sequence[Any], text: str) -> dict[str, int]:
        prompt, completion = _words(messages), len(text.split())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _whole(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: FaultKind,
        messages: Sequence[Any],
        text: str,
    ) -> None:
        # A whole answer meets the stream faults as a provider would show them without streaming.
        if kind == "slow_first" and await self._until_gone(reader, self.fault.first_delay):
            return
        if kind == "stall":
            await self._until_gone(reader)
            return
        answer = {
            "id": f"chatcmpl-{self.name}-{len(self.calls)}",
            "object": "chat.completion",
            "created": _CREATED,
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": self._usage(messages, text),
        }
        raw = json.dumps(answer).encode()
        if kind == "cut":
            head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
            await self._send(writer, head.encode() + raw[: len(raw) // 2])
            return
        if kind == "malformed":
            raw = raw[: len(raw) // 2]
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(raw)}\r\n"
            "connection: close\r\n\r\n"
        )
        await self._send(writer, head.encode() + raw)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: FaultKind,
        body: Mapping[str, Any],
        messages: Sequence[Any],
        text: str,
    ) -> None:
        options = body.get("stream_options")
        with_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
        ident = f"chatcmpl-{self.name}-{len(self.calls)}"

        def event(delta: Mapping[str, Any], finish: str | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": self.model,
                "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
            }
            if with_usage:
                chunk["usage"] = None
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        async def emit(data: bytes) -> None:
            await self._send(writer, b"%x\r\n%s\r\n" % (len(data), data))

        await self._send(
            writer,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        )
        if kind == "slow_first" and await self._until_gone(reader, self.fault.first_delay):
            return
        await emit(event({"role": "assistant", "content": ""}))
        pieces = _pieces(text)
        limit = self.fault.words if kind in ("cut", "stall", "malformed") else len(pieces)
        for piece in pieces[:limit]:
            if self.chunk_delay > 0:
                await self.clock.sleep(self.chunk_delay)
            await emit(event({"content": piece}))
        if kind == "cut":
            return  # the connection closes with the chunked body unterminated
        if kind == "stall":
            await self._until_gone(reader)
            return
        if kind == "malformed":
            await emit(_MALFORMED_EVENT)
            await self._send(writer, b"0\r\n\r\n")
            return
        await emit(event({}, "stop"))
        if with_usage:
            usage = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": self.model,
                "choices": [],
                "usage": self._usage(messages, text),
            }
            await emit(b"data: " + json.dumps(usage).encode() + b"\n\n")
        if kind != "no_done":
            await emit(b"data: [DONE]\n\n")
        await self._send(writer, b"0\r\n\r\n")


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
