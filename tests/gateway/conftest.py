"""Fixtures of the gateway tests: fake and scripted upstreams started on demand (tests/support/gateway.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from brownout.chaos.fakellm import FakeLLM
from support.gateway import Handler, Scripted, serving


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[FakeLLM]]]:
    """Start FakeLLM servers on demand; all are stopped after the test."""
    started: list[FakeLLM] = []

    async def make(mode: str = "ok", **kw: Any) -> FakeLLM:
        fake = FakeLLM(mode, **kw)  # type: ignore[arg-type]
        await fake.start()
        started.append(fake)
        return fake

    yield make
    await asyncio.gather(*(fake.stop() for fake in started))


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[Scripted]]]:
    """Start scripted upstreams on demand; all are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(handler: Handler) -> Scripted:
            upstream = Scripted(handler)
            upstream.url = await stack.enter_async_context(serving(upstream))
            return upstream

        yield make
