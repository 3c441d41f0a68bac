"""The gateway's HTTP routes, as plain ASGI endpoints on the app's router.

* ``POST /v1/chat/completions`` -- OpenAI's chat API over the configured model groups (whole answers
  and ``stream: true``);
* ``GET /v1/models`` -- the model groups, as OpenAI lists models;
* ``GET /health/gateway`` -- every group's endpoints with their breaker state, load and latency
  (503 when no group can answer).

The chat route is ASGI, not a FastAPI endpoint: the body is read and parsed once with :mod:`json`,
only ``model`` and ``stream`` are checked (everything else is the upstream's to judge), and the
answer goes out as the upstream's bytes -- no validation model, no response model, no re-encoding.

Headers on every answer: ``x-brownout-served-by`` (``group/endpoint``), ``x-brownout-fallbacks``
(the groups tried, ``>``-separated: just the group asked for when no fallback was needed),
``x-brownout-attempts``; with a cache, ``x-brownout-cache`` (``hit``, ``miss`` or ``bypass``); with
a schema, ``x-brownout-json-guard`` (see :mod:`brownout.gateway.guard`).

Refusals use the server's one error shape, OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(:mod:`brownout.server.errors`, whose functions make every one of them): 400 for a body that is not
UTF-8, not JSON, not a JSON object, holds NaN/Infinity or a lone surrogate, or lacks ``model``; 404
``model_not_found`` for an unknown group; 413 for a body over ``gateway.max_body_bytes``; 415 without
``Content-Type: application/json``; 429 ``overloaded`` with ``Retry-After`` (and ``retry_after``)
when the group's admission sheds the request; 503 ``upstream_unavailable`` with ``Retry-After`` when
no endpoint of the group or its fallbacks answered. Upstream 4xx that blame the request come back with
the upstream's status and words, put in the one shape (llama.cpp's server, for one, sends a numeric
``code`` and no ``param``).

The routes are documented in ``/openapi.json`` by :func:`gateway_openapi` (request and answer schemas,
the error shape) without becoming FastAPI routes: they keep the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any, Final, TypeVar, get_args

from prometheus_client import CollectorRegistry
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from brownout.errors import Overloaded
from brownout.gateway.guard import requested_schema
from brownout.gateway.metrics import GatewayCollector
from brownout.gateway.openapi import gateway_openapi
from brownout.gateway.router import (
    Answer,
    Gateway,
    GatewayUnavailable,
    Group,
    Passthrough,
    retry_after_header,
    snippet,
)
from brownout.gateway.stream import OpenStream, discard, open_stream, relay
from brownout.server.errors import (
    DEFAULT_RETRY_AFTER,
    ApiError,
    ErrorType,
    check_json_content_type,
    error_bytes,
    error_content,
    parse_json_body,
    send_error,
)

__all__ = ["CHAT_PATH", "MAX_BUDGET", "ChatCompletions", "gateway_openapi", "install_gateway"]

T = TypeVar("T")

CHAT_PATH: Final = "/v1/chat/completions"
"""Where the chat route is installed (the server's body-size guard gives it the gateway's limit)."""

_JSON: Final = (b"content-type", b"application/json")

MAX_BUDGET: Final = 86_400.0
"""The largest ``x-brownout-budget`` a request may ask for, in seconds."""
_SSE_EXTRA: Final = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def _reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    out = [_JSON, (b"content-length", str(len(body)).encode())]
    if headers:
        out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _refuse(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None, **fields: Any
) -> None:
    """An error answer in the one shape (``fields``: see :func:`~brownout.server.errors.error_content`)."""
    await send_error(send, status, error_bytes(status, message, **fields), headers or ())


async def _refuse_error(send: Send, e: ApiError) -> None:
    await _refuse(send, e.status_code, str(e.detail), **e.fields)


class ChatCompletions:
    """The ASGI endpoint of ``POST /v1/chat/completions`` (see the module docstring)."""

    __slots__ = ("gateway", "max_body")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.max_body = gateway.config.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        gateway = self.gateway
        now = gateway.clock.now
        t0 = now()
        for name, value in scope["headers"]:
            if name == b"content-length":
                # A body declared too large is refused before any of it is read: waiting for
                # 99,999,999,999 bytes only to refuse them holds the connection for nothing.
                if not value.isdigit() or len(value) > 18 or int(value) > self.max_body:
                    await _too_large(send, self.max_body)
                    return
                break
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        for name, value in scope["headers"]:
            if name == b"content-type":
                refused = check_json_content_type(value)
                break
        else:
            refused = check_json_content_type(None)
        if refused is not None:
            await _refuse_error(send, refused)
            return
        raw: bytes = message.get("body", b"")
        if message.get("more_body", False):
            parts = [raw]
            size = len(raw)
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await _too_large(send, self.max_body)
                    return
                parts.append(chunk)
                if not message.get("more_body", False):
                    break
            raw = b"".join(parts)
        elif len(raw) > self.max_body:
            await _too_large(send, self.max_body)
            return
        try:
            # Long conversations nest shallowly but hold many brackets: only the parser's own limit.
            body = parse_json_body(raw, max_depth=None)
        except ApiError as e:
            await _refuse_error(send, e)
            return
        if type(body) is not dict:
            await _refuse(send, 400, "the request body must be a JSON object")
            return
        model = body.get("model")
        if type(model) is not str:
            await _refuse(
                send,
                400,
                "'model' is required: the name of a model group",
                code="missing_model",
                param="model",
            )
            return
        group = gateway.groups.get(model)
        if group is None:
            await _refuse(
                send,
                404,
                f"the model {model!r} does not exist here; model groups: {sorted(gateway.groups)}",
                code="model_not_found",
                param="model",
            )
            return
        stream = body.get("stream")
        if stream is not None and type(stream) is not bool:
            await _refuse(send, 400, "'stream' must be true or false", code="invalid_value", param="stream")
            return
        if not gateway.started:
            await _refuse(
                send, 503, "the gateway is starting", [(b"retry-after", b"1")], code="starting", retry_after=1
            )
            return
        budget = group.request_budget
        for name, value in scope["headers"]:
            if name == b"x-brownout-budget":
                asked = _budget(value)
                if asked is None:
                    await _refuse(
                        send,
                        400,
                        f"x-brownout-budget must be a number of seconds above 0 and at most {MAX_BUDGET:g}",
                        code="invalid_value",
                        param="x-brownout-budget",
                    )
                    return
                budget = asked
                break
        deadline = t0 + budget
        stats = group.stats
        stats.requests += 1
        if stream:
            await self._stream(group, body, raw, t0, deadline, receive, send)
            return
        try:
            if group.shares_slots:
                done = await _unless_gone(receive, gateway.complete(group, body, raw, deadline))
                if done is None:
                    stats.outcomes["disconnected"] += 1
                    return
                answer, cached = done
            else:
                answer, cached = await gateway.complete(group, body, raw, deadline)
        except Overloaded as e:
            stats.outcomes["overloaded"] += 1
            await _overloaded(send, group, e)
            return
        except GatewayUnavailable as e:
            stats.outcomes["unavailable"] += 1
            await _unavailable(send, e)
            return
        answer_headers, answer_body = _shaped(answer)
        headers = [
            *answer_headers,
            (b"content-length", str(len(answer_body)).encode()),
            (b"x-brownout-served-by", answer.served_by),
            (b"x-brownout-attempts", str(answer.attempts).encode()),
        ]
        if answer.path:
            headers.append((b"x-brownout-fallbacks", answer.path))
        if cached is not None:
            headers.append((b"x-brownout-cache", cached.encode()))
        if answer.guard is not None:
            headers.append((b"x-brownout-json-guard", answer.guard.encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer_body})
        stats.outcomes["served" if answer.status < 400 else "client_error"] += 1
        stats.overhead.observe(max(0.0, now() - t0 - answer.upstream))

    async def _stream(
        self,
        group: Group,
        body: dict[str, Any],
        raw: bytes,
        t0: float,
        deadline: float,
        receive: Receive,
        send: Send,
    ) -> None:
        gateway = self.gateway
        stats = group.stats
        admission = group.admission
        try:
            await admission.__aenter__()
        except Overloaded as e:
            stats.outcomes["overloaded"] += 1
            await _overloaded(send, group, e)
            return
        try:
            try:
                opening = gateway.hedged(
                    group,
                    lambda trail: gateway.route(
                        group,
                        body,
                        raw,
                        lambda g, ep, content, until: open_stream(gateway, g, ep, content, until),
                        deadline=deadline,
                        trail=trail,
                    ),
                    discard,
                )
                if group.shares_slots:
                    found = await _unless_gone(receive, opening)
                    if found is None:
                        stats.outcomes["disconnected"] += 1
                        return
                    opened: OpenStream = found
                else:
                    opened = await opening
            except Passthrough as e:
                answer: Answer = e.answer
                await _reply_whole(send, answer)
                stats.outcomes["served" if answer.status < 400 else "client_error"] += 1
                return
            except GatewayUnavailable as e:
                stats.outcomes["unavailable"] += 1
                await _unavailable(send, e)
                return
            headers = [
                *_SSE_EXTRA,
                (b"x-brownout-served-by", opened.served_by),
                (b"x-brownout-attempts", str(opened.attempts).encode()),
            ]
            if opened.path:
                headers.append((b"x-brownout-fallbacks", opened.path))
            if group.json_guard and requested_schema(body) is not None:
                headers.append((b"x-brownout-json-guard", b"skipped"))
            stats.overhead.observe(max(0.0, gateway.clock.now() - t0 - opened.upstream))
            stats.outcomes[await relay(gateway, group, opened, body, deadline, receive, send, headers)] += 1
        finally:
            await admission.__aexit__(None, None, None)


async def _disconnected(receive: Receive) -> None:
    # Once the body is read, the ASGI receive channel yields only http.disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when the client disconnects first: then ``work`` is cancelled.

    For a group whose requests may wait long for a slot of a model server the brief pipeline shares:
    a caller that gave up must leave the queue, not have its request sent once a slot frees, for
    nobody, in place of the pipeline's calls and the requests of callers still waiting.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _reply_whole(send: Send, answer: Answer) -> None:
    answer_headers, answer_body = _shaped(answer)
    headers = [
        *answer_headers,
        (b"content-length", str(len(answer_body)).encode()),
        (b"x-brownout-served-by", answer.served_by),
        (b"x-brownout-attempts", str(answer.attempts).encode()),
    ]
    if answer.path:
        headers.append((b"x-brownout-fallbacks", answer.path))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer_body})


_ERROR_TYPES: Final = frozenset(get_args(ErrorType))


def _shaped(answer: Answer) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body to send for ``answer``: as they came when it succeeded; when the upstream
    refused the request (a 4xx passed back), its status and words in the one error shape -- a client
    of this gateway reads one shape, whichever server stands behind it."""
    if answer.status < 400:
        return answer.headers, answer.body
    message, fields = _upstream_error(answer.status, answer.body)
    body = error_bytes(answer.status, message, **fields)
    headers = [(n, v) for n, v in answer.headers if n not in (b"content-type", b"content-length")]
    headers.append(_JSON)
    if answer.status in (429, 503) and not any(n == b"retry-after" for n, _ in headers):
        headers.append((b"retry-after", str(DEFAULT_RETRY_AFTER).encode()))
    return headers, body


