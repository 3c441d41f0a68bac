"""The gateway's conduct when an upstream misbehaves: budgets, watched streams, continuation, classification.

Upstreams here are scripted ASGI servers on 127.0.0.1 that tell one answer, :data:`STORY`, word by word:
asked with a trailing assistant message (a continuation), they tell the rest of it after that text.
Each fault is scripted on the call it hits, so a test can check that the client read the whole story
exactly once, who was asked what, and how the breakers and counters saw it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Send

from brownout.gateway.config import GatewayHedgeSection
from brownout.gateway.router import Hedge
from brownout.gateway.stream import CONTINUE_INSTRUCTION
from brownout.testing import FakeClock
from support.gateway import (
    NEVER,
    breaker_of,
    chat,
    completion,
    gateway,
    group,
    label,
    read_stream,
    send_json,
    sse_start,
)
from support.wait import until

STORY = "A fresh citrus scent opens on bergamot and settles into warm cedar and a trace of amber."
WORDS = [w + " " for w in STORY.split(" ")[:-1]] + [STORY.split(" ")[-1]]

Fault = Callable[[int, dict[str, Any], Receive, Send], Awaitable[bool]]
"""Answers the n-th request in its own way and returns True, or returns False to let the story be told."""


def chunk(content: str | None = None, *, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    doc = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "story",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def told(body: dict[str, Any]) -> str:
    """What the request already holds of the story: the last assistant message's text."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


def rest_of(body: dict[str, Any]) -> list[str]:
    done = told(body)
    assert STORY.startswith(done), f"continued from a text that is not the story's start: {done!r}"
    rest = STORY[len(done) :]
    out: list[str] = []
    for word in WORDS:
        if done:
            if len(done) >= len(word):
                done = done[len(word) :]
                continue
            word, done = word[len(done) :], ""
        out.append(word)
    assert "".join(out) == rest
    return out


