"""The OpenAI-compatible gateway over real HTTP, against small upstream servers on 127.0.0.1.

The gateway runs on an in-process uvicorn server; its upstreams are :class:`FakeLLM` servers (healthy,
failing, slow, hanging, 429 with Retry-After, client-fault 4xx, streams that break before or after the
first token) or small scripted ASGI servers where a test must hold a request or check what was sent.
Where breakers and budgets are judged, the gateway runs on a :class:`FakeClock`, so time moves only
when a test says so.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import Receive, Send

from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.events import EventBus, FallbackServed
from brownout.gateway.config import GatewaySection
from brownout.gateway.router import Gateway
from brownout.gateway.routes import install_gateway
from brownout.policies.breaker import BreakerState
from brownout.server.app import create_app
from brownout.server.errors import ErrorResponse
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock
from support.gateway import (
    NEVER,
    SCHEMA,
    TRIP,
    breaker_of,
    chat,
    completion,
    gateway,
    group,
    label,
    read_stream,
    send_json,
    sse,
    sse_start,
)
from support.wait import until

# ------------------------------------------------------------------------------------------ routing


async def test_routes_to_the_healthy_replica_and_says_which(fakes: Any) -> None:
    bad = await fakes("error", status=500)
    good = await fakes("ok", content="fresh bergamot")
    async with gateway({"chat": group(bad, good, breaker=NEVER)}) as gw:
        r = await gw.post(chat())
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "fresh bergamot"
        assert r.headers["x-brownout-served-by"] == f"chat/{label(good)}"
        assert "x-brownout-fallbacks" not in r.headers  # no fallback group served it
        assert r.headers["x-brownout-attempts"] == "2"  # the failing replica first, then the healthy one
        assert (bad.chat_requests, good.chat_requests) == (1, 1)
        assert "x-brownout-cache" not in r.headers  # this group has no cache


async def test_forwards_unknown_fields_replaces_the_model_and_never_client_credentials(fakes: Any) -> None:
    fake = await fakes("ok")
    settings = {"endpoints": [{"url": fake.url, "model": "Qwen2.5-7B", "api_key": "sk-upstream"}]}
    async with gateway({"chat": settings}) as gw:
        body = chat(temperature=0.3, logit_bias={"50256": -100}, x_vendor={"keep": [1, 2]})
        r = await gw.post(body, headers={"authorization": "Bearer client-secret"})
        assert r.status_code == 200
    sent = fake.last_chat
    assert sent is not None
    assert sent["model"] == "Qwen2.5-7B"
    assert {k: v for k, v in sent.items() if k != "model"} == {k: v for k, v in body.items() if k != "model"}
    assert fake.last_headers["authorization"] == "Bearer sk-upstream"
    assert "client-secret" not in json.dumps(fake.last_headers)


async def test_least_in_flight_spreads_concurrent_requests_over_equal_replicas(fakes: Any) -> None:
    a = await fakes("ok", delay=0.05)
    b = await fakes("ok", delay=0.05)
    async with gateway({"chat": group(a, b)}) as gw:
        answers = await asyncio.gather(*(gw.post(chat()) for _ in range(10)))
        assert all(r.status_code == 200 for r in answers)
        assert a.chat_requests + b.chat_requests == 10
        assert min(a.chat_requests, b.chat_requests) >= 3


async def test_latency_aware_routing_prefers_the_faster_replica(fakes: Any) -> None:
    slow = await fakes("ok", delay=0.1)
    fast = await fakes("ok")
    async with gateway({"chat": group(slow, fast)}) as gw:
        for _ in range(6):
            assert (await gw.post(chat())).status_code == 200
    # Each replica is tried once while its latency is unknown; then the fast one gets everything.
    assert (slow.chat_requests, fast.chat_requests) == (1, 5)


async def test_a_hanging_replica_times_out_and_the_request_fails_over(fakes: Any) -> None:
    hang = await fakes("hang")
    good = await fakes("ok")
    async with gateway({"chat": group(hang, good, timeout=0.2, breaker=NEVER)}) as gw:
        r = await gw.post(chat())
        assert r.status_code == 200
        assert r.headers["x-brownout-served-by"] == f"chat/{label(good)}"
        assert gw.group().endpoints[0].stats.failures == 1
        # Its time-out now counts as its latency: the next requests avoid it.
        for _ in range(3):
            assert (await gw.post(chat())).headers["x-brownout-served-by"] == f"chat/{label(good)}"
    assert hang.chat_requests == 1


# ------------------------------------------------------------------------------------------ breakers, retries


async def test_each_endpoint_has_its_own_breaker(fakes: Any) -> None:
    bad = await fakes("error", status=500)
    good = await fakes("ok")
    clock = FakeClock()
    async with gateway({"chat": group(bad, good, breaker=TRIP)}, clock=clock) as gw:
        for _ in range(6):
            assert (await gw.post(chat())).status_code == 200
        assert breaker_of(gw.gateway, "chat", 0).state is BreakerState.OPEN
        assert breaker_of(gw.gateway, "chat", 1).state is BreakerState.CLOSED
        m = gw.metrics()
        assert m[("gateway_breaker_state", frozenset({("group", "chat"), ("endpoint", label(bad))}))] == 1
        assert m[("gateway_breaker_state", frozenset({("group", "chat"), ("endpoint", label(good))}))] == 0
    # Two failed calls opened the bad replica's breaker; nothing reached it after that.
    assert (bad.chat_requests, good.chat_requests) == (2, 6)


async def test_all_breakers_open_gives_503_with_retry_after_without_calling_upstream(fakes: Any) -> None:
    bad = await fakes("error", status=500)
    clock = FakeClock()
    trip = {**TRIP, "minimum_calls": 1, "window_size": 1, "timeout": 120}
    async with gateway({"chat": group(bad, breaker=trip)}, clock=clock) as gw:
        first = await gw.post(chat())
        assert first.status_code == 503
        assert first.headers["retry-after"] == "120"
        assert first.json()["error"]["code"] == "upstream_unavailable"
        assert "HTTP 500" in first.json()["error"]["message"]
        second = await gw.post(chat())
        assert second.status_code == 503
        assert second.headers["retry-after"] == "120"
        assert second.headers["x-brownout-attempts"] == "0"
        assert "breaker is open" in second.json()["error"]["message"]
        assert bad.chat_requests == 1
        clock.advance(121)  # the open wait is over: the next request probes the upstream
        bad.set("ok")
        assert (await gw.post(chat())).status_code == 200
        assert bad.chat_requests == 2


async def test_retries_stop_when_the_retry_budget_is_spent(fakes: Any) -> None:
    bad = await fakes("error", status=502)
    clock = FakeClock()
    settings = group(
        bad,
        max_attempts=3,
        retry_backoff=0,
        retry_budget_ratio=0,
        retry_budget_min_per_second=0.1,  # one retry in the 10 s window
        breaker=NEVER,
    )
    async with gateway({"chat": settings}, clock=clock) as gw:
        first = await gw.post(chat())
        assert (first.status_code, first.headers["x-brownout-attempts"]) == (503, "2")
        second = await gw.post(chat())
        assert (second.status_code, second.headers["x-brownout-attempts"]) == (503, "1")
        assert "retry budget exhausted" in second.json()["error"]["message"]
        assert bad.chat_requests == 3
        clock.advance(11)  # the window has moved past the retry: the budget allows one again
        third = await gw.post(chat())
        assert third.headers["x-brownout-attempts"] == "2"


@pytest.mark.parametrize(("mode", "status"), [("rate_limited", 429), ("error", 503)])
async def test_upstream_retry_after_opens_that_endpoints_breaker_for_that_long(
    fakes: Any, mode: str, status: int
) -> None:
    limited = await fakes(mode, status=status, retry_after=30)
    good = await fakes("ok")
    clock = FakeClock()
    async with gateway({"chat": group(limited, good, breaker=NEVER)}, clock=clock) as gw:
        r = await gw.post(chat())
        assert r.status_code == 200
        assert r.headers["x-brownout-attempts"] == "2"
        held = breaker_of(gw.gateway, "chat", 0)
        assert held.state is BreakerState.OPEN
        assert held.retry_after() == 30
        for _ in range(3):
            assert (await gw.post(chat())).headers["x-brownout-served-by"] == f"chat/{label(good)}"
        assert limited.chat_requests == 1
        clock.advance(30)
        assert held.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_fault_4xx_is_passed_back_not_retried_not_counted(fakes: Any, status: int) -> None:
    refusing = await fakes("error", status=status)
    good = await fakes("ok")
    async with gateway({"chat": group(refusing, good, max_attempts=3)}) as gw:
        r = await gw.post(chat())
        assert r.status_code == status
        assert r.json()["error"]["message"] == f"injected error {status}"  # the upstream's own words
        # ... in the one error shape, though the upstream sent a numeric code and no param: the
        # code becomes the status's own name.
        error = ErrorResponse.model_validate(r.json()).error
        assert isinstance(error.code, str)
        assert error.code
        assert error.param is None
        assert r.headers["x-brownout-served-by"] == f"chat/{label(refusing)}"
        stats = breaker_of(gw.gateway, "chat", 0).metrics()
        assert (stats.calls, stats.failures) == (0, 0)
        assert gw.group().stats.outcomes["client_error"] == 1
    assert (refusing.chat_requests, good.chat_requests) == (1, 0)


# ------------------------------------------------------------------------------------------ fallbacks


async def test_fallback_groups_are_tried_in_order_and_reported(fakes: Any) -> None:
    first = await fakes("error", status=500)
    second = await fakes("down")
    third = await fakes("ok", content="from the third")
    groups = {
        "primary": group(first, max_attempts=1, fallbacks=["secondary", "tertiary"]),
        "secondary": group(second, max_attempts=1, fallbacks=["primary"]),
        "tertiary": group(third),
    }
    async with gateway(groups) as gw:
        events: list[Any] = []
        gw.bus.subscribe(events.append)
        r = await gw.post(chat("primary"))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "from the third"
        assert r.headers["x-brownout-fallbacks"] == "primary>secondary>tertiary"
        assert r.headers["x-brownout-served-by"] == f"tertiary/{label(third)}"
        assert r.headers["x-brownout-attempts"] == "3"
        assert (first.chat_requests, second.chat_requests, third.chat_requests) == (1, 1, 1)
        assert gw.group("primary").stats.fallbacks == {"tertiary": 1}
        served = [e for e in events if isinstance(e, FallbackServed)]
        assert [(e.source, e.strategy, e.skipped) for e in served] == [("gateway:primary", "tertiary", 2)]
        # A fallback group's own fallbacks are not followed: secondary alone fails, then primary.
        r = await gw.post(chat("secondary"))
        assert r.status_code == 503
        assert r.headers["x-brownout-fallbacks"] == "secondary>primary"
        m = gw.metrics()
        assert m[("gateway_fallbacks_total", frozenset({("group", "primary"), ("to", "tertiary")}))] == 1


# ------------------------------------------------------------------------------------------ admission


async def test_admission_sheds_with_429_and_retry_after(scripted: Any) -> None:
    release = asyncio.Event()

    async def held(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await release.wait()
        await send_json(send, completion("done"))

    upstream = await scripted(held)
    admission = {"max_concurrent": 1, "max_queue": 0, "retry_after": 7}
    async with gateway({"chat": group(upstream.url, admission=admission)}) as gw:
        first = asyncio.create_task(gw.post(chat()))
        await until(lambda: upstream.calls == 1, "the first request upstream")
        shed = await gw.post(chat())
        assert shed.status_code == 429
        assert shed.headers["retry-after"] == "7"
        assert shed.json()["error"]["code"] == "overloaded"
        assert shed.json()["error"]["type"] == "rate_limit_error"
        release.set()
        assert (await first).status_code == 200
        assert upstream.calls == 1
        assert gw.group().stats.outcomes["overloaded"] == 1
        assert (await gw.post(chat())).status_code == 200


# ------------------------------------------------------------------------------------------ streaming


async def test_streams_pass_through_event_by_event_unchanged(scripted: Any) -> None:
    gate = asyncio.Event()
    events = [sse("A fresh"), sse(" citrus"), sse(done=True)]

    async def gated(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        await send({"type": "http.response.body", "body": events[0], "more_body": True})
        await gate.wait()  # the rest comes only once the client has read the first event
        await send({"type": "http.response.body", "body": events[1] + events[2], "more_body": False})

    upstream = await scripted(gated)
    async with (
        gateway({"chat": group(upstream.url)}) as gw,
        gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-brownout-served-by"] == f"chat/{label(upstream)}"
        received = b""
        chunks = r.aiter_raw()
        while events[0] not in received:
            received += await anext(chunks)
        # The first event reached the client while the upstream was still holding the rest.
        assert not gate.is_set()
        gate.set()
        received += b"".join([c async for c in chunks])
    assert received == b"".join(events)
    assert upstream.bodies[0]["stream"] is True


async def test_a_stream_that_breaks_before_its_first_token_fails_over_transparently(fakes: Any) -> None:
    broken = await fakes("break_before")
    good = await fakes("ok", content="A fresh citrus scent")
    async with gateway({"chat": group(broken, good, breaker=NEVER)}) as gw:
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.status_code == 200
            assert r.headers["x-brownout-served-by"] == f"chat/{label(good)}"
            assert r.headers["x-brownout-attempts"] == "2"
            text = (await read_stream(r)).decode()
        assert text.rstrip().endswith("data: [DONE]")
        assert "event: error" not in text
        deltas = [
            json.loads(line[6:])["choices"][0]["delta"] for line in text.splitlines() if line[6:7] == "{"
        ]
        assert "".join(d.get("content", "") for d in deltas) == "A fresh citrus scent"
        stats = breaker_of(gw.gateway, "chat", 0).metrics()
        assert stats.failures == 1
    assert (broken.chat_requests, good.chat_requests) == (1, 1)


async def test_a_stream_that_breaks_mid_way_with_nothing_to_continue_it_ends_with_an_error_event(
    fakes: Any,
) -> None:
    broken = await fakes("break_mid", content="A fresh citrus scent")
    async with gateway({"chat": group(broken, breaker=NEVER)}) as gw:
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.status_code == 200
            text = (await read_stream(r)).decode()  # ends cleanly: no broken read on the client
        assert '"content": "A "' in text  # the first token got through
        assert "[DONE]" not in text
        last = text.strip().split("\n\n")[-1]
        assert last.startswith("event: error\ndata: ")
        error = json.loads(last.split("data: ", 1)[1])["error"]
        assert error["code"] == "stream_interrupted"
        assert error["type"] == "service_unavailable"
        assert "no endpoint could continue it" in error["message"]
        ErrorResponse.model_validate({"error": error})  # the one error shape, mid-stream too
        assert breaker_of(gw.gateway, "chat", 0).metrics().failures == 1
        assert gw.group().stats.outcomes["stream_error"] == 1
        assert gw.group().stats.continuations["failed"] == 1
        assert gw.group().endpoints[0].load.in_flight == 0
    assert broken.chat_requests == 1  # the broken endpoint is not asked to continue its own answer


async def test_a_stream_that_ends_without_done_is_reported_not_truncated_silently(scripted: Any) -> None:
    async def short(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        await send({"type": "http.response.body", "body": sse("half an ans"), "more_body": False})

    upstream = await scripted(short)
    async with gateway({"chat": group(upstream.url)}) as gw:
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            text = (await read_stream(r)).decode()
        assert text.startswith(sse("half an ans").decode())
        assert "event: error" in text
        assert "ended before its final event" in text


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_request(scripted: Any) -> None:
    upstream_saw_disconnect = asyncio.Event()

    async def endless(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await sse_start(send)
        await send({"type": "http.response.body", "body": sse("first"), "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        upstream_saw_disconnect.set()

    upstream = await scripted(endless)
    async with gateway({"chat": group(upstream.url)}) as gw:
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            first = await anext(r.aiter_raw())
            assert b"first" in first
        # The client closed its connection; the gateway must stop reading the upstream.
        await asyncio.wait_for(upstream_saw_disconnect.wait(), 5.0)
        endpoint = gw.group().endpoints[0]
        await until(lambda: endpoint.load.in_flight == 0, "the stream to be released")
        assert endpoint.breaker.metrics().failures == 0  # the client left; the upstream did nothing wrong
        await until(lambda: gw.group().stats.outcomes["disconnected"] == 1, "the outcome")
        assert gw.group().admission.in_flight == 0


# ------------------------------------------------------------------------------------------ cache, guard


async def test_identical_deterministic_requests_share_one_upstream_call_then_hit_the_cache(
    scripted: Any,
) -> None:
    release = asyncio.Event()

    async def held(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await release.wait()
        await send_json(send, completion(f"answer {n}"))

    upstream = await scripted(held)
    async with gateway({"chat": group(upstream.url, cache={"enabled": True})}) as gw:
        body = chat(temperature=0, max_tokens=50)
        waiting = [asyncio.create_task(gw.post(body)) for _ in range(8)]
        await until(lambda: gw.group().stats.requests == 8, "all eight requests at the gateway")
        await until(lambda: upstream.calls == 1, "the one upstream call")
        release.set()
        answers = await asyncio.gather(*waiting)
        assert [r.status_code for r in answers] == [200] * 8
        assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"answer 1"}
        assert {r.headers["x-brownout-cache"] for r in answers} == {"miss"}
        assert upstream.calls == 1
        # The same request, its fields in another order: answered from the cache.
        hit = await gw.post(dict(reversed(list(body.items()))))
        assert hit.headers["x-brownout-cache"] == "hit"
        assert hit.json()["choices"][0]["message"]["content"] == "answer 1"
        assert upstream.calls == 1
        # Not deterministic, or a different request: the upstream answers.
        assert (await gw.post(chat(temperature=0.7))).headers["x-brownout-cache"] == "bypass"
        assert (await gw.post(chat(temperature=0, max_tokens=51))).headers["x-brownout-cache"] == "miss"
        assert upstream.calls == 3
        m = gw.metrics()
        assert m[("gateway_cache_total", frozenset({("group", "chat"), ("result", "hit")}))] == 1
        assert m[("gateway_cache_total", frozenset({("group", "chat"), ("result", "miss")}))] == 9


def json_request(**extra: Any) -> dict[str, Any]:
    rf = {"type": "json_schema", "json_schema": {"name": "scent", "schema": SCHEMA}}
    return chat(response_format=rf, **extra)


async def test_json_guard_reasks_once_with_the_problems_and_reports_fixed(scripted: Any) -> None:
    answers = [
        json.dumps({"name": "bergamot", "intensity": 42}),
        json.dumps({"name": "bergamot", "intensity": 7}),
    ]

    async def model(n: int, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await send_json(send, completion(answers[n - 1]))

    upstream = await scripted(model)
    async with gateway({"chat": group(upstream.url)}) as gw:
        r = await gw.post(json_request())
        assert r.status_code == 200
        assert r.headers["x-brownout-json-guard"] == "fixed"
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {
            "name": "bergamot",
            "intensity": 7,
        }
        assert gw.group().stats.guard == {"fixed": 1}
    assert upstream.calls == 2
    reask = upstream.bodies[1]["messages"]
    assert reask[:-2] == upstream.bodies[0]["messages"]
    assert reask[-2] == {"role": "assistant", "content": answers[0]}
    assert reask[-1]["role"] == "user"
    assert "at /intensity: 42 is greater than the maximum of 10" in reask[-1]["content"]


async def test_json_guard_passes_valid_answers_and_gives_up_after_one_reask(fakes: Any) -> None:
    valid = await fakes("ok")  # the fake answers a JSON instance of the requested schema
    invalid = await fakes("wrong_schema")
    async with gateway(
        {"good": group(valid), "bad": group(invalid), "off": group(invalid, json_guard=False)}
    ) as gw:
        r = await gw.post(json_request(model="good"))
        assert r.headers["x-brownout-json-guard"] == "valid"
        assert valid.chat_requests == 1
        r = await gw.post(json_request(model="bad"))
        assert r.status_code == 200
        assert r.headers["x-brownout-json-guard"] == "invalid"  # flagged, for the client to judge
        assert invalid.chat_requests == 2  # the first answer and one re-ask, no more
        r = await gw.post(json_request(model="off"))
        assert "x-brownout-json-guard" not in r.headers
        assert invalid.chat_requests == 3


# ------------------------------------------------------------------------------------------ requests refused


async def test_malformed_requests_get_openai_style_errors(fakes: Any) -> None:
    fake = await fakes("ok")
    async with gateway({"chat": group(fake)}, max_body_bytes=2048) as gw:
        r = await gw.http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_request_error")
        r = await gw.http.post("/v1/chat/completions", json=["a", "list"])
        assert r.status_code == 400
        r = await gw.post({"messages": []})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "missing_model")
        r = await gw.post(chat("gpt-17"))
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
        assert "['chat']" in r.json()["error"]["message"]
        r = await gw.post(chat(stream="yes"))
        assert r.status_code == 400
        r = await gw.post(chat(padding="x" * 4096))
        assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")
        assert set(r.json()["error"]) == {"message", "type", "param", "code", "limit_bytes"}
        assert r.json()["error"]["limit_bytes"] == 2048
    assert fake.chat_requests == 0


# ------------------------------------------------------------------------------------------ in brownout serve


async def test_brownout_serve_exposes_the_gateway_its_metrics_and_health(fakes: Any, tmp_path: Path) -> None:
    model = await fakes("ok")
    base = load_config(None, environ={}).model_dump()
    base["models"]["local"]["enabled"] = False
    base["models"]["health_interval"] = 3600.0
    for role in ROLES:
        base["models"]["roles"][role]["endpoints"] = [{"url": model.url}]
    base["database"] = {
        **base["database"],
        "url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
        "spool_path": str(tmp_path / "spool.db"),
    }
    base["gateway"] = {
        "groups": {"chat": group(model, fallbacks=["backup"]), "backup": group(model)},
    }
    config = BrownoutConfig.model_validate(base)
    runtime = Runtime(config, events=EventBus())
    app = create_app(config, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout") as http:
            # A chat over server.max_body_bytes (16 KiB): the gateway bounds its own bodies.
            long = chat(messages=[{"role": "user", "content": "notes " * 4000}])
            r = await http.post("/v1/chat/completions", json=long)
            assert r.status_code == 200, r.text
            assert r.headers["x-brownout-served-by"] == f"chat/{label(model)}"
            models = (await http.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["chat", "backup"]
            health = (await http.get("/health/gateway")).json()
            assert health["status"] == "healthy"
            assert health["groups"]["chat"]["fallbacks"] == ["backup"]
            assert health["groups"]["chat"]["endpoints"][0]["breaker"] == "closed"
            # The same view in /health and in the live view's snapshot (the dashboard).
            assert (await http.get("/health")).json()["gateway"]["status"] == "healthy"
            status = (await http.get("/api/v1/status")).json()
            assert status["gateway"] == {
                "status": "healthy",
                "groups": {"chat": "available", "backup": "available"},
            }
            text = (await http.get("/metrics")).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ep = frozenset({("group", "chat"), ("endpoint", label(model))})
    assert samples[("gateway_requests_total", frozenset({("group", "chat")}))] == 1
    assert samples[("gateway_responses_total", frozenset({("group", "chat"), ("outcome", "served")}))] == 1
    assert samples[("gateway_upstream_requests_total", ep)] == 1
    assert samples[("gateway_upstream_failures_total", ep)] == 0
    assert samples[("gateway_upstream_latency_seconds_count", ep)] == 1
    assert samples[("gateway_overhead_seconds_count", frozenset({("group", "chat")}))] == 1
    assert samples[("gateway_breaker_state", ep)] == 0
    assert ("gateway_admission_in_flight", frozenset({("group", "backup")})) in samples


async def test_without_groups_the_routes_answer_clearly(tmp_path: Path) -> None:
    gw = Gateway(GatewaySection())
    app = Starlette()
    install_gateway(app, gw)
    await gw.start()  # nothing to open without groups
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        assert (await http.get("/v1/models")).json() == {"object": "list", "data": []}
        r = await http.post("/v1/chat/completions", json=chat("anything"))
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
        assert (await http.get("/health/gateway")).json() == {"status": "disabled", "groups": {}}
    await gw.aclose()


# ---------------------------------------------------------------------------------- the fakes' new modes


async def test_fakellm_streams_like_openai_and_rate_limits_with_retry_after(fakes: Any) -> None:
    fake = await fakes("ok", content="A fresh citrus scent")
    async with httpx.AsyncClient(base_url=fake.url, trust_env=False) as http:
        r = await http.post("/v1/chat/completions", json=chat(stream=True))
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == "A fresh citrus scent"
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        fake.set("rate_limited")
        r = await http.post("/v1/chat/completions", json=chat())
        assert (r.status_code, r.headers["retry-after"]) == (429, "1")
        fake.set("break_mid")
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/v1/chat/completions", json=chat())  # half a body, then the connection drops
