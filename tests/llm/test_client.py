"""The model client, over real HTTP against fault-injecting servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.clock import SYSTEM_CLOCK
from brownout.config import CircuitBreakerSection
from brownout.errors import ConfigError, DeadlineExceeded, ModelError, ModelUnavailable, Overloaded
from brownout.events import BreakerStateChanged, EventBus
from brownout.llm.client import EARLY_CUT, ModelClient, SharedEndpoint, is_caller_fault
from brownout.llm.types import CUT_SHORT, ChatResult, EndpointConfig
from brownout.policies.breaker import BreakerConfig, BreakerGroupConfig, BreakerState
from brownout.policies.deadline import deadline
from brownout.policies.limiter import AdaptiveLimiter, LimiterConfig
from brownout.policies.retry import RetryConfig
from brownout.testing import FakeTimer
from support.wait import until

MESSAGES = [{"role": "user", "content": "A fresh citrus scent for summer."}]

# Opens after 2 failures out of at least 2 calls; stays open long enough for any test.
SMALL = BreakerGroupConfig(
    defaults=BreakerConfig(minimum_calls=2, window_size=4, failure_rate_threshold=0.5, open_wait=30.0),
    overrides={},
)
# Records every outcome of a test and never opens.
WIDE = BreakerGroupConfig(defaults=BreakerConfig(minimum_calls=100, window_size=100), overrides={})
ONE_TRY = RetryConfig(max_attempts=1)
TWO_TRIES = RetryConfig(max_attempts=2, backoff_base=0.0)


def ep(fake: FakeLLM | str, **kw: Any) -> EndpointConfig:
    return EndpointConfig(url=fake if isinstance(fake, str) else fake.url, **kw)


def dead_url() -> str:
    """A 127.0.0.1 URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def client(*endpoints: EndpointConfig, **kw: Any) -> ModelClient:
    kw.setdefault("breakers", SMALL)
    kw.setdefault("retry", ONE_TRY)
    return ModelClient("gen", endpoints, events=kw.pop("events", EventBus()), **kw)


def failures(c: ModelClient, name: str | None = None) -> tuple[int, int]:
    m = c.breakers[name or c.role].metrics()
    return m.calls, m.failures


async def test_success_returns_a_chat_result() -> None:
    async with FakeLLM(model="m") as fake, client(ep(fake, model="small", api_key="s3cret")) as c:
        schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "maximum": 4}}}
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        result = await c.chat(MESSAGES, max_tokens=64, temperature=0.1, response_format=rf)
        assert isinstance(result, ChatResult)
        assert (result.content, result.role, result.endpoint) == ('{"n": 4}', "gen", fake.url)
        assert result.finish_reason == "stop"
        assert result.usage["completion_tokens"] == 2
        assert 0 < result.latency < 5
        sent = fake.last_chat
        assert sent is not None
        assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("small", 64, 0.1)
        assert sent["response_format"] == rf
        assert sent["messages"] == MESSAGES
        assert fake.last_headers["authorization"] == "Bearer s3cret"
        assert failures(c) == (1, 0)
        [status] = c.endpoints_status()
        assert status["state"] == "closed"
        assert status["in_flight"] == 0
        assert status["ewma_latency_ms"] == pytest.approx(result.latency * 1000, abs=0.01)


async def test_endpoint_without_grammar_support_gets_no_json_schema() -> None:
    async with FakeLLM() as fake, client(ep(fake, json_schema=False)) as c:
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        await c.chat(MESSAGES, response_format=rf)
        assert fake.last_chat is not None
        assert "response_format" not in fake.last_chat
        await c.chat(MESSAGES, response_format={"type": "json_object"})
        assert fake.last_chat["response_format"] == {"type": "json_object"}


async def test_500s_open_the_breaker_then_calls_fail_fast_without_touching_the_server() -> None:
    bus = EventBus()
    changes: list[BreakerStateChanged] = []
    bus.subscribe(changes.append, BreakerStateChanged)
    async with FakeLLM("error") as fake, client(ep(fake), events=bus) as c:
        for _ in range(2):
            with pytest.raises(ModelError) as info:
                await c.chat(MESSAGES)
            assert info.value.status == 500
            assert info.value.endpoint == fake.url
        assert c.breakers["gen"].state is BreakerState.OPEN
        assert [(e.old, e.new) for e in changes] == [("closed", "open")]
        assert not c.available
        seen = fake.chat_requests
        with pytest.raises(ModelUnavailable) as unavailable:
            await c.chat(MESSAGES)
        assert 29.0 < unavailable.value.retry_after <= 30.0
        assert unavailable.value.role == "gen"
        assert fake.chat_requests == seen == 2  # failed fast: the server saw nothing


async def test_a_retry_after_the_breaker_opened_gives_up_with_the_real_error() -> None:
    async with FakeLLM("error", status=502) as fake, client(ep(fake), retry=TWO_TRIES) as c:
        # Attempt 1 fails (window 1/1, below minimum_calls), attempt 2 fails and opens the breaker;
        # the error is the endpoint's, not "unavailable".
        with pytest.raises(ModelError) as info:
            await c.chat(MESSAGES)
        assert info.value.status == 502
        assert fake.chat_requests == 2
        assert c.breakers["gen"].state is BreakerState.OPEN
        assert c.retry.stats.retries == 1


