"""Tests of brownout.llm.guard: re-asking the model, repair, backoff, deadlines, token growth, counters,
and the one engine under the pipeline's guard and the gateway's."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from brownout.errors import ConfigError, DeadlineExceeded, GuardFailed, ModelError, ModelUnavailable
from brownout.events import Event, EventBus, GuardGaveUp, GuardRetried
from brownout.gateway.guard import SchemaCheck, SchemaGuard
from brownout.llm.guard import (
    MAX_REPAIR_CHARS,
    Accepted,
    GuardConfig,
    GuardResult,
    GuardStats,
    JSONGuard,
    Rejection,
    close_cut_json,
)
from brownout.llm.types import Message
from brownout.policies.deadline import deadline
from brownout.testing import FakeClock

Note = Annotated[str, Field(max_length=20)]


class Brief(BaseModel):
    """A small stand-in for the creative brief: a range, a bounded list of bounded strings, a choice."""

    intensity: float = Field(ge=0, le=1)
    notes: list[Note] = Field(min_length=1, max_length=5)
    longevity: Literal["short", "medium", "long"]


GOOD = '{"intensity": 0.5, "notes": ["rose", "musk"], "longevity": "long"}'
GOOD_VALUE = Brief(intensity=0.5, notes=["rose", "musk"], longevity="long")
PROMPT: list[Message] = [
    {"role": "system", "content": "Answer with a JSON brief."},
    {"role": "user", "content": "something fresh"},
]


class FixedRandom(random.Random):
    """An rng whose random() always returns ``value``: makes the jitter predictable."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class ScriptedAsk:
    """A fake model: returns queued answers (or raises queued errors) and records every request."""

    def __init__(self, *answers: str | BaseException) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[Message], int, dict[str, Any] | None]] = []

    async def __call__(
        self, messages: list[Message], max_tokens: int, response_format: dict[str, Any] | None
    ) -> str:
        self.calls.append((list(messages), max_tokens, response_format))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def max_tokens(self) -> list[int]:
        return [call[1] for call in self.calls]

    def messages(self, n: int) -> list[Message]:
        """The messages of request ``n`` (1-based)."""
        return self.calls[n - 1][0]


@pytest.fixture
def jclock() -> FakeClock:
    """A fake clock whose sleeps return at once after moving time (sequential re-ask loops)."""
    return FakeClock(autojump=True)


def make_guard(
    jclock: FakeClock,
    events: EventBus | None = None,
    *,
    jitter_draw: float = 0.0,
    **config: Any,
) -> JSONGuard[Brief]:
    config.setdefault("jitter", 0.0)
    return JSONGuard(
        "brief",
        Brief,
        GuardConfig(**config),
        clock=jclock,
        events=events if events is not None else EventBus(),
        rng=FixedRandom(jitter_draw),
    )


# --- the first answer ----------------------------------------------------------------------------------


