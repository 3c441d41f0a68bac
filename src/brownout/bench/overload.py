"""``brownout bench overload``: a default ``brownout serve`` under distinct-text load, level by level.

Overload is not failure: a server with more requests than its models can answer should keep serving
model answers at the models' rate, shed the rest at once, and never treat its busy models as broken.
This bench measures how far the server is from that, against the bare model server's rate.

1. The bare model server's rate (:mod:`brownout.bench.capacity`): the best schema-valid
   completions/min of the generator's brief body over threads x slots, measured first, in the same
   run, on the same machine (``--no-bare`` skips it, ``--bare-rate`` gives it). The grid's best is the
   highest of several short measurements, which flatters it, and its short cells of about ten
   answers each do not tell close configurations apart (on 2 cores, 2 x 2 and 2 x 4 swapped places
   from one run to the next), so the grid's :data:`BARE_FINALISTS` best configurations are then
   measured again, each for as long as a level runs: the best of those, its rate and tokens/s, is
   what the levels are divided by. That configuration is measured once more right after each level,
   with the server idle, and each level is also divided by the mean of the bare rates measured just
   before and just after it (``ratio_to_bare_adjacent``, ``tokens_ratio_to_bare_adjacent``): on a
   shared machine the pace of the same server drifts by 5-10 % over a few minutes, more than the
   difference being measured, and a rate measured a quarter of an hour before a level carries that
   drift into its ratio.
2. A default ``brownout serve`` (no config file, its own temporary working directory, a free port on
   127.0.0.1), or the server at ``--url`` (127.0.0.1 only).
3. Per concurrency level (1, 4, 16, 64, 200 by default): ``level`` clients, each sending the next
   distinct text as soon as its previous answer came back, for ``seconds``. Per level: answers/s,
   p50/p95/p99 of accepted answers and of rejections separately, the share of each kind of answer
   (:func:`classify_answer`), generator-served briefs/min and their ratio to the bare rate, the
   generator's completion tokens/s (from ``/health`` before and after the load: the model's work
   rate, steadier than a minute's 10-30 briefs) and their ratio to the bare best's tokens/s -- both
   ratios also against the best configuration that answers in time (:class:`BareInTime`), breaker
   opens and system modes seen (``/api/v1/recovery/status`` polled twice a second), recovery actions
   taken (its history before and after; the ones its guard held back listed apart), and how long
   after the load ended the requested mode was served in full again (``recovered_s``; the next level
   starts then, or after ``settle`` seconds).

Load goes to 127.0.0.1 only, bounded in count (``level`` requests in flight) and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import h11
import httpx

from brownout.bench import child_env, percentile
from brownout.bench.client import LoadClient, brief_text, retry_pause
from brownout.config import RoleSection

__all__ = [
    "KINDS",
    "Answer",
    "BareInTime",
    "Kind",
    "LevelResult",
    "breaker_opens",
    "classify_answer",
    "new_actions",
    "run",
    "run_async",
    "summarize",
]

Kind = Literal["full", "downshifted", "dimmed", "degraded", "cache", "rules", "rejected", "failed"]
"""What served one answer (see :func:`classify_answer`)."""

KINDS: tuple[Kind, ...] = (
    "full",
    "downshifted",
    "dimmed",
    "degraded",
    "cache",
    "rules",
    "rejected",
    "failed",
)
"""Every kind, the generator-served ones first."""

GENERATOR = "qwen"
"""The generator's role (``models.roles.qwen``), whose endpoints' completion tokens ``/health`` shows."""

GENERATOR_SERVED: frozenset[Kind] = frozenset({"full", "downshifted", "dimmed", "degraded"})
"""The kinds whose brief the generator model wrote."""

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_T = TypeVar("_T")


def classify_answer(status: int | None, headers: Mapping[str, str], body: Any, requested_mode: str) -> Kind:
    """What served one answer of ``POST /v1/briefs``, from the answer alone.

    * ``rejected``: 503 or 429 with a ``Retry-After`` header (shed; the client was told when to come back);
    * ``failed``: anything else that is not a 200 with a brief (errors, timeouts: ``status`` None);
    * for a brief, by who wrote it -- its ``generate`` stage (the first), or a cache hit:
      ``cache`` (an exact-cache hit or a similar earlier request's brief), ``rules`` (rule-based,
      popular or any other fallback that is not a model);
    * a brief the generator wrote: ``dimmed`` when the answer says what was dimmed for load (a
      non-empty ``dimmed`` field, or ``reason`` ``load``), else ``downshifted`` when served in a
      poorer mode than requested, else ``degraded`` when a later stage fell back (template hints,
      rule-based validation) or the generator answered with reduced context, else ``full``.
    """
    if status == 200 and isinstance(body, dict) and isinstance(body.get("brief"), dict):
        stages = [s for s in body.get("stages") or [] if isinstance(s, dict)]
        by = [str(s.get("served_by", "")) for s in stages]
        first = by[0] if by else ""
        if body.get("cached") is True or first == "cache":
            return "cache"
        if not (first.startswith("model:") or first == "reduced_context"):
            return "rules"
        if body.get("dimmed") or body.get("reason") == "load":
            return "dimmed"
        if body.get("downshifted") or body.get("served_mode") != requested_mode:
            return "downshifted"
        if first == "reduced_context" or any(not b.startswith("model:") for b in by) or body.get("degraded"):
            return "degraded"
        return "full"
    if status in (429, 503) and _retry_after(headers):
        return "rejected"
    return "failed"


def _retry_after(headers: Mapping[str, str]) -> bool:
    raw = headers.get("retry-after")
    if raw is None:
        return False
    try:
        return float(raw) >= 0
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Answer:
    """One request of the load: its kind, latency (seconds) and when it came back (monotonic);
    ``connect``: the part of the latency spent opening a new connection (0.0 on a kept-alive one);
    ``first``: its client's first request (every client sends its first at the level's start);
    ``cut``: a generator's brief stopped at the latency target (``description_tail`` dimmed)."""

    kind: Kind
    latency: float
    done: float
    detail: str = ""
    connect: float = 0.0
    first: bool = False
    cut: bool = False


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {f"p{q}_ms": round(percentile(values, q) * 1000, 1) for q in (50, 95, 99)}


