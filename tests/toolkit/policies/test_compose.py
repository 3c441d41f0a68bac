"""compose(): policies stacked outermost first, end to end on a FakeClock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import pytest

from brownout.errors import CircuitOpen, DeadlineExceeded, Overloaded
from brownout.events import Event, EventBus, RetryGaveUp
from brownout.policies.admission import Admission, AdmissionConfig
from brownout.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from brownout.policies.compose import Composition, compose
from brownout.policies.deadline import Deadline, DeadlineConfig, remaining
from brownout.policies.fallback import PRIMARY, FallbackChain, Strategy
from brownout.policies.retry import Retry, RetryConfig
from brownout.testing import FakeClock


class ModelDown(Exception):
    """What the protected model raises in these tests."""


class Recording:
    """A minimal policy: logs entry, errors and exit of each call into a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.seen: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        self.log.append(f"enter {self.name}")
        self.seen.append((fn, args, kwargs))
        try:
            return await fn(*args, **kwargs)
        except BaseException as e:
            self.log.append(f"error {self.name} {type(e).__name__}")
            raise
        finally:
            self.log.append(f"exit {self.name}")


class RecordingBlock(Recording):
    """A recording policy that can also guard an ``async with`` block."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name, log)
        self.exits: list[BaseException | None] = []

    async def __aenter__(self) -> RecordingBlock:
        self.log.append(f"enter {self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exits.append(exc)
        self.log.append(f"exit {self.name}")


class Model:
    """An async callable that fails ``failures`` times, then answers; logs every call's arguments."""

    def __init__(self, failures: int = 0, answer: Any = "brief") -> None:
        self.failures = failures
        self.answer = answer
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if len(self.calls) <= self.failures:
            raise ModelDown(f"attempt {len(self.calls)}")
        return self.answer


def no_jitter(**overrides: Any) -> RetryConfig:
    """A retry config with predictable waits: 1 s, 2 s, 4 s, ..."""
    settings: dict[str, Any] = {"max_attempts": 3, "backoff_base": 1.0, "jitter": "none"}
    settings.update(overrides)
    return RetryConfig(**settings)


@pytest.fixture
def auto() -> FakeClock:
    """A fake clock whose sleeps return at once after moving time (for retry backoff)."""
    return FakeClock(autojump=True)


# ------------------------------------------------------------------------------------- order and args


async def test_policies_are_entered_outermost_first_and_left_in_reverse() -> None:
    log: list[str] = []
    a, b, c = Recording("a", log), Recording("b", log), Recording("c", log)

    async def fn() -> str:
        log.append("fn")
        return "value"

    assert await compose(a, b, c).call(fn) == "value"
    assert log == ["enter a", "enter b", "enter c", "fn", "exit c", "exit b", "exit a"]


async def test_an_error_unwinds_through_every_policy_innermost_first() -> None:
    log: list[str] = []
    a, b = Recording("a", log), Recording("b", log)
    error = ModelDown("down")

    async def fn() -> None:
        raise error

    with pytest.raises(ModelDown) as info:
        await compose(a, b).call(fn)
    assert info.value is error
    assert log == ["enter a", "enter b", "error b ModelDown", "exit b", "error a ModelDown", "exit a"]


async def test_nested_compositions_keep_the_order() -> None:
    log: list[str] = []
    a, b, c = Recording("a", log), Recording("b", log), Recording("c", log)

    async def fn() -> None:
        log.append("fn")

    await compose(compose(a, b), c).call(fn)
    await compose(a, compose(b, c)).call(fn)
    assert log == 2 * ["enter a", "enter b", "enter c", "fn", "exit c", "exit b", "exit a"]