def _upstream_error(status: int, raw: bytes) -> tuple[str, dict[str, Any]]:
    """The message and error fields an upstream's error body gives (OpenAI's shape or near it)."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, str) and error:
        return error, {}
    if not isinstance(error, dict):
        return f"the upstream refused the request (HTTP {status}): {snippet(raw)}", {}
    message = error.get("message")
    fields: dict[str, Any] = {}
    kind, code, param = error.get("type"), error.get("code"), error.get("param")
    if kind in _ERROR_TYPES:
        fields["type"] = kind
    if isinstance(code, str) and code:
        fields["code"] = code  # a numeric code repeats the status: the status's own name is used
    if isinstance(param, str) and param:
        fields["param"] = param
    if not isinstance(message, str) or not message:
        message = f"the upstream refused the request (HTTP {status})"
    return message, fields


def _budget(value: bytes) -> float | None:
    """The seconds an ``x-brownout-budget`` header asks for, or None when it is not a usable number."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0.0 < seconds <= MAX_BUDGET else None


async def _too_large(send: Send, limit: int) -> None:
    # The connection closes after the answer: the rest of the body is not read.
    await _refuse(
        send,
        413,
        f"the request body is over {limit} bytes (gateway.max_body_bytes)",
        [(b"connection", b"close")],
        code="request_too_large",
        limit_bytes=limit,
    )