def summarize(answers: Sequence[Answer], elapsed: float, bare_per_min: float | None = None) -> dict[str, Any]:
    """The per-level figures of ``answers`` received over ``elapsed`` seconds.

    ``answers_per_s`` counts every answer (briefs and refusals alike), ``briefs_per_s`` the briefs;
    ``accepted`` latencies are the briefs', ``rejections`` the 503/429's, from sending the request to
    the end of the answer, a new connection's setup included (a client refused for long finds its
    kept-alive connection closed and opens another); ``rejections_after_connect`` leave that setup out,
    and ``rejections_new_connections`` is the share of refusals that opened a connection;
    ``rejections_after_first`` leave out every client's first request -- all of them sent in the same
    instant, a burst of the level's size the server answers one after another -- and so measure the
    steady load. ``share`` is each kind's share of all answers. ``generator_briefs_per_min`` counts
    the briefs the generator wrote; ``ratio`` divides it by ``bare_per_min`` (the bare model server's
    best) when given. ``generator_briefs_cut`` of them were stopped at the latency target and served
    with their description cut short; ``generator_whole_briefs_per_min`` counts the others.
    """
    counts = Counter(a.kind for a in answers)
    n = len(answers)
    briefs = [a.latency for a in answers if a.kind not in ("rejected", "failed")]
    refusals = [a for a in answers if a.kind == "rejected"]
    rejected = [a.latency for a in refusals]
    generated = sum(counts[k] for k in GENERATOR_SERVED)
    cut = sum(1 for a in answers if a.cut)
    per_min = generated * 60.0 / elapsed if elapsed > 0 else 0.0
    return {
        "answers": n,
        "answers_per_s": round(n / elapsed, 2) if elapsed > 0 else 0.0,
        "briefs_per_s": round(len(briefs) / elapsed, 2) if elapsed > 0 else 0.0,
        "counts": {k: counts[k] for k in KINDS},
        "share": {k: round(counts[k] / n, 4) if n else 0.0 for k in KINDS},
        "accepted": _pcts(briefs),
        "rejections": _pcts(rejected),
        "rejections_after_connect": _pcts([a.latency - a.connect for a in refusals]),
        "rejections_after_first": _pcts([a.latency for a in refusals if not a.first]),
        "rejections_new_connections": round(sum(a.connect > 0 for a in refusals) / len(refusals), 4)
        if refusals
        else None,
        "generator_briefs": generated,
        "generator_briefs_per_min": round(per_min, 2),
        "generator_briefs_cut": cut,
        "generator_whole_briefs_per_min": round((generated - cut) * 60.0 / elapsed, 2) if elapsed else 0.0,
        "ratio_to_bare": round(per_min / bare_per_min, 3) if bare_per_min else None,
    }


