"""A fault-injecting OpenAI-compatible chat server, for tests and chaos drills.

It speaks the part of the OpenAI API that brownout's model client uses -- ``GET /health``,
``GET /v1/models``, ``POST /v1/chat/completions`` -- on 127.0.0.1 only, and misbehaves on demand.
The behaviour is switched at runtime with ``POST /_control`` (JSON below) or, in the same process,
:meth:`FakeLLM.set`; ``GET /_control`` reads it back with the request counters.

Modes (``mode`` of :class:`FakeBehaviour`):

=================  ==================================================================================
``ok``             answer after ``delay`` seconds (default 0)
``slow``           answer after ``delay`` seconds (default 2)
``error``          HTTP ``status`` (default 500) with an OpenAI-style error body; ``Retry-After`` when
                   ``retry_after`` is set; ``/health`` answers 503
``down``           503 everywhere, ``/health`` included (a server still loading its model)
``hang``           never answer; the request is held until the client gives up (or the server stops)
``garbage``        200 with a well-formed completion whose text is not JSON
                   ("Sure! Here is your brief: {oops")
``wrong_schema``   200 with JSON text that violates the requested schema (a required key missing,
                   bounded numbers out of range, enums with unknown values)
``flaky``          the next ``fail_times`` chat requests fail with 500, then it answers as ``ok``
``malformed``      200 whose *body* is not an OpenAI completion (truncated JSON, or ``content`` verbatim)
``rate_limited``   429 with ``Retry-After`` (``retry_after``, default 1 s), as a hosted API's rate limit
``break_before``   the connection breaks before the first token: a stream sends its headers and no event,
                   a whole answer its headers and no body
``break_mid``      the connection breaks after the first token: a stream sends its first content event,
                   a whole answer half its body
=================  ==================================================================================

Streaming: a request with ``"stream": true`` gets server-sent events as OpenAI sends them -- a role
event, one ``chat.completion.chunk`` per word of the answer (``chunk_delay`` seconds apart; a whole
answer comes once its stream would have ended, one ``chunk_delay`` per word after ``delay``), a final
event with ``finish_reason``, then ``data: [DONE]`` -- in the modes that answer (``ok``, ``slow``,
``garbage``, ``wrong_schema``, ``flaky`` once its failures are spent). ``delay`` comes before the
first event. Asked for ``stream_options: {"include_usage": true}``, a last event before ``[DONE]``
carries the ``usage`` (no choices), as OpenAI's does. Errors are plain JSON error responses,
streaming or not.

An answer's text is ``content`` when set, else a JSON document generated from the request's
``response_format.json_schema.schema`` by :func:`schema_instance`, else ``"ok"``.

Slots: ``FakeLLM(slots=N)`` (``--slots N``) answers at most N chat requests at a time, as a llama.cpp
server with ``--parallel N`` does; further requests wait inside the server, first come first served,
and their ``delay`` starts only once they have a slot. ``open_chats`` / ``peak_open_chats`` count the
chat requests the server holds at once (answering or waiting for a slot), so a test can check that a
client never sends more than the server can run; ``peak_answering`` the most answered at once.
With ``shared`` the requests answered at once share the server's speed, as llama.cpp's slots share its
threads: ``delay`` is what one request alone takes, and one that starts while N are answered (itself
included) takes N x ``delay``.

Each ``set`` / ``POST /_control`` describes the whole behaviour: fields left out take their defaults,
so ``{"mode": "ok"}`` always means a plain, prompt answer whatever was set before.

In tests::

    async with FakeLLM(mode="ok") as fake:
        ...  # talk to fake.url
        fake.set(mode="error", status=503, retry_after=2)

As a separate process (a test can ``kill -9`` it to simulate a crash); it prints
``READY http://127.0.0.1:<port>`` once it accepts connections (``--port 0`` picks a free port)::

    python -m brownout.chaos.fakellm --port 8081 --mode slow --delay 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import socket
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Literal, get_args

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "GARBAGE",
    "HOST",
    "MODES",
    "FakeBehaviour",
    "FakeLLM",
    "Mode",
    "main",
    "schema_instance",
    "schema_violation",
]

HOST = "127.0.0.1"
"""The only address the fake ever binds: it is a fault injector, never a service on the network."""

Mode = Literal[
    "ok",
    "error",
    "hang",
    "slow",
    "garbage",
    "wrong_schema",
    "flaky",
    "down",
    "malformed",
    "rate_limited",
    "break_before",
    "break_mid",
]
"""The behaviours a :class:`FakeLLM` can be switched to."""

MODES: tuple[str, ...] = get_args(Mode)
"""Every mode name, in documentation order."""

GARBAGE = "Sure! Here is your brief: {oops"
"""The text of a ``garbage`` answer: chatty and not JSON, as small models write without a grammar."""

_MALFORMED_BODY = '{"id": "chatcmpl-broken", "object": "chat.completion", "choices": ['
_SLOW_DEFAULT_DELAY = 2.0
# Recursive schemas (a node with children) would generate forever with "at least one item";
# below this depth arrays get only the items they require.
_MAX_DEPTH = 8


class FakeBehaviour(BaseModel):
    """How a :class:`FakeLLM` answers; the body of ``POST /_control``. See the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "ok"
    delay: float | None = Field(
        default=None, ge=0, le=3600, description="seconds before answering (ok: 0, slow: 2 by default)"
    )
    status: int = Field(default=500, ge=400, le=599, description="HTTP status of the 'error' mode")
    retry_after: float | None = Field(
        default=None, ge=0, le=86400, description="Retry-After seconds sent with 'error' and 'down' answers"
    )
    content: str | None = Field(
        default=None, description="answer text (ok/slow/flaky) or raw body (malformed) instead of the default"
    )
    fail_times: int = Field(default=1, ge=0, le=1_000_000, description="failures before 'flaky' answers")
    chunk_delay: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description="seconds between the events of a streamed answer (a whole answer: per word, before it)",
    )
    shared: bool = Field(
        default=False,
        description="requests answered at once share the server's speed: N of them take N x delay each",
    )

    @property
    def effective_delay(self) -> float:
        """The delay in force: ``delay`` if set, else 2 s in ``slow`` mode and 0 otherwise."""
        if self.delay is not None:
            return self.delay
        return _SLOW_DEFAULT_DELAY if self.mode == "slow" else 0.0


