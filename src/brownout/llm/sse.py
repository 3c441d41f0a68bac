"""Server-sent events of an OpenAI chat-completion stream, read and checked one event at a time.

One reader for every stream brownout consumes: the gateway relays what it reads to its client (see
:mod:`brownout.gateway.stream`), the model client (:mod:`brownout.llm.client`) keeps only the answer.
:class:`EventReader` takes its bytes from any :class:`PieceSource` -- the gateway's own upstream
connection, or an httpx response -- and checks each whole event as it arrives: its ``data`` must be
``[DONE]`` or a JSON object that is not an error, else :class:`BrokenStream` is raised. It keeps the
text of choice 0, whether the final event (one with a ``finish_reason``) came, and the ``usage`` and
``model`` the server reported.
"""

from __future__ import annotations

import json
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = ["DONE_EVENT", "BrokenStream", "EventReader", "PieceSource", "complete_events"]

DONE_EVENT: Final = b"data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""


def complete_events(buf: bytes) -> int:
    """Length of the prefix of ``buf`` made of whole SSE events (0 when none has ended yet)."""
    cut = buf.rfind(b"\n\n")
    cut = cut + 2 if cut >= 0 else 0
    crlf = buf.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > cut:
        cut = crlf + 4
    return cut


class PieceSource(Protocol):
    """Where an :class:`EventReader` reads from: a response body, piece by piece as it arrives."""

    async def next_piece(self, timeout: float) -> bytes | None:
        """The next piece of the body, or None at its end; raises when ``timeout`` seconds pass
        without one (each source with its own timeout error) or when the connection breaks."""
        ...


S = TypeVar("S", bound=PieceSource)


class BrokenStream(Exception):
    """The upstream broke the stream (malformed or error event, end before the final event)."""


class EventReader(Generic[S]):
    """Reads one upstream stream event by event, checks each, and keeps what continuation needs.

    ``response`` is the source, kept for its owner (to close it); ``resume``: this stream continues
    an answer already begun, so role-only events are dropped.
    """

    __slots__ = (
        "choices",
        "done",
        "finish_reason",
        "finished",
        "model",
        "response",
        "resume",
        "tail",
        "text",
        "tokens",
        "tools",
        "usage",
    )

    def __init__(self, response: S, *, resume: bool = False) -> None:
        self.response = response
        self.resume = resume
        self.tail = b""
        self.done = False
        """``data: [DONE]`` was read."""
        self.finished = False
        """The final event (one with a ``finish_reason``) was read."""
        self.finish_reason: str | None = None
        """Choice 0's ``finish_reason``, once its final event was read."""
        self.text: list[str] = []
        """The content of choice 0 read so far, piece by piece."""
        self.tokens = 0
        """Content events read (about one token each)."""
        self.tools = False
        """A tool call was streamed (such an answer is not continued)."""
        self.choices = False
        """A choice other than the first was streamed (such an answer is not continued)."""
        self.usage: dict[str, Any] | None = None
        """The ``usage`` the server reported (OpenAI sends it in a last event when asked with
        ``stream_options: {"include_usage": true}``)."""
        self.model: str | None = None
        """The ``model`` the server says answered."""

    async def read(self, timeout: float) -> tuple[bytes, bool] | None:
        """The next whole events to forward, checked, and whether a token was among them; None at the
        stream's end. Raises the source's timeout error after ``timeout`` seconds without a byte, its
        connection error when the connection breaks, and :class:`BrokenStream` on a bad event."""
        while True:
            chunk = await self.response.next_piece(timeout)
            if chunk is None:
                if self.tail.strip():
                    raise BrokenStream("the stream ended inside an event")
                return None
            buf = self.tail + chunk if self.tail else chunk
            cut = complete_events(buf)
            if not cut:
                self.tail = buf
                continue
            self.tail = buf[cut:]
            return self._check(buf[:cut])

    def _check(self, raw: bytes) -> tuple[bytes, bool]:
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        token = False
        for event in raw.split(b"\n\n"):
            if not event:
                continue
            data: list[bytes] = []
            named_error = False
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                elif line.startswith(b"event:") and line[6:].strip() == b"error":
                    named_error = True
            if not data:
                if not named_error:
                    out.append(event + b"\n\n")  # a comment (keep-alive): harmless, forwarded
                continue
            payload = b"\n".join(data)
            if payload.strip() == b"[DONE]":
                self.done = True
                out.append(DONE_EVENT)
                continue
            try:
                chunk = json.loads(payload)
            except (ValueError, RecursionError):
                raise BrokenStream(f"a malformed event: {payload[:80]!r}") from None
            if type(chunk) is not dict:
                raise BrokenStream(f"an event that is not a JSON object: {payload[:80]!r}")
            if named_error or "error" in chunk:
                raise BrokenStream(f"an error event: {payload[:200].decode('utf-8', 'replace')}")
            usage = chunk.get("usage")
            if type(usage) is dict:
                self.usage = usage
            model = chunk.get("model")
            if type(model) is str:
                self.model = model
            if self._note(chunk):
                token = True
            elif self.resume and not usage:
                continue  # the continuation's role event: the client has had one
            out.append(event + b"\n\n")
        return b"".join(out), token

    def _note(self, chunk: dict[str, Any]) -> bool:
        """Keep what ``chunk`` adds to the answer; True when it carries a token or the finish."""
        choices = chunk.get("choices")
        if type(choices) is not list:
            return False
        token = False
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            if index != 0:
                self.choices = True
            delta = choice.get("delta")
            if type(delta) is dict:
                content = delta.get("content")
                if type(content) is str and content:
                    self.text.append(content)
                    self.tokens += 1
                    token = True
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.tools = True
                    token = True
            reason = choice.get("finish_reason")
            if reason:
                self.finished = True
                if index == 0 and type(reason) is str:
                    self.finish_reason = reason
                token = True
        return token
