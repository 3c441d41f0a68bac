"""The drill scenarios, one module each (brownout.chaos.drills.scenarios and brownout.chaos.drills.spec):
every module is listed, holds its scenario under its own name, and brings its play; the scenario
template as Markdown; the helpers several plays share."""

from __future__ import annotations

import pkgutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from brownout.chaos.drills import scenarios
from brownout.chaos.drills.catalog import CATALOG, scenario
from brownout.chaos.drills.scenarios import (
    MODULES,
    PLAYS,
    _model_fault,
    _shared,
    all_models_down,
    broker_down,
    cache_stampede,
    garbage_json,
    generator_down,
    hinter_down,
    loop_blocking,
    memory_pressure,
    model_hang,
    model_server_crash,
    overload,
    postgres_down,
    postgres_failover,
    queue_overflow,
    redis_down,
    slow_model,
    validator_down,
)
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen

EVERY = (
    all_models_down,
    broker_down,
    cache_stampede,
    garbage_json,
    generator_down,
    hinter_down,
    loop_blocking,
    memory_pressure,
    model_hang,
    model_server_crash,
    overload,
    postgres_down,
    postgres_failover,
    queue_overflow,
    redis_down,
    slow_model,
    validator_down,
)
MODEL_FAULTS = (
    all_models_down,
    garbage_json,
    generator_down,
    hinter_down,
    model_hang,
    slow_model,
    validator_down,
)


def test_every_scenario_module_is_listed_once() -> None:
    files = {m.name for m in pkgutil.iter_modules(scenarios.__path__) if not m.name.startswith("_")}
    assert files == {m.__name__.rsplit(".", 1)[1] for m in EVERY}
    assert sorted(MODULES, key=lambda m: m.__name__) == sorted(EVERY, key=lambda m: m.__name__)
    assert len(set(MODULES)) == len(MODULES)
    assert [s.name for s in CATALOG] == [m.SCENARIO.name for m in MODULES]


@pytest.mark.parametrize("module", EVERY, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_a_scenario_module_holds_its_scenario_under_its_own_name_and_its_play(module: ModuleType) -> None:
    found: Scenario = module.SCENARIO
    assert found.name == module.__name__.rsplit(".", 1)[1].replace("_", "-")
    assert scenario(found.name) is found
    assert PLAYS[found.play] is module.play
    assert found.requires
    assert found.verification
    assert found.detection


def test_the_model_faults_share_one_play() -> None:
    for module in MODEL_FAULTS:
        assert module.play is _model_fault.play, module.__name__
        assert module.SCENARIO.play == "model_fault"
    others = [m for m in EVERY if m not in MODEL_FAULTS]
    assert all(m.play is not _model_fault.play for m in others)


def test_a_scenario_reads_as_the_template() -> None:
    s = Scenario(
        name="disk-full",
        title="Disk full",
        category="Data",
        severity="High",
        kind="data",
        event="The spool's disk fills up.",
        detection=(DetectionRow("Spool", "write error", "immediate"),),
        response=("Writes are refused with 503 + Retry-After.", "Nothing acknowledged is lost."),
        impact=(("Lost writes", "0"),),
        verification=("bounded load", "0 lost writes"),
        play="disk_full",
        seed="002 (the spool)",
    )
    assert s.to_markdown().split("\n") == [
        "### Disk full (`disk-full`)",
        "",
        "**Category**: Data  ",
        "**Severity**: High  ",
        "**Kind**: data  ",
        "**From**: dynamic pricing on Redis and PostgreSQL (the spool)",  # the design, in words
        "",
        "#### Event",
        "The spool's disk fills up.",
        "",
        "#### Detection",
        "| Component | Method | Timeout |",
        "|---|---|---|",
        "| Spool | write error | immediate |",
        "",
        "#### Expected response",
        "1. Writes are refused with 503 + Retry-After.",
        "2. Nothing acknowledged is lost.",
        "",
        "#### Impact",
        "| Metric | Impact |",
        "|---|---|",
        "| Lost writes | 0 |",
        "",
        "#### Verification",
        "- bounded load",
        "- 0 lost writes",
        "",
    ]
    # Without an origin there is no "From" line; the defaults ask for no failure and full recovery.
    plain = Scenario("x", "X", "Load", "Low", "load", "e", (), (), (), (), play="x")
    assert "**From**" not in plain.to_markdown()
    assert (plain.fault, plain.goals) == (Fault(), Goals())
    assert (plain.goals.max_failed, plain.goals.lost_writes, plain.goals.recover) == (0, True, True)


def test_behaviour_and_config_are_read_only_copies() -> None:
    source = {"mode": "error"}
    copy = frozen(source)
    source["mode"] = "ok"
    assert copy["mode"] == "error"
    with pytest.raises(TypeError):
        copy["mode"] = "hang"  # type: ignore[index]


def drill(tmp_path: Path, **parts: Any) -> Any:
    """The parts of a :class:`~brownout.chaos.drills.harness.Drill` the shared helpers read."""
    checks: list[tuple[str, bool, str]] = []
    return SimpleNamespace(
        settings=SimpleNamespace(health_interval=0.5),
        workdir=tmp_path,
        result=SimpleNamespace(extra={}),
        check=lambda name, ok, detail="": checks.append((name, ok, detail)),
        checks=checks,
        **parts,
    )


def test_the_shared_redis_settings_point_the_server_and_its_events_at_it(tmp_path: Path) -> None:
    d = drill(tmp_path)
    assert _shared.redis_config(d, "redis://127.0.0.1:7000/0") == {
        "redis": {"url": "redis://127.0.0.1:7000/0", "health_interval": 0.5},
        "events": {"outbox_path": str(tmp_path / "events.db")},
    }


@pytest.mark.parametrize(("pending", "bit"), [((0, 3, 1), True), ((0, 0), False)])
def test_the_spool_check_says_whether_the_outage_made_writes_wait(
    tmp_path: Path, pending: tuple[int, ...], bit: bool
) -> None:
    d = drill(tmp_path, watcher=SimpleNamespace(samples=[SimpleNamespace(spool_pending=p) for p in pending]))
    _shared.spool_check(d)
    assert d.result.extra["max_spool_pending"] == max(pending)
    assert d.checks == [
        ("writes were spooled while no database took them", bit, f"max pending {max(pending)}")
    ]


def test_stored_request_ids_are_read_back_from_postgresql() -> None:
    asked: list[tuple[str, str]] = []

    def execute(sql: str, database: str) -> list[tuple[object, ...]]:
        asked.append((sql, database))
        return [("r1",), ("r2",)]

    assert _shared.pg_request_ids(SimpleNamespace(execute=execute), "app") == {"r1", "r2"}
    assert asked == [("SELECT request_id FROM briefs", "app")]
