"""The dimmer: under too much load, leave out optional work for a growing share of requests.

Overload is not failure. When requests arrive faster than the models can serve them, the answer is
not to let them queue until they time out (and then blame the models), but to *dim*: skip the
optional parts of some requests so that every request still meets its latency target, and as many
answers as possible still get the expensive part. This is the "brownout" control of Klein et al.
(ICSE 2014): a controller adjusts the probability of serving optional content from the measured
response time.

What can be dimmed is an ordered list of *steps*, cheapest to lose first; for the brief service:
``("creative_hints", "validation", "generation", "model")`` -- first the hinter, then the validator,
then a similar earlier answer is served in place of generating, and only last no model at all.

**The value.** One number ``value`` in ``[0, 1]``: 0 is full service, 1 is everything dimmed. With
``n`` steps, step ``i`` (0-based) owns the slice ``[i/n, (i+1)/n)``: below its slice it is never
dimmed, above it it is always dimmed, and inside it a request has it dimmed with probability
``value * n - i``. Every request draws one random number ``u`` and a step is dimmed when its share
exceeds ``u``; so a request that loses a step loses every earlier one too -- the order is kept per
request, not only on average. The *level* is how many steps are dimmed for at least some requests,
``ceil(value * n)``: 0 (full service) to ``n``.

**The control law** runs every ``interval`` seconds (lazily, on the next call after the tick: no
background task, so a dimmer nobody asks costs nothing). It measures the load as a *ratio* to the
target latency:

* with a ``queue_delay`` signal (the wait a request arriving now would have before it starts): that
  wait (smoothed by ``smoothing``) plus the p95 of the *service* times (latency minus queue wait) of
  requests completed in the last ``window`` seconds, over the target -- the latency a new request
  can expect, without the lag of answers that queued long ago;
* without one: the p95 of latency / target of the requests completed in the window (a request may
  carry its own target, e.g. one per mode).

Then a PI controller in velocity form, with ``r`` the ratio and ``r'`` the previous one::

    step  = proportional * (r - r')                      # damps the swing of a queue
    step += gain * (r - setpoint)                        if r > setpoint
    step += recovery_gain * (r - (setpoint - dead_band)) if r < setpoint - dead_band
    value = clip(value + clip(step, -max_step_down, max_step_up), 0, 1)

A queue is an integrator: a controller that only integrated the error would swing between "nothing
dimmed" and "everything dimmed"; the proportional part on the *change* of the ratio damps that.
``setpoint`` is below 1 because arrivals are random: steering the expected latency to 70 % of the
target keeps the p95 of real answers under it. Inside the dead band ``[setpoint - dead_band,
setpoint]`` only the proportional part acts, so a steady load settles instead of flapping; the shown
level also has a small ``level_hysteresis``. When nothing (or fewer than ``min_samples``) completed
in the window and the queue is short, there is no load to dim for and the value falls by
``max_step_down`` per step: after the load ends it is back at 0 within :attr:`Dimmer.recovery_time`.
Defaults were chosen on a simulated queue (see ``tests/toolkit/policies/test_dimmer.py``): two slots,
4 s per full request, arrivals at three times capacity -- p95 held under the target, the generator kept at
about 90 % of what it can do.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from pydantic import Field, model_validator

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.events import DEFAULT_BUS, DimmerChanged, EventBus
from brownout.policies._base import PolicyConfig

__all__ = ["Dimmer", "DimmerConfig", "DimmerDecision", "DimmerSnapshot"]


class DimmerConfig(PolicyConfig):
    """Settings of a :class:`Dimmer` (see the module docstring for the control law)."""

    target_p95: float = Field(
        default=10.0, gt=0, description="Latency target in seconds: the p95 the dimmer holds requests under."
    )
    window: float = Field(
        default=5.0, gt=0, description="Seconds of completed requests the p95 is measured over."
    )
    interval: float = Field(default=0.5, gt=0, description="Seconds between two control steps.")
    gain: float = Field(
        default=0.03,
        gt=0,
        description="Integral gain: change of the value per step per unit of relative error (ratio - 1).",
    )
    recovery_gain: float = Field(
        default=0.1,
        gt=0,
        description="Integral gain below the dead band: how fast dimmed parts come back once load falls.",
    )
    proportional: float = Field(
        default=0.3,
        ge=0,
        description="Proportional gain: change of the value per unit change of the ratio between two steps.",
    )
    max_step_up: float = Field(
        default=0.1, gt=0, le=1, description="Largest increase of the value in one control step."
    )
    max_step_down: float = Field(
        default=0.2, gt=0, le=1, description="Largest decrease of the value in one control step."
    )
    setpoint: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description=(
            "The latency, as a fraction of the target, the controller steers to: below 1 because "
            "arrivals are random and the p95 of real answers runs above the average prediction."
        ),
    )
    dead_band: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="The value holds while the latency ratio lies in [setpoint - dead_band, setpoint].",
    )
    smoothing: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Weight of the newest queue-delay reading in its moving average (1: no smoothing).",
    )
    level_hysteresis: float = Field(
        default=0.03,
        ge=0,
        lt=0.25,
        description=(
            "The level falls only once the value is this far (in value units) below the level's "
            "lower edge, so a value hovering at an edge does not flip the shown level back and forth."
        ),
    )
    min_samples: int = Field(
        default=3,
        ge=1,
        description="Completed requests needed in the window before their p95 is trusted to lower the value.",
    )
    max_samples: int = Field(
        default=2000, ge=10, description="Most completed requests kept in the window (the newest)."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.dead_band >= self.setpoint:
            raise ValueError(
                f"dead_band ({self.dead_band}) must be below setpoint ({self.setpoint}): "
                "the value could then never fall"
            )
        if self.interval > self.window:
            raise ValueError(
                f"interval ({self.interval}) must not exceed window ({self.window}): "
                "a control step would miss requests"
            )
        return self


@dataclass(frozen=True, slots=True)
class DimmerDecision:
    """What one request has dimmed: ``dimmed`` is a prefix of the dimmer's steps, in order."""

    level: int
    dimmed: tuple[str, ...]

    def dims(self, step: str) -> bool:
        """True when ``step`` is left out for this request."""
        return step in self.dimmed

    def keeping(self, step: str) -> DimmerDecision:
        """This decision with ``step`` and every step after it kept: the steps before it stay dimmed.

        For a caller that finds the work of ``step`` can be done at no cost to anyone's latency --
        the resource it needs is idle right now -- so leaving it out would only waste it."""
        if step not in self.dimmed:
            return self
        return DimmerDecision(self.level, self.dimmed[: self.dimmed.index(step)])


