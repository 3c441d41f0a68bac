"""The gateway scenarios in the terminal: ``brownout drill gateway``, ``gateway-<name>``, ``--list``.

:func:`main` runs the scenarios named (``gateway`` for all 16) with one line on stderr as each
finishes, then prints the scorecard table (or, with ``--json``, the scorecard as JSON on stdout) and,
with ``--report DIR``, writes ``gateway-scorecard.json`` and ``gateway-scorecard.md`` there. Exit
status: 0 when every scenario passed, 1 otherwise, 2 for an unknown name or a run that could not start.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

from brownout.chaos.failover.runner import PEERS, PRIOR_RUN, ScenarioScore, Scorecard, run_catalogue
from brownout.chaos.failover.scenarios import CATALOGUE, find

__all__ = ["is_gateway_name", "list_rows", "list_table", "main", "markdown", "scorecard_table"]

_GRADE_STYLE: Final = {"pass": "green", "partial": "yellow", "safe": "dark_orange", "fail": "red"}


def is_gateway_name(name: str) -> bool:
    """Whether ``name`` picks gateway scenarios (``gateway``, ``gateway-all``, ``gateway-<name>``)."""
    return name == "gateway" or name.startswith("gateway-")


def list_rows() -> list[dict[str, Any]]:
    """The gateway scenarios as rows (``--list --json``)."""
    return [{"name": s.drill_name, "fault": s.title, "passes_when": s.passes_when} for s in CATALOGUE]


def list_table() -> Table:
    """The gateway scenarios as a table (``--list``)."""
    table = Table(title="gateway scenarios (brownout drill gateway | gateway-NAME ...)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("the primary's fault")
    table.add_column("a pass needs, besides the complete answer within 100 s")
    for row in list_rows():
        table.add_row(row["name"], row["fault"], row["passes_when"])
    return table


def _calls(score: ScenarioScore) -> str:
    return " / ".join(str(n) for n in score.calls.values())


def scorecard_table(card: Scorecard) -> Table:
    """The scorecard: a row per scenario, then the totals."""
    summary = card.summary()
    totals = ", ".join(f"{n} {g}" for g, n in summary.items())
    table = Table(
        title=f"gateway fault scenarios: {totals} ({card.seconds:.0f} s)",
        title_justify="left",
        caption="calls: primary / backup (/ control) upstream requests",
        caption_justify="left",
    )
    table.add_column("scenario", no_wrap=True)
    table.add_column("grade")
    table.add_column("s", justify="right")
    table.add_column("calls", justify="right", no_wrap=True)
    table.add_column("why")
    for score in card.scores:
        g = score.verdict.grade
        table.add_row(
            score.scenario.drill_name,
            Text(g, style=_GRADE_STYLE[g]),
            f"{score.seconds:.1f}",
            _calls(score),
            score.verdict.reason,
        )
    return table


def markdown(card: Scorecard) -> str:
    """The scorecard as a Markdown table (the report's, and the benchmarks README's)."""
    lines = [
        "| # | scenario | grade | seconds | calls (primary / backup) | why |",
        "|---:|---|---|---:|---|---|",
    ]
    for i, score in enumerate(card.scores, 1):
        reason = score.verdict.reason.replace("|", "\\|")
        lines.append(
            f"| {i} | `{score.scenario.name}` | **{score.verdict.grade}** | {score.seconds:.1f} | "
            f"{_calls(score)} | {reason} |"
        )
    totals = ", ".join(f"{n} {g}" for g, n in card.summary().items())
    lines += ["", f"Totals: {totals}."]
    return "\n".join(lines) + "\n"


def _peers_line() -> str:
    peers = "; ".join(
        f"{name} {score['pass']} pass" + (f" ({score['fail']} fail)" if "fail" in score else "")
        for name, score in PEERS.items()
    )
    prior = ", ".join(f"{n} {g}" for g, n in PRIOR_RUN.items())
    return f"published: {peers}. An earlier independent run of brownout: {prior}."


def main(
    names: Sequence[str],
    *,
    as_json: bool = False,
    report: Path | None = None,
    console: Console | None = None,
) -> int:
    """Run the gateway scenarios ``names``; returns the exit status (module docstring)."""
    out = console or Console()
    err = Console(stderr=True)
    try:
        chosen = find(names)
    except KeyError as e:
        err.print(f"[red]{e.args[0]}[/]")
        return 2

    def finished(score: ScenarioScore) -> None:
        g = score.verdict.grade
        err.print(
            Text.assemble(
                f"[{score.scenario.drill_name}] ",
                (g, _GRADE_STYLE[g]),
                f" in {score.seconds:.1f} s: {score.verdict.reason}",
            ),
            highlight=False,
        )

    def phase(text: str) -> None:
        err.print(f"[gateway] {text}", highlight=False, markup=False)

    try:
        card = asyncio.run(run_catalogue(chosen, on_score=finished, on_phase=phase))
    except RuntimeError as e:
        err.print(f"[red]the gateway scenarios could not run: {e}[/]")
        return 2
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "gateway-scorecard.json").write_text(json.dumps(card.to_json(), indent=2) + "\n")
        (report / "gateway-scorecard.md").write_text(markdown(card))
    if as_json:
        print(json.dumps(card.to_json(), indent=2))
    else:
        out.print(scorecard_table(card))
        out.print(_peers_line(), highlight=False)
        if report is not None:
            out.print(f"report: {report / 'gateway-scorecard.md'}")
    return 0 if card.all_pass else 1
