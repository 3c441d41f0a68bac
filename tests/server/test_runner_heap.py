"""The server runner settles the heap once the app has started (brownout.server.runner.settle_heap).

Full garbage collections used to walk everything a started server holds -- some 140,000 objects --
and held every request in flight for 50 to 90 ms, one or two times a second under load. These tests
check the behaviour, not the timing: what was alive at startup is out of the collector's sight, what
was already garbage is gone, and a server made by ``make_server`` does it once it has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.server.app import create_app
from brownout.server.runner import make_server, settle_heap
from support.stack import make_config
from support.wait import until


class _Node:
    """An object the collector tracks, that can be part of a reference cycle."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def _tracked(obj: object) -> bool:
    """Whether the collector's generations hold ``obj`` (frozen objects are in none of them)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Start and end with nothing frozen, so that the test process's objects stay collectable."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_settling_freezes_what_is_alive_and_collects_what_is_not() -> None:
    kept = _Node()
    garbage_a, garbage_b = _Node(), _Node()
    garbage_a.other, garbage_b.other = garbage_b, garbage_a  # a cycle only the collector can free
    gone = weakref.ref(garbage_a)
    del garbage_a, garbage_b
    assert _tracked(kept)

    frozen = settle_heap()

    assert gone() is None, "garbage in cycles is collected before the freeze, not frozen with it"
    assert frozen == gc.get_freeze_count() > 0
    assert not _tracked(kept), "what was alive is out of the collector's generations"
    fresh = _Node()
    assert _tracked(fresh), "what is made afterwards is collected as usual"
    gc.unfreeze()
    assert _tracked(kept)


@pytest.mark.usefixtures("unfrozen")
async def test_a_started_server_has_settled_its_heap(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_config({role: fake.url for role, fake in fakes.items()}, tmp_path / "app.db"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, log_config=None, log_level="warning", access_log=False, lifespan="on")
    # Inside pytest's process: leave its signal handlers alone (uvicorn would install its own).
    monkeypatch.setattr(server, "capture_signals", contextlib.nullcontext)
    assert gc.get_freeze_count() == 0
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), "the server to start")
        assert not task.done(), "the server stopped while starting"
        assert gc.get_freeze_count() > 0
        assert not _tracked(app.state.runtime), "the runtime built at startup is frozen"
    finally:
        server.should_exit = True
        await task
        sock.close()
