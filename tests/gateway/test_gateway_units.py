"""The gateway's parts on their own: config, endpoint choice, breaker hold, cache keys, SSE framing,
the JSON guard's checks and the metrics' histograms. Time is a FakeClock; nothing here opens a socket."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from brownout.config import load_config
from brownout.errors import ConfigError
from brownout.events import BreakerStateChanged, EventBus
from brownout.gateway.cache import cache_key, deterministic
from brownout.gateway.config import GatewayEndpoint, GatewaySection, ModelGroup
from brownout.gateway.guard import SchemaGuard, requested_schema
from brownout.gateway.router import Gateway, forwarded, retry_after_header
from brownout.gateway.stats import Histogram
from brownout.gateway.stream import complete_events, error_event
from brownout.llm.guard import Accepted, Rejection
from brownout.policies.balance import pick
from brownout.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from brownout.testing import FakeClock

# ------------------------------------------------------------------------------------------ breaker hold


def test_open_for_holds_the_breaker_open_for_the_given_time(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Any] = []
    bus.subscribe(seen.append)
    breaker = CircuitBreaker("ep", BreakerConfig(open_wait=5), clock=clock, events=bus)
    breaker.open_for(30, "upstream Retry-After 30s")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.available
    assert breaker.retry_after() == 30
    assert breaker.metrics().opened == 1
    assert [(e.old, e.new, e.reason) for e in seen if isinstance(e, BreakerStateChanged)] == [
        ("closed", "open", "upstream Retry-After 30s")
    ]
    clock.advance(29.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_open_for_never_shortens_an_open_wait_but_may_lengthen_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker("ep", BreakerConfig(open_wait=60, minimum_calls=1, window_size=1), clock=clock)
    breaker.open_for(60)
    breaker.open_for(10)  # shorter: ignored
    assert breaker.retry_after() == 60
    breaker.open_for(90)  # longer: extended
    assert breaker.retry_after() == 90
    assert breaker.metrics().opened == 1  # still one opening


def test_open_for_leaves_operator_states_alone(clock: FakeClock) -> None:
    breaker = CircuitBreaker("ep", clock=clock)
    breaker.force_closed()
    breaker.open_for(30)
    assert breaker.state is BreakerState.FORCED_CLOSED
    breaker.disable()
    breaker.open_for(30)
    assert breaker.state is BreakerState.DISABLED
    breaker.reset()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            breaker.open_for(bad)


def test_open_for_from_half_open_reopens_for_the_hold(clock: FakeClock) -> None:
    breaker = CircuitBreaker("ep", BreakerConfig(open_wait=5), clock=clock)
    breaker.open_for(5)
    clock.advance(5)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.open_for(20)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == 20


# ------------------------------------------------------------------------------------------ config


def groups(**named: Any) -> dict[str, Any]:
    return {"groups": named}


def test_default_gateway_has_no_groups() -> None:
    section = load_config(None, environ={}).gateway
    assert section == GatewaySection()
    assert section.groups == {}
    assert section.max_body_bytes == 4_194_304


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        (groups(a={"endpoints": []}), "gateway.groups.a.endpoints", "at least 1"),
        (groups(a={"endpoints": [{"url": "ftp://x"}]}), "gateway.groups.a.endpoints.0.url", "http://"),
        (
            groups(a={"endpoints": [{"url": "http://h:1"}], "fallbacks": ["b"]}),
            "gateway",
            "groups.a.fallbacks[0]: unknown group 'b'",
        ),
        (
            groups(a={"endpoints": [{"url": "http://h:1"}], "fallbacks": ["a"]}),
            "gateway",
            "cannot fall back to itself",
        ),
        (
            groups(a={"endpoints": [{"url": "http://h:1"}, {"url": "http://h:1/"}]}),
            "gateway.groups.a",
            "listed twice",
        ),
        (
            groups(a={"endpoints": [{"url": "http://h:1"}], "max_attempts": 0}),
            "gateway.groups.a.max_attempts",
            "",
        ),
        (
            groups(a={"endpoints": [{"url": "http://h:1"}], "breaker": {"minimum_calls": 30}}),
            "gateway.groups.a.breaker",
            "minimum_calls",
        ),
        (groups(a={"endpoints": [{"url": "http://h:1"}], "colour": "red"}), "gateway.groups.a.colour", ""),
    ],
)
def test_bad_gateway_config_names_the_key(
    tmp_path: Path, raw: dict[str, Any], key: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"gateway": raw}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == key
    assert message in caught.value.message


def test_endpoint_urls_are_normalised_and_labelled() -> None:
    ep = GatewayEndpoint(url="http://10.0.0.5:8000/v1/")
    assert ep.url == "http://10.0.0.5:8000"
    assert ep.label == "10.0.0.5:8000"
    assert GatewayEndpoint(url="https://api.example.com", name="hosted").label == "hosted"


# ------------------------------------------------------------------------------------------ endpoint choice


def make_gateway(clock: FakeClock, n: int = 3, **settings: Any) -> Gateway:
    group = ModelGroup.model_validate(
        {"endpoints": [{"url": f"http://127.0.0.1:{9000 + i}"} for i in range(n)], **settings}
    )
    return Gateway(GatewaySection(groups={"chat": group}), clock=clock)


def test_pick_prefers_untried_then_lowest_expected_wait_then_fewest_in_flight(clock: FakeClock) -> None:
    g = make_gateway(clock).groups["chat"]
    a, b, c = g.endpoints
    assert pick(g.endpoints, None) is a  # nothing known: the order given
    a.load.begin()
    assert pick(g.endpoints, None) is b  # equal (unknown) latency: fewest in flight
    for ep, latency in ((a, 0.1), (b, 0.5), (c, 0.3)):
        ep.load.observe(latency)
    a.load.end()
    assert pick(g.endpoints, None) is a
    for _ in range(3):
        a.load.begin()  # expected wait (3 + 1) * 0.1 = 0.4 > c's 0.3
    assert pick(g.endpoints, None) is c
    assert pick(g.endpoints, [c]) is a  # a replica already tried goes last
    assert pick(g.endpoints, [a, b, c]) is c


def test_pick_skips_endpoints_whose_breaker_refuses(clock: FakeClock) -> None:
    gw = make_gateway(clock, n=2)
    g = gw.groups["chat"]
    a, b = g.endpoints
    a.breaker.open_for(10)
    assert pick(g.endpoints, None) is b
    b.breaker.force_open()
    assert pick(g.endpoints, None) is None
    assert not g.available
    assert g.retry_after() == min(10, b.breaker.config.open_wait)  # forced open: its open wait
    assert gw.status()["status"] == "unhealthy"


def test_latency_average_moves_towards_new_answers(clock: FakeClock) -> None:
    ep = make_gateway(clock, n=1).groups["chat"].endpoints[0]
    ep.load.observe(1.0)
    assert ep.load.ewma == 1.0
    ep.load.observe(0.0)
    assert ep.load.ewma == pytest.approx(0.7)


def test_fallback_chains_follow_the_config_order(clock: FakeClock) -> None:
    one = {"endpoints": [{"url": "http://127.0.0.1:1"}]}
    section = GatewaySection.model_validate(
        {"groups": {"a": {**one, "fallbacks": ["c", "b"]}, "b": one, "c": {**one, "fallbacks": ["a"]}}}
    )
    gw = Gateway(section, clock=clock)
    assert [g.name for g in gw.groups["a"].chain] == ["a", "c", "b"]
    assert [g.name for g in gw.groups["c"].chain] == ["c", "a"]
    assert json.loads(gw.models_body)["data"][1] == {
        "id": "b",
        "object": "model",
        "created": 0,
        "owned_by": "brownout",
    }


# ------------------------------------------------------------------------------------------ cache keys


def test_only_temperature_zero_unstreamed_requests_are_deterministic() -> None:
    assert deterministic({"temperature": 0})
    assert deterministic({"temperature": 0.0, "stream": False})
    assert not deterministic({})  # OpenAI's default temperature is 1
    assert not deterministic({"temperature": 0.2})
    assert not deterministic({"temperature": False})
    assert not deterministic({"temperature": "0"})
    assert not deterministic({"temperature": 0, "stream": True})


def test_cache_keys_ignore_field_order_and_stream_flags_but_nothing_else() -> None:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    key = cache_key("chat", body)
    assert cache_key("chat", dict(reversed(list(body.items())))) == key
    assert cache_key("chat", {**body, "stream": False, "stream_options": None}) == key
    assert cache_key("other", body) != key
    assert cache_key("chat", {**body, "seed": 1}) != key
    assert cache_key("chat", {**body, "messages": [{"role": "user", "content": "hi!"}]}) != key


# ------------------------------------------------------------------------------------------ SSE framing


@pytest.mark.parametrize(
    ("buf", "cut"),
    [
        (b"", 0),
        (b"data: {", 0),
        (b"data: 1\n\n", 9),
        (b"data: 1\n\ndata: 2", 9),
        (b"data: 1\n\ndata: 2\n\n", 18),
        (b"data: 1\r\n\r\ndata: 2", 11),
        (b": ping\n\n", 8),
    ],
)
def test_complete_events_finds_the_end_of_the_last_whole_event(buf: bytes, cut: int) -> None:
    assert complete_events(buf) == cut


def test_the_error_event_is_what_openai_clients_raise_on() -> None:
    event = error_event("upstream broke")
    assert event.startswith(b"event: error\ndata: ")
    assert event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1])["error"]["message"] == "upstream broke"


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    raw = [
        (b"Content-Type", b"application/json"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"content-length", b"12"),
        (b"x-request-id", b"abc"),
        (b"Server", b"uvicorn"),
    ]
    assert forwarded(raw) == [(b"content-type", b"application/json"), (b"x-request-id", b"abc")]
    assert retry_after_header(0.2) == b"1"
    assert retry_after_header(29.5) == b"30"


# ------------------------------------------------------------------------------------------ JSON guard

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "maximum": 3}, "s": {"enum": ["a", "b"]}},
    "required": ["n", "s"],
}


def completion(*contents: str | None) -> bytes:
    return json.dumps(
        {"choices": [{"index": i, "message": {"content": c}} for i, c in enumerate(contents)]}
    ).encode()


def test_requested_schema_reads_openai_json_schema_only() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    assert requested_schema({"response_format": rf}) == SCHEMA
    assert requested_schema({"response_format": {"type": "json_object"}}) is None
    assert requested_schema({"response_format": {"type": "json_schema", "json_schema": {}}}) is None
    assert requested_schema({}) is None


def test_schema_check_lists_problems_per_path() -> None:
    guard = SchemaGuard()
    check = guard.for_schema(SCHEMA)
    assert check is not None
    assert guard.for_schema(dict(reversed(list(SCHEMA.items())))) is check  # compiled once
    assert isinstance(check.judge(completion('{"n": 1, "s": "a"}')), Accepted)
    bad = check.judge(completion('{"n": 1, "s": "a"}', '{"n": 9}'))
    assert isinstance(bad, Rejection)
    assert bad.text == '{"n": 9}'
    assert bad.problems == ('at /: "s" is a required property', "at /n: 9 is greater than the maximum of 3")
    found = check.judge(completion("Sure! {oops"))
    assert isinstance(found, Rejection)
    assert "\n- the answer is not JSON: " in check.reask_messages([], found)[-1]["content"]
    assert isinstance(check.judge(completion(None)), Accepted)  # a tool call: not the guard's to judge
    assert isinstance(check.judge(b"not a completion"), Accepted)
    assert guard.for_schema({"type": "wat"}) is None


class Reply:
    """A whole upstream answer, as far as the guard reads it."""

    def __init__(self, *contents: str | None) -> None:
        self.body = completion(*contents)


async def test_reask_appends_the_bad_answer_and_the_problems() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0}
    bad = Reply(json.dumps({"n": 9, "s": "a", "pad": "x" * 5000}))
    good = Reply('{"n": 1, "s": "a"}')
    sent: list[dict[str, Any]] = []

    async def ask(again: dict[str, Any]) -> Reply:
        sent.append(again)
        return good

    assert await SchemaGuard().run(SCHEMA, body, bad, ask) == (good, "fixed")
    [again] = sent
    assert again["temperature"] == 0
    assert again["messages"][0] == body["messages"][0]
    assert again["messages"][1]["role"] == "assistant"
    assert len(again["messages"][1]["content"]) < 4100  # a long bad answer is cut
    assert "- at /n: 9 is greater than the maximum of 3" in again["messages"][2]["content"]
    assert body["messages"] == [{"role": "user", "content": "q"}]  # the original is untouched


async def test_the_guard_reasks_once_and_keeps_the_last_answer_it_has() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    first, second = Reply('{"n": 9}'), Reply('{"n": 8}')
    asked: list[dict[str, Any]] = []

    async def ask_bad(again: dict[str, Any]) -> Reply:
        asked.append(again)
        return second

    async def nothing(again: dict[str, Any]) -> Reply | None:
        asked.append(again)
        return None  # no upstream answered, or one answered with an error

    guard = SchemaGuard()
    ok = Reply('{"n": 1, "s": "a"}')
    assert await guard.run(SCHEMA, body, ok, ask_bad) == (ok, "valid")
    assert asked == []
    assert await guard.run(SCHEMA, body, first, ask_bad) == (second, "invalid")
    assert await guard.run(SCHEMA, body, first, nothing) == (first, "invalid")
    assert len(asked) == 2  # one re-ask each time, never more
    assert await guard.run({"type": "wat"}, body, first, ask_bad) == (first, "skipped")
    # An answer nested too deep for the JSON reader is not JSON, like any other unreadable answer.
    deep = Reply("[" * 100_000)
    assert await guard.run(SCHEMA, body, deep, ask_bad) == (second, "invalid")
    assert "the answer is not JSON" in asked[-1]["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------ metrics


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    h = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.005, 0.5):
        h.observe(value)
    assert h.count == 4
    assert h.total == pytest.approx(0.5065)
    assert h.cumulative() == [("0.001", 2.0), ("0.01", 3.0), ("+Inf", 4.0)]