class _FakeState:
    """What the routes share: the behaviour, the counters, the last chat request."""

    def __init__(self, behaviour: FakeBehaviour, model: str, slots: int | None = None) -> None:
        self.model = model
        # llama.cpp's --parallel: requests beyond it wait here for a slot (None: no limit).
        self.slots = asyncio.Semaphore(slots) if slots is not None else None
        self.open_chats = 0
        self.peak_open_chats = 0
        self.answering = 0
        self.peak_answering = 0
        # Set (and replaced) whenever ``answering`` changes: shared-speed requests re-plan then.
        self.answering_changed = asyncio.Event()
        self.behaviour = behaviour
        self.failures_left = 0
        self.requests = 0
        self.chat_requests = 0
        self.last_chat: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        # Set when the server stops: held requests (hang, delays) then end at once, so a shutdown
        # never waits for them.
        self.release = asyncio.Event()
        self.ids = itertools.count(1)
        self.set(behaviour)

    def note_answering_changed(self) -> None:
        """Wake the shared-speed requests: the number answered at once changed."""
        self.answering_changed.set()
        self.answering_changed = asyncio.Event()

    def set(self, behaviour: FakeBehaviour) -> None:
        self.behaviour = behaviour
        self.failures_left = behaviour.fail_times if behaviour.mode == "flaky" else 0

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.behaviour.model_dump(),
            "failures_left": self.failures_left,
            "requests": self.requests,
            "chat_requests": self.chat_requests,
            "open_chats": self.open_chats,
            "peak_open_chats": self.peak_open_chats,
            "peak_answering": self.peak_answering,
        }