@dataclass(frozen=True, slots=True)
class DimmerSnapshot:
    """The dimmer's state for ``/health`` and metrics; latencies in seconds (None: nothing measured)."""

    level: int
    value: float
    step: str | None
    """The step being dimmed at the margin (the last one at least partly dimmed), or None at level 0."""
    target_p95: float
    observed_p95: float | None
    observed_ratio: float | None
    samples: int


class Dimmer:
    """A brownout controller over ordered optional ``steps``; see the module docstring.

    ``observe(latency)`` after each completed request, ``decide()`` before each request. ``rng`` draws
    the per-request numbers (inject a seeded ``random.Random`` in tests); ``queue_delay`` returns the
    wait in seconds a request arriving now would have before it starts (optional).
    """

    def __init__(
        self,
        name: str = "dimmer",
        steps: Sequence[str] = ("optional",),
        config: DimmerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        rng: random.Random | None = None,
        queue_delay: Callable[[], float] | None = None,
    ) -> None:
        if not steps:
            raise ValueError("a dimmer needs at least one step to dim")
        if len(set(steps)) != len(steps):
            raise ValueError(f"dimmer steps must be distinct, got {list(steps)}")
        self.name = name
        self.steps = tuple(steps)
        self.config = config if config is not None else DimmerConfig()
        self._clock = clock
        self._events = events
        self._rng = rng if rng is not None else random.Random()
        self._queue_delay = queue_delay
        self._value = 0.0
        self._level = 0
        self._forced: float | None = None
        # (completed at, latency / its target, latency, service time / its target): the newest
        # ``max_samples`` only.
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=self.config.max_samples)
        self._next_tick = clock.now() + self.config.interval
        self._observed_ratio: float | None = None
        self._last_ratio: float | None = None
        self._queue_ratio: float | None = None
        self._observed_p95: float | None = None
        self.level_changes = 0
        """How many times the level changed since construction (a flapping dimmer shows here)."""

    # -- reading ------------------------------------------------------------------------------

    @property
    def recovery_time(self) -> float:
        """Seconds after the load ends by which the value is back at 0, at the latest."""
        cfg = self.config
        return cfg.window + cfg.interval * (math.ceil(1.0 / cfg.max_step_down) + 1)

    @property
    def forced(self) -> bool:
        """True while the value is pinned (:meth:`force`): an operator's word, which callers obey
        to the letter."""
        return self._forced is not None

    @property
    def value(self) -> float:
        """The dimmer value in [0, 1] now (0: full service)."""
        self._catch_up(self._clock.now())
        return self._current()

    @property
    def level(self) -> int:
        """How many steps are dimmed for at least some requests now (0 .. len(steps))."""
        self._catch_up(self._clock.now())
        return self._level

    def snapshot(self) -> DimmerSnapshot:
        """The state now, for health and metrics."""
        now = self._clock.now()
        self._catch_up(now)
        level = self._level
        # The p95 of what completed in the window up to now (the controller's view is one tick old).
        recent = sorted(s[2] for s in self._samples if s[0] >= now - self.config.window)
        observed = recent[_p95_index(len(recent))] if recent else None
        return DimmerSnapshot(
            level=level,
            value=round(self._current(), 4),
            step=self.steps[level - 1] if level else None,
            target_p95=self.config.target_p95,
            observed_p95=None if observed is None else round(observed, 4),
            observed_ratio=None if self._observed_ratio is None else round(self._observed_ratio, 4),
            samples=len(recent),
        )

    def share(self, step: str) -> float:
        """The fraction of requests that have ``step`` dimmed now (0..1)."""
        index = self.steps.index(step)
        return min(1.0, max(0.0, self.value * len(self.steps) - index))

    # -- per request --------------------------------------------------------------------------

    def decide(self) -> DimmerDecision:
        """Which steps the next request leaves out: a prefix of ``steps``, drawn with one random number."""
        self._catch_up(self._clock.now())
        scaled = self._current() * len(self.steps)
        if scaled <= 0.0:
            return DimmerDecision(0, ())
        # Step i is dimmed when its share (scaled - i, clipped to [0, 1]) exceeds u: with one u per
        # request, losing step i implies losing every step before it.
        u = self._rng.random()
        count = 0
        for i in range(len(self.steps)):
            if scaled - i > u:
                count = i + 1
            else:
                break
        return DimmerDecision(self._level, self.steps[:count])

    def observe(self, latency: float, *, target: float | None = None, waited: float = 0.0) -> None:
        """Record a completed request's latency (seconds), against ``target`` (default ``target_p95``).

        ``waited`` is the part of ``latency`` the request spent queueing before it started; with a
        ``queue_delay`` signal the controller predicts a new request's latency as the queue's wait now
        plus the p95 of recent service times (latency minus wait), which reacts without the lag of
        answers that queued long ago.
        """
        if latency < 0 or math.isnan(latency):
            raise ValueError(f"latency must be a non-negative number of seconds, got {latency!r}")
        if not 0 <= waited <= latency:
            raise ValueError(f"waited must lie within [0, latency], got {waited!r} for {latency!r}")
        goal = self.config.target_p95 if target is None else target
        if goal <= 0:
            raise ValueError(f"target must be positive, got {goal!r}")
        now = self._clock.now()
        self._catch_up(now)
        self._samples.append((now, latency / goal, latency, (latency - waited) / goal))

    # -- operator -----------------------------------------------------------------------------

    def force(self, value: float | None) -> None:
        """Pin the value (an operator's override or a test), or None to hand control back."""
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"a dimmer value lies in [0, 1], got {value!r}")
        self._forced = value
        self._set_level(self._clock.now())

    # -- the controller -----------------------------------------------------------------------

    def _current(self) -> float:
        return self._value if self._forced is None else self._forced

    def _catch_up(self, now: float) -> None:
        """Run the control steps whose ticks have passed (at their own times)."""
        if now < self._next_tick:
            return
        interval = self.config.interval
        ticks = int((now - self._next_tick) // interval) + 1
        # After a long quiet spell only the last ticks matter: the window is empty and the value can
        # only fall, reaching 0 within ceil(1 / max_step_down) steps. Skip the rest.
        most = math.ceil(self.config.window / interval) + math.ceil(1.0 / self.config.max_step_down) + 1
        first = self._next_tick + max(0, ticks - most) * interval
        for i in range(min(ticks, most)):
            self._step(first + i * interval)
        self._next_tick += ticks * interval

    def _step(self, at: float) -> None:
        cfg = self.config
        samples = self._samples
        horizon = at - cfg.window
        while samples and samples[0][0] < horizon:
            samples.popleft()
        # Samples completed after ``at`` (a lazy catch-up replaying older ticks) are not seen yet.
        seen = [s for s in samples if s[0] <= at]
        ratio: float | None = None
        p95: float | None = None
        if seen:
            ratios = sorted(s[1] for s in seen)
            ratio = ratios[_p95_index(len(ratios))]
            latencies = sorted(s[2] for s in seen)
            p95 = latencies[_p95_index(len(latencies))]
        if self._queue_delay is not None:
            # Predicted latency of a request arriving now: the queue's wait plus a p95 service time.
            # The queue's wait is smoothed (an EWMA over the control steps): one burst of arrivals
            # should not dim the next requests, a queue that stays long should.
            reading = max(0.0, self._queue_delay()) / cfg.target_p95
            smoothed = self._queue_ratio
            smoothed = reading if smoothed is None else smoothed + cfg.smoothing * (reading - smoothed)
            self._queue_ratio = smoothed
            waiting = smoothed
            if seen:
                services = sorted(s[3] for s in seen)
                waiting += services[_p95_index(len(services))]
            ratio = waiting
        self._observed_ratio = ratio
        self._observed_p95 = p95
        value = self._value
        last, self._last_ratio = self._last_ratio, ratio
        low = cfg.setpoint - cfg.dead_band
        if ratio is None or (ratio < low and len(seen) < cfg.min_samples):
            # Nothing (or hardly anything) completed and no queue to speak of: no load to dim for.
            value -= cfg.max_step_down
        else:
            # Velocity-form PI: the proportional part follows the change of the ratio (it damps the
            # swing a queue -- an integrator -- would otherwise cause), the integral part pushes
            # towards the setpoint and rests inside the dead band.
            step = cfg.proportional * (ratio - (ratio if last is None else last))
            if ratio > cfg.setpoint:
                step += cfg.gain * (ratio - cfg.setpoint)
            elif ratio < low:
                # Well under the target: give the dimmed parts back (at recovery_gain).
                step += cfg.recovery_gain * (ratio - low)
            value += min(max(step, -cfg.max_step_down), cfg.max_step_up)
        self._value = min(1.0, max(0.0, value))
        self._set_level(at)

    def _set_level(self, at: float) -> None:
        current = self._current()
        n = len(self.steps)
        level = min(n, math.ceil(current * n - 1e-9)) if current > 0 else 0
        old = self._level
        hysteresis = self.config.level_hysteresis * n
        if self._forced is None and 0 < level < old and current * n > old - 1 - hysteresis:
            level = old  # just under the edge: keep showing the higher level (hysteresis)
        if level == old:
            return
        self._level = level
        self.level_changes += 1
        if self._events.active:
            self._events.emit(
                DimmerChanged(
                    source=self.name,
                    at=at,
                    old_level=old,
                    new_level=level,
                    value=round(current, 4),
                    step=self.steps[level - 1] if level else "",
                    observed_p95=self._observed_p95,
                    target_p95=self.config.target_p95,
                )
            )

    def __repr__(self) -> str:
        return f"Dimmer({self.name!r}, level={self._level}/{len(self.steps)}, value={self._current():.3f})"


def _p95_index(n: int) -> int:
    """Index of the 95th percentile in a sorted list of ``n`` (nearest rank)."""
    return max(0, math.ceil(0.95 * n) - 1)