async def tell(body: dict[str, Any], send: Send, *, words: int | None = None, done: bool = True) -> None:
    """Stream the rest of the story (only ``words`` of it, then stop, when given)."""
    await sse_start(send)
    await send({"type": "http.response.body", "body": chunk(role=True), "more_body": True})
    rest = rest_of(body)
    for word in rest[:words]:
        await send({"type": "http.response.body", "body": chunk(word), "more_body": True})
    if words is None:
        tail = chunk(finish="stop") + (b"data: [DONE]\n\n" if done else b"")
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def storyteller(fault: Fault | None = None, *, refuses_prefill: bool = False) -> Callable[..., Any]:
    async def handler(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        if fault is not None and await fault(n, body, receive, send):
            return
        if refuses_prefill and body["messages"][-1]["role"] == "assistant":
            error = {"message": "assistant message prefill is not supported", "type": "invalid_request_error"}
            await send_json(send, {"error": error}, 400)
            return
        if body.get("stream"):
            await tell(body, send)
        else:
            await send_json(send, completion(STORY))

    return handler


async def hold(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def streamed_text(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The content a client reads from an SSE body, and every event's JSON (each must parse)."""
    # A malformed event would fail here, as it does in an SDK's parser.
    lines = [line for block in raw.decode().split("\n\n") for line in block.splitlines()]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join((c.get("delta") or {}).get("content") or "" for e in events for c in e.get("choices", []))
    return text, events


async def stream_of(gw: Any, **extra: Any) -> tuple[httpx.Headers, bytes]:
    async with gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True), **extra) as r:
        assert r.status_code == 200, await r.aread()
        return r.headers, await read_stream(r)


# ------------------------------------------------------------------------------------------ continuation


async def test_a_stream_cut_mid_way_is_continued_on_another_replica_as_one_answer(scripted: Any) -> None:
    async def cut(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=5)
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # ends, unfinished
        return True

    cutter = await scripted(storyteller(cut))
    helper = await scripted(storyteller())
    async with gateway({"chat": group(cutter.url, helper.url, breaker=NEVER)}) as gw:
        headers, raw = await stream_of(gw)
        text, events = streamed_text(raw)
        assert text == STORY
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert b"event: error" not in raw
        assert sum(1 for e in events if "role" in e["choices"][0]["delta"]) == 1  # one role event in all
        assert headers["x-brownout-served-by"] == f"chat/{label(cutter)}"
        # The helper was asked to continue: what was sent, as a trailing assistant message (prefill).
        asked = helper.bodies[0]["messages"]
        assert asked[:-1] == chat()["messages"]
        assert asked[-1] == {"role": "assistant", "content": "".join(WORDS[:5])}
        stats = gw.group().stats
        assert stats.outcomes["served"] == 1
        assert stats.continuations["served"] == 1
        assert breaker_of(gw.gateway, "chat", 0).metrics().failures == 1
        assert breaker_of(gw.gateway, "chat", 1).metrics().failures == 0
        assert [ep.load.in_flight for ep in gw.group().endpoints] == [0, 0]
    assert (cutter.calls, helper.calls) == (1, 1)


async def test_a_fallback_that_refuses_prefill_is_asked_with_the_instruction_and_remembered(
    scripted: Any,
) -> None:
    async def cut(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=7)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    cutter = await scripted(storyteller(cut))
    strict = await scripted(storyteller(refuses_prefill=True))
    groups = {
        "chat": group(cutter.url, fallbacks=["backup"], breaker=NEVER),
        "backup": group(strict.url, breaker=NEVER),
    }
    async with gateway(groups) as gw:
        for round_ in range(2):
            _, raw = await stream_of(gw)
            text, _ = streamed_text(raw)
            assert text == STORY, round_
            assert b"prefill" not in raw  # the refusal never reaches the caller
        backup = gw.group("backup").endpoints[0]
        assert backup.prefill is False
        assert gw.group().stats.continuations == {"served": 2, "prefill_refused": 1}
        assert breaker_of(gw.gateway, "backup").metrics().failures == 0  # a refusal is not a failure
    # Round one: prefill refused, then the instruction form; round two: the instruction form at once.
    forms = [b["messages"][-1]["role"] for b in strict.bodies]
    assert forms == ["assistant", "user", "user"]
    assert strict.bodies[1]["messages"][-1]["content"] == CONTINUE_INSTRUCTION
    assert strict.bodies[1]["messages"][-2] == {"role": "assistant", "content": "".join(WORDS[:7])}


async def test_a_malformed_event_is_never_forwarded_and_the_answer_is_continued(scripted: Any) -> None:
    async def garble(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=3)
        bad = b'data: {"choices": [{"delta": {"content": "oo\n\n'
        await send({"type": "http.response.body", "body": bad, "more_body": False})
        return True

    garbler = await scripted(storyteller(garble))
    helper = await scripted(storyteller())
    async with gateway({"chat": group(garbler.url, helper.url, breaker=NEVER)}) as gw:
        _, raw = await stream_of(gw)
        text, _ = streamed_text(raw)  # every event parses
        assert text == STORY
        assert b'"oo' not in raw
    assert helper.bodies[0]["messages"][-1]["content"] == "".join(WORDS[:3])


async def test_an_error_event_mid_stream_is_not_forwarded_and_the_answer_is_continued(scripted: Any) -> None:
    async def fail(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=2)
        event = b'event: error\ndata: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
        await send({"type": "http.response.body", "body": event, "more_body": False})
        return True

    failing = await scripted(storyteller(fail))
    helper = await scripted(storyteller())
    async with gateway({"chat": group(failing.url, helper.url, breaker=NEVER)}) as gw:
        _, raw = await stream_of(gw)
        assert streamed_text(raw)[0] == STORY
        assert b"overloaded" not in raw


async def test_a_stalled_stream_is_continued_after_the_stall_limit(scripted: Any) -> None:
    async def stall(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=4)
        await hold(receive)  # silent, connection open
        return True

    staller = await scripted(storyteller(stall))
    helper = await scripted(storyteller())
    settings = group(staller.url, helper.url, stall_timeout=0.2, breaker=NEVER)
    async with gateway({"chat": settings}) as gw:
        _, raw = await stream_of(gw)
        assert streamed_text(raw)[0] == STORY
        assert gw.group().endpoints[0].stats.failures == 1


async def test_a_finished_stream_without_done_gets_done_and_counts_as_served(scripted: Any) -> None:
    async def no_done(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, done=False)
        return True

    upstream = await scripted(storyteller(no_done))
    helper = await scripted(storyteller())
    async with gateway({"chat": group(upstream.url, helper.url, breaker=NEVER)}) as gw:
        _, raw = await stream_of(gw)
        assert streamed_text(raw)[0] == STORY
        assert raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b"[DONE]") == 1
        assert b"event: error" not in raw
        assert gw.group().stats.outcomes["served"] == 1
        assert gw.group().endpoints[0].stats.failures == 0
    assert helper.calls == 0


