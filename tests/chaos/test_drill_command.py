"""``brownout drill`` as a command (brownout.chaos.drills.command, .console, and the
``python -m brownout.chaos.drills`` front door): choosing scenarios, listing them, refusing unknown
ones. Running scenarios for real is tests/chaos/test_drills.py's."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from brownout.chaos.drills import CATALOG
from brownout.chaos.drills.command import drill
from brownout.chaos.drills.console import main, select


def names(scenarios: list[object]) -> list[str]:
    return [s.name for s in scenarios]  # type: ignore[attr-defined]


def test_select_keeps_the_catalog_order_and_the_fast_subset() -> None:
    every = [s.name for s in CATALOG]
    assert names(select(["all"])) == every
    assert names(select(["redis-down", "generator-down"])) == [
        n for n in every if n in ("redis-down", "generator-down")
    ]
    fast = [s.name for s in CATALOG if s.fast]
    assert names(select([], fast=True)) == fast
    assert names(select(["all"], fast=True)) == fast
    slow_one = next(s.name for s in CATALOG if not s.fast)
    assert names(select([slow_one], fast=True)) == []  # --fast keeps only quick ones


def test_select_names_an_unknown_scenario_and_the_known_ones() -> None:
    with pytest.raises(
        KeyError, match=r"unknown scenario\(s\) no-such-drill; known: .*generator-down.*, all"
    ):
        select(["generator-down", "no-such-drill"])


def test_main_lists_without_running_anything() -> None:
    out = io.StringIO()
    assert main([], console=Console(file=out, width=200)) == 0
    text = out.getvalue()
    assert all(s.name in text for s in CATALOG)
    assert "Name scenarios to run them" in text
    assert main(["no-such-drill"], console=Console(file=io.StringIO())) == 2


def test_the_command_mounts_on_any_typer_app() -> None:
    app = typer.Typer()
    app.command()(drill)
    result = CliRunner().invoke(app, ["--list", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.output)["scenarios"]] == [s.name for s in CATALOG]
    assert CliRunner().invoke(app, ["no-such-drill"]).exit_code == 2


def test_python_m_runs_the_same_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "brownout.chaos.drills", "--list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)["scenarios"]] == [s.name for s in CATALOG]
