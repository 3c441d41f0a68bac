"""Run the gateway's fault scenarios against a real ``brownout serve`` and score them.

:func:`run_catalogue` starts, on 127.0.0.1, a :class:`~.upstream.FaultUpstream` per scenario role
(the faulty primary, the healthy backup, a control where the scenario has one) in this process, one
healthy upstream for the brief pipeline's three model roles (so no local model starts), and one
``brownout serve`` subprocess whose config holds every scenario's groups with the gateway's
*default* settings. The scenarios then run concurrently -- they share nothing but the server -- each
bounded by its budget, so the whole catalogue takes about as long as its slowest scenario (a little
over 100 s at worst, when a scenario hangs to its budget). The result is a :class:`Scorecard`.

The official ``openai`` client drives the requests (the ``dev`` extra installs it, or
``pip install openai``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from brownout.chaos.failover.grading import GRADES, Exchange, Grade, Verdict
from brownout.chaos.failover.scenarios import BUDGET, CATALOGUE, GatewayScenario, Stage, run_play
from brownout.chaos.failover.upstream import Fault, FaultUpstream
from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "PEERS",
    "PRIOR_RUN",
    "ScenarioScore",
    "Scorecard",
    "gateway_config",
    "run_catalogue",
    "supports_context_window",
]

PEERS: Final[dict[str, dict[str, int]]] = {
    "Portkey": {"pass": 11, "fail": 3},
    "LiteLLM": {"pass": 9},
    "Bifrost": {"pass": 9, "fail": 1},
}
"""The peers' published scores on the same 16 scenarios (the catalogue's v0.1 results)."""

PRIOR_RUN: Final[dict[Grade, int]] = {"pass": 6, "partial": 2, "safe": 6, "fail": 2}
"""An independent run of the 16 scenarios against ``brownout serve`` with default settings (issue 17)."""

_START_TIMEOUT: Final = 60.0


@dataclass(slots=True)
class ScenarioScore:
    """One scenario's result: its verdict, how long it took, who was called, what the caller saw."""

    scenario: GatewayScenario
    verdict: Verdict
    seconds: float
    calls: dict[str, int]
    """Chat requests each upstream received (``primary``, ``backup``, ``control``)."""
    did: dict[str, dict[str, int]]
    """What each upstream did with them (a fault, ``healthy``, ``prefill_rejected``), counted."""
    exchanges: list[Exchange] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The score as JSON."""
        s = self.scenario
        return {
            "name": s.drill_name,
            "scenario": s.name,
            "fault": s.title,
            "passes_when": s.passes_when,
            "grade": self.verdict.grade,
            "reason": self.verdict.reason,
            "seconds": round(self.seconds, 2),
            "calls": self.calls,
            "upstreams_did": self.did,
            "requests": len(self.exchanges),
            "exchanges": [ex.to_json() for ex in self.exchanges[:3]],
            **({"timeline": self.timeline()} if len(self.exchanges) > 1 else {}),
        }

    def timeline(self) -> list[str]:
        """Each request of a many-request scenario in one line: when it started (seconds after the
        first), who served it or the error, and whether the text was whole."""
        if not self.exchanges:
            return []
        first = self.exchanges[0].started
        lines = []
        for ex in self.exchanges:
            who = ex.headers.get("x-brownout-served-by") or (", ".join(ex.models) or "nobody")
            what = who if ex.answered else f"error: {(ex.error or '')[:80]}"
            lines.append(f"{ex.started - first:6.2f} s  {what}")
        return lines


@dataclass(slots=True)
class Scorecard:
    """Every scenario's score from one run."""

    scores: list[ScenarioScore]
    seconds: float
    budget: float = BUDGET
    notes: list[str] = field(default_factory=list)
    when: str = ""
    """The run's UTC date and time (ISO 8601)."""

    def summary(self) -> dict[Grade, int]:
        """How many scenarios got each grade."""
        counts = Counter(s.verdict.grade for s in self.scores)
        return {g: counts[g] for g in GRADES}

    @property
    def all_pass(self) -> bool:
        """Every scenario passed."""
        return bool(self.scores) and all(s.verdict.grade == "pass" for s in self.scores)

    def to_json(self) -> dict[str, Any]:
        """The scorecard as JSON (``brownout drill gateway --json``; ``benchmarks/results/failover.json``)."""
        return {
            "catalogue": "16 provider faults (failover catalogue v0.1), streaming, official openai client",
            "target": "brownout serve, default gateway settings",
            "brownout_version": _version(),
            "when": self.when,
            "budget_seconds": self.budget,
            "seconds": round(self.seconds, 1),
            "summary": self.summary(),
            "scenarios": [s.to_json() for s in self.scores],
            "notes": self.notes,
            "peers_published": PEERS,
            "prior_independent_run": PRIOR_RUN,
        }