async def test_a_slow_first_token_fails_over_before_anything_is_sent(scripted: Any) -> None:
    async def slow(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await sse_start(send)
        await send({"type": "http.response.body", "body": chunk(role=True), "more_body": True})
        await hold(receive)  # the role event, then no token
        return True

    sluggish = await scripted(storyteller(slow))
    helper = await scripted(storyteller())
    settings = group(sluggish.url, helper.url, first_token_timeout=0.2, breaker=NEVER)
    async with gateway({"chat": settings}) as gw:
        headers, raw = await stream_of(gw)
        text, events = streamed_text(raw)
        assert text == STORY
        assert headers["x-brownout-served-by"] == f"chat/{label(helper)}"
        assert sum(1 for e in events if "role" in e["choices"][0]["delta"]) == 1
        assert gw.group().stats.continuations == {}  # failed over before the client saw a byte
    assert helper.bodies[0]["messages"] == chat()["messages"]


async def test_a_stream_with_tool_calls_is_not_continued(scripted: Any) -> None:
    async def tool(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await sse_start(send)
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}
        doc = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}
        event = b"data: " + json.dumps(doc).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": False})
        return True

    upstream = await scripted(storyteller(tool))
    helper = await scripted(storyteller())
    async with gateway({"chat": group(upstream.url, helper.url, breaker=NEVER)}) as gw:
        _, raw = await stream_of(gw)
        assert b"event: error" in raw
        assert gw.group().stats.outcomes["stream_error"] == 1
    assert helper.calls == 0  # half a tool call cannot be resumed by prefill


# ------------------------------------------------------------------------------------------ budget


