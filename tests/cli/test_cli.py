"""The ``brownout`` command line: version, serve's config errors, and the side-by-side benchmarks.

The benchmarks run for real against the peer libraries of the ``bench`` extra, on small sizes so each
test takes well under a second. Only behaviour is asserted (rows present, counts), never a timing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import brownout
from brownout.cli import app

BREAKER_LIBRARIES = ["brownout", "pybreaker", "aiobreaker", "purgatory", "circuitbreaker"]
RETRY_LIBRARIES = ["brownout", "tenacity", "stamina"]
CACHE_LIBRARIES = ["brownout", "cashews", "aiocache", "cachetools"]

# A wide terminal, so rich neither wraps library names in tables nor error messages in their boxes.
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=WIDE)


def _json(output: str) -> dict[str, Any]:
    data = json.loads(output)
    assert isinstance(data, dict)
    return data


def test_version_prints_the_package_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == brownout.__version__


def test_serve_with_an_invalid_config_names_the_key_and_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("circuit_breaker:\n  failure_threshold: 1.5\n")
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "circuit_breaker.failure_threshold" in result.stderr


def test_serve_with_a_missing_config_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "bench" in result.output
    assert "version" in result.output


def test_bench_policies_json_has_a_row_for_every_peer(runner: CliRunner) -> None:
    args = ["bench", "policies", "--json", "--calls", "200", "--rounds", "1", "--case", "breaker"]
    result = runner.invoke(app, [*args, "--case", "retry"])
    assert result.exit_code == 0, result.output
    data = _json(result.stdout)
    rows = data["rows"]
    assert [(r["case"], r["library"]) for r in rows] == [("breaker", lib) for lib in BREAKER_LIBRARIES] + [
        ("retry", lib) for lib in RETRY_LIBRARIES
    ]
    for row in rows:
        assert row["error"] == "", row
        assert isinstance(row["added_ns"], int | float), row
        assert not isinstance(row["added_ns"], bool)
        assert row["added_ns"] >= 0
        assert row["note"]
    assert isinstance(data["goals"], dict)
    # With brownout's and pybreaker's breaker rows both present, their ratio is reported.
    assert "breaker_vs_pybreaker_ratio" in data["goals"]
    assert isinstance(data["goals"]["breaker_at_most_quarter_of_pybreaker"], bool)
    assert (data["calls"], data["rounds"]) == (200, 1)


def test_bench_policies_composition_case_reports_its_goal(runner: CliRunner) -> None:
    args = ["bench", "policies", "--json", "--calls", "100", "--rounds", "1"]
    result = runner.invoke(app, [*args, "--case", "breaker", "--case", "composition"])
    assert result.exit_code == 0, result.output
    data = _json(result.stdout)
    assert ("composition", "brownout") in [(r["case"], r["library"]) for r in data["rows"]]
    assert all(r["error"] == "" for r in data["rows"])
    assert isinstance(data["goals"]["composition_below_fastest_peer_breaker"], bool)


def test_bench_stampede_json_counts_computations(runner: CliRunner) -> None:
    result = runner.invoke(app, ["bench", "stampede", "--json", "--callers", "200", "--compute-ms", "5"])
    assert result.exit_code == 0, result.output
    data = _json(result.stdout)
    rows = {r["library"]: r for r in data["rows"]}
    assert list(rows) == CACHE_LIBRARIES
    for row in rows.values():
        assert row["error"] == "", row
    assert rows["brownout"]["computations"] == 1
    assert rows["cashews"]["computations"] == 1  # its lock=True is a real stampede guard
    # No stampede protection: every caller that missed computed.
    assert rows["aiocache"]["computations"] > 1
    assert rows["cachetools"]["computations"] > 1
    assert data["goals"]["one_computation"] is True
    assert data["callers"] == 200


def test_bench_stampede_one_library(runner: CliRunner) -> None:
    args = ["bench", "stampede", "--json", "--callers", "50", "--compute-ms", "1", "--library", "brownout"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _json(result.stdout)["rows"]
    assert [(r["library"], r["computations"]) for r in rows] == [("brownout", 1)]


def test_unknown_case_is_a_usage_error_naming_it(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["bench", "policies", "--calls", "100", "--case", "breaker", "--case", "nope"]
    )
    assert result.exit_code == 2
    assert "'nope'" in result.output
    assert "--case" in result.output
    assert result.stdout == ""  # nothing was measured or printed


def test_unknown_library_is_a_usage_error_naming_it(runner: CliRunner) -> None:
    result = runner.invoke(app, ["bench", "stampede", "--callers", "10", "--library", "memcached"])
    assert result.exit_code == 2
    assert "'memcached'" in result.output
    assert "--library" in result.output


def test_too_few_calls_is_rejected(runner: CliRunner) -> None:
    result = runner.invoke(app, ["bench", "policies", "--calls", "5"])
    assert result.exit_code == 2
    assert "--calls" in result.output


def test_bench_policies_table_names_the_libraries(runner: CliRunner) -> None:
    args = ["bench", "policies", "--calls", "100", "--rounds", "1", "--case", "breaker", "--case", "retry"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for library in BREAKER_LIBRARIES + RETRY_LIBRARIES:
        assert library in result.stdout
    assert "added ns" in result.stdout
    assert "breaker_vs_pybreaker_ratio" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_bench_stampede_table_names_the_libraries(runner: CliRunner) -> None:
    result = runner.invoke(app, ["bench", "stampede", "--callers", "20", "--compute-ms", "1"])
    assert result.exit_code == 0, result.output
    for library in CACHE_LIBRARIES:
        assert library in result.stdout
    assert "computations" in result.stdout
    assert "one_computation" in result.stdout