async def test_hang_times_out_at_the_timeout_and_counts_as_failure() -> None:
    async with FakeLLM("hang") as fake, client(ep(fake), timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(ModelError) as info:
            await c.chat(MESSAGES)
        assert time.monotonic() - start < 1.5
        assert info.value.status is None
        assert "no answer within 0.3s" in str(info.value)
        assert isinstance(info.value.__cause__, httpx.TimeoutException)
        assert failures(c) == (1, 1)
        # A per-call timeout overrides the client's.
        with pytest.raises(ModelError, match=r"within 0\.2s"):
            await c.chat(MESSAGES, timeout=0.2)


async def test_a_body_that_is_not_a_completion_is_a_counted_model_error() -> None:
    async with FakeLLM("malformed") as fake, client(ep(fake)) as c:
        with pytest.raises(ModelError, match="malformed completion") as info:
            await c.chat(MESSAGES)
        assert info.value.status == 200
        fake.set("malformed", content='{"object": "chat.completion", "choices": []}')
        with pytest.raises(ModelError, match="choices"):
            await c.chat(MESSAGES)
        assert failures(c) == (2, 2)


async def test_prose_content_is_the_guards_business_not_a_client_error() -> None:
    async with FakeLLM("garbage") as fake, client(ep(fake)) as c:
        result = await c.chat(MESSAGES)
        assert result.content.startswith("Sure!")
        assert failures(c) == (1, 0)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_caller_faults_are_not_counted_nor_retried(status: int) -> None:
    async with (
        FakeLLM("error", status=status) as fake,
        client(ep(fake), retry=RetryConfig(max_attempts=3, backoff_base=0.0)) as c,
    ):
        for _ in range(3):
            with pytest.raises(ModelError) as info:
                await c.chat(MESSAGES)
            assert info.value.status == status
            assert type(info.value) is ModelError
        assert fake.chat_requests == 3  # one request per call: no retry
        assert failures(c) == (0, 0)
        assert c.breakers["gen"].state is BreakerState.CLOSED


def test_caller_fault_classification() -> None:
    assert all(is_caller_fault(s) for s in (400, 401, 403, 404, 413, 422))
    assert not any(is_caller_fault(s) for s in (None, 200, 408, 429, 500, 502, 503))


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_carried_on_the_model_error(status: int) -> None:
    async with FakeLLM("error", status=status, retry_after=7) as fake, client(ep(fake)) as c:
        with pytest.raises(ModelError) as info:
            await c.chat(MESSAGES)
        assert (info.value.status, info.value.retry_after) == (status, 7.0)
        assert failures(c) == (1, 1)  # a 429/503 blames the endpoint


async def test_a_short_retry_after_is_honoured_by_the_retry() -> None:
    async with FakeLLM("error", status=503, retry_after=0.3) as fake, client(ep(fake), retry=TWO_TRIES) as c:
        start = time.monotonic()
        with pytest.raises(ModelError):
            await c.chat(MESSAGES)
        assert time.monotonic() - start >= 0.3  # waited the hint, not backoff_base 0
        assert fake.chat_requests == 2


async def test_connection_refused_is_a_counted_failure() -> None:
    url = dead_url()
    async with client(ep(url)) as c:
        with pytest.raises(ModelError, match="ConnectError") as info:
            await c.chat(MESSAGES)
        assert (info.value.endpoint, info.value.status) == (url, None)
        assert failures(c) == (1, 1)


async def test_a_dead_endpoint_is_avoided_once_its_breaker_opens() -> None:
    down = dead_url()
    async with FakeLLM() as good, client(ep(down), ep(good), retry=TWO_TRIES) as c:
        assert set(c.breakers) == {f"gen@{down}", f"gen@{good.url}"}
        for _ in range(6):
            result = await c.chat(MESSAGES)
            assert result.endpoint == good.url  # every call succeeds: the retry moves over
        # The dead endpoint was tried (first in order, not yet measured) until its breaker opened.
        assert c.breakers[f"gen@{down}"].state is BreakerState.OPEN
        assert failures(c, f"gen@{down}") == (2, 2)
        assert good.chat_requests == 6
        statuses = {s["url"]: s for s in c.endpoints_status()}
        assert statuses[down]["available"] is False
        assert statuses[good.url]["state"] == "closed"
        assert c.available


async def test_a_failing_endpoint_stops_getting_requests_once_its_breaker_opens() -> None:
    async with FakeLLM("error") as bad, FakeLLM() as good, client(ep(bad), ep(good), retry=TWO_TRIES) as c:
        for _ in range(5):
            assert (await c.chat(MESSAGES)).endpoint == good.url
        assert bad.chat_requests == 2  # until its breaker opened, then never again
        assert good.chat_requests == 5


async def test_retry_moves_to_the_other_endpoint() -> None:
    async with (
        FakeLLM("flaky", fail_times=1) as first,
        FakeLLM() as second,
        client(ep(first), ep(second), retry=TWO_TRIES) as c,
    ):
        result = await c.chat(MESSAGES)
        assert result.endpoint == second.url
        assert (first.chat_requests, second.chat_requests) == (1, 1)
        assert c.retry.stats.retries == 1


async def test_without_retries_the_first_failure_is_raised() -> None:
    async with FakeLLM("error") as first, FakeLLM() as second, client(ep(first), ep(second)) as c:
        with pytest.raises(ModelError):
            await c.chat(MESSAGES)
        assert second.chat_requests == 0


async def test_no_endpoint_available_raises_model_unavailable_with_the_soonest_retry_after() -> None:
    async with FakeLLM() as a, FakeLLM() as b, client(ep(a), ep(b)) as c:
        breakers = list(c.breakers.values())
        breakers[0].force_open()  # retry_after = open_wait = 30
        assert c.available
        breakers[1].force_open()
        assert not c.available
        with pytest.raises(ModelUnavailable, match="all 2 endpoints") as info:
            await c.chat(MESSAGES)
        assert info.value.retry_after == 30.0
        assert a.chat_requests == b.chat_requests == 0


async def test_concurrent_calls_spread_by_in_flight_count() -> None:
    async with FakeLLM("slow", delay=0.2) as a, FakeLLM("slow", delay=0.2) as b, client(ep(a), ep(b)) as c:
        results = await asyncio.gather(*(c.chat(MESSAGES) for _ in range(6)))
        assert (a.chat_requests, b.chat_requests) == (3, 3)
        assert {r.endpoint for r in results} == {a.url, b.url}
        assert all(s["in_flight"] == 0 for s in c.endpoints_status())


async def test_lower_latency_wins_when_in_flight_ties() -> None:
    async with FakeLLM("slow", delay=0.15) as slow, FakeLLM() as fast, client(ep(slow), ep(fast)) as c:
        # Concurrent calls teach the client both latencies.
        await asyncio.gather(c.chat(MESSAGES), c.chat(MESSAGES))
        assert (slow.chat_requests, fast.chat_requests) == (1, 1)
        for _ in range(3):
            assert (await c.chat(MESSAGES)).endpoint == fast.url
        assert slow.chat_requests == 1


async def test_probe_reports_each_endpoint_and_leaves_breakers_alone() -> None:
    async with (
        FakeLLM() as ok,
        FakeLLM("error") as broken,
        FakeLLM("hang") as hung,
        client(ep(ok), ep(broken), ep(hung)) as c,
    ):
        start = time.monotonic()
        results = await c.probe(timeout=0.3)
        assert time.monotonic() - start < 1.5  # the probes ran at once
        by_url = {r.endpoint: r for r in results}
        assert [r.endpoint for r in results] == [ok.url, broken.url, hung.url]
        assert by_url[ok.url].healthy
        assert by_url[ok.url].error is None
        assert 0 < by_url[ok.url].latency < 1.0
        assert not by_url[broken.url].healthy
        assert by_url[broken.url].error == "HTTP 500"
        assert not by_url[hung.url].healthy
        assert "timeout" in (by_url[hung.url].error or "")
        assert by_url[hung.url].latency >= 0.25
        assert all(r.role == "gen" for r in results)
        assert ok.last_chat is not None
        assert ok.last_chat["max_tokens"] == 4
        assert ok.last_chat["messages"][0]["content"] == "Reply with OK."
        # Three probes per endpoint would open SMALL breakers if they were recorded.
        await c.probe(timeout=0.3)
        await c.probe(timeout=0.3)
        for breaker in c.breakers.values():
            assert breaker.state is BreakerState.CLOSED
            assert breaker.metrics().calls == 0


async def test_probe_reports_connection_failure_and_garbage() -> None:
    async with FakeLLM("malformed") as broken, client(ep(dead_url()), ep(broken)) as c:
        refused, malformed = await c.probe(timeout=1.0)
        assert not refused.healthy
        assert "ConnectError" in (refused.error or "")
        assert not malformed.healthy
        assert "malformed completion" in (malformed.error or "")
        broken.set("ok", content="  ")
        _, empty = await c.probe(timeout=1.0)
        assert (empty.healthy, empty.error) == (False, "empty answer")


def test_breaker_config_comes_from_the_group_by_role() -> None:
    url = "http://127.0.0.1:9"
    server_group = CircuitBreakerSection().group()  # what the server passes
    qwen = ModelClient("qwen", [ep(url)], breakers=server_group)
    mistral = ModelClient("mistral", [ep(url)], breakers=server_group)
    assert qwen.breakers["qwen"].config.failure_rate_threshold == 0.4  # the generator opens earlier
    assert mistral.breakers["mistral"].config.failure_rate_threshold == 0.5
    # Without a group, every role gets the toolkit's defaults: no role is special to the client.
    assert ModelClient("qwen", [ep(url)]).breakers["qwen"].config.failure_rate_threshold == 0.5
    group = BreakerGroupConfig(overrides={"qwen": {"failure_rate_threshold": 0.25, "open_wait": 5.0}})
    tuned = ModelClient("qwen", [ep(url)], breakers=group).breakers["qwen"].config
    assert (tuned.failure_rate_threshold, tuned.open_wait) == (0.25, 5.0)


async def test_qwen_breaker_opens_at_40_percent_failures() -> None:
    defaults = BreakerConfig(minimum_calls=5, window_size=5, open_wait=30.0)
    group = BreakerGroupConfig(defaults=defaults, overrides=CircuitBreakerSection().group().overrides)
    async with FakeLLM() as fake:
        clients = {
            role: ModelClient(role, [ep(fake)], breakers=group, retry=ONE_TRY, events=EventBus())
            for role in ("qwen", "mistral")
        }
        for c in clients.values():
            async with c:
                for mode in ("ok", "ok", "ok", "error", "error"):  # 2 of 5 fail
                    fake.set(mode)  # type: ignore[arg-type]
                    with contextlib.suppress(ModelError):
                        await c.chat(MESSAGES)
        assert clients["qwen"].breakers["qwen"].state is BreakerState.OPEN
        assert clients["mistral"].breakers["mistral"].state is BreakerState.CLOSED


async def test_the_callers_deadline_cuts_a_slow_call() -> None:
    async with FakeLLM("slow", delay=5.0) as fake, client(ep(fake), timeout=10.0) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.2):
                await c.chat(MESSAGES)
        assert time.monotonic() - start < 1.0
        assert c.endpoints_status()[0]["in_flight"] == 0