def breaker_opens(snapshots: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """How many times each breaker was seen going into ``open`` over ``snapshots`` (name -> state),
    in order. A breaker open in the first snapshot counts once: it opened before or as the level began."""
    opens: Counter[str] = Counter()
    last: dict[str, str] = {}
    for snap in snapshots:
        for name, state in snap.items():
            if state == "open" and last.get(name) != "open":
                opens[name] += 1
            last[name] = state
    return dict(opens)


def new_actions(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The recovery actions in history ``after`` that are not in ``before`` (by time, action and target)."""

    def key(a: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        return a.get("at"), a.get("action"), a.get("target")

    seen = {key(a) for a in before}
    return [dict(a) for a in after if key(a) not in seen]


def held_back(actions: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """``actions`` (recovery history entries) as (the ones that ran, the ones its guard held back),
    each ``"action(target)"``; a held-back one also says why.

    The recovery manager records an action its guard held back -- a model that is busy, not down, or
    a resource high from our own load -- as ``skipped`` with the reason: nothing was done, so it is
    not counted as an action taken."""
    ran = [f"{a.get('action')}({a.get('target')})" for a in actions if a.get("status") != "skipped"]
    kept = [
        f"{a.get('action')}({a.get('target')}): {a.get('detail')}"
        for a in actions
        if a.get("status") == "skipped"
    ]
    return ran, kept


@dataclass(slots=True)
class LevelResult:
    """One concurrency level's raw material (turned into figures by :meth:`figures`)."""

    level: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    snapshots: list[dict[str, str]] = field(default_factory=list)
    modes_seen: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    recovered_s: float | None = None
    tokens: int | None = None
    """The generator's completion tokens during the load (None when the server did not say)."""

    def figures(
        self,
        bare_per_min: float | None,
        bare_tokens_per_s: float | None = None,
        in_time: BareInTime | None = None,
    ) -> dict[str, Any]:
        """The level's row of the report (``in_time``: the bare grid's best that answers in time)."""
        opens = breaker_opens(self.snapshots)
        failed = [a.detail for a in self.answers if a.kind == "failed" and a.detail]
        ran, kept = held_back(self.actions)
        rate = self.tokens / self.elapsed if self.tokens is not None and self.elapsed > 0 else None
        summary = summarize(self.answers, self.elapsed, bare_per_min)
        per_min = summary["generator_briefs_per_min"]
        return {
            "concurrency": self.level,
            "seconds": round(self.elapsed, 2),
            **summary,
            "ratio_to_bare_in_time": _ratio(per_min, in_time.valid_per_min if in_time else None),
            "generator_tokens_per_s": None if rate is None else round(rate, 1),
            "tokens_ratio_to_bare": _ratio(rate, bare_tokens_per_s),
            "tokens_ratio_to_bare_in_time": _ratio(rate, in_time.tokens_per_s if in_time else None),
            "breaker_opens": sum(opens.values()),
            "breaker_opens_by_name": opens,
            "system_modes_seen": list(dict.fromkeys(self.modes_seen)),
            "recovery_actions": len(ran),
            "recovery_action_names": ran,
            "recovery_actions_held_back": kept,
            "full_mode_back_s": None if self.recovered_s is None else round(self.recovered_s, 2),
            "first_failures": list(dict.fromkeys(failed))[:3],
        }


def _ratio(value: float | None, of: float | None) -> float | None:
    return round(value / of, 3) if value is not None and of else None


@dataclass(frozen=True, slots=True)
class BareInTime:
    """The bare grid's best among the configurations whose calls answer in time: p95 latency within
    the generator's timeout. A configuration whose slowest calls take longer serves no brief from
    them -- the generator's call times out -- so its rate is not one a server with that timeout and
    a latency target of the same length can reach (on 2 cores, 2 threads x 4 slots: 34/min, but
    calls of 11.8 s at p95)."""

    name: str
    valid_per_min: float
    tokens_per_s: float

    @staticmethod
    def of(grid: Sequence[Mapping[str, Any]] | None, timeout: float) -> BareInTime | None:
        """The best row of ``grid`` (by valid completions/min, then tokens/s) with ``p95_s <= timeout``."""
        fits = [r for r in grid or () if not r.get("error") and 0 < float(r.get("p95_s") or 0) <= timeout]
        if not fits:
            return None
        best = max(fits, key=_rank)
        return BareInTime(str(best["name"]), float(best["valid_per_min"]), float(best["tokens_per_s"]))


# ---------------------------------------------------------------------------------------------- load


def _text(level: int, i: int) -> str:
    # Distinct across levels too: no answer of one level is a cache hit in the next.
    return f"{brief_text(i)} (level {level})"


async def _status(http: httpx.AsyncClient) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await http.get("/api/v1/recovery/status")
        body = response.json()
        if response.status_code == 200 and isinstance(body, dict):
            return body
    return None


async def _generator_tokens(http: httpx.AsyncClient) -> int | None:
    """The completion tokens the generator's endpoints have reported so far (``/health``), or None."""
    with contextlib.suppress(httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError):
        body = (await http.get("/health")).json()
        endpoints = body["models"][GENERATOR]["endpoints"]
        return sum(int(ep["completion_tokens"]) for ep in endpoints)
    return None


async def _side(url: str, ask: Callable[[httpx.AsyncClient], Awaitable[_T]]) -> _T:
    """``ask`` on a client of its own to ``url`` (between levels, when no other is open)."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as side:
        return await ask(side)


async def _history(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        body = (await http.get("/api/v1/recovery/actions")).json()
        history = body.get("history") if isinstance(body, dict) else None
        if isinstance(history, list):
            return [a for a in history if isinstance(a, dict)]
    return []


def _full(status: Mapping[str, Any] | None, mode: str) -> bool:
    return (
        status is not None
        and mode in (status.get("available_modes") or [])
        and status.get("system_mode") in (None, "normal")
        and all(s == "closed" for s in (status.get("breakers") or {}).values())
    )


async def _watch(http: httpx.AsyncClient, result: LevelResult, interval: float) -> None:
    while True:
        status = await _status(http)
        if status is not None:
            breakers = status.get("breakers") or {}
            result.snapshots.append({str(k): str(v) for k, v in breakers.items()})
            result.modes_seen.append(str(status.get("system_mode")))
        await asyncio.sleep(interval)


async def _client(
    http: LoadClient,
    level: int,
    numbers: itertools.count[int],
    mode: str,
    until: float,
    out: list[Answer],
) -> None:
    first = True
    while time.monotonic() < until:
        i = next(numbers)
        t0 = time.monotonic()
        detail = ""
        connect = 0.0
        headers: dict[str, str] = {}
        try:
            response = await http.post_json("/v1/briefs", {"text": _text(level, i), "mode": mode})
        except (TimeoutError, OSError, h11.ProtocolError) as e:
            status, body = None, None
            detail = f"{type(e).__name__}: {e}".rstrip(": ")
        else:
            status, headers, connect = response.status, response.headers, response.connect
            try:
                body = response.json()
            except ValueError:
                body = None
            if status != 200:
                detail = f"HTTP {status}"
        done = time.monotonic()
        kind = classify_answer(status, headers, body, mode)
        dimmed = body.get("dimmed") if isinstance(body, dict) else None
        cut = kind in GENERATOR_SERVED and "description_tail" in (dimmed or [])
        out.append(Answer(kind, done - t0, done, detail if kind == "failed" else "", connect, first, cut))
        first = False
        if kind == "rejected" or status is None:
            # A refused client comes back after the Retry-After it was given, as a polite one would;
            # one that got no answer at all (refused connection, timeout) waits as for a Retry-After
            # of a second -- without it a level against a server that is down spins on the dead port.
            pause = retry_pause(_seconds(headers.get("retry-after")))
            await asyncio.sleep(min(pause, max(0.0, until - time.monotonic())))


def _seconds(raw: str | None) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


async def run_level(
    url: str,
    level: int,
    seconds: float,
    *,
    mode: str = "fast",
    settle: float = 60.0,
    poll: float = 0.5,
    timeout: float = 120.0,
) -> LevelResult:
    """``level`` clients for ``seconds`` against ``url``, then up to ``settle`` seconds until the requested
    mode is served in full again. Raises ValueError for a host other than 127.0.0.1."""
    host = httpx.URL(url).host
    if host not in _LOCAL_HOSTS:
        raise ValueError(f"overload goes to 127.0.0.1 only, not {host!r}")
    if level < 1 or seconds <= 0:
        raise ValueError("level must be at least 1 and seconds positive")
    result = LevelResult(level, seconds)
    # The load on the light client (a tenth of httpx's cost per request: the clients must not be what
    # is measured); the status polls, a few a second, on httpx.
    async with (
        LoadClient(url, timeout=timeout, max_connections=level + 8) as http,
        httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as side,
    ):
        before = await _history(side)
        tokens = await _generator_tokens(side)
        watcher = asyncio.create_task(_watch(side, result, poll))
        numbers = itertools.count()
        t0 = time.monotonic()
        try:
            await asyncio.gather(
                *(_client(http, level, numbers, mode, t0 + seconds, result.answers) for _ in range(level))
            )
            ended = time.monotonic()
            result.elapsed = ended - t0
            after = await _generator_tokens(side)
            if tokens is not None and after is not None:
                result.tokens = after - tokens
            while time.monotonic() - ended < settle:
                if _full(await _status(side), mode):
                    result.recovered_s = time.monotonic() - ended
                    break
                await asyncio.sleep(poll)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        result.actions = new_actions(before, await _history(side))
    return result


# ---------------------------------------------------------------------------------------------- server


class _Serve:
    """``python -m brownout serve --port N`` with the built-in defaults, in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        from brownout.llm.local import free_port

        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, mode: str, timeout: float) -> None:

        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *(
                    sys.executable,
                    "-m",
                    "brownout",
                    "serve",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ),
                cwd=self.workdir,
                env=child_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0, trust_env=False) as http:
            while not _full(await _status(http), mode):
                if self.proc.returncode is not None:
                    raise RuntimeError(f"brownout serve exited while starting:\n{self._tail()}")
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"brownout serve did not serve {mode} within {timeout:g}s:\n{self._tail()}"
                    )
                await asyncio.sleep(0.5)

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def _machine() -> dict[str, Any]:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "note": "a shared machine: other sessions run tests beside this one, so figures are provisional",
    }


