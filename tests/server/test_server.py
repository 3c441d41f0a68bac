"""``brownout serve`` end to end: the FastAPI app over ASGI, real HTTP to fault-injecting model servers.

Each test builds the app from a config whose three model roles (qwen generator, mistral validator,
llama hinter) point at their own :class:`~brownout.chaos.fakellm.FakeLLM` on 127.0.0.1, runs its
lifespan, and talks to it through ``httpx.ASGITransport``. The clock is real (these are integration
tests), so waits are on conditions, never fixed sleeps, and model timeouts are short.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from brownout.briefs.rules import IFRA_SKIPPED_WARNING, popular_brief, template_hints
from brownout.chaos.fakellm import FakeLLM, Mode
from brownout.config import ROLES
from brownout.events import GuardRetried
from brownout.policies.breaker import BreakerState
from support.net import free_port
from support.stack import assert_overloaded, brief_of, merge, metric_values, sample, serve, stage_sources
from support.wait import until

STAGE_ROLE = {"generate": "qwen", "validate": "mistral", "hint": "llama"}
MODE_STAGES = {
    "fast": ["generate"],
    "balanced": ["generate", "validate"],
    "creative": ["generate", "validate", "hint"],
}
# Breakers that open after two failed calls and stay open for the rest of the test.
TRIP: dict[str, Any] = {"circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600}}
TOKEN = "s3cret-admin-token"


# -------------------------------------------------------------------------------- 1. healthy


@pytest.mark.parametrize("mode", ["fast", "balanced", "creative"])
async def test_all_healthy_serves_the_requested_mode_with_every_model(
    fakes: dict[str, FakeLLM], tmp_path: Path, mode: str
) -> None:
    async with serve(fakes, tmp_path) as stack:
        before = {role: fake.chat_requests for role, fake in fakes.items()}
        body = await stack.brief("a fresh citrus perfume for hot summer days", mode)
        assert body["served_mode"] == mode
        assert body["downshifted"] is False
        assert body["reason"] is None
        assert body["impact"] == {}
        assert body["warnings"] == []
        assert body["reliability"] == "high"
        assert body["degraded"] is False
        assert body["cached"] is False
        assert stage_sources(body) == [(s, f"model:{STAGE_ROLE[s]}") for s in MODE_STAGES[mode]]
        brief = brief_of(body)
        if mode == "creative":
            assert brief.creative_hints  # from the hinter model, not the templates
            assert brief.creative_hints != template_hints(brief.style)
        else:
            assert brief.creative_hints == []
        if mode == "fast":
            assert body["validation"] is None
        else:
            assert body["validation"]["source"] == "model"
        # Each stage the mode runs asked its own model exactly once; the others were left alone.
        used = {STAGE_ROLE[s] for s in MODE_STAGES[mode]}
        for role, fake in fakes.items():
            assert fake.chat_requests - before[role] == (1 if role in used else 0), role


# -------------------------------------------------------------------------------- 2. generator


async def test_generator_error_serves_a_rule_based_brief(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        fakes["qwen"].set("error")
        body = await stack.brief("an intense woody leather perfume for winter nights", "balanced")
        assert body["served_mode"] == "balanced"  # the breaker is still closed: a stage fallback
        assert stage_sources(body) == [("generate", "rules"), ("validate", "model:mistral")]
        assert body["reliability"] == "low"
        assert body["degraded"] is True
        assert any("fallback due to model failure" in w for w in body["warnings"])
        brief = brief_of(body)
        assert brief.style == "woody"  # the rules read the request
        # A degraded answer is not cached: asking again runs the pipeline again.
        again = await stack.brief("an intense woody leather perfume for winter nights", "balanced")
        assert again["cached"] is False


async def test_generator_error_serves_a_similar_earlier_brief(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        first = await stack.brief("a fresh citrus perfume for hot summer days", "fast")
        assert stage_sources(first) == [("generate", "model:qwen")]
        fakes["qwen"].set("error")
        body = await stack.brief("a fresh citrus perfume for hot sunny summer days", "fast")
        assert body["served_mode"] == "fast"
        assert stage_sources(body) == [("generate", "cache")]
        assert body["brief"] == first["brief"]
        assert body["reliability"] == "medium"
        (note,) = [w for w in body["warnings"] if "similar earlier request" in w]
        score = float(note.rsplit("similarity ", 1)[1].rstrip(")"))
        assert 0.8 <= score < 1.0
        # A request unlike any earlier one gets no cached brief, only rules.
        other = await stack.brief("warm amber and vanilla for a winter evening", "fast")
        assert stage_sources(other) == [("generate", "rules")]


async def test_generator_failing_once_is_recovered_by_the_client_retry(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        qwen = fakes["qwen"]
        qwen.set("flaky", fail_times=1)
        before = qwen.chat_requests
        body = await stack.brief("a powdery iris perfume", "fast")
        # ModelClient retries a 500 once: the second attempt answers and the model serves.
        assert stage_sources(body) == [("generate", "model:qwen")]
        assert body["reliability"] == "high"
        assert qwen.chat_requests - before == 2


async def test_generator_failing_twice_is_served_with_reduced_context(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        qwen = fakes["qwen"]
        qwen.set("flaky", fail_times=2)
        before = qwen.chat_requests
        body = await stack.brief("a powdery iris perfume", "fast")
        # Both attempts of the normal call failed; strategy 2 of scenario 1 asked again, smaller.
        assert stage_sources(body) == [("generate", "reduced_context")]
        assert "Generated with reduced context after a model failure" in body["warnings"]
        assert body["reliability"] == "medium"
        assert qwen.chat_requests - before == 3
        assert qwen.last_chat is not None
        assert qwen.last_chat["max_tokens"] == 256
        assert qwen.last_chat["temperature"] == 0.5


# -------------------------------------------------------------------------------- 3. validator


async def test_validator_error_falls_back_to_rule_validation(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        fakes["mistral"].set("error", status=503)
        body = await stack.brief("a soft floral perfume with rose", "balanced")
        assert body["served_mode"] == "balanced"
        assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "rules")]
        assert IFRA_SKIPPED_WARNING in body["warnings"]
        assert any("IFRA check skipped" in w for w in body["warnings"])
        assert "Validated with rule-based fallback (Mistral unavailable)" in body["warnings"]
        assert body["validation"]["source"] == "rules"
        assert body["validation"]["ifra_compliance"] is None
        assert body["reliability"] == "medium"


# -------------------------------------------------------------------------------- 4. hinter


async def test_hinter_error_serves_template_hints(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        fakes["llama"].set("error")
        body = await stack.brief("a dreamy oriental perfume with amber and spice", "creative")
        assert body["served_mode"] == "creative"
        assert stage_sources(body) == [
            ("generate", "model:qwen"),
            ("validate", "model:mistral"),
            ("hint", "template"),
        ]
        brief = brief_of(body)
        assert brief.creative_hints == template_hints(brief.style)
        assert "Template hints used (Llama unavailable)" in body["warnings"]


# -------------------------------------------------------------------------------- 5. downshift


async def test_open_breakers_downshift_creative_to_balanced_then_fast(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, TRIP) as stack:
        fakes["llama"].set("error")
        first = await stack.brief("a green tea and fig perfume", "creative")
        assert stage_sources(first)[-1] == ("hint", "template")
        assert stack.breaker("llama").state is BreakerState.OPEN  # two failed attempts opened it

        body = await stack.brief("a smoky vetiver perfume for autumn", "creative")
        assert body["served_mode"] == "balanced"
        assert body["downshifted"] is True
        assert "llama" in body["reason"]
        assert body["impact"]["features_lost"] == ["creative_hints"]
        assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "model:mistral")]
        assert any(w.startswith("Downshifted from creative to balanced") for w in body["warnings"])
        assert brief_of(body).creative_hints == []
        assert body["cached"] is False

        fakes["mistral"].set("error")
        await stack.brief("a salty marine perfume", "balanced")  # the validator fails twice: open
        assert stack.breaker("mistral").state is BreakerState.OPEN
        fast = await stack.brief("a cozy cashmere musk perfume", "creative")
        assert fast["served_mode"] == "fast"
        assert fast["downshifted"] is True
        assert "mistral" in fast["reason"]
        assert "llama" in fast["reason"]
        assert fast["impact"]["features_lost"] == ["creative_hints", "validation"]
        assert stage_sources(fast) == [("generate", "model:qwen")]

        # A balanced request loses only the validation.
        balanced = await stack.brief("a cozy cashmere musk perfume", "balanced")
        assert balanced["served_mode"] == "fast"
        assert balanced["impact"]["features_lost"] == ["validation"]

        metrics = await stack.metrics()
        down = "llm_mode_downshift_total"
        assert sample(metrics, down, from_mode="creative", to_mode="balanced") == 1
        assert sample(metrics, down, from_mode="creative", to_mode="fast") == 1
        assert sample(metrics, down, from_mode="balanced", to_mode="fast") == 1
        assert sample(metrics, "circuit_breaker_state", model="llama", endpoint="llama") == 1
        assert sample(metrics, "circuit_breaker_state", model="qwen", endpoint="qwen") == 0
        assert sample(metrics, "model_health_status", model="mistral") == 0


# -------------------------------------------------------------------------------- 6. emergency


async def test_all_models_down_serves_emergency_answers(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path, TRIP) as stack:
        known = "a fresh citrus perfume for hot summer days"
        served = await stack.brief(known, "fast")
        assert stage_sources(served) == [("generate", "model:qwen")]

        for fake in fakes.values():
            fake.set("error")
        # One creative request fails on every model, twice each: every breaker opens.
        opening = await stack.brief("a mossy oakmoss chypre", "creative")
        assert stage_sources(opening) == [("generate", "rules"), ("validate", "rules"), ("hint", "template")]
        for role in ROLES:
            assert stack.breaker(role).state is BreakerState.OPEN, role

        # The exact request served before, in the same mode: the cached answer itself.
        cached = await stack.brief(known, "fast")
        assert cached["cached"] is True
        assert cached["brief"] == served["brief"]

        # The same text in another mode: emergency mode, from the cache.
        body = await stack.brief(known, "creative")
        assert body["served_mode"] == "emergency"
        assert body["downshifted"] is True
        assert stage_sources(body) == [("generate", "cache")]
        assert body["brief"] == served["brief"]
        assert "Served from cache (models unavailable)" in body["warnings"]
        assert body["impact"]["features_lost"] == [
            "creative_hints",
            "validation",
            "model_generation",
            "personalisation",
        ]
        assert all(role in body["reason"] for role in ("qwen",))

        # A request never seen: the popular brief of its mode.
        for mode in ("fast", "balanced", "creative"):
            popular = await stack.brief("something completely new and different", mode)
            assert popular["served_mode"] == "emergency"
            assert stage_sources(popular) == [("generate", "popular")]
            assert brief_of(popular) == popular_brief(mode)
            assert popular["reliability"] == "low"
            assert "Using popular brief template (models unavailable)" in popular["warnings"]

        chat_before = {role: fake.chat_requests for role, fake in fakes.items()}
        await stack.brief("yet another new request", "balanced")
        # Open breakers: no model was called at all.
        assert {role: fake.chat_requests for role, fake in fakes.items()} == chat_before

        health = (await stack.http.get("/health")).json()
        assert all(m["status"] == "unhealthy" for m in health["models"].values())
        assert health["status"] == "degraded"  # the cache can still answer


# -------------------------------------------------------------------------------- 7. JSON guard


async def test_json_guard_reasks_after_garbage(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        qwen = fakes["qwen"]
        qwen.set("garbage")

        def heal(event: GuardRetried) -> None:
            # The guard is about to re-ask: the model answers properly from now on.
            if event.source == "generate":
                qwen.set("ok")

        stack.bus.subscribe(heal, GuardRetried)
        before_metrics = await stack.metrics()
        before = qwen.chat_requests
        body = await stack.brief("a bright neroli cologne", "fast")
        assert stage_sources(body) == [("generate", "model:qwen")]
        assert body["degraded"] is False
        assert qwen.chat_requests - before == 2
        # The re-ask carried the bad answer back, and a note of what was wrong.
        assert qwen.last_chat is not None
        messages = qwen.last_chat["messages"]
        assert messages[-2]["role"] == "assistant"
        assert messages[-2]["content"].startswith("Sure! Here is your brief")
        assert messages[-1]["role"] == "user"

        after = await stack.metrics()

        def grew(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before_metrics, name, **labels)

        bad = grew("llm_json_parse_failures_total", stage="generate") + grew(
            "llm_json_validation_failures_total", stage="generate"
        )
        assert bad == 1
        assert grew("llm_json_retry_count_bucket", stage="generate", le="0.0") == 0
        assert grew("llm_json_retry_count_bucket", stage="generate", le="1.0") == 1
        assert grew("llm_json_retry_count_count", stage="generate") == 1
        assert grew("llm_json_retry_count_sum", stage="generate") == 1
        assert grew("llm_json_fallback_used_total") == 0


async def test_json_guard_gives_up_on_wrong_schema_and_falls_back(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        qwen = fakes["qwen"]
        qwen.set("wrong_schema")
        before = qwen.chat_requests
        body = await stack.brief("a bright neroli cologne", "fast")
        assert stage_sources(body) == [("generate", "rules")]
        assert body["reliability"] == "low"
        # 1 + 3 re-asks for the normal call, as many for the reduced-context one.
        assert qwen.chat_requests - before == 8
        metrics = await stack.metrics()
        assert sample(metrics, "llm_json_validation_failures_total", stage="generate") == 8
        assert sample(metrics, "llm_json_retry_count_bucket", stage="generate", le="2.0") == 0
        assert sample(metrics, "llm_json_retry_count_bucket", stage="generate", le="3.0") == 2
        assert sample(metrics, "llm_json_fallback_used_total") == 1
        # A well-formed answer with the wrong content is not the endpoint's fault: the breaker saw successes.
        assert stack.breaker("qwen").metrics().failures == 0

        await stack.brief("a bright neroli cologne again", "fast")
        metrics = await stack.metrics()
        assert sample(metrics, "llm_json_fallback_used_total") == 2
        assert sample(metrics, "llm_json_validation_failures_total", stage="generate") == 16


# -------------------------------------------------------------------------------- 8. hang, slow


async def test_hanging_generator_is_cut_at_its_timeout(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    overrides = merge(TRIP, {"models": {"roles": {"qwen": {"timeout": 0.3}}}})
    async with serve(fakes, tmp_path, overrides) as stack:
        qwen = fakes["qwen"]
        qwen.set("hang")
        before = qwen.chat_requests
        body = await stack.brief("a hanging request for jasmine", "balanced")
        assert body["served_mode"] == "balanced"
        assert stage_sources(body) == [("generate", "rules"), ("validate", "model:mistral")]
        # The window already held the start-up constraint check (a success), so the first timeout made
        # the failure rate 1/2, over qwen's 0.4: the breaker opened, and the client's retry and the
        # reduced-context call were refused without waiting.
        assert qwen.chat_requests - before == 1
        assert stack.breaker("qwen").state is BreakerState.OPEN
        # The request was not held to its 60 s deadline.
        assert body["stages"][0]["latency_ms"] < 10_000


async def test_hanging_generator_gets_its_reduced_context_call_within_the_deadline(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Breakers never open here: the generator is asked twice normally, then twice with reduced context.
    overrides = {"server": {"request_timeout": 10.0}, "models": {"roles": {"qwen": {"timeout": 0.2}}}}
    async with serve(fakes, tmp_path, overrides) as stack:
        qwen = fakes["qwen"]
        qwen.set("hang")
        before = qwen.chat_requests
        body = await stack.brief("a hanging request for vetiver", "balanced")
        # The reduced-context call waits three times the role's timeout (the seed's 10 s -> 30 s), not a
        # fixed 30 s that would outlast the request's deadline.
        assert body["served_mode"] == "balanced"
        assert stage_sources(body) == [("generate", "rules"), ("validate", "model:mistral")]
        assert qwen.chat_requests - before == 4
        assert qwen.last_chat is not None
        assert qwen.last_chat["max_tokens"] == 256


async def test_request_deadline_cutting_a_hung_model_still_serves(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Breakers never open here, so the hung generator is asked until the request's deadline passes.
    overrides = {"server": {"request_timeout": 1.5}, "models": {"roles": {"qwen": {"timeout": 1.0}}}}
    async with serve(fakes, tmp_path, overrides) as stack:
        fakes["qwen"].set("hang")
        body = await stack.brief("a hanging request for tuberose", "creative")
        assert body["served_mode"] == "fallback"
        assert body["downshifted"] is True
        assert "deadline" in body["reason"]
        assert stage_sources(body) == [("generate", "rules")]
        assert body["reliability"] == "low"
        metrics = await stack.metrics()
        assert sample(metrics, "llm_mode_downshift_total", from_mode="creative", to_mode="fallback") == 1


async def test_slow_validator_beyond_its_timeout_is_replaced_by_rules(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    overrides = {"models": {"roles": {"mistral": {"timeout": 0.3}}}}
    async with serve(fakes, tmp_path, overrides) as stack:
        mistral = fakes["mistral"]
        mistral.set("slow", delay=30)
        before = mistral.chat_requests
        body = await stack.brief("a slow request for sandalwood", "balanced")
        assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "rules")]
        assert IFRA_SKIPPED_WARNING in body["warnings"]
        assert mistral.chat_requests - before == 2
        # Slow but within the timeout: the model serves.
        mistral.set("slow", delay=0.05)
        body = await stack.brief("a slow request for cedar", "balanced")
        assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "model:mistral")]


# -------------------------------------------------------------------------------- 9. crash


def _spawn_fake(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "brownout.chaos.fakellm", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def _start_fake_process(port: int) -> subprocess.Popen[str]:
    """The fake as its own process on ``port``, once it prints READY."""
    proc = _spawn_fake(port)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    except BaseException:
        _kill(proc)
        raise
    assert line.startswith(f"READY http://127.0.0.1:{port}"), line
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()  # SIGKILL: no clean shutdown, as in a crash
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def test_generator_process_crash_and_restart(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    port = free_port()
    urls = {"qwen": f"http://127.0.0.1:{port}", "mistral": fakes["mistral"].url, "llama": fakes["llama"].url}
    overrides = {
        "circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 1.0, "success_threshold": 1}
    }
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(await _start_fake_process(port))
        async with serve(fakes, tmp_path, overrides, urls=urls) as stack:
            body = await stack.brief("before the crash: a citrus cologne", "balanced")
            assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "model:mistral")]

            _kill(procs[0])
            statuses = []
            for i in range(4):
                response = await stack.post(f"during the crash, request {i}: an amber perfume", "balanced")
                statuses.append(response.status_code)
                assert response.status_code == 200, response.text
                crashed = response.json()
                brief_of(crashed)
                assert crashed["stages"][0]["served_by"] == "rules"
            assert stack.breaker("qwen").state is BreakerState.OPEN
            # Once the breaker is open the generator is known down before the request runs.
            assert crashed["served_mode"] == "fallback"
            assert "qwen" in crashed["reason"]

            procs.append(await _start_fake_process(port))
            client = stack.runtime.clients["qwen"]
            await until(lambda: client.available, "the breaker's open wait")
            back = await stack.brief("after the restart: a citrus cologne", "balanced")
            assert back["served_mode"] == "balanced"
            assert back["downshifted"] is False
            assert stage_sources(back) == [("generate", "model:qwen"), ("validate", "model:mistral")]
            assert stack.breaker("qwen").state is BreakerState.CLOSED
            metrics = await stack.metrics()
            assert sample(metrics, "http_errors_total", status="500") == 0
    finally:
        for proc in procs:
            _kill(proc)


# -------------------------------------------------------------------------------- 10. admission


async def test_a_full_queue_answers_503_with_retry_after(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    overrides = {"queue": {"max_size": 2, "max_concurrent": 1}}
    async with serve(fakes, tmp_path, overrides) as stack:
        fakes["qwen"].set("slow", delay=0.5)
        responses = await asyncio.gather(
            *(stack.post(f"distinct request number {i} for a rose perfume", "balanced") for i in range(8))
        )
        statuses = sorted(r.status_code for r in responses)
        # One runs, two wait, the other five are shed at once.
        assert statuses == [200] * 3 + [503] * 5
        for response in responses:
            if response.status_code == 200:
                brief_of(response.json())
                continue
            assert_overloaded(response, queue_size=2)
        metrics = await stack.metrics()
        assert sample(metrics, "brief_rejections_total", reason="queue_full") == 5
        assert sample(metrics, "http_errors_total", status="503") == 5
        assert sample(metrics, "queue_size") == 0
        # brownout_shed_seconds times each refusal from the server's side: all five, none of them held
        # until the running call's 0.5 s were over.
        assert sample(metrics, "brownout_shed_seconds_count") == 5
        assert sample(metrics, "brownout_shed_seconds_bucket", le="0.5") == 5


# -------------------------------------------------------------------------------- 11. singleflight


async def test_identical_concurrent_requests_share_one_model_call(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        qwen = fakes["qwen"]
        # Slow enough that every request arrives while the first is still running.
        qwen.set("slow", delay=0.2)
        before = qwen.chat_requests
        text = "a fresh citrus perfume for hot summer days"
        responses = await asyncio.gather(*(stack.post(text, "fast") for _ in range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        bodies = [r.json() for r in responses]
        assert qwen.chat_requests - before == 1
        assert all(b["brief"] == bodies[0]["brief"] for b in bodies)
        assert len({b["request_id"] for b in bodies}) == 20

        later = await stack.brief(text, "fast")
        assert later["cached"] is True
        assert later["brief"] == bodies[0]["brief"]
        assert qwen.chat_requests - before == 1
        # Whitespace and case do not make a new request.
        again = await stack.brief("  A fresh  citrus perfume for HOT summer days ", "fast")
        assert again["cached"] is True
        assert qwen.chat_requests - before == 1
        metrics = await stack.metrics()
        assert sample(metrics, "cache_hits_total") >= 2


# -------------------------------------------------------------------------------- 12. bad input


async def test_oversized_bodies_are_refused_with_413(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path, {"server": {"max_body_bytes": 1024}}) as stack:
        before = fakes["qwen"].chat_requests
        big = {"text": "rose " * 400, "mode": "fast"}
        response = await stack.http.post("/v1/briefs", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["limit_bytes"] == 1024
        assert response.json()["error"]["code"] == "request_too_large"

        # The same without a Content-Length header (a chunked upload) is cut off while reading.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"text": "'
            for _ in range(10):
                yield b"rose " * 50
            yield b'", "mode": "fast"}'

        response = await stack.http.post(
            "/v1/briefs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["limit_bytes"] == 1024
        assert response.json()["error"]["code"] == "request_too_large"
        assert fakes["qwen"].chat_requests == before
        metrics = await stack.metrics()
        assert sample(metrics, "http_errors_total", status="413") == 2


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"mode": "fast"}, "text", "Field required"),
        ({"text": "", "mode": "fast"}, "text", "at least 1 character"),
        ({"text": "   ", "mode": "fast"}, None, "text must not be empty"),
        ({"text": "a rose perfume", "mode": "turbo"}, "mode", "'fast', 'balanced' or 'creative'"),
        ({"text": "a rose perfume", "mode": "fast", "colour": "red"}, "colour", "Extra inputs"),
        ({"text": "r" * 2001, "mode": "fast"}, None, "the limit is 2000"),
        ({"text": 42, "mode": "fast"}, "text", "valid string"),
    ],
)
async def test_invalid_requests_are_refused_with_422_and_a_reason(
    fakes: dict[str, FakeLLM], tmp_path: Path, payload: dict[str, Any], field: str | None, words: str
) -> None:
    async with serve(fakes, tmp_path) as stack:
        before = fakes["qwen"].chat_requests
        response = await stack.http.post("/v1/briefs", json=payload)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert words in error["message"]
        if field is None:  # refused by the service: one sentence
            assert error["code"] == "invalid_value"
        else:  # refused by the request model: the field and the problem
            assert error["param"] == field
            (item,) = error["errors"]
            assert item["loc"] == ["body", field]
            assert words in item["msg"]
        assert fakes["qwen"].chat_requests == before


async def test_a_body_that_is_not_json_is_refused_with_400(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        response = await stack.http.post(
            "/v1/briefs", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_json"
        assert "not valid JSON" in error["message"]
        assert "line 1 column 2" in error["message"]


# -------------------------------------------------------------------------------- 13. health


async def test_health_reports_models_cache_database_and_queue(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        await stack.brief("a rose perfume", "fast")
        response = await stack.http.get("/health")
        assert response.status_code == 200
        health = response.json()
        assert health["status"] == "healthy"
        assert set(health["models"]) == set(ROLES)
        for role, model in health["models"].items():
            assert model["status"] == "healthy", role
            assert model["breakers"] == {role: "closed"}
            assert model["last_check"]["healthy"] is True
        assert health["cache"]["size"] == 1
        assert health["cache"]["max_size"] == 1000
        assert health["database"]["status"] == "healthy"
        assert health["queue_size"] == 0

        model = await stack.http.get("/health/models/qwen")
        assert model.status_code == 200
        assert model.json()["status"] == "healthy"
        assert model.json()["latency_ms"] >= 0
        assert (await stack.http.get("/health/models/gpt")).status_code == 404


async def test_health_llm_checks_each_model(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        ok = await stack.http.get("/health/llm", params={"model": "qwen"})
        assert ok.status_code == 200
        assert ok.json()["status"] == "healthy"
        assert ok.json()["circuit_state"] == "closed"

        fakes["qwen"].set("error")
        bad = await stack.http.get("/health/llm", params={"model": "qwen"})
        assert bad.status_code == 503
        assert bad.json()["status"] == "unhealthy"
        assert "qwen" in bad.json()["error"]["message"]
        assert bad.json()["error"]["retry_after"] == int(bad.headers["Retry-After"])
        # The failed check is remembered: /health and the pipeline see the generator as down.
        assert (await stack.http.get("/health")).json()["models"]["qwen"]["status"] == "unhealthy"
        body = await stack.brief("a rose perfume while qwen is sick", "fast")
        assert body["served_mode"] == "fallback"

        fakes["qwen"].set("ok")
        assert (await stack.http.get("/health/llm", params={"model": "qwen"})).status_code == 200
        assert (await stack.http.get("/health")).json()["models"]["qwen"]["status"] == "healthy"

        everything = await stack.http.get("/health/llm", params={"model": "all"})
        assert everything.status_code == 200
        assert everything.json()["status"] == "healthy"
        fakes["llama"].set("down")
        degraded = await stack.http.get("/health/llm", params={"model": "all"})
        assert degraded.status_code == 200
        assert degraded.json()["status"] == "degraded"
        assert degraded.json()["models"]["llama"]["status"] == "unhealthy"
        assert degraded.json()["models"]["qwen"]["status"] == "healthy"

        bogus = await stack.http.get("/health/llm", params={"model": "bogus"})
        assert bogus.status_code == 422


# -------------------------------------------------------------------------------- 14. metrics


async def test_metrics_expose_the_seed_names(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        await stack.brief("a rose perfume", "creative")
        await stack.brief("a rose perfume", "creative")  # a cache hit
        response = await stack.http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        names = {family.name for family in text_string_to_metric_families(response.text)}
        for name in (
            "llm_requests",
            "llm_request_failures",
            "circuit_breaker_state",
            "llm_mode_downshift",
            "llm_json_parse_failures",
            "llm_json_retry_count",
            "llm_json_fallback_used",
            "cache_hits",
            "queue_size",
        ):
            assert name in names, name
        for line in (
            "llm_requests_total",
            "llm_request_failures_total",
            "llm_json_retry_count_bucket",
            "llm_json_fallback_used_total",
            "cache_hits_total",
            "queue_size",
        ):
            assert line in response.text, line
        metrics = metric_values(response.text)
        for role in ROLES:
            assert sample(metrics, "llm_requests_total", model=role) == 1
            assert sample(metrics, "llm_request_failures_total", model=role) == 0
            assert sample(metrics, "circuit_breaker_state", model=role, endpoint=role) == 0
        assert sample(metrics, "cache_hits_total") == 1
        assert sample(metrics, "queue_size") == 0
        assert sample(metrics, "llm_json_retry_count_bucket", stage="generate", le="0.0") == 1


# -------------------------------------------------------------------------------- 15. recovery


async def test_recovery_reads_and_refuses_admin_actions_without_a_token(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        status = await stack.http.get("/api/v1/recovery/status")
        assert status.status_code == 200
        assert status.json()["breakers"] == dict.fromkeys(ROLES, "closed")
        assert status.json()["available_modes"] == ["fast", "balanced", "creative"]
        health = await stack.http.get("/api/v1/recovery/health")
        assert health.status_code == 200
        assert set(health.json()["models"]) == set(ROLES)
        assert health.json()["database"] is True
        actions = await stack.http.get("/api/v1/recovery/actions")
        assert actions.status_code == 200
        assert {"reset_breakers", "clear_cache", "check_health"} <= {
            a["name"] for a in actions.json()["actions"]
        }

        refused = await stack.http.post(
            "/api/v1/recovery/reset", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert refused.status_code == 403
        assert "admin_token" in refused.json()["error"]["message"]
        trigger = await stack.http.post("/api/v1/recovery/trigger", json={"action": "clear_cache"})
        assert trigger.status_code == 403


async def test_recovery_reset_with_the_token_closes_every_breaker(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, merge(TRIP, {"server": {"admin_token": TOKEN}})) as stack:
        fakes["llama"].set("error")
        fakes["mistral"].set("error")
        await stack.brief("a rose perfume", "creative")
        status = (await stack.http.get("/api/v1/recovery/status")).json()
        assert status["breakers"] == {"qwen": "closed", "mistral": "open", "llama": "open"}
        assert status["available_modes"] == ["fast"]

        missing = await stack.http.post("/api/v1/recovery/reset")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = await stack.http.post("/api/v1/recovery/reset", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert stack.breaker("llama").state is BreakerState.OPEN

        auth = {"Authorization": f"Bearer {TOKEN}"}
        reset = await stack.http.post("/api/v1/recovery/reset", headers=auth)
        assert reset.status_code == 200
        assert reset.json()["done"][0]["action"] == "reset_breakers"
        assert reset.json()["done"][0]["ok"] is True
        for role in ROLES:
            assert stack.breaker(role).state is BreakerState.CLOSED, role
        status = (await stack.http.get("/api/v1/recovery/status")).json()
        assert status["breakers"] == dict.fromkeys(ROLES, "closed")
        assert status["available_modes"] == ["fast", "balanced", "creative"]
        assert status["history"][-1]["action"] == "reset_breakers"

        fakes["llama"].set("ok")
        fakes["mistral"].set("ok")
        body = await stack.brief("a violet perfume", "creative")
        assert body["served_mode"] == "creative"

        unknown = await stack.http.post("/api/v1/recovery/trigger", json={"action": "reboot"}, headers=auth)
        assert unknown.status_code == 422
        assert "reboot" in unknown.json()["error"]["message"]
        bad_target = await stack.http.post(
            "/api/v1/recovery/trigger", json={"action": "reset_breakers", "target": "gpt"}, headers=auth
        )
        assert bad_target.status_code == 422
        assert stack.service.cache.stats().size == 1
        clear = await stack.http.post(
            "/api/v1/recovery/trigger", json={"action": "clear_cache"}, headers=auth
        )
        assert clear.status_code == 200
        assert clear.json()["ok"] is True
        assert stack.service.cache.stats().size == 0
        actions = (await stack.http.get("/api/v1/recovery/actions")).json()
        assert [a["action"] for a in actions["history"]] == ["reset_breakers", "clear_cache"]


# -------------------------------------------------------------------------------- 16. sweep


FAULTS: tuple[Mode, ...] = ("error", "hang", "garbage", "wrong_schema", "down")


@pytest.mark.parametrize("targets", ["generator", "all"])
@pytest.mark.parametrize("fault", FAULTS)
async def test_no_fault_ever_turns_into_a_500(
    fakes: dict[str, FakeLLM], tmp_path: Path, fault: Mode, targets: str
) -> None:
    timeouts = {role: {"timeout": 0.3} for role in ROLES}
    async with serve(fakes, tmp_path, merge(TRIP, {"models": {"roles": timeouts}})) as stack:
        await stack.brief("a seen-before request for musk", "fast")
        for role in ("qwen",) if targets == "generator" else ROLES:
            fakes[role].set(fault)
        for text in ("a seen-before request for musk", "a new request for oud"):
            for mode in ("fast", "balanced", "creative"):
                response = await stack.post(text, mode)
                assert response.status_code in (200, 503), response.text
                if response.status_code == 503:
                    assert int(response.headers["Retry-After"]) >= 1
                else:
                    brief_of(response.json())
        metrics = await stack.metrics()
        assert sample(metrics, "http_errors_total", status="500") == 0


# ------------------------------------------------------------------- 17. database down: the spool


async def test_briefs_served_while_the_database_is_down_are_spooled_and_replayed_once(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # The database lives in a folder that does not exist yet: every write fails until it does.
    missing = tmp_path / "not-yet"
    overrides = {
        "database": {
            "url": f"sqlite+aiosqlite:///{missing / 'briefs.db'}",
            "spool_path": str(tmp_path / "spool.db"),
            "write_timeout": 2.0,
        }
    }
    async with serve(fakes, tmp_path, overrides) as stack:
        texts = [f"citrus and sea salt, variation {i}" for i in range(6)]
        ids = [(await stack.brief(text, "fast"))["request_id"] for text in texts]
        health = (await stack.http.get("/health")).json()
        assert health["database"]["status"] == "unhealthy"
        assert health["spool"]["pending"] == len(ids)
        assert sample(await stack.metrics(), "spool_pending") == len(ids)

        missing.mkdir()  # the database comes back
        await stack.runtime.store.init()
        assert stack.runtime.replayer is not None
        stack.runtime.replayer.wake()
        await until(lambda: stack.runtime.spool.pending == 0, "the spool to drain")
        assert await stack.runtime.store.count() == len(ids)
        for request_id in ids:
            record = await stack.runtime.store.get(request_id)
            assert record is not None
            assert record.response["request_id"] == request_id
        # A write after recovery goes straight to the database, in order behind the replayed ones.
        later = (await stack.brief("amber and smoke for winter", "fast"))["request_id"]
        assert await stack.runtime.store.get(later) is not None
        assert await stack.runtime.store.count() == len(ids) + 1