def _version() -> str:
    try:
        return importlib.metadata.version("brownout")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def supports_context_window() -> bool:
    """Whether this gateway's config accepts ``context_window`` on a model group."""
    from brownout.gateway.config import ModelGroup

    return "context_window" in ModelGroup.model_fields


@dataclass(slots=True)
class _Cast:
    """The upstreams of one scenario."""

    primary: FaultUpstream
    backup: FaultUpstream
    control: FaultUpstream | None


def _cast(s: GatewayScenario, clock: Clock) -> _Cast:
    return _Cast(
        primary=FaultUpstream(f"{s.name}-primary", f"primary-{s.name}", s.primary, clock=clock),
        backup=FaultUpstream(
            f"{s.name}-backup",
            f"backup-{s.name}",
            s.backup,
            rejects_prefill=s.backup_rejects_prefill,
            clock=clock,
        ),
        control=FaultUpstream(f"{s.name}-control", f"control-{s.name}", clock=clock) if s.control else None,
    )


def gateway_config(
    scenarios: Sequence[GatewayScenario],
    urls: dict[str, tuple[str, str, str | None]],
    *,
    context_window: bool,
) -> dict[str, Any]:
    """The ``gateway`` section for ``scenarios``: each one's groups, nothing but the defaults besides.

    ``urls`` maps a scenario's name to its primary's, backup's and control's base URLs;
    ``context_window`` says whether the groups' declared context windows may be written.
    """
    groups: dict[str, Any] = {}
    for s in scenarios:
        primary, backup, control = urls[s.name]
        chat: dict[str, Any] = {
            "endpoints": [{"url": primary, "name": "primary"}],
            "fallbacks": [s.backup_group],
        }
        spare: dict[str, Any] = {"endpoints": [{"url": backup, "name": "backup"}]}
        if context_window and s.primary_context is not None:
            chat["context_window"] = s.primary_context
        if context_window and s.backup_context is not None:
            spare["context_window"] = s.backup_context
        groups[s.group] = chat
        groups[s.backup_group] = spare
        if control is not None:
            groups[s.control_group] = {"endpoints": [{"url": control, "name": "control"}]}
    return {"groups": groups}


def _server_config(port: int, roles_url: str, workdir: Path, gateway: dict[str, Any]) -> dict[str, Any]:
    from brownout.config import ROLES

    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": {
            # The brief pipeline's roles on a healthy upstream, probed hourly: no local model starts
            # and nothing but the scenarios' requests reaches the gateway's upstreams.
            "local": {"enabled": False},
            "health_interval": 3600,
            "roles": {role: {"endpoints": [{"url": roles_url, "model": role}]} for role in ROLES},
        },
        "database": {
            "url": f"sqlite+aiosqlite:///{workdir / 'failover.db'}",
            "spool_path": str(workdir / "failover-spool.db"),
        },
        "gateway": gateway,
    }


