"""Overload on healthy models: 200 closed-loop clients on the real embedded models; busy is not broken."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from brownout.bench import percentile
from brownout.bench.client import retry_pause
from brownout.chaos.drills.harness import Drill, seconds_text
from brownout.chaos.drills.load import Load, Sample
from brownout.chaos.drills.scenarios._shared import recovery_history
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen
from brownout.clock import Clock

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="overload",
    title="Overload on healthy models (200 concurrent clients)",
    category="API",
    severity="Critical",
    kind="load",
    seed="issue 14: overload is not failure",
    event="The embedded default (the real local models) gets more distinct-text requests than its "
    "models can answer: 200 clients, each sending its next request as soon as the last is answered. "
    "The models are healthy, only busy.",
    detection=(
        DetectionRow("Admission control", "a request that cannot start before its deadline", "immediate"),
        DetectionRow("Concurrency limit", "model latency above its no-load latency", "a few calls"),
    ),
    response=(
        "The models keep answering at their own rate: time spent queueing never counts against a "
        "model, so no breaker opens and no recovery action runs.",
        "What the models cannot take is dimmed (optional stages dropped, cache, rules) or refused at "
        "once with 503 + Retry-After, never after a long wait.",
        "When the load ends, full mode is back within seconds.",
    ),
    impact=(
        ("Breaker opens", "0"),
        ("Recovery actions", "0 (the models are healthy)"),
        ("Generator-served briefs/min", ">= 0.9 x its rate at one client"),
        ("Refusals", "p95 < 50 ms from request to answer (the opening burst reported beside)"),
        ("Accepted answers", "p95 within the latency target (10 s)"),
    ),
    verification=(
        "the default server on the real embedded models; one client for 20 s (the generator's "
        "rate unloaded), then 200 clients for 30 s, then a gentle load",
        "breaker states from /health, recovery actions from /api/v1/recovery/actions and model "
        "server restarts, before and after",
        "generator-served briefs/min under overload against the one-client rate; p95 of briefs "
        "and of refusals (from the request on its connection: a new connection's setup is reported "
        "beside it, and so are the refusals of the 200 first requests, all sent at once); full mode "
        "back within 10 s of the load ending",
    ),
    play="overload",
    fault=Fault("none", hold=30.0, behaviour=frozen({"clients": 200, "baseline": 20.0})),
    goals=Goals(detect=False, lost_writes=True),
    mode="fast",
    requires=("local-model",),
)


async def play(d: Drill) -> None:
    """The embedded default on the real local models, then 200 closed-loop clients: a busy model must not
    be treated as a broken one (issue 14's goals)."""
    from brownout.bench.overload import breaker_opens, held_back, new_actions

    s = d.scenario
    clients = int(s.fault.behaviour.get("clients", 200))
    baseline = float(s.fault.behaviour.get("baseline", 20.0))
    target = 10.0  # seconds: the p95 latency target of an accepted answer on the embedded default
    d.phase("starting the server on the embedded models")
    load, watcher = await d.begin(_default_settings(), fakes=(), ready_timeout=d.settings.startup_timeout)
    assert d.server is not None
    # The server keeps a request up to its own deadline (60 s by default): a client giving up sooner
    # would count its own impatience as a failed request.
    await load.aclose()
    d.load = load = Load(
        load.base_url,
        mode=s.mode,
        timeout=d.server.config.server.request_timeout + 10.0,
        clock=d.clock,
        on_sample=lambda sample: d.progress.sample(s, sample),
    )
    history_before = await recovery_history(d)
    servers_before = {r: int(v.get("restarts", 0)) for r, v in (await watcher.poll()).servers.items()}

    d.phase(f"one client for {baseline:g} s (the generator's rate unloaded)")
    base_at = d.mark("one client")
    await _closed_loop(load, 1, baseline, d.clock)
    fault_at = d.mark(f"{clients} clients")
    d.phase(f"{clients} clients for {s.fault.hold:g} s")
    shed_before = await _shed_counts(d)
    firsts = await _closed_loop(load, clients, s.fault.hold, d.clock)
    restore_at = d.mark("load ends")
    shed_after = await _shed_counts(d)
    # The server's own view of the same refusals (request in -> 503 out), without the load client and
    # the machine's scheduling between the two processes.
    server_refused = shed_after[0] - shed_before[0]
    server_fast = shed_after[1] - shed_before[1]
    # The stragglers of the overload are in; a gentle load shows when full answers are back.
    d.phase("gentle load until full mode is back")
    gentle = Load(load.base_url, mode=s.mode, rate=0.5, clock=d.clock, timeout=load.timeout)
    gentle.start()
    try:
        await d.wait_recovered_with(gentle, restore_at, 10.0)
    finally:
        await gentle.aclose()
    load.samples.extend(gentle.samples)
    after = await watcher.poll()
    await d.end_load()
    history_after = await recovery_history(d)

    r = d.result
    samples = load.samples
    r.counts = dict(load.counts())
    unloaded = _model_served_per_min(samples, base_at, fault_at)
    loaded = _model_served_per_min(samples, fault_at, restore_at)
    during = [x for x in samples if fault_at <= x.sent < restore_at]
    accepted = [x.latency for x in during if x.status == 200]
    # A refusal's time is from its request on the wire to the answer: when 200 clients start at once,
    # opening their 200 connections costs the drill's own event loop 25-50 ms before any request is
    # written (a bare ASGI app that answers 503 and does nothing else measured 46-69 ms p95 for the
    # whole, 20-26 ms from the request on, with two busy threads on this machine's two cores). That
    # part is reported beside it, not judged. Nor is the opening burst judged: every client sends its
    # first request in the same instant, on a connection of its own, and the server answers the 200
    # one after another on the cores the model is using (its p95 is reported beside). Refused callers
    # are told to come back one after another (queue.retry_pacing), so the steady load's refusals
    # no longer outnumber the burst's a hundred to one, as when all came back every few seconds.
    rejections = [x for x in during if x.outcome == "rejected"]
    opening = [x.answer_time for x in rejections if x.index in firsts]
    refused = [x.answer_time for x in rejections if x.index not in firsts]
    with_connect = [x.latency for x in rejections if x.index not in firsts]
    new_connections = sum(1 for x in rejections if x.connect > 0 and x.index not in firsts)
    opens = breaker_opens([h.breakers for h in watcher.samples])
    actions, kept = held_back(new_actions(history_before, history_after))
    restarts = {
        role: int(info.get("restarts", 0)) - servers_before.get(role, 0)
        for role, info in after.servers.items()
    }
    r.extra.update(
        clients=clients,
        generator_per_min_one_client=round(unloaded, 2),
        generator_per_min_overload=round(loaded, 2),
        accepted_p95_ms=_p95_ms(accepted),
        refused_p95_ms=_p95_ms(refused),
        refused_p95_with_connect_ms=_p95_ms(with_connect),
        refused=len(refused),
        refused_first_requests=len(opening),
        refused_first_requests_p95_ms=_p95_ms(opening),
        refused_on_new_connections=new_connections,
        server_refused=int(server_refused),
        server_refused_within_50ms=round(server_fast / server_refused, 4) if server_refused else None,
        breaker_opens=opens,
        recovery_actions=actions,
        recovery_actions_held_back=kept,
        model_server_restarts=restarts,
        system_modes_seen=sorted({h.system_mode for h in watcher.samples if h.system_mode}),
    )
    d.failed_check()
    d.check("no breaker opened", not opens, f"opens: {opens or 'none'}")
    d.check(
        "no recovery action while the models are healthy",
        not actions and not any(restarts.values()),
        f"actions: {r.extra['recovery_actions'] or 'none'}; model server restarts: {restarts}",
    )
    d.check(
        "the generator kept serving at its rate",
        unloaded > 0 and loaded >= 0.9 * unloaded,
        f"{loaded:.1f} model briefs/min under {clients} clients, {unloaded:.1f} with one client "
        f"(goal >= 0.9x)",
    )
    d.check(
        f"accepted answers p95 within {target:g} s",
        bool(accepted) and percentile(accepted, 95) <= target,
        f"p95 {seconds_text(percentile(accepted, 95) if accepted else None)} over {len(accepted)} briefs",
    )
    d.check(
        "refusals answered in < 50 ms p95",
        not refused or percentile(refused, 95) < 0.05,
        (
            f"p95 {_p95_ms(refused)} ms over {len(refused)} refusals from request to answer "
            f"({_p95_ms(with_connect)} ms with the setup of {new_connections} new connections); "
            f"{len(opening)} clients' first requests, all sent at once, refused with p95 "
            f"{_p95_ms(opening)} ms"
            + (
                f"; the server answered {100 * server_fast / server_refused:.1f} % of its "
                f"{int(server_refused)} within 50 ms"
                if server_refused
                else ""
            )
            if refused
            else "no refusals"
        ),
    )
    d.recovery_check(restore_at, 10.0)
    await d.finish_sqlite()


def _default_settings() -> dict[str, Any]:
    """The built-in defaults of what the drill settings shorten: the overload drill judges the server as
    users run it (model timeouts, health probes, breakers, modes, the JSON guard, the local servers)."""
    from brownout.config import BrownoutConfig

    defaults = BrownoutConfig().model_dump(mode="json")
    out: dict[str, Any] = {
        "models": defaults["models"],
        "circuit_breaker": defaults["circuit_breaker"],
        "json_guard": defaults["json_guard"],
        "server": {"request_timeout": defaults["server"]["request_timeout"]},
    }
    if "modes" in defaults:
        out["modes"] = defaults["modes"]
    return out


async def _closed_loop(load: Load, clients: int, seconds: float, clock: Clock) -> set[int]:
    """``clients`` clients, each sending its next request (a distinct text) as soon as the last came back,
    for ``seconds``; a refused client first waits the Retry-After it was given, as a polite client (the
    OpenAI SDK, any client honouring the header) would, with a little jitter (:func:`retry_pause`).
    Returns the indexes of the clients' first requests (all sent at the start)."""
    until = clock.now() + seconds
    firsts: set[int] = set()

    async def client() -> None:
        first = True
        while clock.now() < until:
            sample = await load.send()
            if first:
                firsts.add(sample.index)
                first = False
            if sample.outcome == "rejected":
                await clock.sleep(min(retry_pause(sample.retry_after), max(0.0, until - clock.now())))

    await asyncio.gather(*(client() for _ in range(clients)))
    return firsts


def _model_served_per_min(samples: Sequence[Sample], since: float, until: float) -> float:
    # Mode fast has one stage, the generator's: a full or downshifted answer is a brief it wrote (a
    # similar earlier brief or the rules are "fallback"; the texts are distinct, so no exact-cache hit).
    n = sum(1 for x in samples if since <= x.done < until and x.outcome in ("full", "downshifted"))
    return n * 60.0 / (until - since) if until > since else 0.0


def _p95_ms(values: Sequence[float]) -> float | None:
    return round(percentile(values, 95) * 1000, 1) if values else None


async def _shed_counts(d: Drill) -> tuple[float, float]:
    """From the server's ``brownout_shed_seconds``: refusals so far, and those answered within 50 ms."""
    from prometheus_client.parser import text_string_to_metric_families

    assert d.server is not None
    async with httpx.AsyncClient(base_url=d.server.url, timeout=10.0, trust_env=False) as http:
        try:
            text = (await http.get("/metrics")).text
        except httpx.HTTPError:
            return 0.0, 0.0
    total = fast = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "brownout_shed_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels.get("le", "nan")) == 0.05:
                fast = sample.value
    return total, fast
