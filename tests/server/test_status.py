"""What the server shows of itself (brownout.server.status): the live snapshot and the /health views,
read from the running parts of an app on fault-injecting model servers."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES
from brownout.events import EventBus
from brownout.server.runtime import Runtime
from brownout.server.status import ServerStatus, display_time, plain
from support.stack import make_config, serve


class Colour(Enum):
    RED = "red"


def test_plain_turns_enums_into_their_values() -> None:
    assert plain(Colour.RED) == "red"
    assert plain(3) == 3
    assert plain(None) is None


def test_display_time_is_utc_to_the_millisecond() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", display_time())


def test_until_the_service_starts_the_snapshot_says_starting(tmp_path: Path) -> None:
    urls = {role: f"http://127.0.0.1:9/{role}" for role in ROLES}  # never called: nothing starts
    runtime = Runtime(make_config(urls, tmp_path / "briefs.db"), events=EventBus())
    snapshot = runtime.status.snapshot(live_clients=3)
    assert snapshot.pop("at")
    assert snapshot == {"status": "starting", "system_mode": "starting", "models": {}, "breakers": {}}


async def test_a_healthy_server_shows_every_part_healthy(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with serve(fakes, tmp_path) as stack:
        status = stack.runtime.status
        snapshot = status.snapshot(live_clients=2)
        assert snapshot["status"] == "healthy"
        assert snapshot["system_mode"] == "normal"
        assert snapshot["available_modes"] == ["fast", "balanced", "creative"]
        assert set(snapshot["models"]) == set(ROLES)
        for role in ROLES:
            model = snapshot["models"][role]
            assert model["status"] == "healthy"
            assert set(model["breakers"].values()) == {"closed"}
            assert model["last_check"]["healthy"] is True
            assert model["server"] is None  # a configured endpoint, no local model server
            assert [ep["in_flight"] for ep in model["concurrency"]] == [0]
            # Nothing ran late: no latency ceiling holds any limit down.
            assert [(ep["latency_ceiling"], ep["late"]) for ep in model["concurrency"]] == [(None, 0)]
        assert snapshot["queue"] == {
            "size": 0,
            "max_size": stack.runtime.config.queue.max_size,
            "in_flight": 0,
        }
        assert snapshot["cache"]["hit_rate"] is None  # nothing looked up yet
        assert snapshot["spool"]["pending"] == 0
        assert snapshot["database"] == {"status": "healthy"}
        assert snapshot["redis"] == {"status": "not configured"}
        assert snapshot["dimmer"]["level"] == 0
        assert snapshot["gateway"] == {"status": "disabled", "groups": {}}  # no model group configured
        assert snapshot["live_clients"] == 2

        model = status.model("qwen")
        assert model["status"] == "healthy"
        assert model["last_check"]["busy"] is False
        assert status.outbox() == {"status": "not configured"}
        assert status.spool()["lost"] == {"count": 0, "ids": [], "files": []}
        dimmer = status.dimmer()
        assert (dimmer["level"], dimmer["enabled"]) == (0, stack.runtime.config.dimmer.enabled)


async def test_an_open_breaker_shows_in_the_models_and_the_modes_left(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        stack.breaker("mistral").force_open()
        snapshot = stack.runtime.status.snapshot()
        assert snapshot["models"]["mistral"]["status"] == "unhealthy"
        assert set(snapshot["models"]["mistral"]["breakers"].values()) == {"forced_open"}
        assert snapshot["available_modes"] == ["fast"]  # validation needs mistral
        assert snapshot["status"] == "degraded"  # the generator still answers
        stack.breaker("qwen").force_open()
        assert stack.runtime.status.snapshot()["status"] == "unhealthy"  # no generator, nothing cached
        await stack.post("a fresh citrus perfume", "fast")  # a rule-based answer, not cached
        stack.breaker("qwen").reset()
        await stack.brief("a fresh citrus perfume", "fast")  # a model answer: cached
        stack.breaker("qwen").force_open()
        assert stack.runtime.status.snapshot()["status"] == "degraded"  # a cache to answer from


def records(*, ok: bool, pending: int, error: str | None = None) -> Any:
    """The records' parts that the database view reads."""
    store = SimpleNamespace(writable_host="db-1", read_only=False, failovers=1)
    return SimpleNamespace(ok=ok, error=error, spool=SimpleNamespace(pending=pending), store=store)


def database_view(tmp_path: Path, parts: Any) -> dict[str, Any]:
    urls = {role: f"http://127.0.0.1:9/{role}" for role in ROLES}
    runtime = Runtime(make_config(urls, tmp_path / "briefs.db"), events=EventBus())
    view = ServerStatus(
        runtime.config,
        service=runtime.service,
        clients=runtime.clients,
        local=runtime.local,
        records=parts,
        shared=None,
        outbox=None,
        gateway=runtime.gateway,
        modes=runtime.ops.modes,
    )
    return view.database()


def test_the_database_is_unhealthy_while_it_refuses_writes_and_degraded_until_caught_up(
    tmp_path: Path,
) -> None:
    assert database_view(tmp_path, records(ok=True, pending=0)) == {
        "status": "healthy",
        "error": None,
        "spooled_writes": 0,
        "writable_host": "db-1",
        "read_only": False,
        "failovers": 1,
    }
    assert database_view(tmp_path, records(ok=True, pending=4))["status"] == "degraded"
    down = database_view(tmp_path, records(ok=False, pending=4, error="OperationalError: refused"))
    assert (down["status"], down["error"], down["spooled_writes"]) == (
        "unhealthy",
        "OperationalError: refused",
        4,
    )
