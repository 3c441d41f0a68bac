"""What every policy shares: its config base class and its thin call forms.

Each policy has one engine -- its ``call(fn, *args, **kwargs)`` coroutine method -- and the other
forms are thin layers over it:

* ``await policy.call(fn, *args, **kwargs)``
* ``@policy`` as a decorator of an ``async def`` (same as ``policy.wrap(fn)``)
* ``async with policy:`` for the policies that guard a block (all but retry, which needs a loop:
  ``async for attempt in retry.attempts(): with attempt: ...``)
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

__all__ = ["CallForms", "EnteredGuards", "Policy", "PolicyConfig"]

P = ParamSpec("P")
T = TypeVar("T")


class PolicyConfig(BaseModel):
    """Base of every policy's typed config: immutable, and unknown keys are errors that name the key."""

    # inf and NaN are refused: a wait of "inf" or a NaN threshold is never what a user meant, and
    # would reach places (the shared breaker's Lua scripts, backoff arithmetic) that cannot take it.
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)


@runtime_checkable
class Policy(Protocol):
    """Anything that can run an async callable under its protection."""

    name: str

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` under this policy."""


class CallForms:
    """Mixin giving a policy its decorator and ``wrap`` forms on top of its ``call`` engine."""

    __slots__ = ()

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` under this policy (each policy overrides this)."""
        raise NotImplementedError

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Return ``fn`` protected by this policy; every call goes through :meth:`call`."""
        call = self.call

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = await call(fn, *args, **kwargs)
            return result

        return protected

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Use the policy as a decorator: ``@breaker`` above an ``async def``."""
        return self.wrap(fn)


G = TypeVar("G")


class EnteredGuards(Generic[G]):
    """Remembers, per task context, the guards that ``async with policy:`` blocks entered.

    A policy object is shared by concurrent tasks, so the per-block state of ``async with policy:``
    (a permit, a start time, a deadline scope) cannot live on the object. It lives in a context
    variable instead, as a linked stack so that nested blocks of the same kind unwind in order.
    """

    __slots__ = ("_var",)

    def __init__(self, name: str) -> None:
        self._var: ContextVar[tuple[G, Any] | None] = ContextVar(name, default=None)

    def push(self, guard: G) -> None:
        """Record ``guard`` as the innermost entered block."""
        self._var.set((guard, self._var.get()))

    def pop(self) -> G:
        """Remove and return the innermost entered block's guard."""
        top = self._var.get()
        if top is None:
            raise RuntimeError("__aexit__ without a matching __aenter__")
        self._var.set(top[1])
        return top[0]
