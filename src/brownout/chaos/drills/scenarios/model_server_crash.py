"""Model server crash: the hinter's local llama.cpp server is killed (SIGKILL); its supervisor restarts it."""

from __future__ import annotations

import os
import signal

from brownout.chaos.drills.harness import ROLES, Drill, DrillError, seconds_text
from brownout.chaos.drills.measure import HealthSample
from brownout.chaos.drills.scenarios._model_fault import MODEL_VERIFY, PROBE
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="model-server-crash",
    title="Model server crash and automatic restart",
    category="Model",
    severity="Critical",
    kind="model",
    seed="001 (process supervision)",
    event="The hinter's local llama.cpp server process (the real embedded model) is killed with SIGKILL.",
    detection=(
        DetectionRow("Model supervisor", "child process exit (waitpid)", "immediate"),
        DetectionRow("Model supervisor", "/health of the child fails 3 times", "3 x 2 s"),
        PROBE,
    ),
    response=(
        "The supervisor sees the exit at once; the role is unavailable meanwhile and `creative` "
        "requests downshift to `balanced`.",
        "It restarts the server with backoff (1 s first) on the same port: the client's URL stays valid.",
        "Once the new process answers /health, the role is available again and `creative` returns.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Mode", "creative -> balanced for the restart's duration"),
        ("Restarts", "+1, same port"),
    ),
    verification=(
        *MODEL_VERIFY[:2],
        "detection: the hinter marked unavailable within 1 s of the kill",
        "creative mode back after the restart, on the same port, restarts counted",
        MODEL_VERIFY[4],
    ),
    play="local_model_crash",
    fault=Fault("sigkill", ("llama",), hold=0.0),
    goals=Goals(must_see=(), served_modes=()),
    requires=("fakellm", "local-model"),
    rate=1.0,
)


async def play(d: Drill) -> None:
    """SIGKILL the hinter's supervised local model server; the supervisor restarts it."""
    s = d.scenario
    role = s.fault.roles[0]
    d.phase("starting fakes, the local model and the server")
    # The real model answers in seconds, one request at a time: give its role a 20 s timeout,
    # requests room, and health probes (which queue behind a generation) 10 s.
    load, watcher = await d.begin(
        {
            "models": {"roles": {role: {"timeout": 20.0}}, "health_timeout": 10.0},
            "server": {"request_timeout": 60.0},
        },
        fakes=[r for r in ROLES if r != role],
        ready_timeout=d.settings.startup_timeout,
    )
    load.start()
    d.phase("warm-up (until a full answer)")
    end = d.clock.now() + 90.0
    while not any(x.outcome == "full" for x in load.samples) and d.clock.now() < end:
        await d.clock.sleep(0.1)
    before = await watcher.poll()
    server = before.servers.get(role) or {}
    pid, restarts, url = server.get("pid"), int(server.get("restarts", 0)), server.get("url")
    if not pid:
        raise DrillError(f"/health shows no local model server pid for {role}: {server}")
    d.phase(f"fault: SIGKILL {role} model server (pid {pid})")
    fault_at = d.mark("fault")
    os.kill(int(pid), signal.SIGKILL)

    def restarted(h: HealthSample) -> bool:
        info = h.servers.get(role) or {}
        return h.reachable and info.get("state") == "running" and info.get("pid") not in (None, pid)

    d.phase("waiting for the supervisor's restart")
    back = await watcher.wait_for(restarted, 90.0)
    restore_at = d.mark("restarted") if back is not None else fault_at
    # The restart is the restore; full mode must follow within one health cycle and a probe.
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    after = await watcher.poll()
    await d.end_load()
    info = after.servers.get(role) or {}
    d.result.extra.update(
        pid_before=pid,
        pid_after=info.get("pid"),
        restarts=int(info.get("restarts", 0)) - restarts,
        restart_s=None if back is None else round(back.t - fault_at, 3),
    )
    d.check(
        "the supervisor restarted the model server",
        back is not None,
        f"running again after {seconds_text(back.t - fault_at if back else None)}",
    )
    d.check(
        "same port, restart counted",
        info.get("url") == url and int(info.get("restarts", 0)) > restarts,
        f"url {info.get('url')}, restarts {restarts} -> {info.get('restarts')}",
    )
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()
