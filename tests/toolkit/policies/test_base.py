"""What every policy shares (brownout.policies._base): the config base, the call forms, entered guards."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from brownout.policies._base import CallForms, EnteredGuards, Policy, PolicyConfig


class WindowConfig(PolicyConfig):
    size: int = 10
    wait: float = 1.0


class Counting(CallForms):
    """A policy whose engine only counts and tags what it ran."""

    __slots__ = ("calls", "name")

    def __init__(self) -> None:
        self.name = "counting"
        self.calls: list[tuple[Any, ...]] = []

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        return ("guarded", await fn(*args, **kwargs))


def test_a_config_names_an_unknown_key() -> None:
    with pytest.raises(ValidationError, match="colour"):
        WindowConfig.model_validate({"size": 3, "colour": "blue"})


def test_a_config_is_immutable() -> None:
    config = WindowConfig(size=3)
    with pytest.raises(ValidationError):
        config.size = 4  # type: ignore[misc]
    assert config.model_copy(update={"size": 4}).size == 4
    assert config.size == 3


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "NaN"])
def test_a_config_refuses_infinity_and_nan(value: object) -> None:
    with pytest.raises(ValidationError, match="wait"):
        WindowConfig.model_validate({"wait": value})


async def test_wrap_and_the_decorator_go_through_the_engine() -> None:
    policy = Counting()

    async def double(x: int, *, plus: int = 0) -> int:
        """Twice x."""
        return 2 * x + plus

    wrapped = policy.wrap(double)
    assert await wrapped(3, plus=1) == ("guarded", 7)

    @policy
    async def triple(x: int) -> int:
        return 3 * x

    assert await triple(2) == ("guarded", 6)
    assert policy.calls == [(3,), (2,)]
    # The wrapper keeps the function's identity for logs and tracebacks.
    assert (wrapped.__name__, wrapped.__doc__) == ("double", "Twice x.")
    assert triple.__name__ == "triple"


async def test_the_engine_must_be_written_by_each_policy() -> None:
    async def noop() -> None:
        return None

    with pytest.raises(NotImplementedError):
        await CallForms().call(noop)


def test_a_policy_is_anything_with_a_name_and_a_call_engine() -> None:
    assert isinstance(Counting(), Policy)
    assert not isinstance(object(), Policy)


def test_guards_unwind_innermost_first() -> None:
    guards: EnteredGuards[str] = EnteredGuards("test_guards")
    guards.push("outer")
    guards.push("inner")
    assert guards.pop() == "inner"
    assert guards.pop() == "outer"
    with pytest.raises(RuntimeError, match="without a matching __aenter__"):
        guards.pop()


async def test_guards_belong_to_the_task_that_entered_them() -> None:
    # One policy object is shared by concurrent tasks: each sees only the blocks it entered itself.
    guards: EnteredGuards[str] = EnteredGuards("test_tasks")
    both_in = asyncio.Barrier(2)

    async def block(name: str) -> str:
        guards.push(name)
        await both_in.wait()  # the other task has pushed too
        return guards.pop()

    assert await asyncio.gather(block("a"), block("b")) == ["a", "b"]
    with pytest.raises(RuntimeError):
        guards.pop()  # nothing leaked into the caller's context
