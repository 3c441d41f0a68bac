"""Health probes of local model servers: one probe per shared server, and a probe starved of CPU by
other processes is busy, not down."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from brownout.config import ROLES
from brownout.health.resources import HostReader
from brownout.llm.types import ProbeResult
from brownout.server.runtime import STARVED_SHARE, ModelProbes
from brownout.testing import FakeClock

TIMEOUT = "timeout: no answer within 10s"


@dataclass
class _Backend:
    """Answers a probe after ``took`` (fake) seconds with ``error`` (None: healthy); meanwhile the
    server's threads wait ``waits`` seconds for a CPU."""

    clock: FakeClock
    waits: dict[int, float]
    pid: int
    error: str | None = TIMEOUT
    took: float = 10.0
    waited: float = 0.0
    role: str = "qwen"
    calls: int = 0

    async def probe(self, timeout: float = 5.0) -> list[ProbeResult]:
        self.calls += 1
        self.clock.advance(self.took)
        self.waits[self.pid] += self.waited
        url = f"http://127.0.0.1:{self.pid}"
        return [ProbeResult(self.role, url, self.error is None, self.took, self.error)]


@dataclass
class _Service:
    backends: dict[str, Any]
    recorded: dict[str, list[ProbeResult]] = field(default_factory=dict)

    def record_health(self, role: str, results: list[ProbeResult]) -> None:
        self.recorded[role] = results


@dataclass
class _Server:
    pid: int | None


def _probes(service: _Service, local: dict[str, _Server], clock: FakeClock, **kw: Any) -> ModelProbes:
    return ModelProbes(
        service,  # type: ignore[arg-type]
        {},
        local,  # type: ignore[arg-type]
        None,
        interval=15.0,
        timeout=10.0,
        clock=clock,
        **kw,
    )


async def _round(*, waited: float, error: str | None = TIMEOUT, readable: bool = True) -> ProbeResult:
    clock = FakeClock()
    waits = {7: 100.0}
    backend = _Backend(clock, waits, 7, error=error, waited=waited)
    service = _Service(dict.fromkeys(ROLES, backend))
    probes = _probes(
        service,
        dict.fromkeys(ROLES, _Server(7)),
        clock,
        wait_of=lambda pid: waits[pid] if readable else None,
    )
    await probes.probe_all()
    assert backend.calls == 1  # one shared server, one probe
    assert set(service.recorded) == set(ROLES)
    (result,) = service.recorded["qwen"]
    for role in ROLES:  # the same verdict for every role on it, under the role's own name
        assert service.recorded[role] == [dataclasses.replace(result, role=role)]
    return result


async def test_a_shared_server_is_probed_once_a_round_and_its_verdict_is_every_roles() -> None:
    clock = FakeClock()
    waits = {7: 0.0, 8: 0.0}
    shared = _Backend(clock, waits, 7, error=None, took=0.2)
    own = _Backend(clock, waits, 8, error="HTTP 500", took=0.1, role="llama")
    service = _Service({"qwen": shared, "mistral": shared, "llama": own})
    server = _Server(7)
    probes = _probes(service, {"qwen": server, "mistral": server, "llama": _Server(8)}, clock)
    for _ in range(3):
        await probes.probe_all()
    assert (shared.calls, own.calls) == (3, 3)
    assert [r.role for r in service.recorded["mistral"]] == ["mistral"]
    assert service.recorded["mistral"][0].healthy
    assert service.recorded["mistral"][0].endpoint == "http://127.0.0.1:7"
    assert service.recorded["llama"] == [ProbeResult("llama", "http://127.0.0.1:8", False, 0.1, "HTTP 500")]


async def test_a_probe_that_timed_out_while_its_server_waited_for_a_cpu_is_starved_not_failed() -> None:
    # One probe of the shared server, 10 s, while its threads waited 8 s for a CPU.
    result = await _round(waited=8.0)
    assert result.healthy
    assert result.busy
    assert result.error is not None
    assert result.error.startswith(
        "starved: its server's threads waited 8.0 s for a CPU during the 10.0 s probe"
    )


@pytest.mark.parametrize(
    ("waited", "error", "readable"),
    [
        (STARVED_SHARE * 10.0 - 0.5, TIMEOUT, True),  # had the CPU it wanted: slow or wedged, a failure
        (0.0, TIMEOUT, True),  # stopped or wedged: neither ran nor waited
        (8.0, "HTTP 500", True),  # starved, but it answered an error: that is the model's
        (8.0, TIMEOUT, False),  # nothing to read (not Linux): the probe speaks alone
    ],
)
async def test_a_probe_failed_for_any_other_reason_stays_a_failure(
    waited: float, error: str, readable: bool
) -> None:
    result = await _round(waited=waited, error=error, readable=readable)
    assert not result.healthy
    assert not result.busy
    assert result.error == error


async def test_a_healthy_probe_is_recorded_as_it_came() -> None:
    result = await _round(waited=8.0, error=None)
    assert result.healthy
    assert not result.busy
    assert result.error is None


def test_the_run_queue_wait_of_a_process_tree_is_read_and_grows() -> None:
    reader = HostReader()
    first = reader.run_queue_wait(os.getpid())
    assert first is not None
    assert first >= 0.0
    sum(i * i for i in range(200_000))  # run a little
    second = reader.run_queue_wait(os.getpid())
    assert second is not None
    assert second >= first
    assert reader.run_queue_wait(2**22 + 12345) is None  # no such process
