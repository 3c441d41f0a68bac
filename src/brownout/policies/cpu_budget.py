"""The CPU budget: the service's own work must not starve the models it shares the machine with.

When a model server runs on the same cores as the service in front of it (a local llama.cpp server
beside its API), every request the service answers *without* the model -- a rule-based answer, a
similar earlier one, handed out at once because the model is saturated -- still costs the service CPU
time, and under a flood that time is taken from the model. A caller served at once comes straight
back, so the faster the service hands out quick answers, the more of them it is asked for: measured
on two cores with one local model thread, 200 callers drew 530 quick answers a second and the model
made 8.7 answers a minute instead of the 14.9 it makes alone.

:class:`CpuBudget` bounds that. It measures the process's own CPU time (all its threads, not the
model servers, which are other processes) over each ``interval`` and, while that use is above
``budget`` (a share of one core), raises the share of such requests to refuse -- the caller gets a
refusal with a Retry-After, and a polite caller waits before coming back -- until the use is back
within the budget. Requests that will get the model are not its business: the caller asks
:meth:`CpuBudget.refuse` only for a request that would be answered without one.

**The control law**, every ``interval`` seconds (lazily, on the next call after the tick)::

    used   = CPU seconds of the process since the last step / seconds elapsed
    excess = used / budget - 1
    share += min(gain * excess, max_step_up)      if excess > 0
    share -= release                              if used < budget * (1 - dead_band)
    share  = clip(share, 0, 1)

Inside the dead band ``[budget * (1 - dead_band), budget]`` the share holds, so a steady load
settles instead of flapping. Each step that finds the process under the band lowers the share by
``release``, also when nobody asked in between (the lazy step counts the intervals that passed): once
the flood ends the share is back at 0 within ``interval / release`` intervals.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.policies._base import PolicyConfig

__all__ = ["CpuBudget", "CpuBudgetConfig", "CpuBudgetSnapshot"]


class CpuBudgetConfig(PolicyConfig):
    """Settings of a :class:`CpuBudget` (see the module docstring for the control law)."""

    budget: float = Field(
        default=0.25,
        gt=0,
        le=1024,
        description="Share of one core the process's own work may use (0.25: a quarter of a core).",
    )
    interval: float = Field(default=0.5, gt=0, description="Seconds between two control steps.")
    gain: float = Field(
        default=0.5, gt=0, description="Rise of the refused share per step, per unit of relative excess."
    )
    max_step_up: float = Field(default=0.25, gt=0, le=1, description="Largest rise of the share in one step.")
    release: float = Field(
        default=0.1, gt=0, le=1, description="Fall of the share per step while the use is under the band."
    )
    dead_band: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Below the budget, the fraction of it where the share holds (neither rises nor falls).",
    )


@dataclass(frozen=True, slots=True)
class CpuBudgetSnapshot:
    """The budget's state for ``/health`` and metrics."""

    budget: float
    used: float | None
    """The process's CPU use over the last step, in cores (None: not measured yet)."""
    refusing: float
    """The share of quick answers refused now (0..1)."""
    refused: int
    """Requests refused since construction."""


class CpuBudget:
    """Keeps the process's own CPU use within ``config.budget`` by refusing a share of the requests
    that would be answered without a model; see the module docstring.

    ``cpu_time`` returns the process's CPU seconds (default :func:`time.process_time`; inject a
    counter in tests), ``clock`` the elapsed time, ``rng`` the per-request draws.
    """

    def __init__(
        self,
        name: str = "cpu_budget",
        config: CpuBudgetConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        cpu_time: Callable[[], float] = time.process_time,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else CpuBudgetConfig()
        self._clock = clock
        self._cpu_time = cpu_time
        self._rng = rng if rng is not None else random.Random()
        self._share = 0.0
        self._used: float | None = None
        self._refused = 0
        self._last_at = clock.now()
        self._last_cpu = cpu_time()

    @property
    def share(self) -> float:
        """The share of quick answers refused now (0: none, 1: every one)."""
        self._catch_up()
        return self._share

    def refuse(self) -> bool:
        """Whether to refuse the request asking now (one that would be answered without a model):
        true with probability :attr:`share`."""
        self._catch_up()
        if self._share <= 0.0 or self._rng.random() >= self._share:
            return False
        self._refused += 1
        return True

    def snapshot(self) -> CpuBudgetSnapshot:
        """The state now."""
        self._catch_up()
        used = None if self._used is None else round(self._used, 4)
        return CpuBudgetSnapshot(self.config.budget, used, round(self._share, 4), self._refused)

    def _catch_up(self) -> None:
        cfg = self.config
        now = self._clock.now()
        elapsed = now - self._last_at
        if elapsed < cfg.interval:
            return
        cpu = self._cpu_time()
        used = max(0.0, cpu - self._last_cpu) / elapsed
        self._last_at, self._last_cpu, self._used = now, cpu, used
        if used > cfg.budget:
            # Over: one step up, however long since the last one (the use was averaged over it all).
            self._share = min(1.0, self._share + min(cfg.gain * (used / cfg.budget - 1.0), cfg.max_step_up))
        elif used < cfg.budget * (1.0 - cfg.dead_band):
            # Under: one step down per interval that passed, so a share left from a flood that ended
            # while nobody asked is gone when the next one does.
            steps = max(1, math.floor(elapsed / cfg.interval))
            self._share = max(0.0, self._share - cfg.release * steps)
