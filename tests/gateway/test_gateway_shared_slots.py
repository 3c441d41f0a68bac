"""The gateway's group of a model server that the brief pipeline calls too: one set of slots for both.

``brownout serve`` offers its embedded model as the gateway group ``local``. That server answers the
brief's generator, validator and hinter as well, through one concurrency limiter as wide as its
slots; the gateway's requests take their slots from the same limiter (in turn with the generator's
calls, before the optional stages), so that neither side's requests queue inside the server unseen.
Here the shared limiter is one slot wide and a test holds it as "the generator"; the upstream is a
scripted server on 127.0.0.1 and the gateway runs on a FakeClock where a deadline is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from starlette.types import Receive, Send

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.llm.client import SharedEndpoint
from brownout.policies.breaker import BreakerState
from brownout.policies.limiter import AdaptiveLimiter, LimiterConfig
from brownout.testing import FakeClock
from support.gateway import chat, completion, gateway, group, read_stream, send_json, sse, sse_start
from support.wait import until

GENERATOR, VALIDATOR = 0, 1
GATEWAY = GENERATOR  # in turn with the generator's calls (brownout.server.runtime.SLOT_PRIORITY)


def one_slot(clock: Clock = SYSTEM_CLOCK) -> SharedEndpoint:
    return SharedEndpoint(
        AdaptiveLimiter("models", LimiterConfig(min_limit=1, max_limit=1, initial_limit=1), clock=clock)
    )


async def answered(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
    await send_json(send, completion(f"answer {n}"))


async def queued_behind_the_generator(
    gw: Any, share: SharedEndpoint, body: dict[str, Any]
) -> tuple[Any, Any]:
    """Give the group ``local`` the slots of ``share``, take its one slot as the generator, and send
    ``body``: the slot held and the request's task, once the request waits for the slot."""
    gw.gateway.share_slots("local", share, priority=GATEWAY)
    holding = await share.limiter.acquire(priority=GENERATOR)
    request = asyncio.create_task(gw.post(body))
    await until(lambda: share.limiter.queued == 1, "the request waiting for the slot")
    return holding, request


async def test_a_request_waits_for_a_free_slot_in_turn_with_the_generator_before_optional_stages(
    scripted: Any,
) -> None:
    upstream = await scripted(answered)
    share = one_slot()
    limiter = share.limiter
    async with gateway({"local": group(upstream.url)}) as gw:
        # The one slot is the generator's; the gateway's request waits for it.
        generating, request = await queued_behind_the_generator(gw, share, chat("local"))
        validator = asyncio.create_task(limiter.acquire(priority=VALIDATOR))
        generator = asyncio.create_task(limiter.acquire(priority=GENERATOR))
        await until(lambda: limiter.queued == 3, "three callers waiting")
        assert upstream.calls == 0  # nothing waits inside the server

        generating.release()
        # The gateway's request asked before the generator's next call: it goes first, so a busy
        # brief pipeline cannot keep it waiting out its budget.
        response = await request
        assert response.status_code == 200
        assert upstream.calls == 1
        assert share.last_success is not None  # the gateway's answer showed the server alive
        second = await generator
        assert not validator.done()  # the optional stage waits while the generator works

        second.release()
        (await validator).release()
    assert limiter.in_flight == 0


async def test_no_slot_before_the_budget_is_a_busy_server_not_a_failed_one(scripted: Any) -> None:
    clock = FakeClock()
    upstream = await scripted(answered)
    share = one_slot(clock)
    async with gateway({"local": group(upstream.url, budget=30)}, clock=clock) as gw:
        holding, request = await queued_behind_the_generator(gw, share, chat("local"))
        clock.advance(31)  # past the request's budget, the slot still taken
        response = await request
        holding.release()
        # The budget went on waiting for a slot: 504, and the message says what it waited for.
        assert response.status_code == 504
        error = response.json()["error"]
        assert "budget ran out" in error["message"]
        assert "every slot of the model server stayed busy" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert upstream.calls == 0
        endpoint = gw.group("local").endpoints[0]
        # Nothing was sent: the server's breaker heard of no failure.
        assert endpoint.breaker.state is BreakerState.CLOSED
        assert endpoint.breaker.metrics().calls == 0
        assert endpoint.status()["busy"] == 1
        assert endpoint.status()["shares_slots"] is True
        # Once the slot is free, the next request is answered.
        assert (await gw.post(chat("local"))).status_code == 200
    assert share.limiter.in_flight == 0


async def test_a_stream_holds_its_slot_until_its_last_event(scripted: Any) -> None:
    gate = asyncio.Event()

    async def streamed(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        await send({"type": "http.response.body", "body": sse("A fresh"), "more_body": True})
        await gate.wait()
        await send(
            {"type": "http.response.body", "body": sse(" citrus") + sse(done=True), "more_body": False}
        )

    upstream = await scripted(streamed)
    share = one_slot()
    limiter = share.limiter
    async with gateway({"local": group(upstream.url)}) as gw:
        gw.gateway.share_slots("local", share, priority=GATEWAY)
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat("local", stream=True)) as r:
            assert r.status_code == 200
            # The first token has arrived; the rest is still being generated in the slot.
            assert limiter.in_flight == 1
            waiting = asyncio.create_task(limiter.acquire(priority=GENERATOR))
            await until(lambda: limiter.queued == 1, "the generator waiting for the streamed slot")
            gate.set()
            body = await read_stream(r)
        assert b"[DONE]" in body
        (await waiting).release()  # the generator got the slot once the stream ended
    assert limiter.in_flight == 0
    assert upstream.calls == 1


async def test_a_gateway_without_shared_slots_sends_at_once(scripted: Any) -> None:
    upstream = await scripted(answered)
    async with gateway({"local": group(upstream.url)}) as gw:
        assert (await gw.post(chat("local"))).status_code == 200
        assert gw.group("local").endpoints[0].status()["shares_slots"] is False


@pytest.mark.parametrize("stream", [False, True])
async def test_a_caller_that_leaves_while_waiting_for_a_slot_is_withdrawn(
    scripted: Any, stream: bool
) -> None:
    # Left in the queue, its request would be sent once the slot frees -- for nobody, in place of
    # the pipeline's calls and of callers still waiting.
    upstream = await scripted(answered)
    share = one_slot()
    limiter = share.limiter
    async with gateway({"local": group(upstream.url)}) as gw:
        holding, request = await queued_behind_the_generator(gw, share, chat("local", stream=stream))
        request.cancel()  # the client gives up and closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await until(lambda: limiter.queued == 0, "the abandoned request leaving the queue")
        holding.release()
        assert gw.group("local").stats.outcomes["disconnected"] == 1
        # The slot is free, nothing was sent for the caller that left, and the next caller is served.
        assert limiter.in_flight == 0
        assert upstream.calls == 0
        assert (await gw.post(chat("local"))).status_code == 200