async def test_valid_first_answer_is_one_constrained_attempt(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(GOOD)
    result = await guard.run(ask, PROMPT, max_tokens=300)
    assert result == GuardResult(GOOD_VALUE, 1, False, True, ())
    assert isinstance(result.value, Brief)
    [(messages, max_tokens, response_format)] = ask.calls
    assert messages == PROMPT
    assert max_tokens == 300
    assert response_format == {
        "type": "json_schema",
        "json_schema": {"name": "Brief", "schema": Brief.model_json_schema(), "strict": True},
    }
    assert response_format == guard.response_format()
    assert jclock.sleeps == []
    assert guard.stats == GuardStats(0, 0, 0, 0, 1, 0, {0: 1})


async def test_unconstrained_backend_gets_no_response_format(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(GOOD)
    result = await guard.run(ask, PROMPT, constrained=False)
    assert result.constrained is False
    assert ask.calls[0][2] is None


async def test_strict_schema_off_sends_no_response_format(jclock: FakeClock) -> None:
    guard = make_guard(jclock, strict_schema=False)
    ask = ScriptedAsk("oops", GOOD)
    result = await guard.run(ask, PROMPT, constrained=True)
    assert result.constrained is False
    assert [call[2] for call in ask.calls] == [None, None]


async def test_response_format_is_a_copy(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    first = guard.response_format()
    first["json_schema"]["schema"]["properties"].clear()
    assert guard.response_format()["json_schema"]["schema"] == Brief.model_json_schema()


async def test_schema_name_is_sanitised_for_openai(jclock: FakeClock) -> None:
    class Weird(BaseModel):
        x: int

    Weird.__name__ = "Weird name!"
    guard = JSONGuard("w", Weird, clock=jclock)
    assert guard.response_format()["json_schema"]["name"] == "Weird_name_"


# --- re-asking -----------------------------------------------------------------------------------------


async def test_garbage_then_valid_re_asks_with_the_bad_answer_and_the_problem(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk("Sure! Here is a lovely fragrance for you.", GOOD)
    prompt = list(PROMPT)
    result = await guard.run(ask, prompt)
    assert result.value == GOOD_VALUE
    assert result.attempts == 2
    assert result.repaired is False
    assert len(result.errors) == 1
    assert result.errors[0].startswith("attempt 1: not JSON:")
    second = ask.messages(2)
    assert second[:2] == PROMPT
    assert second[2] == {"role": "assistant", "content": "Sure! Here is a lovely fragrance for you."}
    assert second[3]["role"] == "user"
    correction = second[3]["content"]
    assert "not valid JSON" in correction
    assert '"intensity", "notes", "longevity"' in correction  # tells the model which keys it needs
    assert "only" in correction
    assert prompt == PROMPT  # the caller's list is not mutated
    assert ask.calls[1][2] == guard.response_format()  # the re-ask is constrained too


@pytest.mark.parametrize(
    "answer",
    [
        '{"intensity": 0.5, "notes": ["rose", "musk"], "longevity": "long",}',  # trailing comma
        "{'intensity': 0.5, 'notes': ['rose', 'musk'], 'longevity': 'long'}",  # single quotes
        '{"intensity": 0.5, "notes": ["rose", "musk"], "longevity": "long"',  # missing closing brace
        '```json\n{"intensity": 0.5, "notes": ["rose", "musk"], "longevity": "long"}\n```',  # code fence
    ],
    ids=["trailing-comma", "single-quotes", "missing-brace", "code-fence"],
)
async def test_repairable_json_is_repaired_without_re_asking(jclock: FakeClock, answer: str) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(answer)
    result = await guard.run(ask, PROMPT)
    assert result == GuardResult(GOOD_VALUE, 1, True, True, ())
    assert len(ask.calls) == 1
    assert jclock.sleeps == []
    assert guard.stats == GuardStats(0, 0, 1, 0, 1, 0, {0: 1})


@pytest.mark.parametrize("answer", ["I cannot help with that.", "{", "", "[", "42 is the answer"])
async def test_hopeless_text_is_re_asked(jclock: FakeClock, answer: str) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(answer, GOOD)
    result = await guard.run(ask, PROMPT)
    assert result.attempts == 2
    assert result.repaired is False
    assert len(ask.calls) == 2
    stats = guard.stats
    assert (stats.parse_failures, stats.repairs, stats.retries) == (1, 0, 1)


async def test_repair_off_re_asks_instead(jclock: FakeClock) -> None:
    guard = make_guard(jclock, repair=False)
    ask = ScriptedAsk('{"intensity": 0.5, "notes": ["rose"], "longevity": "long",}', GOOD)
    result = await guard.run(ask, PROMPT)
    assert (result.attempts, result.repaired) == (2, False)
    assert guard.stats.repairs == 0
    assert guard.stats.parse_failures == 1


async def test_out_of_range_value_names_the_field_and_the_range(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk('{"intensity": 33, "notes": ["rose"], "longevity": "long"}', GOOD)
    result = await guard.run(ask, PROMPT)
    assert result.attempts == 2
    correction = ask.messages(2)[-1]["content"]
    assert "does not match the required schema" in correction
    assert "- intensity:" in correction
    assert "got 33" in correction
    assert "from 0 to 1" in correction
    assert "notes" not in correction.split("schema:")[1].split("Reply")[0]  # only the broken field
    assert result.errors[0].startswith("attempt 1: schema: intensity:")
    assert guard.stats.validation_failures == 1


async def test_choice_length_and_nested_errors_are_described(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    bad = {"intensity": 0.2, "notes": ["rose", "x" * 30], "longevity": "forever"}
    ask = ScriptedAsk(json.dumps(bad), GOOD)
    await guard.run(ask, PROMPT)
    correction = ask.messages(2)[-1]["content"]
    assert "longevity: Input should be" in correction
    assert 'one of "short", "medium", "long"' in correction
    assert "notes[1]:" in correction
    assert "at most 20 characters" in correction


async def test_missing_field_is_named(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk('{"intensity": 0.2, "notes": ["rose"]}', GOOD)
    await guard.run(ask, PROMPT)
    correction = ask.messages(2)[-1]["content"]
    assert "- longevity: Field required" in correction
    assert "got" not in correction.split("longevity")[1].split("\n")[0]  # no dump of the whole object


async def test_a_non_object_answer_is_a_validation_failure(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk('"just a string"', GOOD)
    await guard.run(ask, PROMPT)
    assert "(the whole answer)" in ask.messages(2)[-1]["content"]
    assert guard.stats.validation_failures == 1


async def test_many_errors_are_bounded(jclock: FakeClock) -> None:
    class Wide(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int
        f: int
        g: int

    guard = JSONGuard("wide", Wide, GuardConfig(jitter=0), clock=jclock)
    ask = ScriptedAsk("{}", '{"a":1,"b":1,"c":1,"d":1,"e":1,"f":1,"g":1}')
    await guard.run(ask, PROMPT)
    correction = ask.messages(2)[-1]["content"]
    assert correction.count("Field required") == 5
    assert "... and 2 more problem(s)" in correction


async def test_a_huge_bad_answer_is_echoed_bounded(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    garbage = "blah " * 5000
    ask = ScriptedAsk(garbage, GOOD)
    await guard.run(ask, PROMPT)
    assistant, user = ask.messages(2)[-2:]
    assert assistant["content"] == garbage[:4000]
    assert len(user["content"]) < 1000


async def test_truncated_answer_is_called_cut_off(jclock: FakeClock) -> None:
    # Repair rescues what it can of a cut-off answer, but here the missing field makes it invalid.
    guard = make_guard(jclock)
    ask = ScriptedAsk('{"intensity": 0.5, "notes": ["rose", "mu', GOOD)
    await guard.run(ask, PROMPT)
    correction = ask.messages(2)[-1]["content"]
    assert "cut off" in correction
    assert "longevity: Field required" in correction


async def test_truncated_answer_without_repair_is_truncated_json(jclock: FakeClock) -> None:
    guard = make_guard(jclock, repair=False)
    ask = ScriptedAsk('{"intensity": 0.5, "notes": ["rose", "mu', GOOD)
    result = await guard.run(ask, PROMPT)
    assert result.errors[0].startswith("attempt 1: truncated JSON:")
    assert "cut off before the JSON was complete" in ask.messages(2)[-1]["content"]


async def test_only_the_latest_failed_exchange_is_sent(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk("first junk", "second junk", GOOD)
    result = await guard.run(ask, PROMPT)
    assert result.attempts == 3
    third = ask.messages(3)
    assert len(third) == len(PROMPT) + 2
    assert third[-2] == {"role": "assistant", "content": "second junk"}


# --- tokens, backoff, deadline ---------------------------------------------------------------------------


async def test_max_tokens_grows_per_re_ask_and_is_capped(jclock: FakeClock) -> None:
    guard = make_guard(jclock, max_retries=4, extra_tokens=100, max_tokens_cap=450)
    ask = ScriptedAsk("a", "b", "c", "d", GOOD)
    result = await guard.run(ask, PROMPT, max_tokens=200)
    assert result.attempts == 5
    assert ask.max_tokens == [200, 300, 400, 450, 450]


async def test_max_tokens_above_the_cap_is_never_reduced(jclock: FakeClock) -> None:
    guard = make_guard(jclock, extra_tokens=100, max_tokens_cap=450)
    ask = ScriptedAsk("a", GOOD)
    await guard.run(ask, PROMPT, max_tokens=2000)
    assert ask.max_tokens == [2000, 2000]


async def test_backoff_schedule_is_exponential_plus_jitter(jclock: FakeClock) -> None:
    guard = make_guard(jclock, backoff_base=1.0, jitter=0.5, jitter_draw=0.5)
    ask = ScriptedAsk("a", "b", "c", GOOD)
    start = jclock.now()
    result = await guard.run(ask, PROMPT)
    assert result.attempts == 4
    assert jclock.sleeps == [1.25, 2.25, 4.25]
    assert jclock.now() == start + 7.75


async def test_backoff_is_capped(jclock: FakeClock) -> None:
    guard = make_guard(jclock, backoff_base=1.0, backoff_max=1.5, jitter=1.0, jitter_draw=0.25)
    ask = ScriptedAsk("a", "b", "c", GOOD)
    await guard.run(ask, PROMPT)
    assert jclock.sleeps == [1.25, 1.75, 1.75]


async def test_stops_re_asking_when_the_wait_would_pass_the_deadline(jclock: FakeClock) -> None:
    guard = make_guard(jclock, backoff_base=1.0)
    ask = ScriptedAsk("a", "b", "c", GOOD)
    with pytest.raises(GuardFailed) as info:
        async with deadline(1.5, clock=jclock):
            await guard.run(ask, PROMPT)
    # Attempt 1 fails at t=0 and waits 1 s (0.5 s left); the 2 s wait after attempt 2 would pass it.
    assert info.value.attempts == 2
    assert len(info.value.errors) == 2
    assert len(ask.calls) == 2
    assert jclock.sleeps == [1.0]
    assert any("deadline" in note for note in info.value.__notes__)
    assert guard.stats.failures == 1
    assert guard.stats.retry_counts == {1: 1}


async def test_a_roomy_deadline_does_not_stop_the_guard(jclock: FakeClock) -> None:
    guard = make_guard(jclock, backoff_base=1.0)
    ask = ScriptedAsk("a", "b", GOOD)
    async with deadline(100.0, clock=jclock):
        result = await guard.run(ask, PROMPT)
    assert result.attempts == 3


async def test_a_zero_wait_is_no_wait(clock: FakeClock) -> None:
    # The gateway re-asks at once; a clock that moves only when told must not hold the re-ask.
    guard = make_guard(clock, backoff_base=0.0, jitter=0.0)
    result = await asyncio.wait_for(guard.run(ScriptedAsk("junk", GOOD), PROMPT), timeout=5)
    assert result.attempts == 2
    assert clock.sleeps == []


# --- errors of ask itself --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ModelError("connection refused", endpoint="http://127.0.0.1:1"),
        ModelUnavailable("generator", retry_after=5.0),
        DeadlineExceeded(2.0),
        RuntimeError("a bug in the client"),
    ],
    ids=["model-error", "unavailable", "deadline", "other"],
)
async def test_ask_errors_propagate_unchanged_without_retry(jclock: FakeClock, error: Exception) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(error, GOOD)
    with pytest.raises(type(error)) as info:
        await guard.run(ask, PROMPT)
    assert info.value is error
    assert not getattr(info.value, "__notes__", None)
    assert len(ask.calls) == 1
    assert jclock.sleeps == []
    assert guard.stats == GuardStats(0, 0, 0, 0, 0, 0, {})


async def test_ask_error_on_a_re_ask_propagates(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    error = ModelError("HTTP 503", status=503)
    ask = ScriptedAsk("junk", error, GOOD)
    with pytest.raises(ModelError) as info:
        await guard.run(ask, PROMPT)
    assert info.value is error
    assert len(ask.calls) == 2
    assert guard.stats.failures == 0  # not a guard failure
    assert guard.stats.retries == 1


async def test_cancellation_during_the_backoff_propagates(clock: FakeClock) -> None:
    guard = make_guard(clock, backoff_base=1.0)
    ask = ScriptedAsk("junk", GOOD)
    task = asyncio.create_task(guard.run(ask, PROMPT))
    for _ in range(5):
        await asyncio.sleep(0)
    assert clock.sleeps == [1.0]  # waiting before the re-ask
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(ask.calls) == 1


# --- giving up --------------------------------------------------------------------------------------------


async def test_gives_up_after_one_plus_max_retries_with_every_error(jclock: FakeClock) -> None:
    guard = make_guard(jclock, max_retries=3)
    ask = ScriptedAsk(
        "a", '{"intensity": 2}', "{'x': 1,}", '{"intensity": 5, "notes": [], "longevity": "x"}', GOOD
    )
    with pytest.raises(GuardFailed) as info:
        await guard.run(ask, PROMPT)
    exc = info.value
    assert exc.name == "brief"
    assert exc.attempts == 4
    assert len(ask.calls) == 4
    assert [e.split(":")[0] for e in exc.errors] == ["attempt 1", "attempt 2", "attempt 3", "attempt 4"]
    assert "not JSON" in exc.errors[0]
    assert "intensity" in exc.errors[1]
    assert "schema" in exc.errors[2]  # repaired into {"x": 1}, which lacks every field
    assert "longevity" in exc.errors[3]
    assert "gave up after 4 attempt(s)" in str(exc)
    assert any("attempts exhausted" in note for note in exc.__notes__)
    assert guard.stats == GuardStats(1, 3, 1, 3, 0, 1, {3: 1})


async def test_max_retries_zero_is_one_attempt_but_still_repairs(jclock: FakeClock) -> None:
    guard = make_guard(jclock, max_retries=0)
    assert (await guard.run(ScriptedAsk(GOOD[:-1]), PROMPT)).repaired is True
    ask = ScriptedAsk("junk", GOOD)
    with pytest.raises(GuardFailed) as info:
        await guard.run(ask, PROMPT)
    assert info.value.attempts == 1
    assert len(ask.calls) == 1


async def test_disabled_guard_makes_one_attempt_without_repair(jclock: FakeClock) -> None:
    guard = make_guard(jclock, enabled=False)
    assert (await guard.run(ScriptedAsk(GOOD), PROMPT)).value == GOOD_VALUE
    ask = ScriptedAsk(GOOD[:-1], GOOD)  # repairable, but repair is off too
    with pytest.raises(GuardFailed) as info:
        await guard.run(ask, PROMPT)
    assert info.value.attempts == 1
    assert len(ask.calls) == 1
    assert jclock.sleeps == []
    assert guard.stats == GuardStats(1, 0, 0, 0, 1, 1, {0: 2})


# --- counters and events ----------------------------------------------------------------------------------


async def test_stats_count_exactly_over_several_runs(jclock: FakeClock) -> None:
    guard = make_guard(jclock, max_retries=2)
    await guard.run(ScriptedAsk(GOOD), PROMPT)  # clean
    await guard.run(ScriptedAsk(GOOD + ","), PROMPT)  # repaired (trailing junk)
    await guard.run(ScriptedAsk("junk", '{"intensity": 9}', GOOD), PROMPT)  # parse, validation, ok
    with pytest.raises(GuardFailed):
        await guard.run(ScriptedAsk("x", "y", "z"), PROMPT)
    assert guard.stats == GuardStats(
        parse_failures=4,
        validation_failures=1,
        repairs=1,
        retries=4,
        successes=3,
        failures=1,
        retry_counts={0: 2, 2: 2},
    )
    assert guard.retry_counts[2] == 2


async def test_events_on_re_ask_and_give_up_only(jclock: FakeClock) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    guard = make_guard(jclock, bus, max_retries=2)
    await guard.run(ScriptedAsk(GOOD), PROMPT)
    await guard.run(ScriptedAsk(GOOD[:-1]), PROMPT)
    assert seen == []  # nothing on the success path, repaired or not
    start = jclock.now()
    with pytest.raises(GuardFailed):
        await guard.run(ScriptedAsk("junk", '{"intensity": 9}', "more junk"), PROMPT)
    assert [type(e) for e in seen] == [GuardRetried, GuardRetried, GuardGaveUp]
    first, second, gave_up = seen
    assert isinstance(first, GuardRetried)
    assert isinstance(second, GuardRetried)
    assert isinstance(gave_up, GuardGaveUp)
    assert (first.source, first.at, first.attempt) == ("brief", start, 2)
    assert first.error.startswith("not JSON")
    assert second.attempt == 3
    assert second.error.startswith("schema: intensity")
    assert (gave_up.source, gave_up.attempts) == ("brief", 3)
    assert gave_up.error.startswith("not JSON")


# --- configuration ----------------------------------------------------------------------------------------


def test_defaults_follow_the_seed() -> None:
    cfg = GuardConfig()
    assert (cfg.enabled, cfg.max_retries, cfg.backoff_base, cfg.jitter) == (True, 3, 1.0, 0.5)
    assert (cfg.fallback_enabled, cfg.strict_schema, cfg.repair) == (True, True, True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_retries", -1),
        ("backoff_base", -0.1),
        ("backoff_max", -1.0),
        ("jitter", -0.5),
        ("extra_tokens", -1),
        ("max_tokens_cap", 0),
        ("max_retry", 3),  # a misspelt key
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig.model_validate({field: value})
    assert field in str(info.value)


def test_model_must_be_a_pydantic_model() -> None:
    with pytest.raises(ConfigError) as info:
        JSONGuard("x", dict)  # type: ignore[type-var]
    assert info.value.key == "model"


async def test_max_tokens_must_be_positive(jclock: FakeClock) -> None:
    guard = make_guard(jclock)
    ask = ScriptedAsk(GOOD)
    with pytest.raises(ConfigError) as info:
        await guard.run(ask, PROMPT, max_tokens=0)
    assert info.value.key == "max_tokens"
    assert ask.calls == []


def test_repr_names_the_guard() -> None:
    assert repr(JSONGuard("brief", Brief)) == "JSONGuard('brief', Brief, max_retries=3)"


async def test_an_answer_too_long_to_repair_is_re_asked(jclock: FakeClock) -> None:
    # Repairable, but longer than MAX_REPAIR_CHARS: json_repair would hold the event loop for it.
    padding = " " * (MAX_REPAIR_CHARS + 1)
    guard = make_guard(jclock)
    ask = ScriptedAsk('{"intensity": 0.5, "notes": ["rose", "musk"], "longevity": "long",' + padding, GOOD)
    result = await guard.run(ask, PROMPT)
    assert (result.attempts, result.repaired) == (2, False)
    assert guard.stats.repairs == 0
    assert guard.stats.parse_failures == 1


# --- one engine, two front ends: the brief pipeline's and the gateway's ------------------------------------


def gateway_check() -> SchemaCheck:
    check = SchemaGuard().for_schema(Brief.model_json_schema())
    assert check is not None
    return check


READ_ALIKE = [
    GOOD,
    "  " + GOOD + "\n",
    GOOD + ",",  # trailing junk
    '```json\n{"intensity": 0.5, "notes": ["rose"], "longevity": "long"}\n```',  # a code fence
    "{'intensity': 0.5, 'notes': ['rose'], 'longevity': 'long'}",  # single quotes
    '{"intensity": 0.5, "notes": ["rose", "mu',  # cut off
    "Sure! Here is a lovely fragrance for you.",
    "",
    "[" * 100_000,  # nested deeper than the JSON reader goes
    "[" * 5_000 + "]" * 5_000,
    '{"intensity": 33, "notes": ["rose"], "longevity": "long"}',
    '{"intensity": 0.2, "notes": []}',
    '"just a string"',
]


@pytest.mark.parametrize("text", READ_ALIKE, ids=range(len(READ_ALIKE)))
def test_both_front_ends_read_an_answer_alike(jclock: FakeClock, text: str) -> None:
    # Without repair (the gateway never repairs), the two front ends take and refuse the same answers,
    # and say the same thing about an answer that is not JSON: the reading is the engine's.
    pipeline = make_guard(jclock, repair=False).check(text)
    gateway = gateway_check().check(text)
    assert type(pipeline) is type(gateway)
    if isinstance(pipeline, Rejection):
        assert isinstance(gateway, Rejection)
        assert (gateway.detail, gateway.parsed, gateway.truncated) == (
            pipeline.detail,
            pipeline.parsed,
            pipeline.truncated,
        )


def test_repair_is_the_engines_and_the_gateway_leaves_it_off(jclock: FakeClock) -> None:
    fenced = "```json\n" + GOOD + "\n```"
    assert make_guard(jclock).check(fenced) == Accepted(GOOD_VALUE, repaired=True)
    # The gateway passes an answer on as the upstream wrote it: what only a repair can read is not JSON.
    unrepaired = make_guard(jclock, repair=False).check(fenced)
    gateway = gateway_check().check(fenced)
    assert isinstance(unrepaired, Rejection)
    assert isinstance(gateway, Rejection)
    assert gateway.detail == unrepaired.detail is not None


class Answer:
    """A whole gateway answer (a chat completion of one choice), as far as the gateway's guard reads it."""

    def __init__(self, content: str) -> None:
        self.body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()


async def test_both_front_ends_build_the_re_ask_alike(jclock: FakeClock) -> None:
    # The original messages, the bad answer cut to the same length, then the correction in the front
    # end's words; the same bad answer gets the same echo from both.
    garbage = "blah " * 5000
    ask = ScriptedAsk(garbage, GOOD)
    await make_guard(jclock).run(ask, PROMPT)
    pipeline = ask.messages(2)

    sent: list[dict[str, Any]] = []

    async def upstream(again: dict[str, Any]) -> Answer:
        sent.append(again)
        return Answer(GOOD)

    body = {"model": "m", "messages": PROMPT}
    assert (await SchemaGuard().run(Brief.model_json_schema(), body, Answer(garbage), upstream))[1] == "fixed"
    gateway = sent[0]["messages"]
    assert gateway[: len(PROMPT)] == pipeline[: len(PROMPT)] == PROMPT
    assert gateway[len(PROMPT)] == pipeline[len(PROMPT)] == {"role": "assistant", "content": garbage[:4000]}
    assert gateway[-1]["role"] == pipeline[-1]["role"] == "user"
    assert len(gateway) == len(pipeline) == len(PROMPT) + 2


# -- answers cut short at a time limit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "closed"),
    [
        ('{"a": 1, "b": "hal', '{"a": 1, "b": "hal"}'),  # inside a string value: ended there
        ('{"a": 1, "b', '{"a": 1}'),  # inside a key: the key goes
        ('{"a": 1, "b":', '{"a": 1}'),
        ('{"a": 1, "b": 2', '{"a": 1}'),  # a number may be longer than it looks: it goes
        ('{"a": 1, "b": 23,', '{"a": 1, "b": 23}'),
        ('{"a": [1, {"x": tru', '{"a": [1, {}]}'),
        ('{"a": "x\\', '{"a": "x"}'),  # half an escape goes
        ('{"a": "x\\u00', '{"a": "x"}'),
        ('{"a": "x\\ud83d', '{"a": "x"}'),  # a high surrogate without its pair goes
        ('{"a": "x\\ud83d\\ude00y', '{"a": "x\\ud83d\\ude00y"}'),
        ("[1, 2", "[1]"),
        ("{", "{}"),
        ('{"a": {}}  and then prose', '{"a": {}}'),  # a whole document: as it was
        ('{\n  "a": [\n    1,\n', '{\n  "a": [\n    1]}'),
    ],
)
def test_a_cut_answer_is_closed_after_its_last_complete_value(cut: str, closed: str) -> None:
    assert close_cut_json(cut) == closed
    json.loads(closed)


@pytest.mark.parametrize("text", ["", "   ", "prose", '"a string"', "12", '{"a" 1', '{"a": 1 2'])
def test_what_is_not_a_cut_object_or_array_is_not_closed(text: str) -> None:
    # Not an object or array, or malformed before anything complete: nothing to keep.
    assert close_cut_json(text) is None


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(
    value=st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=5) | st.lists(_JSON_VALUES, max_size=5),
    indent=st.none() | st.integers(0, 4),
    ascii_only=st.booleans(),
    data=st.data(),
)
def test_every_prefix_of_a_document_closes_to_valid_json(
    value: Any, indent: int | None, ascii_only: bool, data: st.DataObject
) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert close_cut_json(text) == text
    for end in data.draw(st.lists(st.integers(0, len(text)), max_size=20)):
        closed = close_cut_json(text[:end])
        if closed is not None:
            json.loads(closed)  # never anything but JSON
        elif end > 0 and text[:end].strip():
            pytest.fail(f"a prefix starting the document did not close: {text[:end]!r}")


def test_complete_cut_keeps_a_valid_answer_and_counts_nothing() -> None:
    guard = JSONGuard("brief", Brief, events=EventBus())
    before = guard.stats
    # Stopped before a required field was written: nothing valid to keep.
    assert guard.complete_cut('{"intensity": 0.5, "notes": ["rose", "mu') is None
    kept = guard.complete_cut('{"longevity": "long", "intensity": 0.5, "notes": ["rose", "mu')
    assert kept is not None
    closed, value = kept
    assert closed == '{"longevity": "long", "intensity": 0.5, "notes": ["rose", "mu"]}'
    assert value == Brief(intensity=0.5, notes=["rose", "mu"], longevity="long")
    assert guard.complete_cut("not json at all") is None
    assert guard.stats == before  # neither a success nor a failure of the model's
