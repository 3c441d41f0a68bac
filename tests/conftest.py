"""Shared fixtures for the test suite."""

from __future__ import annotations

import pytest

from brownout.events import EventBus
from brownout.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock that moves only when told to."""
    return FakeClock()


@pytest.fixture
def bus() -> EventBus:
    """A private event bus, so tests can assert what a policy emitted."""
    return EventBus()
