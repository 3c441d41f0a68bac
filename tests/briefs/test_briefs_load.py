"""The brief service under load: one budget per request across admission and the generator's queue.

Real pipeline runs over real HTTP to fault-injecting model servers on 127.0.0.1 (the ``fakes``
fixture) with one slot each, so requests beyond it wait in the model client's queue -- the queue the
admission and the dimmer must see.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from brownout.briefs.service import ANSWER_RESERVE, BriefService, _end_cut_description
from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.errors import ConfigError, ServiceUnavailable
from brownout.events import EventBus
from brownout.llm.client import ModelClient
from brownout.llm.types import ProbeResult
from brownout.policies.breaker import BreakerState
from support.stack import distinct_text, make_config, merge, sample, serve
from support.wait import until


@contextlib.asynccontextmanager
async def one_slot_service(
    fakes: dict[str, FakeLLM], tmp_path: Path, overrides: Mapping[str, Any] | None = None
) -> AsyncIterator[BriefService]:
    """The brief service alone, each role on its fake with one slot (as the embedded llama.cpp)."""
    roles = {role: {"endpoints": [{"url": fakes[role].url, "max_concurrency": 1}]} for role in ROLES}
    config: BrownoutConfig = make_config(
        {r: f.url for r, f in fakes.items()},
        tmp_path / "b.db",
        merge({"models": {"roles": roles}, "cache": {"enabled": False}}, overrides or {}),
    )
    events = EventBus()
    clients = {
        role: ModelClient(
            role,
            config.models.roles[role].endpoints,
            breakers=config.circuit_breaker.group(),
            timeout=config.models.roles[role].timeout,
            limiter=config.models.roles[role].limiter.config(),
            events=events,
        )
        for role in ROLES
    }
    service = BriefService(config, clients, events=events, rng=random.Random(5))
    try:
        yield service
    finally:
        await service.aclose()
        for client in clients.values():
            await client.aclose()


def qwen(svc: BriefService) -> ModelClient:
    client = svc.backends["qwen"]
    assert isinstance(client, ModelClient)
    return client


async def test_model_server_queueing_is_visible_to_admission_and_the_dimmer(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    fakes["qwen"].set("slow", delay=0.4)
    async with one_slot_service(fakes, tmp_path) as svc:
        await svc.create_brief(distinct_text(0), "fast")  # the generator's service time: ~0.4 s
        gen = qwen(svc)
        service = gen.service_time()
        assert service is not None
        assert service > 0
        assert svc.queue_delay() == 0.0  # idle
        # Three requests at once: one holds the generator's only slot, two wait in the client's queue,
        # while the admission (four pipelines at once) has slots to spare.
        tasks = [asyncio.create_task(svc.create_brief(distinct_text(i), "fast")) for i in (1, 2, 3)]
        await until(
            lambda: gen.limiters["qwen"].queued == 2, "two calls waiting for the generator", timeout=5.0
        )
        assert svc.admission.queue_size == 0
        # The wait is the generator's, and both the dimmer's signal and the admission's estimate see it.
        assert svc.queue_delay() >= 2 * service
        first_in_admission_queue = svc._start_wait(1)
        assert first_in_admission_queue is not None
        assert first_in_admission_queue >= 2 * service
        # Every caller further back in the admission queue waits one more service time.
        later = svc._start_wait(3)
        assert later is not None
        assert later >= first_in_admission_queue + 2 * service * 0.99
        for task in tasks:
            await task


async def test_a_request_that_cannot_start_its_generator_call_in_time_is_served_without_it(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # The generator answers in 0.5 s on one slot; the target is 1.2 s, so a request may wait about
    # 0.7 s for it: one caller ahead is fine, two are not. Four requests fit the admission's four
    # pipelines, so they all reach the generator's queue.
    fakes["qwen"].set("slow", delay=0.5)
    overrides = {"dimmer": {"targets": {"fast": 1.2, "balanced": 1.2, "creative": 1.2}}}
    async with one_slot_service(fakes, tmp_path, overrides) as svc:
        svc.dimmer.force(0.0)  # the budgets alone, without the controller
        await svc.create_brief(distinct_text(0), "fast")
        before = fakes["qwen"].chat_requests
        answers = await asyncio.gather(*(svc.create_brief(distinct_text(i), "fast") for i in range(1, 5)))
        by_model = [a for a in answers if a["stages"][0]["served_by"] == "model:qwen"]
        by_load = [a for a in answers if a.get("dimmed")]
        assert len(by_model) + len(by_load) == 4
        assert 1 <= len(by_model) < 4
        assert by_load
        for answer in by_load:
            # Refused at once by the generator's queue: the generation is left to the rules, the
            # answer says the load did it, and the busy generator got no reduced-context call.
            assert answer["reason"] == "load"
            assert answer["dimmed"] == ["generation"]
            assert answer["stages"][0]["served_by"] in ("rules", "cache")
        # Only the requests the generator served reached it: nothing was sent only to time out.
        assert fakes["qwen"].chat_requests - before == len(by_model)
        gen = qwen(svc)
        assert gen.limiters["qwen"].stats.rejected["deadline"] == len(by_load)
        # The load failed nothing: no breaker failure, no model failure counted.
        assert gen.breakers["qwen"].metrics().failures == 0
        assert svc.stats.failures["qwen"] == 0
        assert svc.stats.dimmed["generation"] == len(by_load)


async def test_a_busy_validator_is_left_out_for_load_and_the_answer_says_so(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # The validator answers in 0.6 s on one slot and the target is 1 s: a second balanced request
    # cannot wait for it, so its validation is left to the rules -- dimmed for load, not "unavailable".
    fakes["mistral"].set("slow", delay=0.6)
    overrides = {"dimmer": {"targets": {"fast": 1.0, "balanced": 1.0, "creative": 1.0}}}
    async with one_slot_service(fakes, tmp_path, overrides) as svc:
        svc.dimmer.force(0.0)
        await svc.create_brief(distinct_text(0), "balanced")
        before = fakes["mistral"].chat_requests
        first, second = await asyncio.gather(
            svc.create_brief(distinct_text(1), "balanced"), svc.create_brief(distinct_text(2), "balanced")
        )
        served = sorted([first, second], key=lambda a: "dimmed" in a)
        full, dimmed = served
        assert [s["served_by"] for s in full["stages"]] == ["model:qwen", "model:mistral"]
        assert "dimmed" not in full
        assert [s["served_by"] for s in dimmed["stages"]] == ["model:qwen", "rules"]
        assert dimmed["dimmed"] == ["validation"]
        assert dimmed["reason"] == "load"
        assert fakes["mistral"].chat_requests - before == 1
        assert svc.stats.failures["mistral"] == 0
        assert svc.stats.dimmed["validation"] == 1


async def test_a_slow_call_on_a_busy_generator_is_load_not_failure(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # The generator's server has one slot but the client believes it has four: calls queue inside the
    # server, and those that wait there too long time out. The server completes calls all the while:
    # those timeouts are load, so no breaker opens and the answers say so. (The limit starts at four,
    # not at one, so that the server's own queue fills.)
    roles: dict[str, dict[str, Any]] = {"qwen": {"timeout": 0.7, "limiter": {"initial_limit": 4}}}
    overrides = {"models": {"roles": roles}, "circuit_breaker": {"minimum_calls": 2, "window_size": 10}}
    async with FakeLLM("slow", delay=0.3, slots=1, model="qwen") as one_slot:
        roles["qwen"]["endpoints"] = [{"url": one_slot.url, "max_concurrency": 4}]
        async with one_slot_service({**fakes, "qwen": one_slot}, tmp_path, overrides) as svc:
            svc.dimmer.force(0.0)
            await svc.create_brief(distinct_text(0), "fast")
            answers = await asyncio.gather(*(svc.create_brief(distinct_text(i), "fast") for i in range(1, 5)))
            check_load_not_failure(svc, answers)


def check_load_not_failure(svc: BriefService, answers: list[dict[str, Any]]) -> None:
    """The timeouts were load: said in the answers, no breaker failure, the generator still serves."""
    by_load = [a for a in answers if a.get("dimmed")]
    assert by_load, "nothing timed out: the test's load is too light"
    assert all(a["reason"] == "load" for a in by_load)
    gen = qwen(svc)
    assert gen.breakers["qwen"].state is BreakerState.CLOSED
    assert gen.breakers["qwen"].metrics().failures == 0
    [status] = gen.endpoints_status()
    assert status["slow"] > 0
    assert status["completed"] >= 1 + len(answers) - len(by_load)
    assert svc.role_available("qwen")


@contextlib.asynccontextmanager
async def warm_one_pipeline(
    fakes: dict[str, FakeLLM], tmp_path: Path, generator_delay: float, more: Mapping[str, Any] | None = None
) -> AsyncIterator[BriefService]:
    """One pipeline at a time, a 1 s target for every mode, a generator answering after
    ``generator_delay`` seconds; one brief served already, so the service time is known. ``more``:
    further config overrides."""
    fakes["qwen"].set("slow", delay=generator_delay)
    overrides = {
        "queue": {"max_concurrent": 1},
        "dimmer": {"targets": {"fast": 1.0, "balanced": 1.0, "creative": 1.0}},
    }
    async with one_slot_service(fakes, tmp_path, merge(overrides, more or {})) as svc:
        svc.dimmer.force(0.0)
        await svc.create_brief(distinct_text(0), "fast")
        yield svc


async def test_refusals_for_the_budget_are_at_once_and_say_when_to_retry(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # One pipeline at a time: the admission queue is where requests wait, and its estimate includes
    # the generator's service time.
    async with warm_one_pipeline(fakes, tmp_path, 0.3) as svc:
        outcomes = await asyncio.gather(
            *(svc.create_brief(distinct_text(i), "fast") for i in range(1, 9)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, ServiceUnavailable)]
        answered = [o for o in outcomes if isinstance(o, dict)]
        assert len(refused) + len(answered) == 8
        assert refused
        assert all(e.retry_after >= 1.0 and "latency target" in str(e) for e in refused)
        stats = svc.admission.stats
        # Refused at once on the estimate; or, when a busy machine made the estimate hopeful, at the
        # caller's deadline to start (never later): nothing else refuses these requests.
        assert stats.rejected["deadline"] == len(refused) >= 1
        # A caller that left the queue at its deadline to start was answered without the generator.
        by_load = [a for a in answered if a.get("reason") == "load"]
        assert len(by_load) >= stats.rejected["queue_timeout"]
        # Every caller that joined the queue was admitted, or left it at its deadline to start.
        assert stats.queued <= stats.admitted + stats.rejected["queue_timeout"]


@contextlib.asynccontextmanager
async def one_pipeline_two_seconds(
    fakes: dict[str, FakeLLM], tmp_path: Path, generator_delay: float
) -> AsyncIterator[BriefService]:
    """One pipeline at a time, a 2 s target for every mode, a generator answering after
    ``generator_delay`` seconds with a 5 s call timeout (longer than the target); nothing measured."""
    fakes["qwen"].set("slow", delay=generator_delay)
    overrides = {
        "models": {"roles": {"qwen": {"timeout": 5.0}}},
        "queue": {"max_concurrent": 1},
        "dimmer": {"targets": {"fast": 2.0, "balanced": 2.0, "creative": 2.0}},
    }
    async with one_slot_service(fakes, tmp_path, overrides) as svc:
        svc.dimmer.force(0.0)
        yield svc


async def test_a_fresh_service_under_a_burst_refuses_at_once_what_it_cannot_start_in_time(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Nothing measured yet: a call is planned to take its whole timeout (5 s), longer than the 2 s
    # target, so a request that finds the only pipeline busy cannot be started in time -- and is told so
    # at once, not after queueing until the first answer showed there had never been room.
    async with one_pipeline_two_seconds(fakes, tmp_path, 1.0) as svc:
        assert qwen(svc).service_time() is None
        assert svc.generator_service() == svc.config.models.roles["qwen"].timeout
        tasks = [asyncio.create_task(svc.create_brief(distinct_text(i), "fast")) for i in range(4)]
        await until(lambda: sum(t.done() for t in tasks) == 3, "three refusals")
        assert not tasks[0].done()  # the refusals came while the first call was still running
        for late in tasks[1:]:
            with pytest.raises(ServiceUnavailable, match="latency target"):
                late.result()
        first = await tasks[0]
        assert first["stages"][0]["served_by"] == "model:qwen"
        assert svc.admission.stats.rejected["deadline"] == 3
        assert svc.admission.stats.rejected["queue_timeout"] == 0
        # Measured now: the plan is the calls' own time, and a request may wait for what fits.
        assert 0.9 < svc.generator_service() < 5.0


async def test_a_request_that_waited_in_vain_for_a_pipeline_is_answered_without_the_generator(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # The generator's calls took 0.4 s, so a request behind a running one expects to start in 0.4 s
    # and queues; but the running call has become slow (3 s, cut at its request's 2 s target), and
    # the queued one reaches its deadline to start (2 - 0.25 - 0.4 s after it came) with no pipeline.
    async with one_pipeline_two_seconds(fakes, tmp_path, 0.4) as svc:
        await svc.create_brief(distinct_text(0), "fast")
        fakes["qwen"].set("slow", delay=3.0)
        running = asyncio.create_task(svc.create_brief(distinct_text(1), "fast"))
        await until(lambda: svc.admission.in_flight == 1, "the only pipeline taken")
        waited = await svc.create_brief(distinct_text(2), "fast")
        assert svc.admission.stats.queued == 1
        assert svc.admission.stats.rejected["queue_timeout"] == 1
        # An answer, not a 503 after the wait: without the generator, saying the load left it out.
        assert waited["reason"] == "load"
        assert waited["dimmed"] == ["generation"]
        assert waited["stages"][0]["served_by"] in ("rules", "cache")
        assert waited["latency_ms"] < 2000
        assert not running.done()  # it came while the call it waited behind was still running
        assert svc.stats.rejected["queue_timeout"] == 0
        assert svc.stats.dimmed["generation"] == 1
        await running


@pytest.mark.parametrize("pacing", [4.0, None])
async def test_refused_callers_are_told_to_come_back_one_after_another(
    fakes: dict[str, FakeLLM], tmp_path: Path, pacing: float | None
) -> None:
    # Ten callers refused while the only pipeline is busy: told "when the queue drains", all ten
    # would come back together and nine be refused again; paced, each is given its own time, four
    # for each pipeline run that comes free.
    async with warm_one_pipeline(fakes, tmp_path, 0.6, {"queue": {"retry_pacing": pacing}}) as svc:
        busy = asyncio.create_task(svc.create_brief(distinct_text(1), "fast"))
        await until(lambda: svc.admission.in_flight == 1, "the only pipeline taken")
        told: list[float] = []
        back_at: list[float] = []  # when each was told to come back (the service's clock is monotonic)
        for i in range(2, 12):
            with pytest.raises(ServiceUnavailable, match="latency target") as info:
                await svc.create_brief(distinct_text(i), "fast")
            assert info.value.retry_after is not None
            told.append(info.value.retry_after)
            back_at.append(time.monotonic() + info.value.retry_after)
        assert not busy.done()  # all ten refused while it ran
        assert svc.admission.stats.rejected["deadline"] == 10
        run = svc.admission.service_time
        assert run is not None
        assert told[0] >= 1.0
        if pacing is None:
            assert told == [told[0]] * 10
        else:
            gaps = [b - a for a, b in itertools.pairwise(back_at)]
            assert gaps == pytest.approx([run / 4] * 9, abs=0.01)
        await busy


async def test_a_request_refused_for_its_budget_is_answered_without_a_turn_of_the_event_loop(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Under a burst every request of it runs one step before any runs its next: a refusal that needed
    # a second step (a computation started as a task) waited behind the whole burst.
    # A 0.6 s generator and a 1 s target: a request behind a running one cannot start in time.
    async with warm_one_pipeline(fakes, tmp_path, 0.6) as svc:
        busy = asyncio.create_task(svc.create_brief(distinct_text(1), "fast"))
        await until(lambda: svc.admission.in_flight == 1, "the only pipeline slot taken")
        computations = svc._flights.stats.computations
        turned: list[bool] = []
        asyncio.get_running_loop().call_soon(turned.append, True)
        with pytest.raises(ServiceUnavailable, match="latency target"):
            await svc.create_brief(distinct_text(2), "fast")
        assert turned == []  # refused in the step it arrived in
        assert svc._flights.stats.computations == computations  # and no computation was started for it
        assert svc.admission.stats.rejected["deadline"] == 1
        assert svc.stats.rejected["deadline"] == 1
        # The same text asked again while one is computing joins it and is never refused.
        again = asyncio.create_task(svc.create_brief(distinct_text(1), "fast"))
        first, second = await asyncio.gather(busy, again)
        assert first["brief"] == second["brief"]
        assert svc.admission.stats.rejected["deadline"] == 1


def test_a_busy_probe_is_never_the_roles_best_latency(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    config = make_config({r: f.url for r, f in fakes.items()}, tmp_path / "b.db")
    clients = {role: ModelClient(role, config.models.roles[role].endpoints) for role in ROLES}
    svc = BriefService(config, clients)
    busy = ProbeResult("qwen", "http://a", True, 0.0, None, busy=True)
    measured = ProbeResult("qwen", "http://b", True, 0.25, None)
    svc.record_health("qwen", [busy, measured])
    assert svc.stats.health["qwen"] is measured
    # Busy alone: it is what there is (healthy, said to be busy).
    svc.record_health("qwen", [busy])
    assert svc.stats.health["qwen"] is busy
    # A failed probe never beats a healthy busy one.
    failed = ProbeResult("qwen", "http://b", False, 0.01, "HTTP 500")
    svc.record_health("qwen", [failed, busy])
    assert svc.stats.health["qwen"] is busy


# -------------------------------------------------------------------------------- config and display


async def test_limiter_settings_from_the_config_reach_each_endpoint_and_show(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    overrides = {
        "models": {
            "roles": {
                "qwen": {
                    "limiter": {"max_limit": 2, "initial_limit": 2, "max_queue": 7},
                    "alive_window": 12.0,
                },
                "mistral": {"limiter": {"min_limit": 2, "initial_limit": 3}},
            }
        }
    }
    async with serve(fakes, tmp_path, overrides) as stack:
        qwen_client = stack.runtime.clients["qwen"]
        (lim,) = qwen_client.limiters.values()
        assert (lim.config.max_limit, lim.limit, lim.config.max_queue) == (2, 2, 7)
        assert qwen_client.alive_window == 12.0
        (mistral_lim,) = stack.runtime.clients["mistral"].limiters.values()
        # No max_limit of its own: the endpoint's max_concurrency (16 by default) is the ceiling.
        assert (mistral_lim.config.min_limit, mistral_lim.limit, mistral_lim.config.max_limit) == (2, 3, 16)
        (llama_lim,) = stack.runtime.clients["llama"].limiters.values()
        assert llama_lim.config.max_limit == 16

        await stack.brief("a bright neroli cologne", "fast")
        metrics = await stack.metrics()
        labels = {"model": "qwen", "endpoint": "qwen"}
        assert sample(metrics, "brownout_model_concurrency_limit", **labels) == 2.0
        assert ("brownout_model_concurrency_in_flight", frozenset(labels.items())) in metrics
        assert ("brownout_model_concurrency_queued", frozenset(labels.items())) in metrics
        # Start-up's constraint check and the brief: two well-formed completions, no slow call.
        assert sample(metrics, "brownout_model_completed_total", **labels) == 2.0
        assert sample(metrics, "brownout_model_slow_calls_total", **labels) == 0.0

        health = (await stack.http.get("/health")).json()
        text = str(health)
        assert "'completed': 2" in text
        snap = stack.runtime.status.snapshot()
        [concurrency] = snap["models"]["qwen"]["concurrency"]
        assert concurrency["limit"] == 2
        assert concurrency["queued"] == 0


def test_limiter_settings_are_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"models\.roles\.qwen\.limiter"):
        load_config(None, environ={"BROWNOUT__MODELS__ROLES__QWEN__LIMITER__MIN_LIMIT": "0"})
    with pytest.raises(ConfigError, match="min_limit"):
        load_config(
            None,
            environ={
                "BROWNOUT__MODELS__ROLES__QWEN__LIMITER__MIN_LIMIT": "4",
                "BROWNOUT__MODELS__ROLES__QWEN__LIMITER__MAX_LIMIT": "2",
            },
        )
    with pytest.raises(ConfigError, match="alive_window"):
        load_config(None, environ={"BROWNOUT__MODELS__ROLES__QWEN__ALIVE_WINDOW": "-1"})


def _brief_json(description: str) -> str:
    # Spaced so that the fake streams it a word at a time, the description last (the schema's order).
    return (
        '{"style": "floral", "intensity": 40, "complexity": 50, "notes": [{"note": "floral", "weight": 60}],'
        ' "product_category": "EDP", "longevity": "medium", "description": "' + description + '"}'
    )


LONG_DESCRIPTION = " ".join(f"word{i}" for i in range(60))


def _two_slot_generator(fakes: dict[str, FakeLLM], *, timeout: float) -> dict[str, Any]:
    """Overrides: the generator on two slots from the start, with ``timeout`` per call."""
    qwen = {
        "timeout": timeout,
        "endpoints": [{"url": fakes["qwen"].url, "max_concurrency": 2}],
        "limiter": {"initial_limit": 2},
    }
    return {"models": {"roles": {"qwen": qwen}}}


async def _warm_then_two_long(
    svc: BriefService, fakes: dict[str, FakeLLM], chunk_delay: float
) -> tuple[Any, list[Any]]:
    """One whole answer (a sign of life), then two long answers at once, a word every ``chunk_delay``."""
    svc.dimmer.force(0.0)
    fakes["qwen"].set("ok", content=_brief_json("A short and whole description."), chunk_delay=0.0)
    whole = await svc.create_brief(distinct_text(0), "fast")
    fakes["qwen"].set("ok", content=_brief_json(LONG_DESCRIPTION), chunk_delay=chunk_delay)
    answers = await asyncio.gather(*(svc.create_brief(distinct_text(i), "fast") for i in (1, 2)))
    return whole, list(answers)


async def test_a_slow_generator_answer_cut_in_its_description_is_served_cut_short(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Two slots, a 1.5 s time limit, and a generator writing a word every 50 ms: its brief's fields
    # take ~0.9 s, its 60-word description 3 s more. Two at once on a server that has just answered:
    # slow under load -- each kept as far as it was written, not thrown away for the rules.
    async with one_slot_service(fakes, tmp_path, _two_slot_generator(fakes, timeout=1.5)) as svc:
        whole, answers = await _warm_then_two_long(svc, fakes, chunk_delay=0.05)
        assert whole["brief"]["description"] == "A short and whole description."
        assert "dimmed" not in whole
        for answer in answers:
            assert answer["stages"][0]["served_by"] == "model:qwen"
            assert (answer["reason"], answer["dimmed"]) == ("load", ["description_tail"])
            assert answer["degraded"] is True
            assert any("stopped at its 1.5s time limit" in w for w in answer["warnings"])
            brief = answer["brief"]
            assert (brief["style"], brief["product_category"], brief["longevity"]) == (
                "floral",
                "EDP",
                "medium",
            )
            description = brief["description"]
            assert description.endswith("…")
            words = description[:-1].split()
            assert 4 <= len(words) < 60
            assert words == LONG_DESCRIPTION.split()[: len(words)]  # whole words only, in order
        gen = qwen(svc)
        assert gen.breakers["qwen"].metrics().failures == 0
        assert gen.endpoints_status()[0]["slow"] == 2
        assert svc.stats.dimmed["description_tail"] == 2
        assert svc.stats.failures["qwen"] == 0
        # Not cached, and no model for similar requests: the same text is asked of the model again.
        before = fakes["qwen"].chat_requests
        fakes["qwen"].set("ok", content=_brief_json("Whole this time."), chunk_delay=0.0)
        again = await svc.create_brief(distinct_text(1), "fast")
        assert again["brief"]["description"] == "Whole this time."
        assert fakes["qwen"].chat_requests == before + 1


async def test_a_slow_generator_answer_cut_before_its_description_is_left_to_the_rules(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Cut while the brief's fields were still being written: nothing valid to keep.
    async with one_slot_service(fakes, tmp_path, _two_slot_generator(fakes, timeout=0.5)) as svc:
        _, answers = await _warm_then_two_long(svc, fakes, chunk_delay=0.1)
        for answer in answers:
            assert answer["stages"][0]["served_by"] in ("rules", "cache")
            assert answer["dimmed"] == ["generation"]
        assert qwen(svc).breakers["qwen"].metrics().failures == 0


async def test_a_generator_answer_still_coming_at_the_requests_target_is_cut_there(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # A 2 s target and a 10 s time limit per call: a long answer (fields in ~0.9 s, a 60-word
    # description 3 s more) is cut at the request's target (less the reserve for answering), not at
    # the call's limit, and served cut short. The request's time is its target whatever its call's
    # limit; the cut is the request's doing, nothing is counted against the model.
    overrides = merge(
        _two_slot_generator(fakes, timeout=10.0),
        {"dimmer": {"targets": {"fast": 2.0, "balanced": 2.0, "creative": 2.0}}},
    )
    async with one_slot_service(fakes, tmp_path, overrides) as svc:
        svc.dimmer.force(0.0)
        fakes["qwen"].set("ok", content=_brief_json(LONG_DESCRIPTION), chunk_delay=0.05)
        answer = await svc.create_brief(distinct_text(0), "fast")
        assert answer["stages"][0]["served_by"] == "model:qwen"
        assert (answer["reason"], answer["dimmed"]) == ("load", ["description_tail"])
        # Cut at the target less what answering takes: answered within the target.
        assert 2.0 - ANSWER_RESERVE - 0.2 <= answer["latency_ms"] / 1000 < 2.0
        assert any("stopped at the request's 2s latency target" in w for w in answer["warnings"])
        words = answer["brief"]["description"][:-1].split()
        assert 4 <= len(words) < 60
        gen = qwen(svc)
        assert gen.breakers["qwen"].metrics().failures == 0
        assert svc.stats.failures["qwen"] == 0
        assert gen.limiters["qwen"].stats.dropped == 0


@pytest.mark.parametrize(
    ("cut", "served"),
    [
        ("Fresh citrus and a hint of ro", "Fresh citrus and a hint of…"),
        ("Fresh citrus, then", "Fresh citrus…"),
        ("Fresh citrus. Then a", "Fresh citrus. Then…"),
        ("Fresh citrus. The", "Fresh citrus."),  # back to a whole sentence: it reads whole
        ("Fresh citrus.", "Fresh citrus."),  # stopped right after a sentence
        ("Unbroken", "Unbroken…"),
    ],
)
def test_a_cut_description_ends_at_a_whole_word(cut: str, served: str) -> None:
    assert _end_cut_description(cut) == served