async def test_innermost_policy_gets_the_function_and_its_arguments_untouched() -> None:
    log: list[str] = []
    outer, inner = Recording("outer", log), Recording("inner", log)
    payload = {"prompt": "lavender"}
    marker = object()
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def fn(*args: Any, **kwargs: Any) -> object:
        seen.append((args, kwargs))
        return marker

    # Keyword names that collide with the policies' own parameter names must pass through too.
    result = await compose(outer, inner).call(fn, payload, 2, fn="kw-fn", self="kw-self", name="kw-name")
    assert result is marker
    assert inner.seen == [(fn, (payload, 2), {"fn": "kw-fn", "self": "kw-self", "name": "kw-name"})]
    (args, kwargs), *_ = seen
    assert args[0] is payload
    assert args == (payload, 2)
    assert kwargs == {"fn": "kw-fn", "self": "kw-self", "name": "kw-name"}
    assert payload == {"prompt": "lavender"}


async def test_arguments_pass_through_the_real_policies_untouched(auto: FakeClock, bus: EventBus) -> None:
    model = Model(failures=1)
    payload = ["a", "list"]
    stack = compose(
        Deadline("d", DeadlineConfig(timeout=30), clock=auto, events=bus),
        Admission("a", clock=auto, events=bus),
        CircuitBreaker("b", clock=auto, events=bus),
        Retry("r", no_jitter(), clock=auto, events=bus),
    )
    assert await stack.call(model, payload, 3, fn="kw-fn", self="kw-self", name="kw-name") == "brief"
    # Both attempts got the very same arguments.
    assert len(model.calls) == 2
    for args, kwargs in model.calls:
        assert args[0] is payload
        assert args == (payload, 3)
        assert kwargs == {"fn": "kw-fn", "self": "kw-self", "name": "kw-name"}


# ------------------------------------------------------------------------------------- end to end


async def test_full_stack_success_touches_every_policy_once(clock: FakeClock, bus: EventBus) -> None:
    admission = Admission("a", clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    retry = Retry("r", no_jitter(), clock=clock, events=bus)
    deadlines: list[float | None] = []

    async def fn(prompt: str) -> str:
        deadlines.append(remaining())
        assert admission.in_flight == 1
        return prompt.upper()

    stack = compose(
        Deadline("d", DeadlineConfig(timeout=10), clock=clock, events=bus), admission, breaker, retry
    )
    assert await stack.call(fn, "lavender") == "LAVENDER"
    assert deadlines == [pytest.approx(10.0)]
    assert admission.stats.completed == 1
    assert admission.in_flight == 0
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failures) == (1, 0)
    assert retry.stats.calls == 1
    assert retry.stats.retries == 0