# -- streaming: read as it comes, closed when given up on --------------------------------------------

WORDS = "a slow and steady answer of twelve words that keeps on coming"


async def test_a_streamed_answer_is_read_whole_and_still_bounded_by_the_timeout() -> None:
    # Twelve words 0.1 s apart: 1.1 s in all.
    async with FakeLLM(content=WORDS, chunk_delay=0.1) as fake, client(ep(fake), timeout=0.5) as c:
        # The timeout is the whole call's, even while the tokens keep coming: a request's latency
        # target counts on it.
        with pytest.raises(ModelError, match=r"no answer within 0\.5s"):
            await c.chat(MESSAGES)
        assert failures(c) == (1, 1)
        result = await c.chat(MESSAGES, timeout=3.0)
        assert result.content == WORDS
        assert result.finish_reason == "stop"
        assert result.latency > 0.9
        assert result.usage["completion_tokens"] == 12  # from the stream's last event
        sent = fake.last_chat
        assert sent is not None
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}
        assert failures(c) == (2, 1)
        [status] = c.endpoints_status()
        assert (status["completed"], status["completion_tokens"], status["slow"]) == (1, 12, 0)


async def test_a_slow_call_keeps_what_its_stream_wrote_when_the_caller_can_use_it() -> None:
    # Twelve words 0.1 s apart against a 0.5 s timeout, two calls at once on a server that has just
    # answered: slow under load. A caller that can use a cut answer gets what was written.
    async with (
        FakeLLM(content=WORDS, chunk_delay=0.1) as fake,
        client(ep(fake, max_concurrency=2), limiter=LimiterConfig(initial_limit=2)) as c,
    ):
        await c.chat(MESSAGES, timeout=3.0)  # a sign of life
        seen: list[str] = []

        def keep(written: str) -> str | None:
            seen.append(written)
            return written.upper() if len(written.split()) >= 2 else None

        results = await asyncio.gather(
            *(c.chat(MESSAGES, timeout=0.5, salvage=keep) for _ in range(2)), return_exceptions=True
        )
        assert len(seen) == 2
        for result, written in zip(results, seen, strict=True):
            assert isinstance(result, ChatResult), result
            assert result.finish_reason == CUT_SHORT
            assert result.content == written.upper()
            assert WORDS.startswith(written)
            assert 2 <= len(written.split()) < 12
            assert result.usage["completion_tokens"] == len(written.split())
        assert failures(c) == (1, 0)  # slow, not failed: nothing counted against the endpoint
        [status] = c.endpoints_status()
        assert (status["slow"], status["in_flight"]) == (2, 0)
        # Words kept coming at the server's pace: judged by its time per token, not dropped.
        assert status["limit"] == 2
        assert c.limiters["gen"].stats.dropped == 0

        # Nothing the caller can use: the slow call's Overloaded, as without salvage.
        await c.chat(MESSAGES, timeout=3.0)
        outcomes = await asyncio.gather(
            c.chat(MESSAGES, timeout=0.5, salvage=lambda written: None),
            c.chat(MESSAGES, timeout=3.0),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], Overloaded)
        assert outcomes[0].reason == "slow"
        assert isinstance(outcomes[1], ChatResult)