async def run_async(
    *,
    url: str | None = None,
    levels: Sequence[int] = (1, 4, 16, 64, 200),
    seconds: float = 45.0,
    mode: str = "fast",
    settle: float = 60.0,
    bare: bool = True,
    bare_seconds: float = 20.0,
    bare_rate: float | None = None,
    startup_timeout: float = 180.0,
) -> dict[str, Any]:
    """The whole bench (module docstring); returns the ``--json`` document."""
    if not levels or min(levels) < 1 or max(levels) > 200:
        raise ValueError("levels must be between 1 and 200")
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if url is not None and httpx.URL(url).host not in _LOCAL_HOSTS:
        raise ValueError(f"overload goes to 127.0.0.1 only, not {httpx.URL(url).host!r}")
    machine = _machine()
    capacity: dict[str, Any] | None = None
    from brownout.bench import capacity as bench_capacity

    if bare_rate is None and bare:
        # Before the server starts: the bare server must not share the CPU with brownout's models.
        capacity = await bench_capacity.run_async(seconds=bare_seconds, layouts=False)
        best = capacity.get("best")
        bare_rate = float(best["valid_per_min"]) if best else None
    # The bare grid's best tokens/s, whichever configuration made it (the briefs' best may differ).
    grid = capacity.get("grid") if capacity else None
    bare_tokens = max((float(r["tokens_per_s"]) for r in grid or [] if r.get("tokens_per_s")), default=None)
    finalists: list[dict[str, Any]] = []
    for row in _finalists(grid):
        again = await bench_capacity.measure(int(row["threads"]), int(row["parallel"]), seconds)
        if not again.error and again.valid_per_min > 0:
            finalists.append(asdict(again))
    confirmed = max(finalists, key=_rank, default=None)
    if confirmed is not None:
        bare_rate, bare_tokens = float(confirmed["valid_per_min"]), float(confirmed["tokens_per_s"])
    timeout = RoleSection().timeout
    in_time = BareInTime.of(finalists, timeout) or BareInTime.of(grid, timeout)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="brownout-overload-") as tmp:
        server = _Serve(Path(tmp)) if url is None else None
        try:
            if server is not None:
                await server.start(mode, startup_timeout)
                url = server.url
            assert url is not None
            before = _bare_figures(confirmed)
            for level in levels:
                result = await run_level(url, level, seconds, mode=mode, settle=settle)
                row = result.figures(bare_rate, bare_tokens, in_time)
                if confirmed is not None:
                    # The same bare configuration again, right after the level (brownout idle).
                    idle_from = await _side(url, _history)
                    again = await bench_capacity.measure(
                        int(confirmed["threads"]), int(confirmed["parallel"]), seconds
                    )
                    after = None if again.error else _bare_figures(asdict(again))
                    row.update(_adjacent(row, before, after))
                    before = after
                    # What the idle server did while the bare server had the cores: its model
                    # slowed by a neighbour must not be taken for a broken one (never seen in a
                    # level's own figures, which start after this).
                    ran, kept = held_back(new_actions(idle_from, await _side(url, _history)))
                    status = await _side(url, _status)
                    row["while_bare_measured"] = {
                        "recovery_action_names": ran,
                        "recovery_actions_held_back": kept,
                        "system_mode": None if status is None else status.get("system_mode"),
                    }
                rows.append(row)
        finally:
            if server is not None:
                await server.stop()
    return {
        "bench": "overload",
        "target": "a default brownout serve (built-in config)" if server is not None else url,
        "mode": mode,
        "seconds_per_level": seconds,
        "machine": machine,
        "bare": {
            "valid_per_min": bare_rate,
            "tokens_per_s": bare_tokens,
            "best": capacity.get("best") if capacity else None,
            "best_measured_again": confirmed,
            "finalists_measured_again": finalists,
            "best_in_time": None if in_time is None else asdict(in_time),
            "grid": capacity.get("grid") if capacity else None,
        },
        "levels": rows,
    }


