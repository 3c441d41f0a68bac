"""How ``brownout serve`` lays out its local model servers (built, not started: no model runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brownout.config import ROLES, BrownoutConfig
from brownout.events import EventBus
from brownout.server.runtime import Runtime


def runtime(tmp_path: Path, local: dict[str, Any] | None = None, **roles: Any) -> Runtime:
    config = BrownoutConfig.model_validate(
        {
            "models": {
                "local": local or {},
                "roles": {r: roles.get(r, {}) for r in ROLES},
            },
            "database": {
                "url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
                "spool_path": str(tmp_path / "s.db"),
            },
        }
    )
    return Runtime(config, events=EventBus())


def test_by_default_one_server_serves_every_role_with_one_limit_and_the_generator_first(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path)
    [server] = rt.local_servers
    assert set(rt.local) == set(ROLES)
    assert all(s is server for s in rt.local.values())
    assert server.role == "models"
    assert server.status()["threads"] == max(1, min(4, int(rt.cores)))
    assert server.parallel == 4
    # One limiter for the three roles' calls, never above the server's slots.
    limiters = {role: next(iter(rt.clients[role].limiters.values())) for role in ROLES}
    assert limiters["qwen"] is limiters["mistral"] is limiters["llama"]
    assert limiters["qwen"].config.max_limit == 4
    # Within its slots nothing queues inside it: the limit follows the work it does a second.
    assert limiters["qwen"].config.slots == 4
    # ...and comes down while the generator's calls run past its requests' 10 s target (less the
    # quarter second kept for answering and the second by which a cut is the request's doing).
    assert limiters["qwen"].config.latency_budget == 8.75
    assert limiters["qwen"].config.late_value == 0.5  # a brief cut short is still served
    assert [rt.clients[r].endpoints[0].url for r in ROLES] == [server.url] * 3
    # The generator's calls wait first; a restart for any role is a restart for all of them.
    assert [rt.clients[r].priority for r in ROLES] == [0, 1, 2]
    assert rt.ops.sharing("mistral") == ["mistral", "qwen", "llama"]
    # The gateway's "local" group is the same server, and waits for the same slots, in turn with
    # the generator and before the optional stages.
    assert rt.gateway.config.groups["local"].endpoints[0].url == server.url
    [endpoint] = rt.gateway.groups["local"].endpoints
    assert endpoint.slots is rt.clients["qwen"].share_of(server.url)
    assert endpoint.slots is not None
    assert endpoint.slots.limiter is limiters["qwen"]
    assert endpoint.slot_priority == 0
    assert not (tmp_path / "b.db").exists()  # built, nothing opened


def test_per_role_layout_runs_a_server_per_role_each_with_its_own_limit(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"layout": "per_role", "per_role": {"qwen": {"threads": 2, "parallel": 2}}})
    assert len(rt.local_servers) == 3
    assert [rt.local[r].role for r in ROLES] == list(ROLES)
    assert (rt.local["qwen"].parallel, rt.local["llama"].parallel) == (2, 1)
    limiters = [next(iter(rt.clients[r].limiters.values())) for r in ROLES]
    assert len({id(lim) for lim in limiters}) == 3
    # Only the generator's calls are cut at the requests' target: its limit alone has a latency budget.
    assert [lim.config.latency_budget for lim in limiters] == [8.75, None, None]
    assert rt.ops.sharing("mistral") == ["mistral"]
    # The gateway's "local" group is the generator's server: its requests take the generator's slots.
    [endpoint] = rt.gateway.groups["local"].endpoints
    assert endpoint.slots is not None
    assert endpoint.slots.limiter is limiters[0]


def test_roles_on_endpoints_leave_the_shared_server_to_the_others(tmp_path: Path) -> None:
    rt = runtime(tmp_path, qwen={"endpoints": [{"url": "http://127.0.0.1:9"}]})
    [server] = rt.local_servers
    assert set(rt.local) == {"mistral", "llama"}
    assert rt.clients["qwen"].endpoints[0].url == "http://127.0.0.1:9"
    assert rt.clients["mistral"].limiters["mistral"] is rt.clients["llama"].limiters["llama"]
    assert rt.ops.sharing("qwen") == ["qwen"]
    assert server.role == "models"


def test_the_generators_latency_budget_follows_the_tightest_target_or_is_set_or_off(tmp_path: Path) -> None:
    def budget(rt: Runtime) -> float | None:
        return next(iter(rt.clients["qwen"].limiters.values())).config.latency_budget

    config = runtime(tmp_path).config
    tight = config.model_copy(
        update={"dimmer": config.dimmer.model_copy(update={"targets": {"fast": 6.0, "creative": 10.0}})}
    )
    assert budget(Runtime(tight, events=EventBus())) == 4.75
    off = config.model_copy(update={"dimmer": config.dimmer.model_copy(update={"enabled": False})})
    assert budget(Runtime(off, events=EventBus())) is None  # no target kept: the work rate alone
    assert budget(runtime(tmp_path, qwen={"limiter": {"latency_budget": 6.5}})) == 6.5
    assert budget(runtime(tmp_path, qwen={"limiter": {"latency_budget": None}})) is None
    # An operator's budget for another role applies to its own limiter (per_role: its own server).
    rt = runtime(tmp_path, {"layout": "per_role"}, llama={"limiter": {"latency_budget": 3}})
    assert next(iter(rt.clients["llama"].limiters.values())).config.latency_budget == 3.0
