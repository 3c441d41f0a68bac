"""Chaos drills (issue 5): the catalog, the answer classification, and drills run for real.

The default run executes the fast subset (``brownout drill --fast``) once, as a subprocess of the real
command line, against a real stack: the brownout server as a subprocess, fault-injecting model
servers, a private PostgreSQL. The tests then read its JSON report and files. The whole catalog runs
under ``-m slow``, one scenario per test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from brownout.chaos.drills import CATALOG, OUTCOMES, Load, classify, missing, scenario
from brownout.chaos.drills.catalog import REQUIREMENT_NOTES
from brownout.chaos.drills.load import refusal_info
from brownout.chaos.drills.runner import PLAYS, REQUIREMENTS
from brownout.chaos.servers import ensure_installed
from brownout.cli import app
from brownout.server.errors import error_bytes
from support import ROOT

SERVICES_SCRIPT = ROOT / "scripts" / "services"
FAST = [s.name for s in CATALOG if s.fast]

# Issue 5 item 2: every scenario it asks for, by the catalog's name for it.
ISSUE_SCENARIOS = [
    "generator-down",
    "validator-down",
    "hinter-down",
    "all-models-down",
    "model-hang",
    "garbage-json",
    "slow-model",
    "model-server-crash",
    "redis-down",
    "postgres-down",
    "postgres-failover",
    "broker-down",
    "cache-stampede",
    "queue-overflow",
    "loop-blocking",
    "memory-pressure",
]
# Issue 14 (overload is not failure): the yardstick of the overload work.
OVERLOAD_SCENARIOS = ["overload"]

# -------------------------------------------------------------------------------- the catalog


def test_catalog_holds_every_scenario_of_the_issue_in_the_template() -> None:
    names = [s.name for s in CATALOG]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(ISSUE_SCENARIOS + OVERLOAD_SCENARIOS)
    for s in CATALOG:
        for part in (s.event, s.detection, s.response, s.impact, s.verification):
            assert part, s.name
        text = s.to_markdown()
        for section in (
            "#### Event",
            "#### Detection",
            "#### Expected response",
            "#### Impact",
            "#### Verification",
        ):
            assert section in text, (s.name, section)
        assert "| Component | Method | Timeout |" in text
        assert all(r in REQUIREMENTS and r in REQUIREMENT_NOTES for r in s.requires), s.name
        assert set(s.goals.must_see) <= set(OUTCOMES)


def test_a_scenario_that_cannot_run_says_what_it_waits_on() -> None:
    for s in CATALOG:
        waits = missing(s)
        if s.play not in PLAYS:
            assert waits, f"{s.name} has no play and does not say what it waits on"
        for w in waits:
            assert w.split(":")[0] in s.requires or w.startswith("the drill's play"), w


def test_the_fast_subset_covers_a_model_a_data_and_a_load_scenario() -> None:
    kinds = {scenario(name).kind for name in FAST}
    assert kinds == {"model", "data", "load"}


# -------------------------------------------------------------------------------- classification


def _answer(requested: str, served: str, by: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "brief": {"style": "fresh"},
        "requested_mode": requested,
        "served_mode": served,
        "downshifted": served != requested,
        "stages": [{"stage": f"s{i}", "served_by": b, "latency_ms": 1.0} for i, b in enumerate(by)],
        "degraded": served != requested or any(not b.startswith("model:") for b in by),
        "cached": False,
        "request_id": "r1",
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (200, {}, _answer("creative", "creative", ["model:qwen", "model:mistral", "model:llama"]), "full"),
        (200, {}, _answer("creative", "balanced", ["model:qwen", "model:mistral"]), "downshifted"),
        (200, {}, _answer("creative", "creative", ["model:qwen", "model:mistral", "template"]), "fallback"),
        (200, {}, _answer("creative", "fallback", ["rules"]), "fallback"),
        (200, {}, _answer("creative", "emergency", ["popular"]), "fallback"),
        (200, {}, _answer("fast", "fast", ["model:qwen"], degraded=True, reliability="low"), "fallback"),
        (200, {}, _answer("fast", "fast", ["cache"], cached=True, degraded=False), "full"),
        (200, {}, {"detail": "no brief"}, "failed"),
        (503, {"retry-after": "30"}, json.loads(error_bytes(503, "busy", retry_after=30)), "rejected"),
        (429, {"retry-after": "2"}, json.loads(error_bytes(429, "slow down", retry_after=2)), "rejected"),
        (503, {}, json.loads(error_bytes(503, "down")), "failed"),
        (500, {}, None, "failed"),
        (422, {}, json.loads(error_bytes(422, "bad")), "failed"),
    ],
)
def test_classify(status: int, headers: dict[str, str], body: Any, expected: str) -> None:
    requested = body.get("requested_mode", "creative") if isinstance(body, dict) else "creative"
    outcome, _ = classify(status, headers, body, requested)
    assert outcome == expected


def test_refusal_info_reads_the_servers_error_shape() -> None:
    body = json.loads(
        error_bytes(
            503,
            "the queue is full",
            type="rate_limit_error",
            code="overloaded",
            retry_after=2.5,
            queue_size=500,
            suggestion="use mode=fast",
        )
    )
    assert refusal_info(body) == {
        "error": "the queue is full",
        "retry_after": 3,
        "queue_size": 500,
        "suggestion": "use mode=fast",
        "type": "rate_limit_error",
        "code": "overloaded",
    }
    assert refusal_info({"brief": {}}) is None
    assert refusal_info(None) is None


def test_load_goes_to_the_local_machine_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        Load("http://10.1.2.3:8000")


# -------------------------------------------------------------------------------- the command


def test_drill_list_names_every_scenario_and_what_it_waits_on() -> None:
    result = CliRunner().invoke(app, ["drill", "--list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["scenarios"]
    assert [r["name"] for r in rows] == [s.name for s in CATALOG]
    assert all(isinstance(r["waits_on"], list) for r in rows)


def test_drill_refuses_an_unknown_scenario() -> None:
    result = CliRunner().invoke(app, ["drill", "no-such-drill"])
    assert result.exit_code == 2


# -------------------------------------------------------------------------------- the fast subset, for real


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    """``brownout drill --fast --report DIR --json``, run once for this module."""
    ensure_installed(SERVICES_SCRIPT)
    out = tmp_path_factory.mktemp("drill-report")
    proc = subprocess.run(
        [sys.executable, "-m", "brownout", "drill", "--fast", "--report", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout), out


def _figures(run: tuple[int, dict[str, Any], Path], name: str) -> dict[str, Any]:
    (found,) = [s for s in run[1]["scenarios"] if s["name"] == name]
    assert found["status"] in ("passed", "failed"), found.get("error") or found.get("waits_on")
    return found


def _failed_checks(figures: dict[str, Any]) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in figures["checks"] if not c["passed"]]


@pytest.mark.timeout(480)
def test_fast_subset_writes_the_report(fast_run: tuple[int, dict[str, Any], Path]) -> None:
    code, data, out = fast_run
    assert [s["name"] for s in data["scenarios"]] == FAST
    assert code == (0 if all(s["passed"] for s in data["scenarios"]) else 1)
    assert json.loads((out / "report.json").read_text())["scenarios"] == data["scenarios"]
    markdown = (out / "report.md").read_text()
    for name in FAST:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 10_000
        assert f"({name}.png)" in markdown
        assert f"`{name}`" in markdown


@pytest.mark.timeout(480)
def test_generator_down_serves_every_request_and_is_detected_at_once(
    fast_run: tuple[int, dict[str, Any], Path],
) -> None:
    f = _figures(fast_run, "generator-down")
    assert f["sent"] > 30
    assert f["failed"] == 0
    assert f["full"] > 0
    assert f["fallback"] > 0
    assert f["lost_writes"] == 0
    assert f["acknowledged_writes"] == f["sent"]
    assert f["detection_s"] is not None
    assert f["detection_s"] <= f["detection_budget_s"]


@pytest.mark.timeout(480)
def test_generator_down_full_mode_returns_within_the_breaker_wait(
    fast_run: tuple[int, dict[str, Any], Path],
) -> None:
    f = _figures(fast_run, "generator-down")
    assert f["recovery_s"] is not None, _failed_checks(f)
    assert f["recovery_s"] <= f["recovery_budget_s"], _failed_checks(f)


@pytest.mark.timeout(480)
def test_postgres_down_loses_no_acknowledged_write(fast_run: tuple[int, dict[str, Any], Path]) -> None:
    f = _figures(fast_run, "postgres-down")
    assert f["passed"], _failed_checks(f)
    assert f["failed"] == 0
    assert f["extra"]["max_spool_pending"] > 0  # the outage really made writes wait in the spool
    assert f["acknowledged_writes"] == f["rows_found"] == f["sent"] > 30
    assert f["lost_writes"] == 0
    assert f["spooled"] == 0


@pytest.mark.timeout(480)
def test_cache_stampede_computes_once_for_a_thousand_callers(
    fast_run: tuple[int, dict[str, Any], Path],
) -> None:
    f = _figures(fast_run, "cache-stampede")
    assert f["passed"], _failed_checks(f)
    assert f["computations"] == 1
    assert f["sent"] == 1001
    assert f["failed"] == 0
    assert f["extra"]["coalesced"] + f["extra"]["from_cache"] == 1000


# -------------------------------------------------------------------------------- the whole catalog


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [s.name for s in CATALOG if not s.fast and s.name not in OVERLOAD_SCENARIOS])
def test_scenario(name: str) -> None:
    s = scenario(name)
    waits = missing(s)
    if waits:
        pytest.skip("waits on " + "; ".join(waits))
    if {"postgres", "redis"} & set(s.requires):
        ensure_installed(SERVICES_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "brownout", "drill", name, "--json"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    (figures,) = json.loads(proc.stdout)["scenarios"]
    assert figures["status"] == "passed", figures["error"] or _failed_checks(figures)
    assert proc.returncode == 0


# -------------------------------------------------------------------------------- overload (issue 14)


def test_the_overload_drill_judges_issue_14s_goals() -> None:
    s = scenario("overload")
    assert s.kind == "load"
    assert s.requires == ("local-model",)
    assert s.play in PLAYS
    assert s.fault.behaviour["clients"] == 200
    assert s.fault.hold <= 60  # bounded: the load never runs longer than a minute


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(600)
def test_overload_drill_meets_issue_14s_goals() -> None:
    """200 closed-loop clients on the real embedded models: every goal of issue 14 is a check of the drill;
    the test holds the behavioural ones exactly and the two speed figures to regression floors."""
    s = scenario("overload")
    waits = missing(s)
    if waits:
        pytest.skip("waits on " + "; ".join(waits))
    proc = subprocess.run(
        [sys.executable, "-m", "brownout", "drill", "overload", "--json"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    (f,) = json.loads(proc.stdout)["scenarios"]
    assert f["status"] in ("passed", "failed"), f["error"]
    checks = {c["name"]: c for c in f["checks"]}
    for name in (
        "no failed requests",
        "no breaker opened",
        "no recovery action while the models are healthy",
        "the generator kept serving at its rate",
        "accepted answers p95 within 10 s",
        "refusals answered in < 50 ms p95",
        "full mode back within the budget after restore",
    ):
        assert name in checks, sorted(checks)
    assert f["sent"] > 200
    # What the server does under overload is behaviour, and must hold on any machine: no request failed,
    # no breaker opened, no recovery action, accepted answers within their latency target, full mode
    # back within seconds, nothing acknowledged lost.
    failed = _failed_checks(f)
    speed = ("the generator kept serving at its rate", "refusals answered in < 50 ms p95")
    assert [c for c in failed if not c.startswith(speed)] == [], failed
    # How fast the machine is are figures for benchmarks/ (the drill's own verdict and `brownout bench
    # overload` judge the 0.9 ratio and the 50 ms there). Here, floors that only the faults the issue
    # was about can break: a generator starved by its breaker or by recovery (0.13-0.54 of its rate
    # before), refusals that waited seconds in a queue (p95 4.5-5.1 s before).
    extra = f["extra"]
    assert extra["generator_per_min_overload"] >= 0.5 * extra["generator_per_min_one_client"], extra
    assert extra["refused_p95_ms"] is None or extra["refused_p95_ms"] < 1000, extra
    assert extra["refused_first_requests_p95_ms"] is None or extra["refused_first_requests_p95_ms"] < 1000
    assert extra["refused_first_requests"] <= 200
