"""The overload bench's accounting and the local model servers' capacity settings.

Everything here runs in the default suite without a model: answer classification, percentiles and
shares, breaker-open and recovery-action counting, a level driven for real against a small HTTP
server on 127.0.0.1 that answers the brief server's shapes, the generator's request body, and the
``models.local`` settings that size each local model server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from typer.testing import CliRunner

from brownout.bench import capacity, overload
from brownout.bench.overload import (
    KINDS,
    Answer,
    BareInTime,
    LevelResult,
    breaker_opens,
    classify_answer,
    held_back,
    new_actions,
    run_level,
    summarize,
)
from brownout.briefs.schema import ModelBrief
from brownout.cli import app
from brownout.config import BrownoutConfig, LocalModelsSection
from brownout.server.errors import error_bytes
from support.net import free_port


def _brief(by: list[str], requested: str = "fast", served: str | None = None, **extra: Any) -> dict[str, Any]:
    served = served or requested
    return {
        "brief": {"style": "fresh"},
        "requested_mode": requested,
        "served_mode": served,
        "downshifted": served != requested,
        "reason": None,
        "stages": [{"stage": f"s{i}", "served_by": b, "latency_ms": 1.0} for i, b in enumerate(by)],
        "degraded": served != requested or any(not b.startswith("model:") for b in by),
        "cached": False,
        **extra,
    }


REFUSAL = json.loads(error_bytes(503, "busy", retry_after=2))


@pytest.mark.parametrize(
    ("status", "headers", "body", "requested", "expected"),
    [
        (200, {}, _brief(["model:qwen"]), "fast", "full"),
        (200, {}, _brief(["model:qwen", "model:mistral", "model:llama"], "creative"), "creative", "full"),
        (200, {}, _brief(["model:qwen", "model:mistral"], "creative", "balanced"), "creative", "downshifted"),
        (
            200,
            {},
            _brief(["model:qwen", "model:mistral"], "creative", "balanced", dimmed=["hints"], reason="load"),
            "creative",
            "dimmed",
        ),
        (200, {}, _brief(["model:qwen"], "balanced", "fast", reason="load"), "balanced", "dimmed"),
        (200, {}, _brief(["model:qwen", "model:mistral", "template"], "creative"), "creative", "degraded"),
        (200, {}, _brief(["reduced_context"]), "fast", "degraded"),
        (200, {}, _brief(["cache"], cached=True, degraded=False), "fast", "cache"),
        (200, {}, _brief(["cache"], "fast", "fallback"), "fast", "cache"),
        (200, {}, _brief(["rules"], "fast", "fallback"), "fast", "rules"),
        (200, {}, _brief(["popular"], "fast", "emergency"), "fast", "rules"),
        (200, {}, _brief(["rules"], "creative", "fallback", dimmed=["everything"]), "creative", "rules"),
        (503, {"retry-after": "2"}, REFUSAL, "fast", "rejected"),
        (429, {"retry-after": "0"}, REFUSAL, "fast", "rejected"),
        (503, {}, REFUSAL, "fast", "failed"),
        (503, {"retry-after": "soon"}, REFUSAL, "fast", "failed"),
        (200, {}, {"detail": "no brief"}, "fast", "failed"),
        (500, {}, None, "fast", "failed"),
        (None, {}, None, "fast", "failed"),
    ],
)
def test_classify_answer(
    status: int | None, headers: dict[str, str], body: Any, requested: str, expected: str
) -> None:
    assert classify_answer(status, headers, body, requested) == expected


def test_summary_counts_shares_rates_and_percentiles() -> None:
    # 10 s: 6 briefs by the generator (4 full, 1 downshifted, 1 dimmed), 2 rule-based, 4 refused, 1 failed.
    kinds = ["full"] * 4 + ["downshifted", "dimmed", "rules", "rules"] + ["rejected"] * 4 + ["failed"]
    briefs_ms = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]
    rejected_ms = [10, 20, 30, 40]
    latencies = [*briefs_ms, *rejected_ms, 90_000]
    answers = [Answer(k, ms / 1000, float(i)) for i, (k, ms) in enumerate(zip(kinds, latencies, strict=True))]  # type: ignore[arg-type]
    # The 40 ms refusal spent 30 ms opening its connection; the 10 ms one was its client's first request.
    answers[11] = Answer("rejected", 0.040, 11.0, connect=0.030)
    answers[8] = Answer("rejected", 0.010, 8.0, first=True)
    answers[5] = Answer("dimmed", 6.0, 5.0, cut=True)  # the dimmed one was stopped at the target
    s = summarize(answers, 10.0, bare_per_min=72.0)
    assert s["answers"] == 13
    assert s["answers_per_s"] == 1.3
    assert s["briefs_per_s"] == 0.8
    assert s["counts"] == {
        "full": 4,
        "downshifted": 1,
        "dimmed": 1,
        "degraded": 0,
        "cache": 0,
        "rules": 2,
        "rejected": 4,
        "failed": 1,
    }
    assert sum(s["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert s["share"]["rejected"] == round(4 / 13, 4)
    # Inclusive linear interpolation over the briefs only (the failure's 90 s is in neither list).
    assert s["accepted"] == {"p50_ms": 4500.0, "p95_ms": 7650.0, "p99_ms": 7930.0}
    assert s["rejections"] == {"p50_ms": 25.0, "p95_ms": 38.5, "p99_ms": 39.7}
    assert s["rejections_after_connect"] == {"p50_ms": 15.0, "p95_ms": 28.5, "p99_ms": 29.7}  # 10, 10, 20, 30
    assert s["rejections_new_connections"] == 0.25
    assert s["rejections_after_first"] == {"p50_ms": 30.0, "p95_ms": 39.0, "p99_ms": 39.8}  # 20, 30, 40
    assert s["generator_briefs"] == 6
    assert s["generator_briefs_per_min"] == 36.0
    assert s["generator_briefs_cut"] == 1
    assert s["generator_whole_briefs_per_min"] == 30.0
    assert s["ratio_to_bare"] == 0.5


def test_the_ratio_in_time_is_to_the_best_configuration_whose_calls_fit_the_timeout() -> None:
    grid = [
        {"name": "2 threads x 2 slots", "valid_per_min": 31.4, "tokens_per_s": 93.4, "p95_s": 5.2},
        {"name": "2 threads x 4 slots", "valid_per_min": 34.3, "tokens_per_s": 112.4, "p95_s": 11.8},
        {"name": "1 thread x 1 slot", "valid_per_min": 19.7, "tokens_per_s": 61.0, "p95_s": 4.3},
        {"name": "broken", "valid_per_min": 0, "tokens_per_s": 0, "p95_s": 0, "error": "no model"},
    ]
    in_time = BareInTime.of(grid, timeout=10.0)
    assert in_time == BareInTime("2 threads x 2 slots", 31.4, 93.4)
    assert BareInTime.of(grid, timeout=4.0) is None
    assert BareInTime.of(None, timeout=10.0) is None
    # 6 generator briefs in 10 s (36/min) against 72/min overall and 31.4/min in time.
    level = LevelResult(16, 10.0, answers=[Answer("full", 1.0, float(i)) for i in range(6)], elapsed=10.0)
    level.tokens = 470
    row = level.figures(72.0, 112.4, in_time)
    assert row["ratio_to_bare"] == 0.5
    assert row["ratio_to_bare_in_time"] == round(36 / 31.4, 3)
    assert row["tokens_ratio_to_bare"] == round(47 / 112.4, 3)
    assert row["tokens_ratio_to_bare_in_time"] == round(47 / 93.4, 3)
    assert level.figures(None)["ratio_to_bare_in_time"] is None


def test_summary_of_nothing() -> None:
    s = summarize([], 5.0)
    assert s["answers"] == 0
    assert s["accepted"] == {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    assert s["ratio_to_bare"] is None
    assert s["rejections_new_connections"] is None
    assert set(s["counts"]) == set(KINDS)


def test_breaker_opens_count_transitions_into_open() -> None:
    snaps = [
        {"qwen": "closed", "mistral": "open"},
        {"qwen": "open", "mistral": "open"},
        {"qwen": "half_open", "mistral": "open"},
        {"qwen": "open", "mistral": "closed"},
        {"qwen": "open", "mistral": "closed"},
    ]
    assert breaker_opens(snaps) == {"qwen": 2, "mistral": 1}
    assert breaker_opens([{"qwen": "closed"}] * 3) == {}


def test_new_actions_are_the_ones_not_in_history_before() -> None:
    old = {"at": 1.0, "action": "clear_cache", "target": "all"}
    restart = {"at": 5.0, "action": "restart_model_server", "target": "qwen"}
    off = {"at": 6.0, "action": "fallback_to_rules", "target": "qwen"}
    assert new_actions([old], [old, restart, off]) == [restart, off]
    assert new_actions([old], [old]) == []


def test_an_action_the_guard_held_back_is_listed_apart_not_counted_as_taken() -> None:
    ran = {"at": 2.0, "action": "check_health", "target": "all", "status": "failed", "detail": "cpu at 97%"}
    kept = {
        "at": 2.1,
        "action": "clear_cache",
        "target": "all",
        "status": "skipped",
        "detail": "load, not failure",
    }
    restart = {"at": 5.0, "action": "restart_model_server", "target": "qwen", "status": "ok", "detail": ""}
    assert held_back([ran, kept, restart]) == (
        ["check_health(all)", "restart_model_server(qwen)"],
        ["clear_cache(all): load, not failure"],
    )
    assert held_back([]) == ([], [])


def test_the_generator_body_is_the_brief_services_request() -> None:
    body = capacity.brief_body("A fresh lemon scent for summer")
    assert body["model"] == "qwen"
    assert body["max_tokens"] == 512
    assert body["temperature"] == 0.7
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == ModelBrief.model_json_schema()
    assert "A fresh lemon scent for summer" in body["messages"][-1]["content"]


def test_the_bare_server_is_asked_the_loads_texts() -> None:
    # The generator's answer grows with its request: a bare rate measured on shorter texts would
    # flatter the bare server and understate the ratio.
    for i in (0, 7, 123, 4_000):
        bare, load = capacity._text(i), overload._text(16, i)
        assert bare.rsplit(" (", 1)[0] == load.rsplit(" (", 1)[0]
        assert abs(len(bare) - len(load)) <= 1


def test_capacity_counter_counts_completions_valid_ones_and_tokens() -> None:
    valid = json.dumps(
        {
            "style": "fresh",
            "intensity": 40,
            "complexity": 30,
            "notes": [{"note": "citrus", "weight": 80}],
            "product_category": "EDT",
            "longevity": "medium",
            "description": "A bright lemon scent.",
        }
    )
    ModelBrief.model_validate_json(valid)  # the fixture itself must be a valid brief
    counter = capacity.Counter()

    def completion(content: str, tokens: int) -> dict[str, Any]:
        return {"choices": [{"message": {"content": content}}], "usage": {"completion_tokens": tokens}}

    counter.record(200, completion(valid, 100), 2.0)
    counter.record(200, completion('{"style": ', 40), 1.0)
    counter.record(503, {"error": {"message": "busy"}}, 0.1)
    assert counter.completions == 2
    assert counter.valid == 1
    assert counter.tokens == 140
    assert counter.errors == 1
    row = capacity.ConfigResult.of("t", 1, 1, 2048, 1, 30.0, counter)
    assert row.completions_per_min == 4.0
    assert row.tokens_per_s == round(140 / 30, 1)


# ------------------------------------------------------------------------------ a level, for real


def _fake_brief_server() -> FastAPI:
    """Answers like a saturated brief server: every 3rd request refused, every 3rd rule-based, and
    every other model answer stopped at the latency target (its description cut short)."""
    app = FastAPI()
    seen = {"n": 0, "status": 0, "model": 0}

    @app.post("/v1/briefs")
    async def briefs(request: Request) -> JSONResponse:
        body = await request.json()
        seen["n"] += 1
        n = seen["n"]
        if n % 3 == 0:
            return JSONResponse(REFUSAL, status_code=503, headers={"Retry-After": "1"})
        await asyncio.sleep(0.01)
        by = ["rules"] if n % 3 == 1 else ["model:qwen"]
        seen["model"] += by == ["model:qwen"]
        if n % 6 == 5:
            return JSONResponse(_brief(by, body["mode"], dimmed=["description_tail"], reason="load"))
        return JSONResponse(_brief(by, body["mode"], "fallback" if by == ["rules"] else None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # Each model answer took 7 completion tokens, on two generator endpoints.
        tokens = 7 * seen["model"]
        return {
            "models": {"qwen": {"endpoints": [{"completion_tokens": tokens - 3}, {"completion_tokens": 3}]}}
        }

    @app.get("/api/v1/recovery/status")
    async def status() -> dict[str, Any]:
        # The breaker is seen open on the 2nd poll and closed again from the 4th on.
        seen["status"] += 1
        state = "open" if seen["status"] in (2, 3) else "closed"
        return {"breakers": {"qwen": state}, "available_modes": ["fast"], "system_mode": "normal"}

    later: list[dict[str, Any]] = []

    @app.get("/api/v1/recovery/actions")
    async def actions() -> dict[str, Any]:
        history = [{"at": 1.0, "action": "clear_cache", "target": "all"}]
        if seen["n"]:
            history.append({"at": 2.0, "action": "restart_model_server", "target": "qwen"})
        return {"history": [*history, *later]}

    @app.post("/test/recovery")
    async def act(entry: dict[str, Any]) -> None:
        """What the test makes the server do meanwhile (between levels)."""
        later.append(entry)

    return app


@pytest.fixture
def fake_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(_fake_brief_server(), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end, "fake brief server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_a_level_classifies_every_answer_and_counts_opens_and_actions(fake_url: str) -> None:
    result = asyncio.run(run_level(fake_url, 4, 1.5, mode="fast", settle=5.0, poll=0.1))
    f = result.figures(bare_per_min=60.0, bare_tokens_per_s=10.0)
    counts = f["counts"]
    # The generator's tokens over the load, from /health before and after it.
    assert result.tokens == 7 * (counts["full"] + counts["dimmed"])
    assert f["generator_tokens_per_s"] == round(result.tokens / result.elapsed, 1)
    assert f["tokens_ratio_to_bare"] == round(result.tokens / result.elapsed / 10.0, 3)
    assert f["answers"] == sum(counts.values()) > 12
    # The fake's cycle: rules, model, refused -- whatever the interleaving, a third of each; half the
    # model's answers cut at the target.
    for kind in ("rules", "rejected"):
        assert abs(counts[kind] - f["answers"] / 3) <= 4, counts
    assert abs(counts["full"] + counts["dimmed"] - f["answers"] / 3) <= 4, counts
    assert abs(counts["full"] - counts["dimmed"]) <= 1, counts
    assert counts["failed"] == 0
    assert f["generator_briefs"] == counts["full"] + counts["dimmed"]
    assert f["generator_briefs_cut"] == counts["dimmed"] > 0
    assert f["breaker_opens"] == 1
    assert f["recovery_actions"] == 1
    assert f["recovery_action_names"] == ["restart_model_server(qwen)"]
    assert f["recovery_actions_held_back"] == []
    assert f["full_mode_back_s"] is not None
    assert f["rejections"]["p50_ms"] is not None
    # One first request per client, sent at the start; a new connection for each of those.
    assert sum(a.first for a in result.answers) == 4
    assert all(a.connect > 0 for a in result.answers if a.first)


def test_the_bench_command_reports_each_level_against_a_given_server(fake_url: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            *("bench", "overload", "--json", "--url", fake_url, "--seconds", "1"),
            *("--level", "2", "--level", "3", "--no-bare", "--settle", "2"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["target"] == fake_url
    assert doc["bare"]["valid_per_min"] is None
    assert [row["concurrency"] for row in doc["levels"]] == [2, 3]
    for row in doc["levels"]:
        assert row["answers"] == sum(row["counts"].values()) > 0
        assert row["ratio_to_bare"] is None
        assert row["tokens_ratio_to_bare"] is None
        assert row["generator_tokens_per_s"] is not None


def test_the_bench_command_refuses_load_elsewhere() -> None:
    result = CliRunner().invoke(app, ["bench", "overload", "--url", "http://10.1.2.3:8000", "--no-bare"])
    assert result.exit_code == 2
    assert "127.0.0.1 only" in result.output


def test_a_level_against_a_server_that_is_down_does_not_spin_on_its_port() -> None:
    # Nothing listens there: each client waits about a second after a refused connection, as after
    # a Retry-After, instead of sending its next request at once (2.3 million in 120 s before).
    result = asyncio.run(run_level(f"http://127.0.0.1:{free_port()}", 2, 2.0, settle=0.0, poll=0.1))
    kinds = {a.kind for a in result.answers}
    assert kinds == {"failed"}
    assert 2 <= len(result.answers) <= 2 * 3


def test_load_goes_to_the_local_machine_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        asyncio.run(run_level("http://10.1.2.3:8000", 1, 1.0))


# ------------------------------------------------------------------------------ models.local sizing


def test_local_server_settings_default_and_per_role() -> None:
    local = LocalModelsSection()
    # One shared server by default: the cores the process may use (up to four) and four slots.
    assert local.shared
    assert {local.server_name(r) for r in ("qwen", "mistral", "llama")} == {"models"}
    assert local.server_settings("qwen", cores=2) == (2, 4, local.ctx * 4)
    assert local.server_settings("llama", cores=1.5) == (1, 4, local.ctx * 4)
    assert local.server_settings("qwen", cores=16)[0] == 4
    assert local.server_settings("qwen") == (1, 4, local.ctx * 4)
    sized = LocalModelsSection.model_validate({"threads": 3, "parallel": 4, "ctx": 1024})
    assert sized.server_settings("mistral", cores=2) == (3, 4, 4096)
    # A server per role: one thread and one slot each unless set.
    apart = LocalModelsSection.model_validate({"layout": "per_role"})
    assert apart.server_name("qwen") == "qwen"
    assert apart.server_settings("qwen", cores=8) == (1, 1, apart.ctx)
    local = LocalModelsSection.model_validate(
        {
            "layout": "per_role",
            "threads": 1,
            "parallel": 1,
            "ctx": 1024,
            "per_role": {"qwen": {"threads": 2, "parallel": 4}},
        }
    )
    assert local.server_settings("qwen") == (2, 4, 4096)
    assert local.server_settings("llama") == (1, 1, 1024)


def test_per_role_settings_with_the_shared_server_are_refused_with_the_way_out() -> None:
    with pytest.raises(ValidationError, match="set layout: per_role"):
        BrownoutConfig.model_validate({"models": {"local": {"per_role": {"qwen": {"threads": 2}}}}})


@pytest.mark.parametrize(
    "local",
    [
        {"parallel": 0},
        {"parallel": 65},
        {"per_role": {"generator": {"parallel": 2}}},
        {"per_role": {"qwen": {"threads": 0}}},
        {"per_role": {"qwen": {"slots": 2}}},
        {"layout": "one"},
        {"threads": 0},
    ],
)
def test_bad_local_server_settings_are_refused(local: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BrownoutConfig.model_validate({"models": {"local": local}})


@pytest.mark.parametrize(
    ("again", "winner"),
    [
        ({(2, 2): (27.0, 81.0, 7.0), (2, 4): (25.0, 84.0, 9.0)}, "2x2"),
        # The runner-up of the short cells is the better one measured over a level's length.
        ({(2, 2): (27.0, 81.0, 7.0), (2, 4): (31.0, 95.0, 9.5)}, "2x4"),
    ],
)
async def test_the_levels_are_divided_by_the_best_finalist_measured_again_as_long_as_a_level(
    fake_url: str,
    monkeypatch: pytest.MonkeyPatch,
    again: dict[tuple[int, int], tuple[float, float, float]],
    winner: str,
) -> None:
    # The grid's best is the highest of short measurements (it flatters the bare server, and its
    # cells do not tell close configurations apart): its two best are measured again, each for as
    # long as a level runs, and the levels are divided by the better of those.
    def result(threads: int, parallel: int, valid: float, tokens: float, p95: float, seconds: float) -> Any:
        name = f"{threads}x{parallel}"
        return capacity.ConfigResult(
            name, threads, parallel, 4096, parallel, seconds, 10, 10, 0, valid, valid, tokens, 4.0, p95
        )

    grid = [
        asdict(result(1, 2, 20.0, 60.0, 7.0, 20.0)),
        asdict(result(2, 2, 30.0, 90.0, 7.0, 20.0)),
        asdict(result(2, 4, 29.0, 92.0, 9.0, 20.0)),
    ]
    measured: list[tuple[int, int, float]] = []

    async def fake_grid(**kwargs: Any) -> dict[str, Any]:
        return {"grid": grid, "best": grid[1]}

    async def fake_measure(threads: int, parallel: int, seconds: float, timeout: float = 120.0) -> Any:
        measured.append((threads, parallel, seconds))
        valid, tokens, p95 = again[(threads, parallel)]
        return result(threads, parallel, valid, tokens, p95, seconds)

    monkeypatch.setattr(capacity, "run_async", fake_grid)
    monkeypatch.setattr(capacity, "measure", fake_measure)
    doc = await overload.run_async(url=fake_url, levels=[2], seconds=1.0, settle=2.0)
    threads, parallel = int(winner[0]), int(winner[2])
    # The grid's two best, best first (not 1 x 2); then the winner again after the level.
    assert measured == [(2, 2, 1.0), (2, 4, 1.0), (threads, parallel, 1.0)]
    valid, tokens, _ = again[(threads, parallel)]
    assert (doc["bare"]["valid_per_min"], doc["bare"]["tokens_per_s"]) == (valid, tokens)
    assert doc["bare"]["best"]["valid_per_min"] == 30.0  # the grid's own best, as it measured it
    assert doc["bare"]["best_measured_again"]["name"] == winner
    assert doc["bare"]["best_measured_again"]["seconds"] == 1.0
    assert [r["name"] for r in doc["bare"]["finalists_measured_again"]] == ["2x2", "2x4"]
    # Both answer in time (p95 within the generator's 10 s): the better of them is in time too.
    assert doc["bare"]["best_in_time"]["name"] == winner
    [level] = doc["levels"]
    # Divided before rounding: the rounded rate divided again may differ in the last digit.
    assert level["ratio_to_bare"] == pytest.approx(level["generator_briefs_per_min"] / valid, abs=1e-3)


async def test_each_level_is_also_divided_by_the_bare_rates_measured_just_before_and_after_it(
    fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same bare server's pace drifts with the machine's: measured again right after each level,
    # each level's adjacent ratio is to the mean of its two neighbours, and a level's "after" is the
    # next one's "before". A measurement that failed leaves the one that ran.
    def result(valid: float, tokens: float, error: str = "") -> Any:
        return capacity.ConfigResult(
            "2x4", 2, 4, 8192, 4, 1.0, 10, 10, 0, valid, valid, tokens, 4.0, 8.0, error=error
        )

    paces = iter([result(40.0, 140.0), result(30.0, 120.0), result(36.0, 130.0), result(0, 0, "it died")])
    calls: list[tuple[int, int, float]] = []

    async def fake_grid(**kwargs: Any) -> dict[str, Any]:
        row = asdict(result(41.0, 141.0))
        return {"grid": [row], "best": row}

    async def fake_measure(threads: int, parallel: int, seconds: float, timeout: float = 120.0) -> Any:
        calls.append((threads, parallel, seconds))
        if len(calls) == 2:
            # While the bare server has the cores after the first level, the idle server acts.
            async with httpx.AsyncClient(base_url=fake_url) as http:
                for entry in (
                    {"at": 3.0, "action": "fallback_to_rules", "target": "all"},
                    {
                        "at": 4.0,
                        "action": "restart_model_server",
                        "target": "qwen",
                        "status": "skipped",
                        "detail": "busy",
                    },
                ):
                    await http.post("/test/recovery", json=entry)
        return next(paces)

    monkeypatch.setattr(capacity, "run_async", fake_grid)
    monkeypatch.setattr(capacity, "measure", fake_measure)
    doc = await overload.run_async(url=fake_url, levels=[2, 3, 4], seconds=1.0, settle=2.0)
    assert calls == [(2, 4, 1.0)] * 4  # the finalist, then once after each level
    first, second, third = doc["levels"]
    assert first["bare_adjacent"]["before"] == {"valid_per_min": 40.0, "tokens_per_s": 140.0}
    assert first["bare_adjacent"]["after"] == second["bare_adjacent"]["before"]
    assert (first["bare_adjacent"]["valid_per_min"], first["bare_adjacent"]["tokens_per_s"]) == (35.0, 130.0)
    assert (second["bare_adjacent"]["valid_per_min"], second["bare_adjacent"]["tokens_per_s"]) == (
        33.0,
        125.0,
    )
    assert third["bare_adjacent"]["after"] is None
    assert third["bare_adjacent"]["valid_per_min"] == 36.0
    # What the idle server did while the bare one measured, beside the level before it.
    assert first["while_bare_measured"] == {
        "recovery_action_names": ["fallback_to_rules(all)"],
        "recovery_actions_held_back": ["restart_model_server(qwen): busy"],
        "system_mode": "normal",
    }
    assert second["while_bare_measured"]["recovery_action_names"] == []
    for row in doc["levels"]:
        per_min = row["generator_briefs_per_min"]
        assert row["ratio_to_bare_adjacent"] == pytest.approx(
            per_min / row["bare_adjacent"]["valid_per_min"], abs=1e-3
        )
        assert row["ratio_to_bare"] == pytest.approx(per_min / 40.0, abs=1e-3)  # to the finalist, as before


async def test_a_given_bare_rate_measures_nothing_around_the_levels(
    fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_measure(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing is measured when the bare rate is given")

    monkeypatch.setattr(capacity, "measure", no_measure)
    doc = await overload.run_async(url=fake_url, levels=[2], seconds=1.0, settle=2.0, bare_rate=30.0)
    [level] = doc["levels"]
    assert "bare_adjacent" not in level
    assert level["ratio_to_bare"] == pytest.approx(level["generator_briefs_per_min"] / 30.0, abs=1e-3)
