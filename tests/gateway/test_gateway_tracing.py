"""The gateway's spans: an upstream attempt each, a continued stream's and a hedge's attempts under theirs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from starlette.applications import Starlette
from starlette.types import Receive, Send

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.events import EventBus
from brownout.gateway import tracing
from brownout.gateway.config import GatewaySection
from brownout.gateway.router import Gateway, UpstreamFailed
from brownout.gateway.routes import install_gateway
from brownout.server.tracing import TraceMiddleware
from brownout.testing import FakeClock
from support.gateway import NEVER, Scripted, chat, completion, group, send_json, serving, sse, sse_start
from support.otlp import memory_tracing
from support.wait import until


@contextlib.asynccontextmanager
async def _traced_gateway(
    groups: dict[str, Any], clock: Clock = SYSTEM_CLOCK
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's routes behind the server's trace middleware, on a real uvicorn server."""
    gw = Gateway(GatewaySection.model_validate({"groups": groups}), clock=clock, events=EventBus())
    app = Starlette()
    install_gateway(app, gw)
    await gw.start()
    try:
        async with (
            serving(TraceMiddleware(app)) as url,
            httpx.AsyncClient(base_url=url, timeout=10.0) as http,
        ):
            yield http
    finally:
        await gw.aclose()


def _outline(spans: list[ReadableSpan]) -> list[str]:
    ids = {s.context.span_id for s in spans}
    children: dict[int, list[ReadableSpan]] = {}
    for s in sorted(spans, key=lambda s: s.start_time or 0):
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else 0
        children.setdefault(parent, []).append(s)

    def walk(parent: int, depth: int) -> list[str]:
        out = []
        for child in children.get(parent, []):
            out.append("  " * depth + child.name)
            out += walk(child.context.span_id, depth + 1)
        return out

    return walk(0, 0)


def _final() -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def test_a_continued_stream_has_its_attempts_under_a_continuation_span(scripted: Any) -> None:
    async def cut(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        await send({"type": "http.response.body", "body": sse("Hello, "), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # ends unfinished

    async def finish(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        tail = sse("world.") + _final() + sse(done=True)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    cutter: Scripted = await scripted(cut)
    helper: Scripted = await scripted(finish)
    with memory_tracing() as finished:
        async with _traced_gateway({"chat": group(cutter.url, helper.url, breaker=NEVER)}) as http:
            async with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                raw = b"".join([part async for part in r.aiter_raw()])
            assert b"world." in raw
            assert b"event: error" not in raw
        spans = finished()
    assert _outline(spans) == [
        "POST /v1/chat/completions",
        "  chat chat",
        "  continue stream",
        "    chat chat",
    ]
    by_name = {s.name: s for s in spans}
    continued = dict(by_name["continue stream"].attributes or {})
    assert continued["brownout.tokens_sent"] == 1
    assert continued["brownout.broken"] == (cutter.url.split("://", 1)[1],)
    first, second = sorted((s for s in spans if s.name == "chat chat"), key=lambda s: s.start_time or 0)
    assert dict(first.attributes or {})["brownout.attempt"] == 1
    assert dict(second.attributes or {})["brownout.attempt"] == 1  # the continuation's own first attempt


async def test_a_hedge_has_its_attempt_under_a_hedge_span(scripted: Any) -> None:
    left = asyncio.Event()

    async def slow(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        left.set()

    async def quick(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await send_json(send, {**completion("done"), "usage": {"prompt_tokens": 7, "completion_tokens": 2}})

    sluggish: Scripted = await scripted(slow)
    fast: Scripted = await scripted(quick)
    clock = FakeClock()
    hedge = {"enabled": True, "delay": 1.0, "budget_ratio": 1.0}
    groups = {"chat": group(sluggish.url, fast.url, hedge=hedge, breaker=NEVER)}
    with memory_tracing() as finished:
        async with _traced_gateway(groups, clock) as http:
            request = asyncio.create_task(http.post("/v1/chat/completions", json=chat()))
            await until(lambda: sluggish.calls == 1, "the first attempt")
            clock.advance(1.0)
            assert (await request).status_code == 200
            await until(left.is_set, "the losing attempt to be cancelled")
        spans = finished()
    assert _outline(spans) == ["POST /v1/chat/completions", "  chat chat", "  hedge", "    chat chat"]
    hedge_span = next(s for s in spans if s.name == "hedge")
    (won,) = [s for s in spans if s.parent is not None and s.parent.span_id == hedge_span.context.span_id]
    attributes = dict(won.attributes or {})
    assert attributes["gen_ai.usage.input_tokens"] == 7
    assert attributes["gen_ai.usage.output_tokens"] == 2
    assert attributes["gen_ai.response.model"] == "scripted"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert dict(hedge_span.attributes or {})["brownout.hedge"] is True


async def test_a_timed_out_attempt_says_so_on_its_span() -> None:
    gw = Gateway(GatewaySection.model_validate({"groups": {"chat": group("http://127.0.0.1:9")}}))
    chat_group = gw.groups["chat"]
    (ep,) = chat_group.endpoints

    async def silent(g: Any, e: Any, content: bytes, deadline: float) -> Any:
        raise UpstreamFailed("chat/127.0.0.1:9: no answer within 1s", elapsed=1.0, timed_out=True)

    with memory_tracing() as finished:
        try:
            await tracing.attempt(silent, chat_group, chat_group, ep, b"{}", 0.0, 3)
        except UpstreamFailed:
            pass
        else:
            raise AssertionError("the failure must go on to the router")
        (span,) = finished()
    attributes = dict(span.attributes or {})
    assert span.status.status_code.name == "ERROR"
    assert attributes["error.type"] == "timeout"
    assert attributes["brownout.attempt"] == 3
    assert attributes["brownout.breaker.state"] == "closed"
    assert "server.address" not in attributes  # not started: no connection pool to name
