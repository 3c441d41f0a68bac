"""FallbackChain: strategies tried in order, warnings and causes gathered, cancellation respected."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from brownout.errors import AllFallbacksFailed, CircuitOpen, ConfigError, Overloaded
from brownout.events import Event, EventBus, FallbackServed
from brownout.policies.fallback import (
    PRIMARY,
    Decline,
    Degraded,
    FallbackChain,
    FallbackResult,
    Strategy,
)
from brownout.testing import FakeClock


class Recorder:
    """Builds strategies that log their calls and answer, decline or fail as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def answer(self, name: str, value: Any) -> Strategy[Any]:
        async def fn(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return value

        return Strategy(name, fn)

    def fail(self, name: str, error: BaseException) -> Strategy[Any]:
        async def fn(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            raise error

        return Strategy(name, fn)

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def chain_of(
    *strategies: Any, clock: FakeClock | None = None, bus: EventBus | None = None
) -> FallbackChain[Any]:
    return FallbackChain("brief", list(strategies), clock=clock or FakeClock(), events=bus or EventBus())


async def test_first_strategy_serves_and_the_rest_are_not_tried() -> None:
    rec = Recorder()
    chain = chain_of(rec.answer("cache", "A"), rec.answer("rules", "B"))
    result = await chain.run("lavender", tone="warm")
    assert result == FallbackResult("A", "cache", (), ())
    assert not result.degraded
    assert rec.calls == [("cache", ("lavender",), {"tone": "warm"})]


async def test_strategies_are_tried_in_order_with_the_same_arguments() -> None:
    rec = Recorder()
    timeout = TimeoutError("redis timed out")
    chain = chain_of(
        rec.fail("redis", timeout),
        rec.fail("db", ConnectionError("db down")),
        rec.answer("stale", 41),
        rec.answer("default", 0),
    )
    result = await chain.run(7, region="eu")
    assert result.value == 41
    assert result.served_by == "stale"
    assert result.degraded
    assert [name for name, _ in result.causes] == ["redis", "db"]
    assert result.causes[0][1] is timeout
    assert isinstance(result.causes[1][1], ConnectionError)
    assert rec.calls == [(n, (7,), {"region": "eu"}) for n in ("redis", "db", "stale")]


async def test_decline_is_recorded_and_the_next_strategy_tried() -> None:
    rec = Recorder()
    miss = Decline("no similar brief cached")
    chain = chain_of(rec.fail("cache", miss), rec.answer("rules", "R"))
    result = await chain.run()
    assert (result.value, result.served_by) == ("R", "rules")
    assert result.causes == (("cache", miss),)
    assert str(miss) == "no similar brief cached"


async def test_warnings_gather_from_the_strategy_and_the_degraded_value() -> None:
    async def rules() -> Degraded[str]:
        return Degraded("brief", ("low confidence", "no hinter"))

    async def template() -> str:
        return "template brief"

    chain = chain_of(
        Strategy("rules", rules, warning="Generated from fallback due to model failure"),
        Strategy("template", template, warning="template"),
    )
    result = await chain.run()
    assert result.value == "brief"
    assert result.warnings == ("Generated from fallback due to model failure", "low confidence", "no hinter")

    async def declines() -> str:
        raise Decline

    result = await chain_of(
        Strategy("rules", declines, warning="w1"), Strategy("template", template, "w2")
    ).run()
    assert (result.value, result.warnings) == ("template brief", ("w2",))  # only the server's warning

    bare = await chain_of(Strategy("d", rules)).run()
    assert bare.warnings == ("low confidence", "no hinter")


async def test_pairs_are_accepted_as_strategies() -> None:
    async def one() -> int:
        return 1

    chain: FallbackChain[int] = FallbackChain("c", [("one", one)])
    assert chain.strategies == (Strategy("one", one),)
    assert (await chain.run()).served_by == "one"


async def test_all_failing_raises_with_every_cause_and_the_smallest_retry_after() -> None:
    rec = Recorder()
    breaker = CircuitOpen("qwen", "open", retry_after=12.0)
    shed = Overloaded("gpu", "queue_full", retry_after=4.0, queue_size=500, in_flight=10)
    miss = Decline()
    boom = RuntimeError("template missing")
    chain = chain_of(
        rec.fail("model", breaker), rec.fail("gpu", shed), rec.fail("cache", miss), rec.fail("tpl", boom)
    )
    with pytest.raises(AllFallbacksFailed) as info:
        await chain.run()
    err = info.value
    assert err.causes == (("model", breaker), ("gpu", shed), ("cache", miss), ("tpl", boom))
    assert err.retry_after == 4.0
    assert err.name == "brief"
    assert err.__cause__ is boom
    assert rec.names == ["model", "gpu", "cache", "tpl"]


async def test_all_failing_without_rejections_uses_the_default_retry_after() -> None:
    async def boom() -> None:
        raise ValueError("x")

    chain: FallbackChain[None] = FallbackChain("c", [("a", boom)], events=EventBus(), default_retry_after=7.5)
    with pytest.raises(AllFallbacksFailed) as info:
        await chain.run()
    assert info.value.retry_after == 7.5

    with pytest.raises(AllFallbacksFailed) as info:
        await FallbackChain("empty", [], events=EventBus()).run()
    assert info.value.causes == ()
    assert info.value.retry_after == 30.0


async def test_cancellation_propagates_without_trying_other_strategies() -> None:
    rec = Recorder()
    entered = asyncio.Event()

    async def slow_model() -> str:
        rec.calls.append(("model", (), {}))
        entered.set()
        await asyncio.Event().wait()  # until cancelled
        return "never"

    chain = chain_of(Strategy("model", slow_model), rec.answer("cache", "C"))
    task = asyncio.create_task(chain.run())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.names == ["model"]


async def test_a_strategy_raising_cancelled_error_is_not_swallowed() -> None:
    rec = Recorder()
    chain = chain_of(rec.fail("a", asyncio.CancelledError()), rec.answer("b", 1))
    with pytest.raises(asyncio.CancelledError):
        await chain.run()
    assert rec.names == ["a"]

    chain = chain_of(rec.fail("c", KeyboardInterrupt()), rec.answer("d", 1))
    with pytest.raises(KeyboardInterrupt):
        await chain.run()
    assert rec.names == ["a", "c"]


async def test_call_tries_fn_first_and_returns_only_the_value() -> None:
    rec = Recorder()
    chain = chain_of(rec.answer("cache", "cached"))

    async def model(prompt: str) -> str:
        rec.calls.append(("model", (prompt,), {}))
        return f"generated {prompt}"

    async def broken(prompt: str) -> str:
        rec.calls.append(("broken", (prompt,), {}))
        raise ConnectionError("model down")

    async def hedged(prompt: str) -> Degraded[str]:
        return Degraded(prompt, ("unvalidated",))

    assert await chain.call(model, "rose") == "generated rose"
    assert rec.names == ["model"]
    assert await chain.call(broken, "rose") == "cached"
    assert rec.calls[1:] == [("broken", ("rose",), {}), ("cache", ("rose",), {})]
    assert await chain.call(hedged, "oud") == "oud"


async def test_execute_returns_the_full_result() -> None:
    rec = Recorder()
    chain = chain_of(rec.fail("cache", Decline()), rec.answer("rules", "R"))

    async def model() -> str:
        return "M"

    async def broken() -> str:
        raise ConnectionError("down")

    ok = await chain.execute(model)
    assert ok == FallbackResult("M", PRIMARY, (), ())
    assert not ok.degraded

    fell = await chain.execute(broken)
    assert (fell.value, fell.served_by, fell.degraded) == ("R", "rules", True)
    assert [(name, type(e)) for name, e in fell.causes] == [(PRIMARY, ConnectionError), ("cache", Decline)]

    async def hedged() -> Degraded[str]:
        return Degraded("H", ("partial",))

    assert await chain.execute(hedged) == FallbackResult("H", PRIMARY, ("partial",), ())


async def test_call_all_failing_includes_the_primary_cause() -> None:
    rec = Recorder()
    chain = chain_of(rec.fail("cache", Decline()))

    async def broken() -> str:
        raise ConnectionError("down")

    with pytest.raises(AllFallbacksFailed) as info:
        await chain.call(broken)
    assert [name for name, _ in info.value.causes] == [PRIMARY, "cache"]


async def test_decorator_and_wrap_forms() -> None:
    rec = Recorder()
    chain = chain_of(rec.answer("template", "T"))

    @chain
    async def generate(prompt: str, *, fail: bool = False) -> str:
        """Generate a brief."""
        if fail:
            raise RuntimeError("model down")
        return prompt.upper()

    assert await generate("rose") == "ROSE"
    assert await generate("rose", fail=True) == "T"
    assert rec.calls == [("template", ("rose",), {"fail": True})]
    assert generate.__doc__ == "Generate a brief."

    async def other(x: int) -> str:
        raise ValueError(x)

    assert await chain.wrap(other)(3) == "T"


async def test_events_only_when_a_fallback_served() -> None:
    clock = FakeClock(start=50.0)
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    rec = Recorder()
    chain = chain_of(
        rec.fail("redis", TimeoutError()),
        rec.fail("db", Decline()),
        rec.answer("stale", 1),
        clock=clock,
        bus=bus,
    )

    async def primary() -> int:
        return 0

    async def broken() -> int:
        raise TimeoutError

    await chain.call(primary)
    await chain.execute(primary)
    assert seen == []  # the first candidate serving is the quiet success path

    await chain.run()
    assert seen == [FallbackServed(source="brief", at=50.0, strategy="stale", skipped=2)]

    seen.clear()
    clock.advance(5)
    await chain.call(broken)
    assert seen == [FallbackServed(source="brief", at=55.0, strategy="stale", skipped=3)]

    seen.clear()
    await chain_of(rec.answer("first", 1), bus=bus).run()
    assert seen == []


def test_bad_construction_names_the_key() -> None:
    async def ok() -> int:
        return 1

    with pytest.raises(ConfigError) as info:
        FallbackChain("c", [("a", ok), "not a strategy"])  # type: ignore[arg-type]
    assert info.value.key == "strategies[1]"
    with pytest.raises(ConfigError) as info:
        FallbackChain("c", [("a", 42)])  # type: ignore[arg-type]
    assert info.value.key == "strategies[0].fn"
    with pytest.raises(ConfigError) as info:
        FallbackChain("c", [], default_retry_after=-1)
    assert info.value.key == "default_retry_after"


def test_values_are_immutable() -> None:
    result = FallbackResult(1, "a")
    with pytest.raises(AttributeError):
        result.value = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Degraded(1).warnings = ("x",)  # type: ignore[misc]
    assert Decline.__slots__ == ()
