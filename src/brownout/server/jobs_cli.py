"""``brownout jobs``: submit, follow and cancel jobs on a running server (its ``/v1/jobs`` API).

* ``brownout jobs submit FILE|-`` -- a JSON list, or JSON lines, of texts (``"rose and oud"``) or
  items (``{"text": ..., "mode": ...}``); ``--mode`` for the texts, ``--idempotency-key`` to make a
  retried submission safe, ``--webhook URL``, ``--watch`` to follow it at once; prints the job's id;
* ``brownout jobs status ID [--items] [--json]``, ``brownout jobs list [--state S] [--json]``;
* ``brownout jobs watch ID`` -- a progress bar until the job ends (exit 0 when it succeeded, else 1);
* ``brownout jobs cancel ID``.

Every command takes ``--url`` (default ``http://127.0.0.1:8000``) and talks HTTP only (httpx).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["jobs_app", "read_items"]

jobs_app = typer.Typer(help="Long-running jobs on a running server: submit, status, watch, cancel, list.")

Url = Annotated[str, typer.Option(help="Base URL of a running brownout server.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
_DEFAULT_URL = "http://127.0.0.1:8000"
_ENDED = ("succeeded", "partially_succeeded", "failed", "cancelled")
_COLOUR = {"succeeded": "green", "partially_succeeded": "yellow", "failed": "red", "cancelled": "red"}


def read_items(text: str, mode: str) -> list[dict[str, Any]]:
    """The items of a submission file: a JSON list, or one JSON value per line; each a text (given
    ``mode``) or an item object. Raises ValueError naming the line or position at fault."""
    stripped = text.strip()
    values: list[Any]
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list: {e}") from None
        where = [f"item {i}" for i in range(len(values))]
    else:
        values, where = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {number} is not JSON ({e}); put each text in quotes") from None
            where.append(f"line {number}")
    items: list[dict[str, Any]] = []
    for value, place in zip(values, where, strict=True):
        if isinstance(value, str):
            items.append({"text": value, "mode": mode})
        elif isinstance(value, dict):
            items.append({"mode": mode, **value})
        else:
            raise ValueError(f"{place}: expected a text or an object with a text, got {type(value).__name__}")
    if not items:
        raise ValueError("no items: the file is empty")
    return items


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


def _call(method: str, url: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One request; the JSON answer, or exit 1 with the server's error message."""
    try:
        response = httpx.request(method, f"{url.rstrip('/')}{path}", timeout=30.0, **kwargs)
    except httpx.HTTPError as e:
        raise _fail(f"cannot reach {url}: {e}") from e
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise _fail(f"HTTP {response.status_code} {error.get('code')}: {error.get('message')}")
        raise _fail(f"HTTP {response.status_code}: {response.text[:500]}")
    if not isinstance(body, dict):
        raise _fail(f"unexpected answer from {url}: {response.text[:200]}")
    return body


def _progress_text(job: dict[str, Any]) -> str:
    p = job["progress"]
    mock = f", {p['mock']} mock" if p["mock"] else ""
    return f"{p['done']} done, {p['failed']} failed of {p['total']}{mock}"


@jobs_app.command("submit")
def submit(
    file: Annotated[str, typer.Argument(help="JSON list or JSON lines of texts or items; - for stdin.")],
    mode: Annotated[str, typer.Option(help="Mode of items given as plain texts.")] = "balanced",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Makes a retried submission return the same job.")
    ] = None,
    webhook: Annotated[str | None, typer.Option(help="URL POSTed the job's summary when it ends.")] = None,
    watch_it: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar.")] = False,
    url: Url = _DEFAULT_URL,
) -> None:
    """Submit a briefs job; prints its id."""
    raw = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    try:
        items = read_items(raw, mode)
    except ValueError as e:
        raise _fail(f"{file}: {e}") from e
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body: dict[str, Any] = {"type": "briefs", "items": items}
    if webhook:
        body["webhook"] = webhook
    job = _call("POST", url, "/v1/jobs", json=body, headers=headers)
    typer.echo(job["id"])
    if watch_it:
        watch(job["id"], url=url)


@jobs_app.command("status")
def status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    items: Annotated[bool, typer.Option("--items", help="List the items too.")] = False,
    url: Url = _DEFAULT_URL,
    as_json: JsonFlag = False,
) -> None:
    """A job's state and progress (and its items)."""
    job = _call("GET", url, f"/v1/jobs/{job_id}", params={"items": str(items).lower(), "limit": 1000})
    if as_json:
        typer.echo(json.dumps(job, indent=2, ensure_ascii=False))
        return
    console = Console()
    colour = _COLOUR.get(job["state"], "cyan")
    console.print(
        f"job {job['id']} ({job['type']}): [{colour}]{job['state']}[/] - {job['reason']}", highlight=False
    )
    console.print(_progress_text(job), highlight=False)
    if job.get("waiting"):
        console.print(f"waiting: {job['waiting']}", highlight=False)
    if items:
        table = Table("index", "state", "served by", "mock", "error")
        for item in job.get("items", []):
            table.add_row(
                str(item["index"]),
                item["state"],
                item["served_by"] or "",
                "yes" if item["mock"] else "",
                item["error"] or "",
            )
        console.print(table)


@jobs_app.command("watch")
def watch(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: Url = _DEFAULT_URL,
    interval: Annotated[float, typer.Option(help="Seconds between two looks.")] = 0.5,
) -> None:
    """Follow a job with a progress bar until it ends; exit 0 when it succeeded, else 1."""
    console = Console(stderr=True)
    job = _call("GET", url, f"/v1/jobs/{job_id}", params={"items": "false"})
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job["state"], total=job["progress"]["total"], detail="")
        while True:
            p = job["progress"]
            detail = f"{p['failed']} failed, {p['mock']} mock" + (
                f" ({job['waiting']})" if job.get("waiting") else ""
            )
            bar.update(task, completed=p["done"] + p["failed"], description=job["state"], detail=detail)
            if job["state"] in _ENDED:
                break
            time.sleep(interval)
            job = _call("GET", url, f"/v1/jobs/{job_id}", params={"items": "false"})
    typer.echo(f"{job['state']}: {job['reason']}")
    if job["state"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")], url: Url = _DEFAULT_URL) -> None:
    """Cancel a job: no new item starts; running ones may finish."""
    job = _call("POST", url, f"/v1/jobs/{job_id}/cancel")
    typer.echo(f"{job['id']}: {job['state']} ({_progress_text(job)})")


@jobs_app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    url: Url = _DEFAULT_URL,
    as_json: JsonFlag = False,
) -> None:
    """Jobs, newest first."""
    params = {"state": state} if state else {}
    found = _call("GET", url, "/v1/jobs", params=params)["jobs"]
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    table = Table("id", "type", "state", "progress", "created")
    for job in found:
        table.add_row(job["id"], job["type"], job["state"], _progress_text(job), job["created_at"])
    Console().print(table)
