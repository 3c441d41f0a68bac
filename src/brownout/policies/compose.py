"""Stacking policies around one call: :func:`compose`.

The one documented way to combine policies::

    protected = compose(
        Deadline("model", DeadlineConfig(timeout=10)),   # outermost: bounds everything inside
        Admission("model"),                              # shed load before spending anything
        CircuitBreaker("model"),                         # fail fast while the model is down
        Retry("model"),                                  # innermost: retry each failed attempt
    )
    answer = await protected.call(ask_model, prompt)     # or @protected, protected.wrap(fn)

Policies are listed outermost first; each sees what the ones inside it do as a single call. Common
orders and what they mean:

* ``Deadline → Breaker → Retry``: the breaker records one outcome per call, after the retries; retries
  never sleep past the deadline.
* ``Deadline → Retry → Breaker``: every attempt is recorded by the breaker, and once it opens the
  retry honours the breaker's ``retry_after`` (or gives up if it is too long). Use this when the
  breaker should see the raw failure rate.
* A :class:`~brownout.policies.fallback.FallbackChain` goes first, so that its strategies answer when
  everything inside it has failed or refused; its strategies receive the call's own arguments.

The composition is also an async context manager (``async with protected:``) when every policy in it
can guard a block -- that is, when it holds no :class:`~brownout.policies.retry.Retry`, which must
re-run the block and so needs ``async for attempt in retry.attempts()``.

Cost: ``call`` chains the policies' own ``call`` engines directly (the outer one receives the inner
ones' bound methods as leading arguments), so a composition adds no wrapper frames or allocations of
its own beyond the policies themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from brownout.policies._base import CallForms, EnteredGuards, Policy

__all__ = ["Composition", "compose"]

P = ParamSpec("P")
T = TypeVar("T")


class Composition(CallForms):
    """Policies stacked outermost-first around a call; build it with :func:`compose`."""

    __slots__ = ("_calls", "_first", "_outermost_takes_args", "name", "policies", "receives_call_arguments")

    def __init__(self, *policies: Policy, name: str = "composition") -> None:
        if not policies:
            raise ValueError("compose() needs at least one policy")
        for i, policy in enumerate(policies):
            if not callable(getattr(policy, "call", None)):
                raise TypeError(f"policy #{i} ({policy!r}) has no call(fn, *args) method")
            if getattr(policy, "receives_call_arguments", False) and i != 0:
                raise ValueError(
                    f"{type(policy).__name__} {getattr(policy, 'name', '')!r} must be the outermost policy "
                    "(first in compose()): its strategies take the call's own arguments"
                )
        self.name = name
        self.policies: tuple[Policy, ...] = policies
        self._outermost_takes_args = bool(getattr(policies[0], "receives_call_arguments", False))
        # A composition led by a fallback chain is itself one: nested, it must go first too.
        self.receives_call_arguments = self._outermost_takes_args
        self._first = policies[0].call
        self._calls: tuple[Callable[..., Awaitable[Any]], ...] = tuple(p.call for p in policies[1:])

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` through every policy, outermost first."""
        if self._outermost_takes_args:
            # A fallback chain calls its primary with the call's own arguments, so the inner chain is
            # bound to ``fn`` first (one partial per call, only in this case).
            inner: Callable[..., Awaitable[Any]] = fn
            if self._calls:
                inner = functools.partial(self._calls[0], *self._calls[1:], fn)
            return await self._first(inner, *args, **kwargs)
        return await self._first(*self._calls, fn, *args, **kwargs)

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Return ``fn`` protected by the whole stack (the decorator form).

        The chain of inner ``call`` methods (and, under a fallback chain, the bound inner call) is
        built once here, so a decorated call enters the outermost policy directly.
        """
        first = self._first
        if self._outermost_takes_args:
            inner: Callable[..., Awaitable[Any]] = fn
            if self._calls:
                inner = functools.partial(self._calls[0], *self._calls[1:], fn)
            lead: tuple[Callable[..., Awaitable[Any]], ...] = (inner,)
        else:
            lead = (*self._calls, fn)

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = await first(*lead, *args, **kwargs)
            return result

        return protected

    async def __aenter__(self) -> Composition:
        # Check them all before entering any: a breaker entered and then unwound by this TypeError
        # would record a failure of a dependency that was never called.
        for policy in self.policies:
            if not hasattr(policy, "__aenter__"):
                raise TypeError(
                    f"{type(policy).__name__} {policy.name!r} cannot guard an 'async with' block; "
                    "use the composition's call(), decorator or wrap() form"
                )
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            for policy in self.policies:
                await stack.enter_async_context(policy)  # type: ignore[arg-type]
        except BaseException as e:
            await stack.__aexit__(type(e), e, e.__traceback__)
            raise
        _entered.push(stack)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await _entered.pop().__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        inner = " → ".join(f"{type(p).__name__}({getattr(p, 'name', '')!r})" for p in self.policies)
        return f"compose({inner})"


_entered: EnteredGuards[AsyncExitStack] = EnteredGuards("brownout_composition_entered")


def compose(*policies: Policy, name: str = "composition") -> Composition:
    """Stack ``policies`` (outermost first) into one policy: call, decorator, wrap, ``async with``."""
    return Composition(*policies, name=name)
