"""The ``brownout`` command line.

* ``brownout serve [--config FILE]`` -- the creative-brief server on its embedded defaults (three local
  model servers, in-memory cache, SQLite), or as configured;
* ``brownout brief "text" [--mode creative] [--url URL]`` -- ask a running server for a brief;
* ``brownout bench policies|stampede [--json]`` -- side-by-side benchmarks against the peers;
* ``brownout version``.
"""

from __future__ import annotations

import json
from pathlib import Path
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
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Override server.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override server.port.")] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning, error.")] = "info",
) -> None:
    """Run the creative-brief server: API on 127.0.0.1:8000 and a local model server per role."""
    import logging

    import uvicorn

    from brownout.config import load_config
    from brownout.errors import ConfigError
    from brownout.server.app import create_app

    try:
        cfg = load_config(config)
    except ConfigError as e:
        typer.echo(f"invalid configuration: {e}", err=True)
        raise typer.Exit(2) from e
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if overrides:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=overrides)})
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg)
    typer.echo(
        f"brownout {__version__}: serving briefs on http://{cfg.server.host}:{cfg.server.port} (Ctrl-C stops)"
    )
    try:
        uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level=log_level.lower())
    except ConfigError as e:
        typer.echo(f"cannot start: {e}", err=True)
        raise typer.Exit(2) from e


@app.command()
def brief(
    text: Annotated[str, typer.Argument(help="The customer's wish, in free text.")],
    mode: Annotated[str, typer.Option(help="fast, balanced or creative.")] = "balanced",
    url: Annotated[
        str, typer.Option(help="Base URL of a running brownout server.")
    ] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
) -> None:
    """Ask a running server for a creative brief and print the JSON answer."""
    import httpx

    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/briefs", json={"text": text, "mode": mode}, timeout=timeout
        )
    except httpx.HTTPError as e:
        typer.echo(f"cannot reach {url}: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps(response.json(), indent=2, ensure_ascii=False))
    if response.status_code >= 400:
        retry = response.headers.get("Retry-After")
        typer.echo(f"HTTP {response.status_code}" + (f"; retry after {retry}s" if retry else ""), err=True)
        raise typer.Exit(1)


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


@bench_app.command("guard")
def bench_guard(
    as_json: JsonFlag = False,
    prompts: Annotated[
        int, typer.Option(min=1, help="How many of the built-in varied requests to run.")
    ] = 40,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads of the local model server.")] = 2,
) -> None:
    """The JSON guard on the real embedded model: valid first answers with and without constrained
    decoding, served-valid share, generator calls per request, fallback share, latency."""
    from brownout.bench import guard

    try:
        result = guard.run(prompts=prompts, threads=threads)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--prompts") from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"JSON guard on {result['model']}, {result['prompts']} requests")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("model", "guard"):
            table.add_row(key, _fmt(value))
    console.print(table)
    console.print(f"  guard counters: {result['guard']}")


@bench_app.command("http")
def bench_http(
    as_json: JsonFlag = False,
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections wrk keeps open.")] = 16,
    seconds: Annotated[int, typer.Option(min=1, help="Seconds wrk drives each target.")] = 10,
) -> None:
    """Cached briefs against a bare FastAPI endpoint returning the same JSON, with wrk."""
    from brownout.bench import http

    try:
        result = http.run(connections=connections, seconds=seconds)
    except RuntimeError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"POST /v1/briefs, {connections} connections, {seconds} s each (wrk)")
    for col in ("target", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for row in result["rows"]:
        table.add_row(row["target"], _fmt(row["rps"]), f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}")
    console.print(table)
    console.print(f"  brownout/bare throughput: {result['brownout_vs_bare_rps']}")


def main() -> None:
    """Entry point of the ``brownout`` console script."""
    app()


if __name__ == "__main__":
    main()