def _bare_figures(row: Mapping[str, Any] | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {"valid_per_min": float(row["valid_per_min"]), "tokens_per_s": float(row["tokens_per_s"])}


def _adjacent(
    row: Mapping[str, Any], before: Mapping[str, float] | None, after: Mapping[str, float] | None
) -> dict[str, Any]:
    """A level's ratios to the bare best measured just before and just after it (their mean; the one
    that ran when the other could not): the machine's own pace drifts by several percent over a few
    minutes, and a bare rate measured a quarter of an hour earlier carries that drift into the
    ratio."""
    both = [b for b in (before, after) if b is not None]
    valid = sum(b["valid_per_min"] for b in both) / len(both) if both else None
    tokens = sum(b["tokens_per_s"] for b in both) / len(both) if both else None
    return {
        "bare_adjacent": {
            "before": before,
            "after": after,
            "valid_per_min": None if valid is None else round(valid, 2),
            "tokens_per_s": None if tokens is None else round(tokens, 1),
        },
        "ratio_to_bare_adjacent": _ratio(row["generator_briefs_per_min"], valid),
        "tokens_ratio_to_bare_adjacent": _ratio(row["generator_tokens_per_s"], tokens),
    }


BARE_FINALISTS = 2
"""How many of the bare grid's best configurations are measured again for as long as a level runs."""


def _rank(row: Mapping[str, Any]) -> tuple[float, float]:
    return float(row["valid_per_min"]), float(row["tokens_per_s"])


def _finalists(grid: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """The :data:`BARE_FINALISTS` best rows of the bare grid that made valid completions."""
    ran = [r for r in grid or () if not r.get("error") and float(r.get("valid_per_min") or 0) > 0]
    return sorted(ran, key=_rank, reverse=True)[:BARE_FINALISTS]


def run(**kwargs: Any) -> dict[str, Any]:
    """:func:`run_async` in a new event loop."""
    return asyncio.run(run_async(**kwargs))