async def test_a_silent_endpoint_is_left_after_its_first_timeout(scripted: Any) -> None:
    async def silent(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await hold(receive)
        return True

    mute = await scripted(storyteller(silent))
    good = await scripted(storyteller())
    groups = {
        "chat": group(mute.url, max_attempts=3, timeout=0.2, fallbacks=["backup"], breaker=NEVER),
        "backup": group(good.url),
    }
    async with gateway(groups) as gw:
        r = await gw.post(chat())
        assert r.status_code == 200
        assert r.headers["x-brownout-served-by"] == f"backup/{label(good)}"
        assert r.headers["x-brownout-fallbacks"] == "chat>backup"
        assert r.headers["x-brownout-attempts"] == "2"
    assert mute.calls == 1  # not asked again after it said nothing


async def test_no_request_outlives_its_budget_and_the_header_sets_it(scripted: Any) -> None:
    async def silent(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await hold(receive)
        return True

    mute = await scripted(storyteller(silent))
    also_mute = await scripted(storyteller(silent))
    groups = {"chat": group(mute.url, fallbacks=["backup"]), "backup": group(also_mute.url)}
    async with gateway(groups) as gw:
        loop = asyncio.get_running_loop()
        for stream in (False, True):
            start = loop.time()
            r = await gw.post(chat(stream=stream), headers={"x-brownout-budget": "0.3"})
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "budget_exhausted"
            assert "budget ran out" in r.json()["error"]["message"]
            assert loop.time() - start < 5.0  # not the group's 60 s timeout, nor 2 x 60 s
        bad = await gw.post(chat(), headers={"x-brownout-budget": "soon"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "x-brownout-budget"
        assert (await gw.post(chat(), headers={"x-brownout-budget": "0"})).status_code == 400


# ------------------------------------------------------------------------------------------ classification


def refusal(status: int, code: str, message: str) -> Fault:
    async def refuse(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await send_json(
            send, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, status
        )
        return True

    return refuse


async def test_a_request_over_the_context_window_goes_to_a_fallback_with_a_larger_one(scripted: Any) -> None:
    overflow = refusal(400, "context_length_exceeded", "This model's maximum context length is 4096 tokens.")
    small = await scripted(storyteller(overflow))
    smaller = await scripted(storyteller(overflow))
    large = await scripted(storyteller())
    groups = {
        "chat": group(small.url, context_window=4096, fallbacks=["tiny", "large"]),
        "tiny": group(smaller.url, context_window=2048),
        "large": group(large.url, context_window=32768),
    }
    async with gateway(groups) as gw:
        for stream in (False, True):
            r = await gw.post(chat(stream=stream))
            assert r.status_code == 200, r.text
            assert r.headers["x-brownout-served-by"] == f"large/{label(large)}"
            assert r.headers["x-brownout-fallbacks"] == "chat>large"
        assert breaker_of(gw.gateway, "chat").metrics().failures == 0
    assert (small.calls, smaller.calls, large.calls) == (2, 0, 2)


async def test_a_request_over_the_context_window_with_no_larger_fallback_gets_the_refusal(
    scripted: Any,
) -> None:
    overflow = refusal(400, "context_length_exceeded", "This model's maximum context length is 4096 tokens.")
    small = await scripted(storyteller(overflow))
    other = await scripted(storyteller())
    groups = {"chat": group(small.url, context_window=4096, fallbacks=["same"]), "same": group(other.url)}
    async with gateway(groups) as gw:
        r = await gw.post(chat())
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
    assert other.calls == 0  # no declared larger context: nothing to gain


async def test_a_content_filter_refusal_is_returned_with_its_reason_and_not_retried(scripted: Any) -> None:
    reason = "The response was filtered due to the prompt triggering content management policy."
    filtering = await scripted(storyteller(refusal(400, "content_filter", reason)))
    replica = await scripted(storyteller())
    backup = await scripted(storyteller())
    groups = {
        "chat": group(filtering.url, replica.url, fallbacks=["backup"]),
        "backup": group(backup.url),
    }
    async with gateway(groups) as gw:
        gw.group().endpoints[1].load.observe(10.0)  # the filtering replica is asked first
        for stream in (False, True):
            r = await gw.post(chat(stream=stream))
            assert r.status_code == 400
            assert r.json()["error"] == {
                "message": reason,
                "type": "invalid_request_error",
                "code": "content_filter",
                "param": None,
            }
    assert (filtering.calls, replica.calls, backup.calls) == (2, 0, 0)


async def test_a_short_retry_after_is_waited_out_on_the_same_endpoint(scripted: Any) -> None:
    async def limited(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        if n > 1:
            return False
        raw = json.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"2")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
        return True

    primary = await scripted(storyteller(limited))
    backup = await scripted(storyteller())
    clock = FakeClock()
    groups = {"chat": group(primary.url, fallbacks=["backup"]), "backup": group(backup.url)}
    async with gateway(groups, clock=clock) as gw:
        request = asyncio.create_task(gw.post(chat()))
        await until(lambda: primary.calls == 1 and clock.pending_timers > 0, "the wait for the hint")
        assert breaker_of(gw.gateway, "chat").retry_after() == 2  # no other request hammers it meanwhile
        clock.advance(2)
        r = await request
        assert r.status_code == 200
        assert r.headers["x-brownout-served-by"] == f"chat/{label(primary)}"
        assert r.headers["x-brownout-attempts"] == "2"
    assert (primary.calls, backup.calls) == (2, 0)


@pytest.mark.parametrize("hint", [None, b"30"])
async def test_a_429_without_a_usable_hint_fails_over_at_once(scripted: Any, hint: bytes | None) -> None:
    async def limited(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        headers = [(b"content-type", b"application/json")]
        if hint is not None:
            headers.append((b"retry-after", hint))
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "rate limited"}}'})
        return True

    primary = await scripted(storyteller(limited))
    backup = await scripted(storyteller())
    groups = {"chat": group(primary.url, fallbacks=["backup"]), "backup": group(backup.url)}
    async with gateway(groups) as gw:
        r = await gw.post(chat())
        assert r.headers["x-brownout-served-by"] == f"backup/{label(backup)}"
    assert primary.calls == 1  # asked once: no retry into a rate limit


# ------------------------------------------------------------------------------------------ recovery


async def test_a_healed_endpoint_gets_traffic_back_within_seconds_by_default(scripted: Any) -> None:
    healthy = False

    async def flap(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        if healthy:
            return False
        await send_json(send, {"error": {"message": "boom", "type": "server_error"}}, 500)
        return True

    primary = await scripted(storyteller(flap))
    backup = await scripted(storyteller())
    clock = FakeClock()
    # No pause before a retry: on this clock it would last until the test moves time.
    groups = {"chat": group(primary.url, retry_backoff=0, fallbacks=["backup"]), "backup": group(backup.url)}
    async with gateway(groups, clock=clock) as gw:
        for _ in range(5):
            assert (await gw.post(chat())).status_code == 200
        breaker = breaker_of(gw.gateway, "chat")
        assert breaker.state.value == "open"
        assert breaker.retry_after() == 2.0  # the default first open wait
        healthy = True
        clock.advance(2.0)
        r = await gw.post(chat())
        assert r.headers["x-brownout-served-by"] == f"chat/{label(primary)}"
        assert (await gw.post(chat())).headers["x-brownout-served-by"] == f"chat/{label(primary)}"
        assert breaker.state.value == "closed"  # two good probes close it


# ------------------------------------------------------------------------------------------ hedging


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hedge_goes_after_the_delay_and_the_first_answer_wins(scripted: Any, stream: bool) -> None:
    left = asyncio.Event()

    async def slow(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await hold(receive)  # until the gateway gives up on it
        left.set()
        return True

    sluggish = await scripted(storyteller(slow))
    quick = await scripted(storyteller())
    clock = FakeClock()
    hedge = {"enabled": True, "delay": 1.0, "budget_ratio": 1.0}
    async with gateway(
        {"chat": group(sluggish.url, quick.url, hedge=hedge, breaker=NEVER)}, clock=clock
    ) as gw:
        gw.group().endpoints[1].load.observe(5.0)  # the sluggish replica is asked first
        request = asyncio.create_task(gw.post(chat(stream=stream)))
        await until(lambda: sluggish.calls == 1, "the first attempt")
        assert quick.calls == 0
        clock.advance(1.0)
        r = await request
        assert r.status_code == 200
        assert r.headers["x-brownout-served-by"] == f"chat/{label(quick)}"
        if stream:
            assert streamed_text(r.content)[0] == STORY
        await until(left.is_set, "the losing attempt to be cancelled")
        assert gw.group().stats.hedges == {"sent": 1, "won": 1}
        # The loser was cancelled, not failed: its breaker saw nothing, its slot is free.
        assert breaker_of(gw.gateway, "chat", 0).metrics().failures == 0
        assert [ep.load.in_flight for ep in gw.group().endpoints] == [0, 0]


def test_hedges_wait_for_a_known_p95_and_stay_within_their_budget() -> None:
    clock = FakeClock()
    hedge = Hedge(GatewayHedgeSection(enabled=True, budget_ratio=0.05), clock=clock)
    for i in range(Hedge.MIN_ANSWERS - 1):
        hedge.observe(0.1 + i / 1000)
    assert hedge.delay() is None  # too few answers to know the group's p95
    for _ in range(81):
        hedge.observe(0.1)
    hedge.observe(5.0)  # one slow answer in a hundred does not make the p95
    delay = hedge.delay()
    assert delay is not None
    assert 0.1 <= delay < 0.12
    sent = 0
    for _ in range(200):
        hedge.budget.record_call()
        sent += hedge.budget.try_spend()
    assert sent == 10  # 5 % of the requests


async def test_a_stream_that_keeps_flowing_is_not_cut_by_the_budget(scripted: Any) -> None:
    async def steady(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await sse_start(send)
        for word in WORDS:
            await send({"type": "http.response.body", "body": chunk(word), "more_body": True})
            await asyncio.sleep(0.02)  # a word every 20 ms: about 0.35 s in all, over the budget
        await send({"type": "http.response.body", "body": chunk(finish="stop") + b"data: [DONE]\n\n"})
        return True

    upstream = await scripted(storyteller(steady))
    async with gateway({"chat": group(upstream.url)}) as gw:
        _, raw = await stream_of(gw, headers={"x-brownout-budget": "0.1"})
        assert streamed_text(raw)[0] == STORY
        assert b"event: error" not in raw


async def test_a_fallback_stream_that_breaks_is_continued_from_the_group_asked_for(scripted: Any) -> None:
    async def once(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        if n > 1:
            return False
        await send_json(send, {"error": {"message": "a moment", "type": "server_error"}}, 500)
        return True

    async def cut(n: int, body: dict[str, Any], receive: Receive, send: Send) -> bool:
        await tell(body, send, words=6)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    primary = await scripted(storyteller(once))
    backup = await scripted(storyteller(cut))
    groups = {
        "chat": group(primary.url, max_attempts=1, fallbacks=["backup"], breaker=NEVER),
        "backup": group(backup.url, breaker=NEVER),
    }
    async with gateway(groups) as gw:
        headers, raw = await stream_of(gw)
        assert streamed_text(raw)[0] == STORY
        assert headers["x-brownout-served-by"] == f"backup/{label(backup)}"
        assert gw.group().stats.continuations["served"] == 1
    # The primary, well again, took the rest: the backup's own chain has nothing left.
    assert primary.bodies[1]["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:6])}
