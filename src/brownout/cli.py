"""The ``brownout`` command line.

* ``brownout bench policies|stampede [--json]`` -- side-by-side benchmarks against the peers;
* ``brownout version``.

``brownout serve`` (the creative-brief server) is not built yet; the command says so plainly and exits
with status 2 rather than pretending.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from brownout import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="brownout",
    help="Keep ML and LLM services answering while their parts fail.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Side-by-side benchmarks against peer libraries.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]


@app.command()
def version() -> None:
    """Print brownout's version."""
    typer.echo(__version__)


@app.command()
def serve() -> None:
    """Run the creative-brief server (not built yet)."""
    typer.echo(
        "brownout serve is not available yet: the server is being built (see the README). "
        "The resilience policies and `brownout bench` work today.",
        err=True,
    )
    raise typer.Exit(2)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _print_goals(console: Console, goals: dict[str, Any]) -> None:
    for key, value in goals.items():
        if isinstance(value, bool):
            mark = "[green]yes[/]" if value else "[red]no[/]"
        else:
            mark = _fmt(value)
        console.print(f"  {key}: {mark}")


@bench_app.command("policies")
def bench_policies(
    as_json: JsonFlag = False,
    calls: Annotated[int, typer.Option(min=100, help="Calls per timing round.")] = 20_000,
    rounds: Annotated[int, typer.Option(min=1, help="Timing rounds; the best is kept.")] = 5,
    case: Annotated[
        list[str] | None, typer.Option(help="Only this case: breaker, retry, deadline, composition.")
    ] = None,
) -> None:
    """Nanoseconds added per successful call: brownout against pybreaker, aiobreaker, purgatory,
    circuitbreaker, tenacity, stamina and asyncio's own timeouts."""
    from brownout.bench import policies

    try:
        result = policies.run(calls=calls, rounds=rounds, cases=case)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--case") from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"added ns per successful call ({calls} calls x {rounds} rounds, best round)")
    for col in ("case", "library", "added ns", "note"):
        table.add_column(col, justify="right" if col == "added ns" else "left")
    for row in result["rows"]:
        table.add_row(row["case"], row["library"], _fmt(row["added_ns"]), row["error"] or row["note"])
    console.print(table)
    _print_goals(console, result["goals"])


@bench_app.command("stampede")
def bench_stampede(
    as_json: JsonFlag = False,
    callers: Annotated[int, typer.Option(min=1, help="Concurrent callers for the one missing key.")] = 1000,
    compute_ms: Annotated[float, typer.Option(min=0, help="How long the computation takes.")] = 50.0,
    library: Annotated[
        list[str] | None, typer.Option(help="Only this library (brownout, cashews, aiocache, cachetools).")
    ] = None,
) -> None:
    """1000 concurrent requests for one missing key: computations run and latency, side by side."""
    from brownout.bench import stampede

    try:
        result = stampede.run(callers=callers, compute_ms=compute_ms, libraries=library)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--library") from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"{callers} callers, one missing key, {compute_ms:g} ms computation")
    for col in ("library", "computations", "p50 ms", "p99 ms", "max ms", "note"):
        table.add_column(col, justify="left" if col in ("library", "note") else "right")
    for row in result["rows"]:
        table.add_row(
            row["library"],
            _fmt(row["computations"]),
            _fmt(row["p50_ms"]),
            _fmt(row["p99_ms"]),
            _fmt(row["max_ms"]),
            row["error"] or row["note"],
        )
    console.print(table)
    _print_goals(console, result["goals"])


def main() -> None:
    """Entry point of the ``brownout`` console script."""
    app()
