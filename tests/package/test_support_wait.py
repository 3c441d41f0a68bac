"""The test suite's own waiting helper: a hung check fails the wait, it does not hang the test."""

from __future__ import annotations

import asyncio

import pytest

from support.wait import until


async def test_an_async_check_that_never_returns_fails_naming_what_was_awaited() -> None:
    async def hung() -> bool:
        await asyncio.Event().wait()
        return True

    with pytest.raises(AssertionError, match=r"waiting for the answer \(the check itself never returned\)"):
        await until(hung, "the answer", timeout=0.05)


async def test_an_async_check_that_comes_true_ends_the_wait() -> None:
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    await until(third_time, "the third call", timeout=5.0, interval=0)
    assert calls == 3