async def test_a_call_cut_at_its_callers_finish_time_is_the_callers_doing_not_the_models() -> None:
    # A lone call on an idle endpoint whose caller needs the answer in 0.5 s, well within its 3 s
    # time limit: twelve words 0.1 s apart do not make it. The caller's time went elsewhere (waiting
    # for its turn, say): nothing is counted against the endpoint, busy or not.
    async with FakeLLM(content=WORDS, chunk_delay=0.1) as fake, client(ep(fake), timeout=3.0) as c:
        seen: list[str] = []

        def keep(written: str) -> str | None:
            seen.append(written)
            return written if len(written.split()) >= 2 else None

        start = time.monotonic()
        result = await c.chat(MESSAGES, finish_by=SYSTEM_CLOCK.now() + 0.5, salvage=keep)
        assert time.monotonic() - start < 1.0
        assert result.finish_reason == CUT_SHORT
        assert [result.content] == seen
        assert 2 <= len(result.content.split()) < 12
        # Nothing the caller can use: Overloaded ("slow": the model is busy for this caller).
        with pytest.raises(Overloaded) as info:
            await c.chat(MESSAGES, finish_by=SYSTEM_CLOCK.now() + 0.5)
        assert info.value.reason == "slow"
        assert failures(c) == (0, 0)  # neither call reached the breaker's count
        assert c.limiters["gen"].stats.dropped == 0
        # Time enough: the whole answer, as without a finish time.
        whole = await c.chat(MESSAGES, finish_by=SYSTEM_CLOCK.now() + 2.5)
        assert whole.content == WORDS
        assert failures(c) == (1, 0)
        assert c.endpoints_status()[0]["in_flight"] == 0


async def test_a_finish_time_about_as_long_as_the_timeout_still_finds_a_hung_model() -> None:
    # Cut at its finish time, but within EARLY_CUT of its own timeout: that is the timeout, and a
    # lone call that got nothing from an idle endpoint is a failure (a hung model must be found).
    async with FakeLLM("hang") as fake, client(ep(fake), timeout=0.6) as c:
        with pytest.raises(ModelError, match="no answer within"):
            await c.chat(MESSAGES, finish_by=SYSTEM_CLOCK.now() + 0.5)
        assert failures(c) == (1, 1)
    assert EARLY_CUT >= 0.5


async def test_a_call_whose_slot_comes_after_its_finish_time_is_not_sent() -> None:
    async with FakeLLM("hang") as fake, client(ep(fake, max_concurrency=1), timeout=30.0) as c:
        first = asyncio.create_task(c.chat(MESSAGES))  # holds the only slot
        await until(lambda: fake.chat_requests == 1, "the first call sent")
        finish_by = SYSTEM_CLOCK.now() + 0.1
        second = asyncio.create_task(c.chat(MESSAGES, finish_by=finish_by))
        await until(lambda: SYSTEM_CLOCK.now() > finish_by, "the second call's finish time passed")
        first.cancel()  # the slot comes free only now
        with pytest.raises(Overloaded) as info:
            await second
        assert info.value.reason == "queue_timeout"
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert fake.chat_requests == 1  # never sent
        assert failures(c) == (0, 0)
        assert c.endpoints_status()[0]["in_flight"] == 0


async def test_a_stream_silent_for_longer_than_the_timeout_times_out_and_counts() -> None:
    async with FakeLLM(content=WORDS, chunk_delay=1.0) as fake, client(ep(fake), timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(ModelError, match=r"no answer within 0\.3s") as info:
            await c.chat(MESSAGES)
        assert time.monotonic() - start < 1.0  # after the first silence, not the whole answer
        assert isinstance(info.value.__cause__, httpx.TimeoutException)
        assert failures(c) == (1, 1)  # a lone call on an idle endpoint: nothing else to blame


async def test_a_stream_that_breaks_mid_answer_is_a_counted_failure() -> None:
    async with FakeLLM("break_mid", content=WORDS) as fake, client(ep(fake)) as c:
        with pytest.raises(ModelError) as info:
            await c.chat(MESSAGES)
        assert info.value.endpoint == fake.url
        assert failures(c) == (1, 1)


async def test_a_stream_far_longer_than_max_tokens_is_a_broken_server() -> None:
    endless = " ".join(["word"] * 200)  # 200 events for max_tokens 16: the server ignores the bound
    async with FakeLLM(content=endless) as fake, client(ep(fake)) as c:
        with pytest.raises(ModelError, match="for max_tokens 16"):
            await c.chat(MESSAGES, max_tokens=16)
        assert failures(c) == (1, 1)
        fake.set(content=" ".join(["word"] * 90))  # within twice max_tokens and the slack
        result = await c.chat(MESSAGES, max_tokens=16)
        assert len(result.content.split()) == 90


async def test_an_endpoint_that_cannot_stream_is_asked_for_the_whole_answer() -> None:
    async with FakeLLM(content=WORDS) as fake, client(ep(fake, stream=False)) as c:
        result = await c.chat(MESSAGES)
        assert result.content == WORDS
        assert result.usage["completion_tokens"] == 12
        assert fake.last_chat is not None
        assert "stream" not in fake.last_chat
        assert "stream_options" not in fake.last_chat


async def test_a_whole_answer_to_a_stream_request_is_read_whole() -> None:
    # A server that ignores ``stream`` and answers with one JSON completion.
    whole = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"content": "whole"}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 1},
    }
    async with FakeLLM("malformed", content=json.dumps(whole)) as fake, client(ep(fake)) as c:
        result = await c.chat(MESSAGES)
        assert (result.content, result.finish_reason) == ("whole", "stop")
        assert failures(c) == (1, 0)


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)