# ---------------------------------------------------------------------------------------------- the app


def _error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _until_disconnect(request: Request) -> None:
    # Once the body is read, the ASGI receive channel yields only ``http.disconnect``: when the client
    # closes the connection (it gave up) or the server drops it.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _hold(
    request: Request, release: asyncio.Event, delay: float | None, wake: asyncio.Future[Any] | None = None
) -> bool:
    """Wait ``delay`` seconds (for ever if None), or until ``wake`` is done. False if the client left or
    the server stopped first."""
    left = asyncio.ensure_future(_until_disconnect(request))
    stopped = asyncio.ensure_future(release.wait())
    waits: tuple[asyncio.Future[Any], ...] = (left, stopped) if wake is None else (left, stopped, wake)
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        return not (left.done() or stopped.done())
    finally:
        left.cancel()
        stopped.cancel()
        await asyncio.gather(left, stopped, return_exceptions=True)


async def _share(request: Request, state: _FakeState, work: float) -> bool:
    """Answer ``work`` seconds of one request's computation while sharing the server's speed with
    every request answered at the same time (processor sharing: with N answering, each advances at
    1/N). False if the client left or the server stopped first."""
    loop = asyncio.get_running_loop()
    while work > 1e-9:
        n = max(state.answering, 1)
        changed = state.answering_changed
        started = loop.time()
        wake = asyncio.ensure_future(changed.wait())
        try:
            if not await _hold(request, state.release, work * n, wake):
                return False
        finally:
            wake.cancel()
        work -= (loop.time() - started) / n
    return True