async def test_admission_sheds_before_the_breaker_or_the_model_spend_anything(
    clock: FakeClock, bus: EventBus
) -> None:
    admission = Admission("a", AdmissionConfig(max_concurrent=1, max_queue=0), clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    retry = Retry("r", no_jitter(), clock=clock, events=bus)
    model = Model()
    stack = compose(admission, breaker, retry)
    async with admission:  # the only slot is taken
        with pytest.raises(Overloaded) as info:
            await stack.call(model)
    assert info.value.reason == "queue_full"
    assert model.calls == []
    assert breaker.metrics().calls == 0
    assert retry.stats.calls == 0


# ------------------------------------------------------------------ retry and breaker, both orders


async def test_retry_inside_breaker_gives_the_breaker_one_outcome(auto: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    retry = Retry("r", no_jitter(max_attempts=3), clock=auto, events=bus)
    model = Model(failures=10)
    with pytest.raises(ModelDown):
        await compose(breaker, retry).call(model)
    assert len(model.calls) == 3
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failures) == (1, 1)


async def test_breaker_inside_retry_sees_every_attempt(auto: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    retry = Retry("r", no_jitter(max_attempts=3), clock=auto, events=bus)
    model = Model(failures=10)
    with pytest.raises(ModelDown):
        await compose(retry, breaker).call(model)
    assert len(model.calls) == 3
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failures) == (3, 3)


async def test_recovery_on_the_last_attempt_is_one_success_or_a_mixed_record(
    auto: FakeClock, bus: EventBus
) -> None:
    outside = CircuitBreaker("outside", clock=auto, events=bus)
    inside = CircuitBreaker("inside", clock=auto, events=bus)
    assert await compose(outside, Retry("r1", no_jitter(), clock=auto, events=bus)).call(Model(2)) == "brief"
    assert await compose(Retry("r2", no_jitter(), clock=auto, events=bus), inside).call(Model(2)) == "brief"
    assert (outside.metrics().calls, outside.metrics().failures) == (1, 0)
    assert (inside.metrics().calls, inside.metrics().failures) == (3, 2)


def _quick_breaker(clock: FakeClock, bus: EventBus) -> CircuitBreaker:
    """Opens after 2 failures out of 2, stays open 5 s, closes after 1 good probe."""
    config = BreakerConfig(
        window_size=2, minimum_calls=2, open_wait=5.0, success_threshold=1, half_open_max_calls=1
    )
    return CircuitBreaker("b", config, clock=clock, events=bus)


async def test_retry_outside_an_open_breaker_waits_out_its_retry_after(
    auto: FakeClock, bus: EventBus
) -> None:
    breaker = _quick_breaker(auto, bus)
    retry = Retry("r", no_jitter(max_attempts=5, backoff_base=0.5), clock=auto, events=bus)
    model = Model(failures=2)
    assert await compose(retry, breaker).call(model) == "brief"
    # attempt 1 fails, wait 0.5; attempt 2 fails and opens the breaker for 5 s; wait 1; attempt 3 is
    # refused with retry_after 4, which beats the 2 s backoff; attempt 4 is the probe that succeeds.
    assert auto.sleeps == pytest.approx([0.5, 1.0, 4.0])
    assert len(model.calls) == 3
    assert breaker.state is BreakerState.CLOSED
    assert breaker.metrics().rejected == 1


async def test_retry_gives_up_when_the_breaker_asks_for_too_long_a_wait(
    auto: FakeClock, bus: EventBus
) -> None:
    breaker = _quick_breaker(auto, bus)
    retry = Retry(
        "r", no_jitter(max_attempts=5, backoff_base=0.5, max_retry_after=3.0), clock=auto, events=bus
    )
    model = Model(failures=10)
    with pytest.raises(CircuitOpen) as info:
        await compose(retry, breaker).call(model)
    assert info.value.retry_after == pytest.approx(4.0)
    assert any("retry_after too long" in note for note in info.value.__notes__)
    assert retry.stats.gave_up["retry_after too long"] == 1
    assert len(model.calls) == 2


# ------------------------------------------------------------------------------------- deadline


async def test_deadline_bounds_the_retries(auto: FakeClock, bus: EventBus) -> None:
    events: list[Event] = []
    bus.subscribe(events.append, RetryGaveUp)
    retry = Retry("r", no_jitter(max_attempts=10, backoff_base=4.0), clock=auto, events=bus)
    model = Model(failures=100)
    stack = compose(
        Deadline("d", DeadlineConfig(timeout=10), clock=auto, events=bus),
        CircuitBreaker("b", clock=auto, events=bus),
        retry,
    )
    with pytest.raises(ModelDown) as info:
        await stack.call(model)
    # Waited 4 s after attempt 1; the 8 s wait after attempt 2 would reach past the 10 s deadline.
    assert auto.sleeps == [4.0]
    assert len(model.calls) == 2
    assert str(info.value) == "attempt 2"
    assert any("deadline" in note for note in info.value.__notes__)
    assert retry.stats.gave_up["deadline"] == 1
    assert [(e.reason, e.attempts) for e in events if isinstance(e, RetryGaveUp)] == [("deadline", 2)]


async def test_deadline_cuts_a_hanging_attempt_and_the_breaker_does_not_count_it(
    auto: FakeClock, bus: EventBus
) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    retry = Retry("r", no_jitter(max_attempts=5), clock=auto, events=bus)
    attempts = 0

    async def model() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ModelDown("fast failure")
        await auto.sleep(100)  # hangs far past the deadline
        return "too late"

    stack = compose(Deadline("d", DeadlineConfig(timeout=5), clock=auto, events=bus), breaker, retry)
    with pytest.raises(DeadlineExceeded) as info:
        await stack.call(model)
    assert info.value.timeout == 5
    assert attempts == 2
    # The cancellation went straight through the retry (no third attempt, no give-up) and the breaker.
    assert retry.stats.retries == 1
    assert sum(retry.stats.gave_up.values()) == 0
    assert breaker.metrics().calls == 0
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # the deadline withdrew its own cancellation


# ------------------------------------------------------------------------------------- fallback


def _chain(clock: FakeClock, bus: EventBus, seen: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> Any:
    async def from_cache(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs))
        return "cached brief"

    return FallbackChain("brief", [Strategy("cache", from_cache)], clock=clock, events=bus)


async def test_fallback_chain_outermost_answers_with_the_calls_own_arguments(
    auto: FakeClock, bus: EventBus
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    retry = Retry("r", no_jitter(), clock=auto, events=bus)
    model = Model(failures=100)
    stack = compose(_chain(auto, bus, seen), breaker, retry)
    assert await stack.call(model, "lavender", tone="warm") == "cached brief"
    assert model.calls == 3 * [(("lavender",), {"tone": "warm"})]
    assert seen == [(("lavender",), {"tone": "warm"})]
    assert breaker.metrics().failures == 1


async def test_fallback_chain_outermost_passes_a_good_answer_through(auto: FakeClock, bus: EventBus) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    stack = compose(_chain(auto, bus, seen), CircuitBreaker("b", clock=auto, events=bus))
    assert await stack.call(Model(), "lavender") == "brief"
    assert seen == []


async def test_fallback_chain_alone_in_a_composition(auto: FakeClock, bus: EventBus) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    stack = compose(_chain(auto, bus, seen))
    assert await stack.call(Model(failures=1), "x", k=1) == "cached brief"
    assert seen == [(("x",), {"k": 1})]


async def test_open_breaker_inside_a_chain_serves_the_fallback_without_calling_the_model(
    auto: FakeClock, bus: EventBus
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    breaker.force_open()
    retry = Retry("r", no_jitter(retry_on=(ModelDown,)), clock=auto, events=bus)
    model = Model()
    stack = compose(_chain(auto, bus, seen), breaker, retry)
    assert await stack.call(model, "lavender") == "cached brief"
    assert model.calls == []
    assert retry.stats.calls == 0
    assert seen == [(("lavender",), {})]


async def test_served_by_is_recorded_when_executing_the_chain_over_the_inner_composition(
    auto: FakeClock, bus: EventBus
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    chain = _chain(auto, bus, seen)
    inner = compose(
        CircuitBreaker("b", clock=auto, events=bus), Retry("r", no_jitter(), clock=auto, events=bus)
    )

    failing = await chain.execute(inner.wrap(Model(failures=100)), "lavender", tone="warm")
    assert failing.value == "cached brief"
    assert failing.served_by == "cache"
    assert failing.degraded
    [(name, cause)] = failing.causes
    assert name == PRIMARY
    assert isinstance(cause, ModelDown)
    assert seen == [(("lavender",), {"tone": "warm"})]

    working = await chain.execute(inner.wrap(Model()), "lavender")
    assert (working.value, working.served_by, working.degraded) == ("brief", PRIMARY, False)


def test_fallback_chain_must_be_outermost(clock: FakeClock, bus: EventBus) -> None:
    chain = _chain(clock, bus, [])
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    with pytest.raises(ValueError, match="outermost"):
        compose(breaker, chain)
    with pytest.raises(ValueError, match="'brief'"):
        compose(breaker, Retry("r", clock=clock, events=bus), chain)


async def test_nested_composition_with_a_chain_first_gives_strategies_the_calls_arguments(
    auto: FakeClock, bus: EventBus
) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    protected = compose(_chain(auto, bus, seen), CircuitBreaker("b", clock=auto, events=bus))
    stack = compose(protected, Retry("r", no_jitter(), clock=auto, events=bus))
    assert await stack.call(Model(failures=100), "lavender", tone="warm") == "cached brief"
    assert seen == [(("lavender",), {"tone": "warm"})]
    assert protected.receives_call_arguments


def test_nested_composition_led_by_a_chain_must_be_outermost_too(clock: FakeClock, bus: EventBus) -> None:
    protected = compose(_chain(clock, bus, []), CircuitBreaker("b", clock=clock, events=bus))
    with pytest.raises(ValueError, match="outermost"):
        compose(Retry("r", clock=clock, events=bus), protected)
    assert not compose(CircuitBreaker("b2", clock=clock, events=bus)).receives_call_arguments


# ------------------------------------------------------------------------------------- async with


async def test_async_with_enters_every_policy_for_the_block(clock: FakeClock, bus: EventBus) -> None:
    admission = Admission("a", clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    stack = compose(Deadline("d", DeadlineConfig(timeout=10), clock=clock, events=bus), admission, breaker)
    async with stack as entered:
        assert entered is stack
        assert admission.in_flight == 1
        assert remaining() == pytest.approx(10.0)
    assert admission.in_flight == 0
    assert remaining() is None
    assert (breaker.metrics().calls, breaker.metrics().failures) == (1, 0)


async def test_async_with_exception_propagates_and_every_policy_sees_it(
    clock: FakeClock, bus: EventBus
) -> None:
    log: list[str] = []
    outer, inner = RecordingBlock("outer", log), RecordingBlock("inner", log)
    admission = Admission("a", clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    error = ModelDown("inside the block")

    async def block() -> None:
        async with compose(outer, admission, breaker, inner):
            log.append("block")
            raise error

    with pytest.raises(ModelDown) as info:
        await block()
    assert info.value is error
    assert log == ["enter outer", "enter inner", "block", "exit inner", "exit outer"]
    assert outer.exits == [error]
    assert inner.exits == [error]
    assert (breaker.metrics().calls, breaker.metrics().failures) == (1, 1)
    assert admission.in_flight == 0
    assert admission.stats.completed == 1


async def test_async_with_a_refusing_policy_releases_the_ones_already_entered(
    clock: FakeClock, bus: EventBus
) -> None:
    admission = Admission("a", clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    breaker.force_open()
    ran = False
    with pytest.raises(CircuitOpen):
        async with compose(admission, breaker):
            ran = True
    assert not ran
    assert admission.in_flight == 0


async def test_async_with_deadline_overrun_raises_deadline_exceeded(auto: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    admission = Admission("a", clock=auto, events=bus)
    stack = compose(Deadline("d", DeadlineConfig(timeout=5), clock=auto, events=bus), admission, breaker)
    with pytest.raises(DeadlineExceeded):
        async with stack:
            await auto.sleep(60)
    assert admission.in_flight == 0
    assert breaker.metrics().calls == 0  # a cancelled block says nothing about the dependency


async def test_async_with_same_composition_in_concurrent_tasks_and_nested(
    clock: FakeClock, bus: EventBus
) -> None:
    admission = Admission("a", clock=clock, events=bus)
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    stack = compose(admission, breaker)
    release = asyncio.Event()
    peak: list[int] = []

    async def user(n: int) -> int:
        async with stack:
            peak.append(admission.in_flight)
            await release.wait()
            async with stack:
                peak.append(admission.in_flight)
        return n

    tasks = [asyncio.create_task(user(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert admission.in_flight == 3
    release.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2]
    assert max(peak) >= 4
    assert admission.in_flight == 0
    assert breaker.metrics().calls == 6


async def test_async_with_refuses_a_composition_holding_a_retry(clock: FakeClock, bus: EventBus) -> None:
    admission = Admission("a", clock=clock, events=bus)
    stack = compose(admission, Retry("model-retry", clock=clock, events=bus))
    ran = False
    with pytest.raises(TypeError, match=r"Retry 'model-retry'"):
        async with stack:
            ran = True
    assert not ran
    assert admission.in_flight == 0
    assert admission.stats.admitted == 0  # refused before entering anything


async def test_async_with_refusing_a_retry_records_nothing_on_the_breaker(
    clock: FakeClock, bus: EventBus
) -> None:
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    with pytest.raises(TypeError):
        async with compose(breaker, Retry("r", clock=clock, events=bus)):
            pass
    assert breaker.metrics().calls == 0


# ------------------------------------------------------------------------------------- call forms


async def test_decorator_keeps_the_metadata_and_protects_the_call(auto: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    stack = compose(breaker, Retry("r", no_jitter(), clock=auto, events=bus))
    attempts = 0

    @stack
    async def generate(prompt: str, *, tone: str = "neutral") -> str:
        """Generate a brief."""
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ModelDown("first")
        return f"{prompt}/{tone}"

    assert generate.__name__ == "generate"
    assert generate.__doc__ == "Generate a brief."
    assert generate.__qualname__.endswith("generate")
    assert generate.__wrapped__.__name__ == "generate"  # type: ignore[attr-defined]
    assert await generate("lavender", tone="warm") == "lavender/warm"
    assert attempts == 2
    assert breaker.metrics().calls == 1


async def test_wrap_is_the_decorator(clock: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    stack = compose(breaker)

    async def ask(x: int) -> int:
        """Double it."""
        return 2 * x

    wrapped = stack.wrap(ask)
    assert wrapped.__wrapped__ is ask  # type: ignore[attr-defined]
    assert wrapped.__doc__ == "Double it."
    assert await wrapped(21) == 42
    breaker.force_open()
    with pytest.raises(CircuitOpen):
        await wrapped(1)


async def test_decorated_method_binds_self(auto: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=auto, events=bus)
    stack = compose(
        Deadline("d", DeadlineConfig(timeout=30), clock=auto, events=bus),
        breaker,
        Retry("r", no_jitter(), clock=auto, events=bus),
    )

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name
            self.selves: list[object] = []

        @stack
        async def generate(self, prompt: str) -> str:
            """Ask the model."""
            self.selves.append(self)
            if len(self.selves) == 1:
                raise ModelDown("first")
            return f"{self.name}:{prompt}"

    qwen, llama = Client("qwen"), Client("llama")
    assert await qwen.generate("lavender") == "qwen:lavender"
    assert await llama.generate("vetiver") == "llama:vetiver"
    assert qwen.selves == [qwen, qwen]
    assert llama.selves == [llama, llama]
    assert Client.generate.__name__ == "generate"
    assert Client.generate.__doc__ == "Ask the model."
    assert breaker.metrics().calls == 2


# ------------------------------------------------------------------------------------- construction


def test_empty_compose_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="at least one policy"):
        compose()


def test_a_non_policy_is_a_type_error_naming_its_position(clock: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    with pytest.raises(TypeError, match="policy #1"):
        compose(breaker, object())  # type: ignore[arg-type]

    class NotCallable:
        name = "nc"
        call = "not a method"

    with pytest.raises(TypeError, match="policy #0"):
        compose(NotCallable(), breaker)  # type: ignore[arg-type]


def test_repr_lists_the_policies_outermost_first(clock: FakeClock, bus: EventBus) -> None:
    stack = compose(
        Deadline("d", clock=clock, events=bus),
        Admission("a", clock=clock, events=bus),
        CircuitBreaker("b", clock=clock, events=bus),
        Retry("r", clock=clock, events=bus),
    )
    assert repr(stack) == "compose(Deadline('d') → Admission('a') → CircuitBreaker('b') → Retry('r'))"


def test_compose_builds_a_named_composition(clock: FakeClock, bus: EventBus) -> None:
    breaker = CircuitBreaker("b", clock=clock, events=bus)
    retry = Retry("r", clock=clock, events=bus)
    stack = compose(breaker, retry, name="model")
    assert isinstance(stack, Composition)
    assert stack.name == "model"
    assert stack.policies == (breaker, retry)
    assert compose(breaker).name == "composition"