async def _endless_stream(
    closed: asyncio.Event, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An HTTP server's handler streaming one token event every 50 ms until the client goes away."""
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

    async def until_eof() -> None:
        await reader.read()  # b"" once the client has closed its end
        closed.set()

    watcher = asyncio.create_task(until_eof())
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]}\n\n'
    try:
        while not closed.is_set():
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.05)
    except ConnectionError:
        closed.set()
    finally:
        watcher.cancel()
        writer.close()


async def test_a_call_given_up_on_closes_its_stream_so_the_server_stops_generating() -> None:
    # A model server generates until its client goes away: a stream whose caller gave up must be
    # closed at once, or the server's slot would go on working for nobody.
    closed = asyncio.Event()
    server = await asyncio.start_server(functools.partial(_endless_stream, closed), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client(ep(f"http://127.0.0.1:{port}"), timeout=5.0) as c:
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.3):
                await c.chat(MESSAGES)
        await until(closed.is_set, "the server to see the stream closed", timeout=2.0)
        assert c.endpoints_status()[0]["in_flight"] == 0


async def test_an_idle_connection_is_not_reused_past_the_keepalive_expiry() -> None:
    # A server closes an idle keep-alive connection after its timeout (llama.cpp: 5 s). Reused just as
    # the server closes it, a call fails at once against a healthy endpoint; the pool gives idle
    # connections up before the server would, so the next call opens a fresh one.
    connections = 0
    ended = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, ended
        connections += 1
        body = json.dumps(
            {"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]}
        ).encode()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await _read_request(reader)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        writer.close()
        await writer.wait_closed()
        ended += 1

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with client(ep(f"http://127.0.0.1:{port}", stream=False), keepalive_expiry=0.2) as c:
            await c.chat(MESSAGES)
            await c.chat(MESSAGES)
            assert connections == 1  # reused while fresh
            await asyncio.sleep(0.3)
            await c.chat(MESSAGES)
            assert connections == 2  # idle past the expiry: a new connection
            assert failures(c) == (3, 0)
        await until(lambda: ended == connections, "the server's handlers to see their connections end")


_WHOLE = json.dumps(
    {"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]}
).encode()


async def test_a_call_sent_on_a_connection_the_server_closed_is_sent_again_on_a_new_one() -> None:
    # Each connection answers one request and then drops the next unanswered, as llama.cpp does after
    # a streamed answer (it closes, although it said Keep-Alive): a call that goes out on it in that
    # moment is sent again on a new connection, and nothing counts against the endpoint.
    requests = dropped = 0
    handlers: list[asyncio.Task[None]] = []

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests, dropped
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await _read_request(reader)
            requests += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(_WHOLE), _WHOLE)
            )
            await writer.drain()
            await _read_request(reader)
            dropped += 1
        writer.close()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with client(ep(f"http://127.0.0.1:{port}", stream=False)) as c:
            for _ in range(3):
                assert (await c.chat(MESSAGES)).content == "ok"
            assert (requests, dropped) == (3, 2)  # two calls went out on a closing connection
            assert failures(c) == (3, 0)
        await asyncio.gather(*handlers, return_exceptions=True)


async def test_a_new_connection_closed_without_an_answer_is_not_sent_again() -> None:
    # A server that takes the request and closes: a new connection, so not a stale one -- a failure
    # of the endpoint, counted, and sent once.
    requests = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await _read_request(reader)
            requests += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client(ep(f"http://127.0.0.1:{port}", stream=False)) as c:
        with pytest.raises(ModelError, match="RemoteProtocolError"):
            await c.chat(MESSAGES)
        assert requests == 1
        assert failures(c) == (1, 1)


