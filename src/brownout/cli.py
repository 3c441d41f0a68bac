"""The ``brownout`` command line.

* ``brownout serve [--config FILE]`` -- the creative-brief server on its embedded defaults (three local
  model servers, in-memory cache, SQLite), or as configured;
* ``brownout brief "text" [--mode creative] [--url URL]`` -- ask a running server for a brief;
* ``brownout check --url URL`` -- the checklist before promoting a canary (exit 0: "safe to promote");
* ``brownout status --url URL`` -- the live state of a running server as a table;
* ``brownout jobs submit|status|watch|cancel|list`` -- long-running jobs on a running server;
* ``brownout bench policies|stampede [--json]`` -- side-by-side benchmarks against the peers;
* ``brownout bench durable [--json]`` -- spool replay into PostgreSQL and cache reads through Redis;
* ``brownout bench gateway [--json]`` -- the OpenAI-compatible gateway against direct calls, Portkey, LiteLLM;
* ``brownout bench model-capacity [--json]`` -- the bare model server's throughput per threads x slots;
* ``brownout bench overload [--json]`` -- a default server under distinct-text load, against that rate;
* ``brownout bench jobs [--json]`` -- a job against the same briefs one by one, and a dead worker's reclaim;
* ``brownout drill NAME ...|all [--report DIR] [--json]``, ``brownout drill --list`` -- chaos drills;
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
from brownout.chaos.drills.command import drill
from brownout.server.jobs_cli import jobs_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="brownout",
    help="Keep ML and LLM services answering while their parts fail.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Side-by-side benchmarks against peer libraries.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(jobs_app, name="jobs")

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
    log_format: Annotated[
        str,
        typer.Option(
            help="text: lines for people; json: one JSON object per line, with trace_id and span_id "
            "while a traced request is served."
        ),
    ] = "text",
) -> None:
    """Run the creative-brief server: API on 127.0.0.1:8000, the embedded models on a local server."""
    import logging

    from brownout.config import load_config
    from brownout.errors import ConfigError
    from brownout.server.listener import listen

    if log_format not in ("text", "json"):
        typer.echo(f"--log-format must be text or json, not {log_format!r}", err=True)
        raise typer.Exit(2)
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
    # The port first: a second server on the same config stops here, before it starts model servers
    # or opens the database or the spool (uvicorn would start all of those before binding).
    try:
        sock = listen(cfg.server.host, cfg.server.port)
    except ConfigError as e:
        typer.echo(f"cannot start: {e}", err=True)
        raise typer.Exit(2) from e
    from brownout.server.app import create_app
    from brownout.server.runner import run_server

    logging_options: dict[str, Any] = {}
    if log_format == "json":
        from brownout.telemetry import JsonLogFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logging.basicConfig(level=log_level.upper(), handlers=[handler])
        # uvicorn's own lines (startup, access) go through the same handler instead of its formatters.
        logging_options["log_config"] = None
    else:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Building the server's parts reads the config once more (a local model file, say): a setting
        # at fault stops it here, before anything starts.
        app = create_app(cfg)
    except ConfigError as e:
        typer.echo(f"cannot start: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(
        f"brownout {__version__}: serving briefs on http://{cfg.server.host}:{cfg.server.port} (Ctrl-C stops)"
    )
    try:
        # SIGTERM/SIGINT ends the live streams and drains the server first (run_server): in-flight
        # requests get up to server.drain_timeout to finish. uvicorn's own grace period comes after
        # the drain, when every request has been answered, so it only bounds closing connections.
        run_server(
            app,
            sockets=[sock],
            host=cfg.server.host,
            port=cfg.server.port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=5,
            **logging_options,
        )
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
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code < 400:
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    # Every refusal is {"error": {"message", "type", "code", "param", ...}} (brownout.server.errors).
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        retry = error.get("retry_after") or response.headers.get("Retry-After")
        typer.echo(
            f"HTTP {response.status_code} {error.get('type')}: {error.get('message')}"
            + (f"; retry after {retry}s" if retry else ""),
            err=True,
        )
    else:
        typer.echo(f"HTTP {response.status_code}: {response.text[:500]}", err=True)
    raise typer.Exit(1)


@app.command()
def check(
    url: Annotated[
        str, typer.Option(help="Base URL of the running brownout server to check.")
    ] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Check a running server before promoting it (a canary, say) to take all traffic.

    Checks that the JSON guard is on with at least 3 retries and its fallback, every circuit breaker
    is closed, the cache's expiry and regeneration work, and every model passes a live test inference.
    Exit 0 and "safe to promote" when every check passes; else exit 1 naming what failed.
    """
    from brownout.checks import run_checks

    results = run_checks(url, timeout=timeout)
    failed = [r.name for r in results if not r.ok]
    if as_json:
        checks = [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]
        typer.echo(json.dumps({"safe": not failed, "checks": checks}, indent=2))
    else:
        console = Console()
        for r in results:
            mark = "[green]PASS[/]" if r.ok else "[red]FAIL[/]"
            console.print(f"{mark} {r.name}: {r.detail}", highlight=False)
        if failed:
            console.print(f"[red bold]NOT safe to promote[/]: failed: {', '.join(failed)}", highlight=False)
        else:
            console.print("[green bold]safe to promote[/]", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def status(
    url: Annotated[
        str, typer.Option(help="Base URL of a running brownout server.")
    ] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
    as_json: JsonFlag = False,
) -> None:
    """The live state of a running server: mode, models and breakers, queue, cache, spool."""
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/api/v1/status", timeout=timeout)
        response.raise_for_status()
        state = response.json()
    except (httpx.HTTPError, ValueError) as e:
        typer.echo(f"cannot read the status of {url}: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    _print_status(Console(), url, state)


_COLOURS = {
    "healthy": "green",
    "closed": "green",
    "normal": "green",
    "degraded": "yellow",
    "half_open": "yellow",
    "unhealthy": "red",
    "open": "red",
    "forced_open": "red",
    "emergency": "red",
}


def _coloured(word: Any) -> str:
    text = _fmt(word)
    colour = _COLOURS.get(text)
    return f"[{colour}]{text}[/]" if colour else text


def _print_status(console: Console, url: str, state: dict[str, Any]) -> None:
    overview = Table(title=f"brownout at {url}", show_header=False)
    overview.add_column("what")
    overview.add_column("value")
    overview.add_row("system mode", _coloured(state.get("system_mode")))
    overview.add_row("status", _coloured(state.get("status")))
    overview.add_row("modes served", ", ".join(state.get("available_modes") or []) or "none")
    queue = state.get("queue") or {}
    overview.add_row(
        "queue depth",
        f"{_fmt(queue.get('size'))} of {_fmt(queue.get('max_size'))}, {_fmt(queue.get('in_flight'))} running",
    )
    cache = state.get("cache") or {}
    rate = cache.get("hit_rate")
    hits, misses = _fmt(cache.get("hits")), _fmt(cache.get("misses"))
    overview.add_row(
        "cache",
        f"hit rate {'-' if rate is None else f'{rate:.1%}'} ({hits} hits, {misses} misses), "
        f"{_fmt(cache.get('size'))}/{_fmt(cache.get('max_size'))} entries",
    )
    spool = state.get("spool") or {}
    overview.add_row(
        "write spool",
        f"{_fmt(spool.get('pending'))} pending" + (" [red](alert)[/]" if spool.get("alert") else ""),
    )
    overview.add_row("database", _coloured((state.get("database") or {}).get("status")))
    overview.add_row("as of", _fmt(state.get("at")))
    console.print(overview)
    models = Table(title="models")
    for col in ("role", "health", "breakers", "last check", "server"):
        models.add_column(col)
    for role, m in (state.get("models") or {}).items():
        check = m.get("last_check")
        if check is None:
            last = "not yet"
        else:
            last = f"{'ok' if check.get('healthy') else 'failed'}, {_fmt(check.get('latency_ms'))} ms"
            if check.get("error"):
                last += f" ({check['error']})"
        breakers = ", ".join(
            f"{_coloured(s)}" if n == role else f"{n}: {_coloured(s)}"
            for n, s in (m.get("breakers") or {}).items()
        )
        models.add_row(
            role, _coloured(m.get("status")), breakers or "-", last, _fmt(m.get("server") or "external")
        )
    console.print(models)


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


@bench_app.command("model-capacity")
def bench_model_capacity(
    as_json: JsonFlag = False,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds each configuration is measured.")] = 20.0,
    threads: Annotated[
        list[int] | None, typer.Option(min=1, help="llama.cpp threads to try (repeat; default 1 and 2).")
    ] = None,
    parallel: Annotated[
        list[int] | None, typer.Option(min=1, help="Request slots to try (repeat; default 1, 2 and 4).")
    ] = None,
    layouts: Annotated[
        bool, typer.Option(help="Also measure the generator beside the validator and hinter (--no-layouts).")
    ] = True,
) -> None:
    """The bare llama.cpp server on the embedded model, answering the generator's brief body at one
    request per slot: completions/min, schema-valid/min, tokens/s, p50/p95 per threads x slots."""
    from brownout.bench import capacity

    try:
        result = capacity.run(
            seconds=seconds, threads=threads or (1, 2), parallel=parallel or (1, 2, 4), layouts=layouts
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    for title, rows in (
        ("bare model server", result["grid"]),
        ("generator beside the other roles", result["layouts"]),
    ):
        if not rows:
            continue
        table = Table(title=f"{title}, {seconds:g} s each ({result['machine']['cpus']} CPUs, shared machine)")
        for col in ("configuration", "completions/min", "valid/min", "tokens/s", "p50 s", "p95 s", "note"):
            table.add_column(col, justify="left" if col in ("configuration", "note") else "right")
        for row in rows:
            table.add_row(
                row["name"],
                _fmt(row["completions_per_min"]),
                _fmt(row["valid_per_min"]),
                _fmt(row["tokens_per_s"]),
                _fmt(row["p50_s"]),
                _fmt(row["p95_s"]),
                row["error"] or row["others"],
            )
        console.print(table)
    best = result["best"]
    if best is not None:
        console.print(f"  best: {best['name']}, {_fmt(best['valid_per_min'])} schema-valid completions/min")


@bench_app.command("overload")
def bench_overload(
    as_json: JsonFlag = False,
    url: Annotated[
        str | None, typer.Option(help="A running server on 127.0.0.1 (default: start a default one).")
    ] = None,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds of load per concurrency level.")] = 45.0,
    level: Annotated[
        list[int] | None,
        typer.Option(min=1, max=200, help="Concurrency levels (repeat; default 1, 4, 16, 64, 200)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="Requested mode: fast, balanced or creative.")] = "fast",
    settle: Annotated[
        float, typer.Option(min=0, help="Longest wait for full mode after a level, seconds.")
    ] = 60.0,
    bare: Annotated[
        bool, typer.Option(help="Measure the bare model server first, for the ratio (--no-bare: skip).")
    ] = True,
    bare_seconds: Annotated[float, typer.Option(min=1, help="Seconds per bare-server configuration.")] = 20.0,
    bare_rate: Annotated[
        float | None,
        typer.Option(min=0, help="The bare server's schema-valid completions/min, instead of measuring it."),
    ] = None,
) -> None:
    """A default server under distinct-text load at rising concurrency: answers/s, latency of briefs and
    of refusals, what served each answer, breaker opens, recovery actions, and model-served briefs/min
    against the bare model server's rate (its best, and measured again right after each level:
    ``adjacent``, the mean of the bare rates just before and after the level)."""
    from brownout.bench import overload

    if mode not in ("fast", "balanced", "creative"):
        raise typer.BadParameter("must be fast, balanced or creative", param_hint="--mode")
    try:
        result = overload.run(
            url=url,
            levels=level or (1, 4, 16, 64, 200),
            seconds=seconds,
            mode=mode,
            settle=settle,
            bare=bare,
            bare_seconds=bare_seconds,
            bare_rate=bare_rate,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    except RuntimeError as e:
        typer.echo(f"bench overload: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    bare_rate_seen = result["bare"]["valid_per_min"]
    table = Table(
        title=f"POST /v1/briefs, mode {mode}, {seconds:g} s per level; bare model server: "
        f"{_fmt(bare_rate_seen)} valid completions/min"
    )
    cols = (
        "conc.",
        "answers/s",
        "brief p50/p95/p99 ms",
        "503 p50/p95 ms",
        "503 p95 after 1st",
        "model",
        "dimmed",
        "cache",
        "rules",
        "503",
        "failed",
        "gen/min",
        "ratio",
        "in time",
        "adjacent",
        "breaker opens",
        "recovery",
        "back s",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for row in result["levels"]:
        share, acc, rej = row["share"], row["accepted"], row["rejections"]
        model = share["full"] + share["downshifted"] + share["degraded"]
        table.add_row(
            str(row["concurrency"]),
            _fmt(row["answers_per_s"]),
            f"{_fmt(acc['p50_ms'])}/{_fmt(acc['p95_ms'])}/{_fmt(acc['p99_ms'])}",
            f"{_fmt(rej['p50_ms'])}/{_fmt(rej['p95_ms'])}",
            _fmt((row.get("rejections_after_first") or {}).get("p95_ms")),
            f"{model:.0%}",
            f"{share['dimmed']:.0%}",
            f"{share['cache']:.0%}",
            f"{share['rules']:.0%}",
            f"{share['rejected']:.0%}",
            f"{share['failed']:.0%}",
            _fmt(row["generator_briefs_per_min"]),
            _fmt(row["ratio_to_bare"]),
            _fmt(row.get("ratio_to_bare_in_time")),
            _fmt(row.get("ratio_to_bare_adjacent")),
            str(row["breaker_opens"]),
            str(row["recovery_actions"]),
            _fmt(row["full_mode_back_s"]),
        )
    console.print(table)


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


@bench_app.command("gateway")
def bench_gateway(
    as_json: JsonFlag = False,
    seconds: Annotated[
        int, typer.Option(min=1, help="Seconds wrk drives each target at each concurrency, per round.")
    ] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds the targets take turns; rows are medians.")] = 3,
    concurrency: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Concurrent connections (repeat; default 1, 20 and 64)."),
    ] = None,
    delay_ms: Annotated[float, typer.Option(min=0, help="The fake upstream's fixed delay.")] = 20.0,
    litellm: Annotated[bool, typer.Option(help="Measure LiteLLM's proxy too (--no-litellm: skip).")] = True,
    portkey: Annotated[
        bool, typer.Option(help="Measure Portkey's open-source gateway too (--no-portkey: skip).")
    ] = True,
    install: Annotated[
        bool,
        typer.Option(
            help="Install LiteLLM (its own venv) and Portkey's gateway (npm, its own folder) when missing "
            "(--no-install: don't)."
        ),
    ] = True,
) -> None:
    """The OpenAI-compatible gateway against direct calls, Portkey's gateway and LiteLLM's proxy, on
    one fake upstream with a fixed delay: req/s, p50/p99, added latency, CPU per request (wrk)."""
    from brownout.bench import gateway

    levels = concurrency or [1, 20, 64]
    try:
        result = gateway.run(
            seconds=seconds,
            concurrencies=levels,
            delay_ms=delay_ms,
            rounds=rounds,
            litellm=litellm,
            install_litellm=install,
            portkey=portkey,
            install_portkey=install,
        )
    except RuntimeError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(
        title=f"POST /v1/chat/completions, upstream {delay_ms:g} ms, median of {rounds} x {seconds} s (wrk)"
    )
    columns = (
        "target",
        "conc.",
        "req/s",
        "p50 ms",
        "p99 ms",
        "added p50",
        "added p99",
        "CPU ms/req",
        "error",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("target", "error") else "right")
    for row in result["rows"]:
        table.add_row(
            row["target"],
            str(row["concurrency"]),
            _fmt(row["rps"]),
            _fmt(row["p50_ms"]),
            _fmt(row["p99_ms"]),
            _fmt(row.get("added_p50_ms")),
            _fmt(row.get("added_p99_ms")),
            _fmt(row.get("cpu_ms_per_req")),
            row["error"] or "",
        )
    console.print(table)
    _print_goals(console, result["goals"])


@bench_app.command("jobs")
def bench_jobs(
    as_json: JsonFlag = False,
    items: Annotated[
        int,
        typer.Option(min=1, max=1000, help="Briefs in the job, and per concurrency level sent one by one."),
    ] = 30,
    level: Annotated[
        list[int] | None,
        typer.Option(min=1, max=64, help="Concurrency of the single requests (repeat; default 1, 2, 4)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="Requested mode: fast, balanced or creative.")] = "fast",
    throughput: Annotated[
        bool, typer.Option(help="Measure the embedded model's job and single rates (--no-throughput: skip).")
    ] = True,
    reclaim: Annotated[
        bool, typer.Option(help="Measure the reclaim after a replica dies (--no-reclaim: skip).")
    ] = True,
    reclaim_items: Annotated[int, typer.Option(min=4, help="Items of the reclaim run's job.")] = 60,
    lease: Annotated[float, typer.Option(min=0.5, help="jobs.lease of the reclaim run's replicas, s.")] = 5.0,
) -> None:
    """Items/min of a briefs job on the embedded model against the same number of single /v1/briefs
    requests at each concurrency, and how fast a live replica takes over a killed one's job and items
    (two replicas on a private Redis and PostgreSQL)."""
    from brownout.bench import jobs as bench
    from brownout.chaos.servers import ServerBinaryMissing, ServerStartError

    if mode not in ("fast", "balanced", "creative"):
        raise typer.BadParameter("must be fast, balanced or creative", param_hint="--mode")
    try:
        result = bench.run(
            items=items,
            levels=level or (1, 2, 4),
            mode=mode,
            throughput_part=throughput,
            reclaim_part=reclaim,
            reclaim_items=reclaim_items,
            lease=lease,
        )
    except (ServerBinaryMissing, ServerStartError, RuntimeError) as e:
        typer.echo(f"bench jobs: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    if "throughput" in result:
        part = result["throughput"]
        table = Table(title=f"{items} briefs on the embedded model, mode {mode}")
        for col in ("path", "model briefs/min", "answers/min", "seconds", "served by"):
            table.add_column(col, justify="left" if col in ("path", "served by") else "right")
        job = part["job"]
        table.add_row(
            "one job",
            _fmt(job["model_items_per_min"]),
            _fmt(job["items_per_min"]),
            _fmt(job["seconds"]),
            str(job["served_by"]),
        )
        for row in part["single"]:
            table.add_row(
                f"single requests, {row['concurrency']} at a time",
                _fmt(row["model_items_per_min"]),
                _fmt(row["items_per_min"]),
                _fmt(row["seconds"]),
                str(row["served_by"]),
            )
        console.print(table)
        console.print(f"  job / best single: {_fmt(part['job_vs_best_single'])}")
    if "reclaim" in result:
        r = result["reclaim"]
        console.print(
            f"reclaim (lease {r['lease_s']:g} s, {r['items']} items): first item taken over after "
            f"{_fmt(r['item_reclaimed_s'])} s, the job after {_fmt(r['job_reclaimed_s'])} s, ended "
            f"{r['state']} after {_fmt(r['finished_s'])} s; every item once: {r['every_item_once']}"
        )


@bench_app.command("durable")
def bench_durable(
    as_json: JsonFlag = False,
    records: Annotated[int, typer.Option(min=2, help="Brief writes spooled, then replayed.")] = 20_000,
    per_entry: Annotated[
        int, typer.Option(min=0, help="Of those, replayed one write per transaction (at most half).")
    ] = 2_000,
    batch: Annotated[int, typer.Option(min=1, help="Entries per replay batch (one transaction).")] = 500,
    reads: Annotated[int, typer.Option(min=1, help="Cache reads per variant.")] = 20_000,
    hot_keys: Annotated[int, typer.Option(min=2, help="Keys the cache reads go round-robin over.")] = 100,
    postgres_url: Annotated[
        str | None,
        typer.Option(help="Use this PostgreSQL (postgresql+asyncpg://...) instead of a private one."),
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Use this Redis instead of a private one.")] = None,
    durable: Annotated[
        bool, typer.Option(help="Private PostgreSQL on disk with fsync=on (--no-durable: in memory).")
    ] = True,
    budget: Annotated[float, typer.Option(min=1, help="Seconds the whole run may take.")] = 600.0,
) -> None:
    """Spool replay into PostgreSQL (writes/s) and cache reads through Redis with and without the
    local front cache (reads/s, p50/p99), on private servers unless URLs are given."""
    from brownout.bench import durable as bench
    from brownout.chaos.servers import ServerBinaryMissing, ServerStartError

    try:
        result = bench.run(
            records=records,
            per_entry=per_entry,
            batch=batch,
            reads=reads,
            hot_keys=hot_keys,
            postgres_url=postgres_url,
            redis_url=redis_url,
            durable=durable,
            budget=budget,
        )
    except (ServerBinaryMissing, ServerStartError, TimeoutError) as e:
        typer.echo(f"bench durable: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console()
    replay = result["replay"]
    table = Table(
        title=f"spool replay into PostgreSQL ({replay['postgres']}, fsync={replay['postgres_fsync']})"
    )
    for col in ("path", "records", "writes/s", "time in sink"):
        table.add_column(col, justify="left" if col == "path" else "right")
    table.add_row(
        "spool append (concurrent)", _fmt(replay["spooled"]), _fmt(replay["spool_appends_per_s"]), "-"
    )
    if "per_entry_records" in replay:
        table.add_row(
            "replay, one write per transaction",
            _fmt(replay["per_entry_records"]),
            _fmt(replay["replay_writes_per_s_per_entry"]),
            f"{replay['per_entry_sink_share']:.0%}",
        )
    share = replay["replay_sink_share"]
    table.add_row(
        f"replay, batch sink ({replay['batch']} per transaction)",
        _fmt(replay["batched_records"]),
        _fmt(replay["replay_writes_per_s"]),
        "-" if share is None else f"{share:.0%}",
    )
    console.print(table)
    table = Table(title=f"cache reads, {result['reads']} round-robin over {result['hot_keys']} hot keys")
    for col in ("path", "reads/s", "p50 us", "p99 us"):
        table.add_column(col, justify="left" if col == "path" else "right")
    labels = {
        "front": "SharedCache, local front",
        "redis": "SharedCache, every read from Redis",
        "raw_redis": "redis-py GET + json.loads",
    }
    for name, label in labels.items():
        row = result["cache"][name]
        table.add_row(label, _fmt(row["reads_per_s"]), _fmt(row["p50_us"]), _fmt(row["p99_us"]))
    console.print(table)
    _print_goals(console, result["goals"])


# Declared with the drills, which never import this module: mounted here.
app.command()(drill)


def main() -> None:
    """Entry point of the ``brownout`` console script."""
    app()


if __name__ == "__main__":
    main()
