"""``brownout drill``: the terminal side of the drills -- the list, live progress (rich), the summary.

``brownout drill --list`` shows the catalog and what each scenario waits on; ``brownout drill NAME ...``
(or ``all``, or ``--fast`` for the default test run's subset) runs scenarios one after another with a
live table on stderr, then prints the verdicts (or, with ``--json``, the JSON report on stdout) and,
with ``--report DIR``, writes the Markdown, PNG and JSON report there. Exit status: 0 when every
scenario that ran passed, 1 when one failed or errored, 2 for an unknown scenario name.

The gateway's provider-fault scenarios are a family of their own (:mod:`brownout.chaos.failover`):
``brownout drill gateway`` runs all 16 against one ``brownout serve`` and prints their scorecard,
``gateway-<name>`` picks one; ``all`` and ``--fast`` stay the brief pipeline's drills, and one run
takes one family. ``--list`` shows both.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from brownout.chaos.drills.catalog import CATALOG, OUTCOMES, Scenario
from brownout.chaos.drills.load import Sample
from brownout.chaos.drills.measure import HealthSample, ScenarioResult, best_mode
from brownout.chaos.drills.report import report_json, write_report
from brownout.chaos.drills.runner import DrillProgress, missing, run_drills

__all__ = ["RichProgress", "main", "select"]

_STATUS_STYLE = {"passed": "green", "failed": "red", "error": "red", "waiting": "yellow", "running": "cyan"}
_OUTCOME_STYLE = {
    "full": "green",
    "downshifted": "yellow",
    "fallback": "dark_orange",
    "rejected": "magenta",
    "failed": "red",
}


def select(names: Sequence[str], *, fast: bool = False) -> list[Scenario]:
    """The scenarios named (``all`` for every one), in catalog order; ``fast`` keeps the fast subset.

    Raises KeyError naming an unknown scenario.
    """
    known = {s.name for s in CATALOG}
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise KeyError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, all")
    wanted = set(names)
    chosen = [s for s in CATALOG if "all" in wanted or s.name in wanted or (fast and not wanted)]
    return [s for s in chosen if s.fast] if fast else chosen


class RichProgress(DrillProgress):
    """A live table: one row per scenario with its phase, outcome counts and the server's mode."""

    def __init__(self, scenarios: Sequence[Scenario], console: Console) -> None:
        self.scenarios = list(scenarios)
        self.console = console
        self.status: dict[str, str] = {s.name: "queued" for s in scenarios}
        self.phases: dict[str, str] = {}
        self.counts: dict[str, Counter[str]] = {s.name: Counter() for s in scenarios}
        self.modes: dict[str, str] = {}
        # A live table on a terminal; plain log lines elsewhere (CI logs, pipes).
        self.live: Live | None = (
            Live(self.render(), console=console, refresh_per_second=4, transient=False)
            if console.is_terminal
            else None
        )

    def render(self) -> Table:
        """The table as it stands."""
        table = Table(title="brownout drill", title_justify="left", expand=False)
        table.add_column("scenario")
        table.add_column("status")
        table.add_column("phase", max_width=44, overflow="ellipsis", no_wrap=True)
        for outcome in OUTCOMES:
            table.add_column(outcome, justify="right", style=_OUTCOME_STYLE[outcome])
        table.add_column("server mode")
        for s in self.scenarios:
            status = self.status[s.name]
            counts = self.counts[s.name]
            table.add_row(
                s.name,
                Text(status, style=_STATUS_STYLE.get(status, "")),
                self.phases.get(s.name, ""),
                *(str(counts[o]) if counts else "" for o in OUTCOMES),
                self.modes.get(s.name, ""),
            )
        return table

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def running(self) -> AbstractContextManager[object]:
        """The context in which the drills run: the live table, or nothing."""
        return self.live if self.live is not None else nullcontext()

    def scenario_started(self, scenario: Scenario) -> None:
        """Mark the scenario running."""
        self.status[scenario.name] = "running"
        self._refresh()

    def phase(self, scenario: Scenario, text: str) -> None:
        """Show the scenario's phase (a log line too when the output is not a terminal, e.g. CI)."""
        self.phases[scenario.name] = text
        if not self.console.is_terminal:
            self.console.print(f"[{scenario.name}] {text}", highlight=False)
        self._refresh()

    def sample(self, scenario: Scenario, sample: Sample) -> None:
        """Count an answer."""
        self.counts[scenario.name][sample.outcome] += 1

    def health(self, scenario: Scenario, sample: HealthSample) -> None:
        """Show the richest mode the server could serve."""
        self.modes[scenario.name] = best_mode(sample)
        self._refresh()

    def scenario_finished(self, result: ScenarioResult) -> None:
        """Show the verdict."""
        self.status[result.name] = result.status
        if result.status == "waiting":
            self.phases[result.name] = "waits on " + "; ".join(w.split(":")[0] for w in result.waits_on)
        elif result.error:
            self.phases[result.name] = result.error.splitlines()[0]
        else:
            failed = [c.name for c in result.checks if not c.passed]
            self.phases[result.name] = ("failed: " + "; ".join(failed)) if failed else "all checks held"
        if not self.console.is_terminal:
            self.console.print(
                f"[{result.name}] {result.status}: {self.phases[result.name]}", highlight=False
            )
        self._refresh()