class StoppedClock:
    """A clock whose time is set by hand and whose timers never fire: a deadline on it never cancels,
    so what the client does with ``remaining()`` alone is observable."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        return FakeTimer(self.t + delay, callback)


async def test_a_passed_deadline_sends_nothing() -> None:
    stopped = StoppedClock()
    async with FakeLLM() as fake, client(ep(fake)) as c:

        async def call_after_the_deadline() -> None:
            async with deadline(1.0, clock=stopped):
                stopped.t = 2.0
                await c.chat(MESSAGES)

        with pytest.raises(DeadlineExceeded):
            await call_after_the_deadline()
        assert fake.chat_requests == 0
        assert failures(c) == (0, 0)


async def test_an_attempt_gets_only_what_is_left_of_the_deadline() -> None:
    stopped = StoppedClock()
    async with FakeLLM("hang") as fake, client(ep(fake), timeout=10.0) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            async with deadline(0.3, clock=stopped):
                await c.chat(MESSAGES)
        assert time.monotonic() - start < 1.5  # cut by the HTTP timeout at ~0.3 s, not 10 s
        assert isinstance(info.value.__cause__, ModelError)
        assert failures(c) == (1, 1)  # a timeout still blames the endpoint


def test_bad_configuration_names_the_key() -> None:
    with pytest.raises(ConfigError, match="endpoints"):
        ModelClient("gen", [])
    with pytest.raises(ConfigError, match=r"endpoints\[1\]\.url"):
        ModelClient("gen", [ep("http://127.0.0.1:9"), ep("http://127.0.0.1:9/")])
    with pytest.raises(ConfigError, match="timeout"):
        ModelClient("gen", [ep("http://127.0.0.1:9")], timeout=0)
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.url"):
        ModelClient("gen", [ep("127.0.0.1:9")])
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.url"):
        ModelClient("gen", [ep("http://[::1")])


async def test_aclose_closes_only_its_own_http_client() -> None:
    own = ModelClient("gen", [ep("http://127.0.0.1:9")])
    await own.aclose()
    assert own._http.is_closed
    async with (
        httpx.AsyncClient(trust_env=False) as shared,
        FakeLLM() as fake,
        ModelClient("gen", [ep(fake)], http=shared) as c,
    ):
        assert (await c.chat(MESSAGES)).content == "ok"
        assert not shared.is_closed


# ------------------------------------------------------------------ overload is not failure


async def test_calls_beyond_the_servers_slots_wait_in_our_queue_and_nothing_counts() -> None:
    # One slot, eight callers, a 0.25 s answer and a 2.5 s attempt timeout: the last caller waits
    # about 1.75 s in our queue, which must not eat its timeout.
    async with (
        FakeLLM("slow", delay=0.25, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=2.5, breakers=WIDE) as c,
    ):
        results = await asyncio.gather(*(c.chat(MESSAGES) for _ in range(8)))
        assert len(results) == 8
        assert fake.chat_requests == 8
        assert fake.peak_open_chats == 1  # never more in flight than the server can run
        assert failures(c) == (8, 0)
        assert c.breakers["gen"].state is BreakerState.CLOSED
        # Each result's latency is the model's time, not the wait in the queue.
        assert max(r.latency for r in results) < 1.5
        [status] = c.endpoints_status()
        assert (status["limit"], status["max_limit"], status["in_flight"], status["queued"]) == (1, 1, 0, 0)


async def test_without_a_limit_the_servers_own_queue_times_calls_out_as_slow_not_failed() -> None:
    # The same load with up to 8 calls in flight: they queue inside the server, where the wait runs
    # against their timeout -- what the limit prevents. The server completes calls all the while, so
    # the timeouts are slow calls under load: the breaker counts none of them, the limit shrinks.
    async with (
        FakeLLM("slow", delay=0.25, slots=1) as fake,
        client(
            ep(fake, max_concurrency=8), timeout=1.0, limiter=LimiterConfig(initial_limit=8), breakers=WIDE
        ) as c,
    ):
        outcomes = await asyncio.gather(*(c.chat(MESSAGES) for _ in range(8)), return_exceptions=True)
        assert fake.peak_open_chats == 8
        slow = [o for o in outcomes if isinstance(o, Overloaded)]
        assert slow
        assert all(o.reason == "slow" for o in slow)
        assert len(slow) + sum(isinstance(o, ChatResult) for o in outcomes) == 8
        assert failures(c) == (8 - len(slow), 0)
        [status] = c.endpoints_status()
        assert (status["completed"], status["slow"]) == (8 - len(slow), len(slow))
        assert status["limit"] < 8


async def test_a_saturated_server_never_opens_the_breaker_and_a_dead_one_still_does() -> None:
    # A server with one slot whose latency rises with load (each request waits for the ones ahead of
    # it), sent up to 4 at a time: under saturation many calls time out, none opens the breaker that
    # two failures would open.
    async with (
        FakeLLM("slow", delay=0.1, slots=1) as fake,
        # Started at four calls (not the slow start): the server's own queue must time some out.
        client(
            ep(fake, max_concurrency=4),
            timeout=0.35,
            retry=TWO_TRIES,
            limiter=LimiterConfig(initial_limit=4),
        ) as c,
    ):
        slow = done = 0
        for _ in range(4):
            outcomes = await asyncio.gather(*(c.chat(MESSAGES) for _ in range(6)), return_exceptions=True)
            for o in outcomes:
                if isinstance(o, Overloaded):
                    slow += o.reason == "slow"
                else:
                    assert isinstance(o, ChatResult), o
                    done += 1
        assert done > 0
        assert slow > 0
        breaker = c.breakers["gen"]
        assert breaker.state is BreakerState.CLOSED
        assert breaker.metrics().failures == 0
        # Slow calls are not retried: another attempt would only add load to a busy model.
        assert c.retry.stats.retries == 0
        # The same client against a dead port: connection refused is a failure whatever the load.
    async with client(ep(dead_url()), timeout=0.35) as dead:
        for _ in range(2):
            with pytest.raises(ModelError):
                await dead.chat(MESSAGES)
        assert dead.breakers["gen"].state is BreakerState.OPEN


async def test_a_server_too_slow_with_every_slot_busy_is_started_one_call_at_a_time() -> None:
    # Four slots sharing the server's cores (llama.cpp's batched slots): one call alone takes 0.2 s,
    # four at once take 0.8 s each -- longer than the 0.5 s timeout. Sending four at once to a fresh
    # server would time all of them out with nothing ever completed, and a breaker that two failures
    # open would call a healthy model down. The limit starts at one call and grows while the
    # answers say the server keeps up, so calls complete and the breaker stays closed.
    async with (
        FakeLLM("ok", delay=0.2, slots=4, shared=True) as fake,
        client(ep(fake, max_concurrency=4), timeout=0.5) as c,
    ):
        done = 0
        for _ in range(6):
            outcomes = await asyncio.gather(*(c.chat(MESSAGES) for _ in range(4)), return_exceptions=True)
            for o in outcomes:
                assert isinstance(o, (ChatResult, Overloaded)), o
                done += isinstance(o, ChatResult)
        assert c.breakers["gen"].state is BreakerState.CLOSED
        assert c.breakers["gen"].metrics().failures == 0
        assert done >= 12
        [status] = c.endpoints_status()
        assert 1 <= status["limit"] <= 2  # the knee: two at once still answer within the timeout


async def test_a_model_that_stops_answering_opens_its_breaker_once_its_last_sign_of_life_is_old() -> None:
    async with FakeLLM("ok") as fake, client(ep(fake), timeout=0.2, alive_window=0.3, breakers=WIDE) as c:
        await c.chat(MESSAGES)
        fake.set("hang")
        # Two calls at once within alive_window of the last completion: slow under load, not failed.
        outcomes = await asyncio.gather(c.chat(MESSAGES), c.chat(MESSAGES), return_exceptions=True)
        assert [getattr(o, "reason", o) for o in outcomes] == ["slow", "slow"]
        assert failures(c) == (1, 0)
        # Nothing completed for longer than alive_window: under load or not, timeouts are failures.
        outcomes = await asyncio.gather(c.chat(MESSAGES), c.chat(MESSAGES), return_exceptions=True)
        assert all(type(o) is ModelError for o in outcomes), outcomes
        assert failures(c) == (3, 2)


async def test_a_lone_call_that_times_out_on_an_idle_endpoint_is_a_failure() -> None:
    # No load to blame: even right after a completion, a call alone on its endpoint that gets no
    # answer counts against it.
    async with FakeLLM("ok") as fake, client(ep(fake), timeout=0.2) as c:
        await c.chat(MESSAGES)
        fake.set("hang")
        with pytest.raises(ModelError):
            await c.chat(MESSAGES)
        assert failures(c) == (2, 1)
        assert c.endpoints_status()[0]["slow"] == 0


async def test_a_model_that_answers_probes_but_no_call_in_time_is_too_slow_not_busy() -> None:
    # A four-token probe passes, but no real call completes within its timeout: the model is too slow
    # for its callers, and under load or not its timeouts count against it.
    async with FakeLLM("slow", delay=0.4) as fake, client(ep(fake), timeout=0.2, breakers=WIDE) as c:
        [probe] = await c.probe(timeout=2.0)
        assert probe.healthy
        outcomes = await asyncio.gather(c.chat(MESSAGES), c.chat(MESSAGES), return_exceptions=True)
        assert all(type(o) is ModelError for o in outcomes), outcomes
        assert failures(c) == (2, 2)
        assert c.endpoints_status()[0]["completed"] == 0  # probes are not calls


async def test_a_caller_with_a_queue_bound_is_refused_at_once_when_the_wait_would_exceed_it() -> None:
    async with (
        FakeLLM("slow", delay=0.3, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=5.0) as c,
    ):
        await c.chat(MESSAGES)  # a measured service time
        first = asyncio.create_task(c.chat(MESSAGES))
        while c.endpoints_status()[0]["in_flight"] == 0:  # noqa: ASYNC110 - no hook for "sent"
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await c.chat(MESSAGES, queue_timeout=0.05)
        assert info.value.reason == "deadline"
        await first
        assert fake.chat_requests == 2
        assert c.limiters["gen"].stats.rejected["deadline"] == 1


async def test_a_caller_whose_wait_runs_out_is_overloaded_and_the_breaker_stays_closed() -> None:
    async with (
        FakeLLM("slow", delay=0.5, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=5.0) as c,
    ):
        first = asyncio.create_task(c.chat(MESSAGES))
        while c.endpoints_status()[0]["in_flight"] == 0:  # noqa: ASYNC110 - no hook for "sent"
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await c.chat(MESSAGES, queue_timeout=0.1)
        assert info.value.reason == "queue_timeout"
        assert info.value.retry_after > 0
        # A caller's own deadline bounds its wait too; either way nothing is sent or counted.
        with pytest.raises((Overloaded, DeadlineExceeded)):
            async with deadline(0.1):
                await c.chat(MESSAGES)
        await first
        assert fake.chat_requests == 1
        assert failures(c) == (1, 0)
        assert c.breakers["gen"].state is BreakerState.CLOSED


async def test_a_deadline_eaten_by_the_queue_is_the_callers_not_the_models() -> None:
    async with (
        FakeLLM("slow", delay=0.4, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=5.0) as c,
    ):
        first = asyncio.create_task(c.chat(MESSAGES))
        while c.endpoints_status()[0]["in_flight"] == 0:  # noqa: ASYNC110 - no hook for "sent"
            await asyncio.sleep(0.01)
        # Waits ~0.4 s for the slot, then has ~0.2 s for a 0.4 s answer.
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.6):
                await c.chat(MESSAGES)
        await first
        assert failures(c) == (1, 0)


async def test_probes_during_saturation_report_busy_and_healthy() -> None:
    async with (
        FakeLLM("slow", delay=0.3, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=5.0) as c,
    ):
        await c.chat(MESSAGES)  # the endpoint has answered recently
        calls = [asyncio.create_task(c.chat(MESSAGES)) for _ in range(3)]
        while c.endpoints_status()[0]["queued"] < 2:  # noqa: ASYNC110 - no hook for "queued"
            await asyncio.sleep(0.01)
        sent = fake.chat_requests
        [busy] = await c.probe(timeout=0.1)
        assert busy.healthy
        assert busy.busy
        assert busy.error is None
        assert fake.chat_requests == sent  # nothing was sent: the calls in flight prove it answers
        # With no answer inside the busy window, the probe waits for a slot with its own budget and
        # reports that wait apart from the inference.
        [queued] = await c.probe(timeout=2.0, busy_window=0.0)
        assert queued.healthy
        assert not queued.busy
        assert queued.queued > 0
        assert queued.latency < 1.5
        await asyncio.gather(*calls)
        assert failures(c) == (4, 0)


async def test_probe_without_a_slot_in_time_reports_busy_not_down() -> None:
    async with (
        FakeLLM("slow", delay=1.0, slots=1) as fake,
        client(ep(fake, max_concurrency=1), timeout=5.0) as c,
    ):
        call = asyncio.create_task(c.chat(MESSAGES))
        while c.endpoints_status()[0]["in_flight"] == 0:  # noqa: ASYNC110 - no hook for "sent"
            await asyncio.sleep(0.01)
        [probe] = await c.probe(timeout=0.1)
        assert probe.healthy
        assert probe.busy
        assert probe.queued == pytest.approx(0.1)
        await call


async def test_the_picker_prefers_an_endpoint_with_a_free_slot() -> None:
    async with (
        FakeLLM("slow", delay=0.5) as narrow,
        FakeLLM("slow", delay=0.5) as wide,
        # Limits already grown to the slots (not the slow start of a fresh client).
        client(
            ep(narrow, max_concurrency=1), ep(wide, max_concurrency=4), limiter=LimiterConfig(initial_limit=4)
        ) as c,
    ):
        # Two calls: one each (fewest in flight). The third: both have one in flight, but only the
        # wide endpoint has a free slot.
        calls = [asyncio.create_task(c.chat(MESSAGES)) for _ in range(3)]
        results = await asyncio.gather(*calls)
        assert narrow.chat_requests == 1
        assert wide.chat_requests == 2
        assert narrow.peak_open_chats == 1
        assert {r.endpoint for r in results} == {narrow.url, wide.url}


def test_max_concurrency_bounds_each_endpoints_limiter() -> None:
    c = client(ep("http://127.0.0.1:1", max_concurrency=2), ep("http://127.0.0.1:2"))
    limits = {name: (lim.limit, lim.config.max_limit) for name, lim in c.limiters.items()}
    # Each starts at one call in flight (the slow start) under its ceiling.
    assert limits == {"gen@http://127.0.0.1:1": (1, 2), "gen@http://127.0.0.1:2": (1, 16)}
    with pytest.raises(ValueError, match="max_concurrency"):
        EndpointConfig(url="http://127.0.0.1:1", max_concurrency=0)
    assert c.estimated_wait() == 0.0


# ------------------------------------------------------------------ roles sharing one server


def shared_server(fake: FakeLLM, slots: int) -> dict[str, SharedEndpoint]:
    limits = LimiterConfig(min_limit=slots, max_limit=slots, initial_limit=slots)
    return {fake.url: SharedEndpoint(AdaptiveLimiter("models", limits))}


async def test_roles_sharing_a_server_share_its_slots_and_the_generators_calls_go_first() -> None:
    async with FakeLLM("slow", delay=0.15, slots=1) as fake:
        shared = shared_server(fake, 1)
        gen = client(ep(fake, max_concurrency=1), shared=shared, breakers=WIDE)
        val = ModelClient(
            "val",
            [ep(fake, max_concurrency=1)],
            breakers=WIDE,
            retry=ONE_TRY,
            shared=shared,
            priority=1,
            learns_limit=False,
            events=EventBus(),
        )
        async with gen, val:
            done: list[str] = []

            async def call(c: ModelClient, name: str) -> None:
                await c.chat(MESSAGES)
                done.append(name)

            first = asyncio.create_task(call(gen, "gen0"))
            await asyncio.sleep(0.05)
            # Three validator calls queue first, then two generator calls: the generator's pass them.
            tasks = [asyncio.create_task(call(val, f"val{i}")) for i in range(3)]
            await asyncio.sleep(0.01)
            tasks += [asyncio.create_task(call(gen, f"gen{i}")) for i in (1, 2)]
            await asyncio.sleep(0.01)
            limiter = shared[fake.url].limiter
            assert (limiter.in_flight, limiter.queued, limiter.queued_before(0)) == (1, 5, 2)
            # Each role sees the wait of its own place in the queue.
            assert val.estimated_wait() > gen.estimated_wait() > 0
            await asyncio.gather(first, *tasks)
            assert done == ["gen0", "gen1", "gen2", "val0", "val1", "val2"]
            # Each role counts its own completions and the tokens the server reported for them.
            [gen_status], [val_status] = gen.endpoints_status(), val.endpoints_status()
            assert (gen_status["completed"], val_status["completed"]) == (3, 3)
            assert gen_status["completion_tokens"] > 0
            assert val_status["completion_tokens"] > 0
            # Each role's expected call time is its own calls' latency, not the shared average.
            assert gen.service_time() == pytest.approx(gen_status["ewma_latency_ms"] / 1000, abs=1e-3)
            assert val.service_time() == pytest.approx(val_status["ewma_latency_ms"] / 1000, abs=1e-3)
            assert fake.peak_open_chats == 1  # one slot for both roles, never more in flight
            assert gen.limiters == {"gen": limiter}
            assert val.limiters == {"val": limiter}


async def test_a_call_that_times_out_while_another_role_completes_on_the_server_is_slow() -> None:
    # The server runs one request at a time; the shared limit lets two in (the validator's waits
    # inside the server). The validator's call times out while the server completes the
    # generator's: the server is busy, not down, although the validator itself never had an answer.
    async with FakeLLM("slow", delay=0.3, slots=1) as fake:
        shared = shared_server(fake, 2)

        def role(name: str, priority: int, timeout: float) -> ModelClient:
            return ModelClient(
                name,
                [ep(fake, max_concurrency=2)],
                breakers=SMALL,
                retry=ONE_TRY,
                timeout=timeout,
                shared=shared,
                priority=priority,
                events=EventBus(),
            )

        async with role("gen", 0, 2.0) as gen, role("val", 1, 0.45) as val:
            generated = asyncio.create_task(gen.chat(MESSAGES))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded) as info:
                await val.chat(MESSAGES)
            assert info.value.reason == "slow"
            await generated
            assert failures(val) == (0, 0)
            [status] = val.endpoints_status()
            assert (status["completed"], status["slow"]) == (0, 1)
        # Not sharing the server's signs of life, the same timeout is the validator's failure.
        async with FakeLLM("slow", delay=0.3, slots=1) as lone:
            alone = ModelClient(
                "val",
                [ep(lone, max_concurrency=2)],
                breakers=SMALL,
                retry=ONE_TRY,
                timeout=0.45,
                limiter=LimiterConfig(initial_limit=2),
                events=EventBus(),
            )
            async with client(ep(lone, max_concurrency=2), timeout=2.0) as other, alone:
                generated = asyncio.create_task(other.chat(MESSAGES))
                await asyncio.sleep(0.05)
                with pytest.raises(ModelError):
                    await alone.chat(MESSAGES)
                await generated
                assert failures(alone) == (1, 1)
