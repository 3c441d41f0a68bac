"""What a drill measures (brownout.chaos.drills.measure), on made-up timelines: /health read into
samples, the richest mode the server could serve, detection and recovery times, lost writes, verdicts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from brownout.chaos.drills.load import Sample
from brownout.chaos.drills.measure import (
    Check,
    HealthSample,
    ScenarioResult,
    WriteAudit,
    best_mode,
    broker_ok,
    database_ok,
    detection_time,
    lost_writes,
    recovery_time,
    redis_ok,
    spooled_keys,
    sqlite_request_ids,
)

ALL_UP = {"qwen": True, "mistral": True, "llama": True}
CLOSED = {"qwen": "closed", "mistral": "closed", "llama": "closed"}


def health(t: float, *, down: tuple[str, ...] = (), breaker: str = "closed", **extra: Any) -> HealthSample:
    available = {r: r not in down for r in ALL_UP}
    breakers = {r: (breaker if r in down else "closed") for r in ALL_UP}
    return HealthSample(t=t, reachable=True, available=available, breakers=breakers, **extra)


def sample(sent: float, done: float, outcome: str, request_id: str | None = None, **extra: Any) -> Sample:
    return Sample(0, sent, done, outcome, 200 if outcome != "failed" else 500, request_id=request_id, **extra)  # type: ignore[arg-type]


def test_a_health_body_is_read_into_a_sample() -> None:
    body = {
        "status": "degraded",
        "system_mode": "degraded",
        "models": {
            "qwen": {
                "status": "unhealthy",
                "breakers": {"a": "closed", "b": "open", "c": "half_open"},
                "last_check": {"healthy": False, "error": "timeout"},
                "server": {"state": "restarting"},
            },
            "mistral": {"status": "healthy", "breakers": {}},
        },
        "database": {"status": "unhealthy"},
        "spool": {"pending": 7},
        "redis": {"status": "fallback"},
        "events": {"pending": 3, "dead_letters": 1},
        "queue_size": 2,
        "in_flight": 4,
    }
    h = HealthSample.parse(12.5, body)
    assert (h.t, h.reachable, h.status, h.system_mode) == (12.5, True, "degraded", "degraded")
    assert h.available == {"qwen": False, "mistral": True}
    assert h.breakers == {"qwen": "open", "mistral": "closed"}  # the worst of the role's endpoints
    assert h.servers == {"qwen": {"state": "restarting"}}
    assert h.probe_errors == {"qwen": "timeout"}
    assert (h.database_ok, h.spool_pending, h.redis_status) == (False, 7, "fallback")
    assert (h.events_pending, h.events_dead, h.queue_size, h.in_flight) == (3, 1, 2, 4)
    assert HealthSample.parse(0.0, {}).database_ok  # nothing said: nothing wrong


def test_the_richest_mode_follows_the_roles_available() -> None:
    assert best_mode(health(0)) == "creative"
    assert best_mode(health(0, down=("llama",))) == "balanced"
    assert best_mode(health(0, down=("mistral",))) == "fast"
    assert best_mode(health(0, down=("qwen",))) == "fallback"
    assert best_mode(health(0, down=("qwen", "mistral", "llama"))) == "emergency"
    assert best_mode(HealthSample(t=0, reachable=False)) == "unreachable"


def test_the_components_of_data_drills() -> None:
    assert database_ok(health(0))
    assert not database_ok(health(0, spool_pending=1))
    assert not database_ok(health(0, database_ok=False))
    assert redis_ok(health(0, redis_status="healthy"))
    assert not redis_ok(health(0, redis_status="fallback"))
    assert broker_ok(health(0, redis_status="healthy"))
    assert not broker_ok(health(0, redis_status="healthy", events_pending=2))


def test_detection_is_the_first_sign_after_the_fault() -> None:
    timeline = [health(9.0, down=("qwen",)), health(10.5), health(11.2, down=("qwen",), breaker="open")]
    # A sign before the fault does not count; the first one after does.
    assert round(detection_time(10.0, timeline, [], ["qwen"]) or 0, 3) == 1.2
    # A degraded answer earlier than the poll is the sign.
    answers = [sample(10.1, 10.4, "full"), sample(10.2, 10.6, "fallback")]
    assert round(detection_time(10.0, timeline, answers, ["qwen"]) or 0, 3) == 0.6
    # A role the fault did not hit does not count; nothing seen is None.
    assert detection_time(10.0, timeline, [], ["llama"]) is None
    # For a data drill, the component not being fine counts.
    data = [health(10.3, spool_pending=5)]
    assert round(detection_time(10.0, data, [], [], component=database_ok) or 0, 3) == 0.3


def test_recovery_needs_the_mode_back_and_a_full_answer_sent_after_the_restore() -> None:
    timeline = [health(20.5, down=("llama",)), health(21.0), health(22.0)]
    answers = [sample(19.0, 21.5, "full"), sample(20.2, 20.9, "downshifted"), sample(21.2, 21.8, "full")]
    # Healthy at 21.0, but the first full answer to a request sent after the restore is at 21.8.
    assert round(recovery_time(20.0, timeline, answers, "creative") or 0, 3) == 1.8
    # Balanced mode does not need the hinter: healthy at 20.5 already.
    assert round(recovery_time(20.0, timeline[:1], answers, "balanced") or 0, 3) == 1.8
    assert recovery_time(20.0, timeline, [sample(19.0, 21.5, "full")], "creative") is None
    half_open = [health(21.0, down=("qwen",), breaker="half_open")]
    assert recovery_time(20.0, half_open, answers, "fast") is None
    spooling = [health(21.0, spool_pending=3), health(23.0)]
    assert round(recovery_time(20.0, spooling, answers, "fast", component=database_ok) or 0, 3) == 3.0


def test_an_acknowledged_write_found_nowhere_is_lost() -> None:
    answers = [
        sample(0, 1, "full", "r1"),
        sample(0, 1, "full", "r2"),
        sample(0, 1, "fallback", "r3"),
        sample(0, 1, "full", "r4", cached=True),  # a cache hit stores nothing
        sample(0, 1, "failed", "r5"),  # a 500 acknowledged nothing
    ]
    audit = lost_writes(answers, rows={"r1"}, spooled={"r2"})
    assert audit == WriteAudit(acknowledged=3, found=1, spooled=1, lost=("r3",))
    assert audit.lost_count == 1


def test_request_ids_are_read_from_the_database_and_the_spool_files(tmp_path: Path) -> None:
    assert sqlite_request_ids(tmp_path / "none.db") == set()
    assert spooled_keys(tmp_path / "none.db") == set()
    db = tmp_path / "briefs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE briefs (request_id TEXT)")
        conn.executemany("INSERT INTO briefs VALUES (?)", [("r1",), ("r2",)])
        conn.execute("CREATE TABLE spool (key TEXT)")
        conn.execute("INSERT INTO spool VALUES ('r3')")
    conn.close()
    assert sqlite_request_ids(db) == {"r1", "r2"}
    assert spooled_keys(db) == {"r3"}
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert sqlite_request_ids(empty) == set()  # no table yet
    assert spooled_keys(empty) == set()


def test_a_result_s_verdict_and_figures() -> None:
    result = ScenarioResult("generator-down", "Generator down", "model", counts={"full": 5, "fallback": 3})
    assert result.passed is None  # no verdict yet
    result.verdict()
    assert result.status == "failed"  # no check at all is not a pass
    result.checks = [Check("no failed requests", True, "0 failed")]
    result.verdict()
    assert result.passed is True
    result.detection_s = 0.12345
    result.writes = WriteAudit(8, 8, 0, ())
    figures = result.figures()
    assert (figures["sent"], figures["full"], figures["fallback"], figures["failed"]) == (8, 5, 3, 0)
    assert figures["detection_s"] == 0.123
    assert (figures["acknowledged_writes"], figures["lost_writes"]) == (8, 0)
    assert figures["checks"] == [{"name": "no failed requests", "passed": True, "detail": "0 failed"}]
    assert "extra" not in figures
    result.checks.append(Check("recovery", False))
    result.verdict()
    assert result.passed is False