def _list(console: Console, as_json: bool) -> None:
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "title": s.title,
            "category": s.category,
            "severity": s.severity,
            "kind": s.kind,
            "fast": s.fast,
            "waits_on": missing(s),
        }
        for s in CATALOG
    ]
    if as_json:
        from brownout.chaos.failover.console import list_rows

        print(json.dumps({"scenarios": rows, "gateway_scenarios": list_rows()}, indent=2))
        return
    table = Table(title="drill scenarios (brownout drill NAME ... | all | --fast)", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("title", "kind", "severity", "fast", "runs here"):
        table.add_column(col)
    for row in rows:
        waits = row["waits_on"]
        table.add_row(
            str(row["name"]),
            str(row["title"]),
            str(row["kind"]),
            str(row["severity"]),
            "yes" if row["fast"] else "",
            Text("yes", style="green") if not waits else Text("waits on " + "; ".join(waits), style="yellow"),
        )
    console.print(table)
    from brownout.chaos.failover.console import list_table

    console.print(list_table())


def _summary(console: Console, results: Sequence[ScenarioResult]) -> None:
    parts = []
    for r in results:
        style = _STATUS_STYLE.get(r.status, "")
        lines = [Text.assemble((f"{r.status.upper():8}", style), f" {r.name}: {r.title}")]
        for c in r.checks:
            mark = ("  ok   ", "green") if c.passed else ("  FAIL ", "red")
            lines.append(Text.assemble(mark, f"{c.name} -- {c.detail}"))
        if r.error:
            lines.append(Text(f"  error: {r.error}", style="red"))
        lines.extend(Text(f"  waits on {w}", style="yellow") for w in r.waits_on)
        parts.append(Group(*lines))
    console.print(Group(*parts))


def main(
    names: Sequence[str],
    *,
    list_only: bool = False,
    report: Path | None = None,
    as_json: bool = False,
    fast: bool = False,
    console: Console | None = None,
) -> int:
    """Run ``brownout drill``; returns the exit status (module docstring)."""
    out = console or Console()
    err = Console(stderr=True)
    if list_only or (not names and not fast):
        _list(out, as_json)
        if not list_only and not as_json:
            out.print("Name scenarios to run them, `all` for every one, or --fast for the quick subset.")
        return 0
    from brownout.chaos.failover.console import is_gateway_name

    gateway = [n for n in names if is_gateway_name(n)]
    if gateway:
        if len(gateway) < len(names) or fast:
            # Two families, two reports: one run makes one of them.
            err.print("[red]run the gateway scenarios on their own: brownout drill gateway[/]")
            return 2
        from brownout.chaos.failover.console import main as gateway_main

        return gateway_main(gateway, as_json=as_json, report=report, console=out)
    try:
        chosen = select(names, fast=fast)
    except KeyError as e:
        err.print(f"[red]{e.args[0]}[/]")
        return 2
    progress = RichProgress(chosen, err)
    with progress.running():
        results = asyncio.run(run_drills(chosen, progress=progress))
    written = write_report(results, report) if report is not None else {}
    if as_json:
        print(json.dumps(report_json(results), indent=2))
    else:
        _summary(out, results)
        if written:
            out.print(f"report: {written['markdown']} (JSON: {written['json']})")
    bad = [r for r in results if r.status in ("failed", "error")]
    return 1 if bad else 0