async def _overloaded(send: Send, group: Group, e: Overloaded) -> None:
    retry = retry_after_header(e.retry_after)
    await _refuse(
        send,
        429,
        f"model group {group.name!r} is at capacity ({e.reason}: {e.queue_size} waiting, "
        f"{e.in_flight} being served); retry after {retry.decode()}s",
        [(b"retry-after", retry)],
        type="rate_limit_error",
        code="overloaded",
        retry_after=int(retry),
        queue_size=e.queue_size,
    )


async def _unavailable(send: Send, e: GatewayUnavailable) -> None:
    retry = retry_after_header(e.retry_after)
    headers = [(b"retry-after", retry), (b"x-brownout-attempts", str(e.attempts).encode())]
    if len(e.path) > 1:
        headers.append((b"x-brownout-fallbacks", ">".join(e.path).encode()))
    if e.budget_spent:
        # Out of time rather than out of endpoints: a gateway timeout, said so.
        await _refuse(send, 504, str(e), headers, code="budget_exhausted", retry_after=int(retry))
        return
    await _refuse(send, 503, str(e), headers, code="upstream_unavailable", retry_after=int(retry))


class _Models:
    """``GET /v1/models``: the model groups."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _reply(send, 200, self.gateway.models_body)


class _Health:
    """``GET /health/gateway``: every group's endpoints; 503 when no group can answer."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        status = gateway.status()
        if status["status"] != "unhealthy":
            await _reply(send, 200, json.dumps(status).encode())
            return
        # The error shape, with the groups' state kept next to it for monitors.
        retry = retry_after_header(min((g.retry_after() for g in gateway.groups.values()), default=1.0))
        content = error_content(
            503, "no model group can answer now", code="no_group_available", retry_after=int(retry)
        )
        await _reply(send, 503, json.dumps({**status, **content}).encode(), [(b"retry-after", retry)])


def install_gateway(app: Any, gateway: Gateway, registry: CollectorRegistry | None = None) -> None:
    """Add the gateway's routes to ``app`` (a FastAPI or Starlette app, or a Router) and, given a
    Prometheus ``registry``, its collector. FastAPI does not generate their OpenAPI entries (they are
    no FastAPI routes): :func:`gateway_openapi` adds them to the app's document."""
    router: Router = app if isinstance(app, Router) else app.router
    # First in the router: a request walks the routes in order, and the chat route is the hot one.
    router.routes[:0] = [
        Route(CHAT_PATH, ChatCompletions(gateway), methods=["POST"], include_in_schema=False),
        Route("/v1/models", _Models(gateway), methods=["GET"], include_in_schema=False),
        Route("/health/gateway", _Health(gateway), methods=["GET"], include_in_schema=False),
    ]
    if registry is not None:
        registry.register(GatewayCollector(gateway))
