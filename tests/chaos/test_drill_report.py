"""The drill report (brownout.chaos.drills.report) of made-up results: the JSON verdict, the Markdown,
and the files written with a PNG timeline per scenario that ran."""

from __future__ import annotations

import json
from pathlib import Path

from brownout.chaos.drills.load import Sample
from brownout.chaos.drills.measure import Check, HealthSample, ScenarioResult, ServerEvent, WriteAudit
from brownout.chaos.drills.report import report_json, report_markdown, write_report

UP = {"qwen": True, "mistral": True, "llama": True}


def ran(name: str = "generator-down", *, passed: bool = True) -> ScenarioResult:
    """A scenario that ran: a load, health polls through the fault, checks, a verdict."""
    result = ScenarioResult(name, "Generator down", "model", mode="creative", rate=8.0, duration_s=12.0)
    result.counts = {"full": 20, "fallback": 6}
    result.samples = [
        Sample(i, i * 0.5, i * 0.5 + 0.2, "full" if i % 4 else "fallback", 200, request_id=f"r{i}")  # type: ignore[arg-type]
        for i in range(26)
    ]
    result.health = [
        HealthSample(t=1.0, reachable=True, available=UP, breakers=dict.fromkeys(UP, "closed")),
        HealthSample(
            t=4.0,
            reachable=True,
            available={**UP, "qwen": False},
            breakers={"qwen": "open", "mistral": "closed", "llama": "closed"},
            spool_pending=2,
            database_ok=False,
        ),
        HealthSample(t=9.0, reachable=True, available=UP, breakers=dict.fromkeys(UP, "closed")),
    ]
    result.t0 = 3.0  # the load started 3 s into the clock
    result.marks = [(4.0, "fault"), (8.0, "restore")]
    result.events = [
        ServerEvent(4.1, "event", "BreakerStateChanged", "breaker", "qwen", "qwen: closed -> open")
    ]
    result.detection_s, result.detection_budget_s = 0.4, 1.5
    result.recovery_s, result.recovery_budget_s = 1.0, 4.0
    result.writes = WriteAudit(26, 26, 0, ())
    result.checks = [Check("no failed requests", True, "0 failed"), Check("recovery within budget", passed)]
    result.verdict()
    return result


def waiting() -> ScenarioResult:
    return ScenarioResult("overload", "Overload", "load", waits_on=["local-model: no model file"])


def test_the_json_says_whether_every_scenario_that_ran_passed() -> None:
    data = report_json([ran(), waiting()])
    assert data["passed"] is True  # a scenario waiting on a piece of the stack does not fail the report
    assert data["summary"] == {"passed": 1, "failed": 0, "error": 0, "waiting": 1}
    assert [s["name"] for s in data["scenarios"]] == ["generator-down", "overload"]
    assert report_json([ran(passed=False)])["passed"] is False
    assert report_json([waiting()])["passed"] is False  # nothing ran: nothing passed
    broken = ScenarioResult("redis-down", "Redis down", "data", status="error", error="no redis-server")
    assert report_json([ran(), broken])["passed"] is False


def test_the_markdown_has_a_summary_row_and_a_section_per_scenario() -> None:
    text = report_markdown([ran(), waiting()], {"generator-down": "generator-down.png"})
    assert text.startswith("# brownout drill report\n")
    assert "2 scenarios -- 1 passed, 0 failed, 0 errors, 1 waiting." in text
    assert (
        "| [generator-down](#generator-down) | PASSED | 26 | 20 | 0 | 6 | 0 | 0 | 0.40 s | 1.00 s | 0 | - |"
        in (text)
    )
    assert "## Generator down (`generator-down`) -- PASSED" in text
    assert "| writes | 26 acknowledged, 26 in the database, 0 spooled, 0 lost |" in text
    assert "| 1.10 | qwen: closed -> open |" in text  # event times from the start of the load
    assert "- [x] no failed requests -- 0 failed" in text
    assert "![timeline of generator-down](generator-down.png)" in text
    assert "#### Expected response" in text  # the scenario itself, in the template
    assert "Not run: it waits on\n\n- local-model: no model file" in text


def test_the_report_files_are_written_with_a_timeline_per_scenario_that_ran(tmp_path: Path) -> None:
    written = write_report([ran(), waiting()], tmp_path / "report")
    assert set(written) == {"generator-down", "json", "markdown"}
    png = written["generator-down"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    data = json.loads(written["json"].read_text())
    assert [s["name"] for s in data["scenarios"]] == ["generator-down", "overload"]
    assert "charts" not in data
    assert "(generator-down.png)" in written["markdown"].read_text()