async def _play(
    s: GatewayScenario,
    cast: _Cast,
    client: Any,
    http: Any,
    clock: Clock,
    budget: float,
    notes: list[str],
) -> ScenarioScore:
    stage = Stage(
        scenario=s,
        primary=cast.primary,
        backup=cast.backup,
        client=client,
        http=http,
        clock=clock,
        budget=budget,
        control=cast.control,
        notes=notes,
    )
    start = clock.now()
    exchanges: list[Exchange] = []
    try:
        # Every request of a play is bounded on its own; this bounds the play as a whole.
        async with asyncio.timeout(budget * 2 + 30.0):
            verdict, exchanges = await run_play(stage)
    except TimeoutError:
        verdict = Verdict("fail", f"the scenario did not finish within {budget * 2 + 30.0:g} s")
    ups = {"primary": cast.primary, "backup": cast.backup}
    if cast.control is not None:
        ups["control"] = cast.control
    return ScenarioScore(
        scenario=s,
        verdict=verdict,
        seconds=clock.now() - start,
        calls={name: len(up.calls) for name, up in ups.items()},
        did={name: dict(Counter(c.did for c in up.calls)) for name, up in ups.items()},
        exchanges=exchanges,
    )


async def run_catalogue(
    scenarios: Sequence[GatewayScenario] = CATALOGUE,
    *,
    budget: float = BUDGET,
    workdir: Path | None = None,
    on_score: Callable[[ScenarioScore], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Scorecard:
    """Run ``scenarios`` concurrently against one ``brownout serve`` and score them (module docstring).

    ``workdir`` keeps the server's config, log and database (a temporary directory when None);
    ``on_score`` is called as each scenario finishes, ``on_phase`` with what the run is doing.
    Raises :class:`~brownout.chaos.drills.processes.DrillError` when the server cannot start, and
    RuntimeError when the ``openai`` client is not installed.
    """
    try:
        import openai
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise RuntimeError(
            "the gateway scenarios drive the official openai client: pip install openai "
            "(or scripts/bootstrap with the dev extra)"
        ) from e
    import httpx

    from brownout.chaos.drills.processes import BrownoutServer
    from brownout.chaos.servers import free_port

    def phase(text: str) -> None:
        if on_phase is not None:
            on_phase(text)

    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    with tempfile.TemporaryDirectory(prefix="brownout-failover-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        casts = {s.name: _cast(s, clock) for s in scenarios}
        roles = FaultUpstream("roles", "roles", Fault())
        ups = [roles, *(u for c in casts.values() for u in (c.primary, c.backup, c.control) if u)]
        notes: list[str] = []
        server: BrownoutServer | None = None
        try:
            for up in ups:
                await up.start()
            windows = supports_context_window()
            if not windows:
                notes.append(
                    "this gateway's config has no context_window: the context-length groups were "
                    "written without it"
                )
            urls = {
                name: (c.primary.url, c.backup.url, c.control.url if c.control else None)
                for name, c in casts.items()
            }
            config = _server_config(
                free_port(), roles.url, work, gateway_config(scenarios, urls, context_window=windows)
            )
            phase("starting brownout serve")
            server = BrownoutServer(config, work)
            await server.start(clock, _START_TIMEOUT)
            phase(f"running {len(scenarios)} scenario(s) at once (budget {budget:g} s each)")
            start = clock.now()
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False) as http,
                openai.AsyncOpenAI(
                    base_url=f"{server.url}/v1",
                    api_key="sk-drill-unused",
                    max_retries=0,
                    timeout=budget + 5.0,
                    # Requests go to 127.0.0.1 only: no proxy from the environment.
                    http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
                ) as client,
            ):

                async def one(s: GatewayScenario) -> ScenarioScore:
                    extra = notes if (s.primary_context or s.backup_context) and not windows else []
                    score = await _play(s, casts[s.name], client, http, clock, budget, list(extra))
                    if on_score is not None:
                        on_score(score)
                    return score

                scores = await asyncio.gather(*(one(s) for s in scenarios))
            seconds = clock.now() - start
        finally:
            if server is not None:
                await server.stop()
            for up in ups:
                await up.aclose()
    return Scorecard(list(scores), seconds, budget=budget, notes=notes, when=when)