async def _take_slot(request: Request, release: asyncio.Event, slots: asyncio.Semaphore) -> bool:
    """Wait for one of the server's slots. False if the client left or the server stopped first."""
    take = asyncio.ensure_future(slots.acquire())
    left = asyncio.ensure_future(_until_disconnect(request))
    stopped = asyncio.ensure_future(release.wait())
    try:
        await asyncio.wait((take, left, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        stopped.cancel()
        await asyncio.gather(left, stopped, return_exceptions=True)
    if take.done() and not take.cancelled():
        # A slot: a client that left meanwhile is noticed while answering, as with any request.
        return True
    take.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await take
        # Acquired in the moment between the wait and the cancel: give it back.
        slots.release()
    return False


def _requested_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a chat request asks for (OpenAI ``json_schema``, or llama.cpp's ``json_object``)."""
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
    else:
        schema = rf.get("schema")
    return schema if isinstance(schema, dict) else None


def _words(messages: Sequence[Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _usage(body: Mapping[str, Any], content: str) -> dict[str, int]:
    """Token counts of an answer, one token per word."""
    prompt_tokens = _words(body.get("messages") or [])
    completion_tokens = len(content.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion(state: _FakeState, body: Mapping[str, Any], content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{next(state.ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or state.model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": _usage(body, content),
    }


def _stream_events(state: _FakeState, body: Mapping[str, Any], content: str) -> list[bytes]:
    """The server-sent events of a streamed answer: role, one chunk per word, finish, [DONE]."""
    base = {
        "id": f"chatcmpl-fake-{next(state.ids)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model") or state.model,
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    words = content.split(" ")
    pieces = [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]
    events = [
        event({"role": "assistant", "content": ""}),
        *(event({"content": piece}) for piece in pieces),
        event({}, "stop"),
    ]
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        # As OpenAI does when asked: a last event with no choices and the request's token counts.
        last: dict[str, Any] = {**base, "choices": [], "usage": _usage(body, content)}
        events.append(f"data: {json.dumps(last)}\n\n".encode())
    return [*events, b"data: [DONE]\n\n"]


class _EventStream(Response):
    """A streamed answer sent event by event; with ``cut``, the body stops after that many events and
    the connection breaks (the app returns without finishing the response, so uvicorn drops it)."""

    def __init__(self, events: list[bytes], delay: float, release: asyncio.Event, cut: int | None) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = events
        self.delay = delay
        self.release = release
        self.cut = cut

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, event in enumerate(self.events):
            if self.cut is not None and i >= self.cut:
                return
            if i and self.delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.delay)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Broken(Response):
    """Headers, then ``partial`` (perhaps nothing) of the body, then a dropped connection: the app
    returns without finishing the response, so uvicorn closes it. ``stream`` sends SSE headers;
    otherwise JSON ones declaring a ``declared``-byte body that never comes whole."""

    def __init__(self, partial: bytes, *, stream: bool, declared: int = 1024) -> None:
        super().__init__(status_code=200)
        self.partial = partial
        self.stream = stream
        self.declared = declared

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.stream:
            headers = [(b"content-type", b"text/event-stream")]
        else:
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(self.declared).encode()),
            ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if self.partial:
            await send({"type": "http.response.body", "body": self.partial, "more_body": True})


def _build_app(state: _FakeState) -> Starlette:
    """The ASGI app serving ``state``."""

    async def health(request: Request) -> Response:
        state.requests += 1
        mode = state.behaviour.mode
        if mode == "error":
            return JSONResponse({"status": "error"}, status_code=503)
        if mode == "down":
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        state.requests += 1
        if state.behaviour.mode == "down":
            return _error(503, "model is loading", state.behaviour.retry_after)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "brownout"}],
            }
        )

    async def chat(request: Request) -> Response:
        state.requests += 1
        state.chat_requests += 1
        state.open_chats += 1
        state.peak_open_chats = max(state.peak_open_chats, state.open_chats)
        try:
            slots = state.slots
            if slots is None:
                return await answer(request)
            # Read (and keep) the body first: waiting for a slot watches the connection for a
            # disconnect, which reads the request's messages.
            await request.body()
            if not await _take_slot(request, state.release, slots):
                return _error(503, "server stopping")
            try:
                return await answer(request)
            finally:
                slots.release()
        finally:
            state.open_chats -= 1

    async def answer(request: Request) -> Response:
        state.answering += 1
        state.peak_answering = max(state.peak_answering, state.answering)
        state.note_answering_changed()
        try:
            return await answer_now(request)
        finally:
            state.answering -= 1
            state.note_answering_changed()

    async def answer_now(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' must be a list")
        state.last_chat = body
        state.last_headers = dict(request.headers)
        b = state.behaviour
        mode = b.mode
        if mode == "flaky" and state.failures_left > 0:
            state.failures_left -= 1
            return _error(500, "injected flaky failure")
        if mode == "error":
            return _error(b.status, f"injected error {b.status}", b.retry_after)
        if mode == "rate_limited":
            retry = b.retry_after if b.retry_after is not None else 1.0
            return _error(429, "injected rate limit", retry)
        if mode == "down":
            return _error(503, "model is loading", b.retry_after)
        if mode == "hang":
            await _hold(request, state.release, None)
            # Reached only when the server stops (a departed client never reads this).
            return _error(503, "server stopping")
        delay = b.effective_delay
        if b.shared and delay > 0:
            if not await _share(request, state, delay):
                return _error(503, "server stopping")
        elif delay > 0 and not await _hold(request, state.release, delay):
            return _error(503, "server stopping")
        if mode == "malformed":
            raw = b.content if b.content is not None else _MALFORMED_BODY
            return Response(raw, media_type="application/json")
        stream = body.get("stream") is True
        if mode == "break_before":
            return _Broken(b"", stream=stream)
        schema = _requested_schema(body)
        if mode == "garbage":
            content = GARBAGE
        elif mode == "wrong_schema":
            content = json.dumps(schema_violation(schema) if schema is not None else ["not", "an", "object"])
        elif b.content is not None:
            content = b.content
        elif schema is not None:
            content = json.dumps(schema_instance(schema))
        else:
            content = "ok"
        if stream:
            events = _stream_events(state, body, content)
            # break_mid: the role event and the first content event, then the connection breaks.
            return _EventStream(events, b.chunk_delay, state.release, cut=2 if mode == "break_mid" else None)
        if b.chunk_delay > 0:
            # A whole answer comes when its stream would have ended: as a real server, it generates
            # token by token either way.
            pieces = len(content.split(" "))
            if not await _hold(request, state.release, b.chunk_delay * pieces):
                return _error(503, "server stopping")
        if mode == "break_mid":
            whole = json.dumps(_completion(state, body, content)).encode()
            return _Broken(whole[: len(whole) // 2], stream=False, declared=len(whole))
        return JSONResponse(_completion(state, body, content))

    async def control(request: Request) -> Response:
        if request.method == "POST":
            try:
                behaviour = FakeBehaviour.model_validate_json(await request.body())
            except ValidationError as e:
                return JSONResponse({"error": str(e)}, status_code=422)
            state.set(behaviour)
        return JSONResponse(state.snapshot())

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/_control", control, methods=["GET", "POST"]),
        ]
    )


# ---------------------------------------------------------------------------------------------- serving


class _Server(uvicorn.Server):
    """uvicorn's server with two changes for running inside someone else's process.

    ``embedded``: it leaves signal handlers alone (the host process -- pytest -- owns them) and waits
    on an event instead of polling every 0.1 s. In both forms it releases held requests before
    shutting down, so a hanging request never delays the stop.
    """

    def __init__(
        self, config: uvicorn.Config, state: _FakeState, *, embedded: bool, on_ready: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._state = state
        self._embedded = embedded
        self._on_ready = on_ready
        self.stop_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install uvicorn's SIGINT/SIGTERM handlers only when running as its own process."""
        if self._embedded:
            yield
            return
        with super().capture_signals():
            yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, then report readiness."""
        await super().startup(sockets=sockets)
        if self.started:
            self._on_ready()

    async def main_loop(self) -> None:
        """Run until asked to stop, then release held requests."""
        if self._embedded:
            await self.on_tick(0)
            await self.stop_event.wait()
        else:
            await super().main_loop()
        self._state.release.set()


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A restarted fake reclaims its port at once even while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


def _config(state: _FakeState) -> uvicorn.Config:
    return uvicorn.Config(
        _build_app(state),
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        loop="asyncio",
        server_header=False,
        timeout_graceful_shutdown=2,
    )


class FakeLLM:
    """An in-process fault-injecting OpenAI-compatible server on 127.0.0.1 (see the module docstring).

    ``async with FakeLLM(mode="ok") as fake:`` starts it on a free port (or ``port``) as a task of the
    running event loop; ``fake.url`` is its base URL. Leaving the block stops it and ends every
    request it still holds. It can be started again with :meth:`start` and keeps its port and counters.
    """

    def __init__(
        self,
        mode: Mode = "ok",
        *,
        delay: float | None = None,
        status: int = 500,
        retry_after: float | None = None,
        content: str | None = None,
        fail_times: int = 1,
        chunk_delay: float = 0.0,
        model: str = "fake",
        port: int = 0,
        slots: int | None = None,
        shared: bool = False,
    ) -> None:
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        behaviour = FakeBehaviour(
            mode=mode,
            delay=delay,
            status=status,
            retry_after=retry_after,
            content=content,
            fail_times=fail_times,
            chunk_delay=chunk_delay,
            shared=shared,
        )
        self._state = _FakeState(behaviour, model, slots)
        self._port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ reading

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (known once started)."""
        if not self._port:
            raise RuntimeError("FakeLLM has not been started")
        return f"http://{HOST}:{self._port}"

    @property
    def port(self) -> int:
        """The TCP port (0 until first started with ``port=0``)."""
        return self._port

    @property
    def behaviour(self) -> FakeBehaviour:
        """The behaviour in force."""
        return self._state.behaviour

    @property
    def requests(self) -> int:
        """Requests served so far on every route but ``/_control``."""
        return self._state.requests

    @property
    def chat_requests(self) -> int:
        """Requests to ``/v1/chat/completions`` so far."""
        return self._state.chat_requests

    @property
    def open_chats(self) -> int:
        """Chat requests the server holds now (answering, or waiting for a slot)."""
        return self._state.open_chats

    @property
    def peak_open_chats(self) -> int:
        """The most chat requests the server held at once so far."""
        return self._state.peak_open_chats

    @property
    def peak_answering(self) -> int:
        """The most chat requests answered at once so far (at most ``slots``)."""
        return self._state.peak_answering

    @property
    def last_chat(self) -> dict[str, Any] | None:
        """The JSON body of the last well-formed chat request."""
        return self._state.last_chat

    @property
    def last_headers(self) -> dict[str, str]:
        """The headers (lower-case names) of the last well-formed chat request."""
        return self._state.last_headers

    @property
    def running(self) -> bool:
        """True while the server task runs."""
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ control

    def set(
        self,
        mode: Mode = "ok",
        *,
        delay: float | None = None,
        status: int = 500,
        retry_after: float | None = None,
        content: str | None = None,
        fail_times: int = 1,
        chunk_delay: float = 0.0,
    ) -> None:
        """Replace the behaviour (fields left out take their defaults); validated like ``/_control``."""
        self._state.set(
            FakeBehaviour(
                mode=mode,
                delay=delay,
                status=status,
                retry_after=retry_after,
                content=content,
                fail_times=fail_times,
                chunk_delay=chunk_delay,
            )
        )

    async def start(self) -> None:
        """Start serving on 127.0.0.1 (on a free port the first time unless ``port`` was given)."""
        if self.running:
            raise RuntimeError("FakeLLM is already running")
        sock = _bind(self._port)
        self._port = sock.getsockname()[1]
        state = self._state
        state.release = asyncio.Event()
        ready = asyncio.Event()
        server = _Server(_config(state), state, embedded=True, on_ready=ready.set)
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"fakellm:{self._port}")
        self._task = task
        waiter = asyncio.ensure_future(ready.wait())
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if task.done():
            sock.close()
            self._task = None
            task.result()  # raises why it could not start
            raise RuntimeError("FakeLLM server stopped during startup")

    async def stop(self) -> None:
        """Stop serving: end held requests, close connections, wait for the server task."""
        task, server = self._task, self._server
        if task is None or server is None:
            return
        self._task = self._server = None
        server.should_exit = True
        server.stop_event.set()
        await task

    async def __aenter__(self) -> FakeLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        where = self.url if self._port else "not started"
        return f"FakeLLM({where}, mode={self._state.behaviour.mode!r})"


# ---------------------------------------------------------------------------------------------- schemas


def schema_instance(schema: Mapping[str, Any]) -> Any:
    """A deterministic JSON value valid against ``schema``.

    Covers what grammar-constrained decoders honour: objects (the required properties), ``enum``
    (the first value), ``const``, integers and numbers (the midpoint of their bounds), strings (short,
    within ``minLength``/``maxLength``; common ``format`` s), arrays (``minItems`` items, at least one),
    booleans, null, ``$ref`` to ``$defs``, ``anyOf``/``oneOf`` (the first non-null branch) and
    ``allOf`` (merged). ``pattern`` is not honoured.
    """
    return _Gen(schema).instance(schema, 0, None)


def schema_violation(schema: Mapping[str, Any]) -> Any:
    """Valid JSON that ``schema`` rejects: :func:`schema_instance` with bounded numbers pushed out of
    range, enums given an unknown value, bounded strings made too long, and the first required key of
    the top object removed (a value of the wrong type when nothing else can be broken)."""
    gen = _Gen(schema)
    valid = gen.instance(schema, 0, None)
    broken = gen.violate(schema, valid, 0)
    if broken == valid:
        return [valid] if not isinstance(valid, list) else {"unexpected": valid}
    return broken


_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


class _Gen:
    """Instance generation and violation over one root schema (for ``$ref`` resolution)."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def resolve(self, schema: Any) -> Any:
        """Follow ``$ref`` (local JSON pointers) and merge ``allOf``."""
        for _ in range(32):
            if not isinstance(schema, Mapping) or "$ref" not in schema:
                break
            target = self._pointer(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, Mapping) else target
        if isinstance(schema, Mapping) and "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                if not isinstance(part, Mapping):
                    continue
                props = {**merged.get("properties", {}), **part.get("properties", {})}
                required = [*merged.get("required", []), *part.get("required", [])]
                merged = {**part, **merged, "properties": props, "required": list(dict.fromkeys(required))}
            return merged
        return schema

    def _pointer(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node: Any = self.root
        for raw in ref[1:].split("/")[1:]:
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            else:
                return {}
        return node

    @staticmethod
    def _type(schema: Mapping[str, Any]) -> str | None:
        t = schema.get("type")
        if isinstance(t, list):
            non_null = [x for x in t if x != "null"]
            return non_null[0] if non_null else "null"
        if isinstance(t, str):
            return t
        if "properties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        if any(k in schema for k in ("minLength", "maxLength", "pattern", "format")):
            return "string"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return "number"
        return None

    @staticmethod
    def _branch(options: Any) -> Any:
        """The first branch of anyOf/oneOf that is not plain null (or null if all are)."""
        if not isinstance(options, list) or not options:
            return {}
        for option in options:
            if not (isinstance(option, Mapping) and option.get("type") == "null"):
                return option
        return options[0]

    def instance(self, schema: Any, depth: int, index: int | None) -> Any:
        """A valid instance; ``index`` (set for items of a ``uniqueItems`` array) makes items differ."""
        schema = self.resolve(schema)
        if not isinstance(schema, Mapping):
            return "ok"  # ``true`` or nonsense: anything goes
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[(index or 0) % len(enum)]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.instance(self._branch(schema[key]), depth, index)
        kind = self._type(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema, index)
        if kind == "number":
            return self._number(schema, index)
        if kind == "boolean":
            return (index or 0) % 2 == 0
        if kind == "null":
            return None
        if kind == "string":
            return self._string(schema, index)
        return "ok"

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key in schema.get("required") or []:
            sub = props.get(key, extra if isinstance(extra, Mapping) else {})
            out[key] = self.instance(sub, depth + 1, None)
        for key, sub in props.items():
            if len(out) >= int(schema.get("minProperties", 0)):
                break
            out.setdefault(key, self.instance(sub, depth + 1, None))
        return out

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        out = [self.instance(sub, depth + 1, None) for sub in prefix]
        items = schema.get("items", {})
        unique = bool(schema.get("uniqueItems"))
        want = int(schema.get("minItems", 0))
        if depth < _MAX_DEPTH:
            want = max(want, 1)
        if "maxItems" in schema:
            want = min(want, int(schema["maxItems"]))
        while len(out) < want and items is not False:
            out.append(self.instance(items, depth + 1, len(out) if unique else None))
        return out

    @staticmethod
    def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        """(low, low exclusive, high, high exclusive), understanding draft-4 boolean exclusives too."""
        lo, hi = schema.get("minimum"), schema.get("maximum")
        lo_x = hi_x = False
        x_lo, x_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if x_lo is True:
            lo_x = lo is not None
        elif isinstance(x_lo, int | float) and (lo is None or x_lo >= lo):
            lo, lo_x = x_lo, True
        if x_hi is True:
            hi_x = hi is not None
        elif isinstance(x_hi, int | float) and (hi is None or x_hi <= hi):
            hi, hi_x = x_hi, True
        return lo, lo_x, hi, hi_x

    def _integer(self, schema: Mapping[str, Any], index: int | None) -> int:
        lo_f, lo_x, hi_f, hi_x = self._bounds(schema)
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_x else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_x else math.floor(hi_f))
        if lo is not None and hi is not None:
            value = (lo + hi) // 2
            if index:
                value = lo + (value - lo + index) % (hi - lo + 1)
        else:
            offset = index or 0
            value = lo + offset if lo is not None else hi - offset if hi is not None else offset
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0 and value % step:
            down = value - value % step
            value = down if lo is None or down >= lo else down + step
        return value

    def _number(self, schema: Mapping[str, Any], index: int | None) -> float:
        lo, lo_x, hi, hi_x = self._bounds(schema)
        if lo is not None and hi is not None:
            value = (lo + hi) / 2
            if index:
                # Distinct values strictly inside the bounds for unique items.
                value = lo + (hi - lo) * (index + 1) / (index + 2)
        elif lo is not None:
            value = lo + (1 if lo_x else 0) + (index or 0)
        elif hi is not None:
            value = hi - (1 if hi_x else 0) - (index or 0)
        else:
            value = float(index or 0)
        return float(value)

    @staticmethod
    def _string(schema: Mapping[str, Any], index: int | None) -> str:
        fmt = schema.get("format")
        text = _FORMATS.get(fmt, "sample") if isinstance(fmt, str) else "sample"
        suffix = str(index) if index and text == "sample" else ""
        high = schema.get("maxLength")
        if isinstance(high, int):
            # Trim the stem, not the suffix that keeps unique items distinct.
            text = (text[: max(0, high - len(suffix))] + suffix)[-high:] if high > 0 else ""
        else:
            text += suffix
        low = int(schema.get("minLength", 0))
        if len(text) < low:
            text += "x" * (low - len(text))
        return text

    def violate(self, schema: Any, value: Any, depth: int) -> Any:
        """``value`` (valid for ``schema``) broken wherever the schema sets a limit."""
        schema = self.resolve(schema)
        if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
            return value
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return "__not_in_enum__"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.violate(self._branch(schema[key]), value, depth)
        kind = self._type(schema)
        if kind == "object" and isinstance(value, dict):
            props = schema.get("properties") or {}
            out = {k: self.violate(props.get(k, {}), v, depth + 1) for k, v in value.items()}
            required = schema.get("required") or []
            if depth == 0 and required:
                out.pop(required[0], None)
            return out
        if kind == "array" and isinstance(value, list):
            items = schema.get("items", {})
            return [self.violate(items, v, depth + 1) for v in value]
        if kind in ("integer", "number") and isinstance(value, int | float):
            lo, _, hi, _ = self._bounds(schema)
            if hi is not None:
                return math.floor(hi) + 1 if kind == "integer" else hi + 1
            if lo is not None:
                return math.ceil(lo) - 1 if kind == "integer" else lo - 1
        if kind == "string" and isinstance(value, str) and isinstance(schema.get("maxLength"), int):
            return "x" * (schema["maxLength"] + 1)
        return value


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake as its own process until SIGINT/SIGTERM (or SIGKILL, which is the point)."""
    parser = argparse.ArgumentParser(
        prog="python -m brownout.chaos.fakellm",
        description="A fault-injecting OpenAI-compatible chat server on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--delay", type=float, default=None, help="seconds before answering")
    parser.add_argument("--status", type=int, default=500, help="HTTP status of the 'error' mode")
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds on errors")
    parser.add_argument("--content", default=None, help="answer text instead of the generated one")
    parser.add_argument("--fail-times", type=int, default=1, help="failures before 'flaky' answers")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--model", default="fake", help="model id reported by /v1/models")
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="chat requests answered at once; more wait (default: no limit)",
    )
    args = parser.parse_args(argv)
    try:
        behaviour = FakeBehaviour(
            mode=args.mode,
            delay=args.delay,
            status=args.status,
            retry_after=args.retry_after,
            content=args.content,
            fail_times=args.fail_times,
            chunk_delay=args.chunk_delay,
        )
    except ValidationError as e:
        parser.error(str(e))
    if args.slots is not None and args.slots < 1:
        parser.error(f"--slots must be at least 1, got {args.slots}")
    state = _FakeState(behaviour, args.model, args.slots)
    sock = _bind(args.port)
    url = f"http://{HOST}:{sock.getsockname()[1]}"

    def ready() -> None:
        print(f"READY {url}", flush=True)

    _Server(_config(state), state, embedded=False, on_ready=ready).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
