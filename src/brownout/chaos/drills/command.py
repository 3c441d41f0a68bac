"""The ``brownout drill`` command: its arguments and options, as ``brownout`` and ``python -m
brownout.chaos.drills`` both mount it.

It lives with the drills so that the drills never import the application's command line; it imports
only typer, and the drills themselves (:mod:`.console`) when it runs, so ``brownout``'s other commands
do not load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["drill"]


def drill(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Scenarios to run (see --list), all, or gateway.", show_default=False),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the scenarios and what each still waits on.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="Write report.md, report.json and a PNG timeline per scenario here.")
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Only the quick subset (the default test run's).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.")
    ] = False,
) -> None:
    """Chaos drills: break the real stack on purpose (models, PostgreSQL, load) and judge the response.

    Each scenario starts a brownout server, fault-injecting model servers and what else it needs on
    127.0.0.1, drives bounded load, injects the fault, restores, and measures. Exit 1 if one fails.
    `brownout drill gateway` runs the gateway's 16 provider-fault scenarios and prints their
    scorecard (exit 1 unless all pass); `gateway-NAME` runs one.
    """
    from brownout.chaos.drills.console import main as drill_main

    raise typer.Exit(drill_main(names or [], list_only=list_only, report=report, as_json=as_json, fast=fast))
