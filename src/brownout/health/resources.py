"""The resource monitor (seed 001): CPU, memory and GPU memory against warning and critical limits.

Every ``interval`` seconds (seed: 60) the monitor samples the machine -- CPU and memory through
psutil, GPU memory through NVIDIA's NVML (the ``nvidia-ml-py`` package, imported only if installed,
and used only when a driver and a GPU answer) -- and gives each resource a level:

========  =========  ==========
resource  warning    critical
========  =========  ==========
cpu       80 %       95 %
memory    80 %       95 %
gpu<N>    90 %       95 %
========  =========  ==========

A level change emits :class:`~brownout.events.ResourceAlert` (back to ``ok`` too). Every sample with a
critical resource calls ``on_critical(resource, sample)`` -- the server runs proactive recovery from it
(the recovery manager's cooldown and attempt limit keep that from repeating too often) -- and
``on_level`` reports every level change.

CPU percentages are averages since the previous sample (``psutil.cpu_percent(interval=None)``), so the
first sample after start has no CPU reading: a reading over a few milliseconds is noise, and acting on
it would be worse than waiting one interval.

No GPU, no NVML, or no ``nvidia-ml-py``: the GPU is skipped, and :attr:`ResourceSample.gpu_status`
says why. Nothing is imported from NVML at module import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus, ResourceAlert

__all__ = [
    "GpuProbe",
    "GpuReading",
    "Level",
    "ResourceMonitor",
    "ResourceSample",
    "Thresholds",
    "system_sample",
]

_log = logging.getLogger("brownout.health")

Level = Literal["ok", "warning", "critical"]
"""How close a resource is to running out."""

_RANK: dict[str, int] = {"ok": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Percent used at which a resource is at ``warning`` and at ``critical``."""

    warning: float
    critical: float

    def __post_init__(self) -> None:
        if not 0 < self.warning <= self.critical <= 100:
            raise ConfigError(
                "resources", f"need 0 < warning <= critical <= 100, got {self.warning}/{self.critical}"
            )

    def level(self, percent: float) -> Level:
        """The level of a resource ``percent`` used."""
        # Strictly above: a threshold of 100 can never be crossed, which is how a level is turned off.
        if percent > self.critical or (percent == self.critical < 100):
            return "critical"
        if percent > self.warning or (percent == self.warning < 100):
            return "warning"
        return "ok"


@dataclass(frozen=True, slots=True)
class GpuReading:
    """Memory of GPU ``index``: bytes used of ``total``."""

    index: int
    name: str
    used: int
    total: int

    @property
    def percent(self) -> float:
        """Percent of the GPU's memory in use."""
        return 100.0 * self.used / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """One look at the machine.

    ``cpu_percent`` is None on the first sample (no interval to average over yet); ``gpus`` is empty
    when no GPU is watched, and ``gpu_status`` then says why ("ok" when GPUs were read).
    """

    at: float
    cpu_percent: float | None
    memory_percent: float
    gpus: tuple[GpuReading, ...] = ()
    gpu_status: str = "not checked"

    def readings(self) -> dict[str, float]:
        """Percent used by resource name: "cpu", "memory", "gpu0", "gpu1", ..."""
        out: dict[str, float] = {"memory": self.memory_percent}
        if self.cpu_percent is not None:
            out["cpu"] = self.cpu_percent
        for gpu in self.gpus:
            out[f"gpu{gpu.index}"] = gpu.percent
        return out


class GpuProbe:
    """Reads GPU memory through NVML, when it can; otherwise says why not, once, and stays quiet.

    ``module`` is the NVML binding (default: ``pynvml`` from the ``nvidia-ml-py`` package, imported
    on first use).
    """

    def __init__(self, module: ModuleType | None = None) -> None:
        self._nvml: Any = module
        self._ready = False
        self.status = "not checked"
        """"ok", or why GPUs are skipped (no binding, no driver, no GPU)."""

    def _init(self) -> bool:
        if self._ready:
            return True
        if self.status not in ("not checked", "ok"):
            return False  # tried before and failed: do not retry every sample
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                self.status = "skipped: nvidia-ml-py is not installed"
                return False
        try:
            self._nvml.nvmlInit()
            count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.status = f"skipped: NVML unavailable ({type(e).__name__}: {e})"
            return False
        if count == 0:
            self.status = "skipped: no GPU"
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            return False
        self._ready = True
        self.status = "ok"
        return True

    def read(self) -> tuple[GpuReading, ...]:
        """Memory of every GPU, or () when GPUs are skipped (see :attr:`status`)."""
        if not self._init():
            return ()
        nvml = self._nvml
        out = []
        try:
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                out.append(
                    GpuReading(
                        index,
                        name.decode() if isinstance(name, bytes) else str(name),
                        int(info.used),
                        int(info.total),
                    )
                )
        except Exception as e:
            self.status = f"error: {type(e).__name__}: {e}"
            return ()
        self.status = "ok"
        return tuple(out)

    def close(self) -> None:
        """Release NVML."""
        if self._ready:
            self._ready = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def system_sample(gpu: GpuProbe | None = None, *, at: float = 0.0, with_cpu: bool = True) -> ResourceSample:
    """Sample CPU (since the previous call) and memory with psutil, and GPUs with ``gpu``."""
    import psutil  # the server extra

    cpu = float(psutil.cpu_percent(interval=None)) if with_cpu else None
    memory = float(psutil.virtual_memory().percent)
    gpus = gpu.read() if gpu is not None else ()
    status = gpu.status if gpu is not None else "not checked"
    return ResourceSample(at=at, cpu_percent=cpu, memory_percent=memory, gpus=gpus, gpu_status=status)


class ResourceMonitor:
    """Samples the machine every ``interval`` seconds and acts on the levels; see the module docstring.

    ``sampler(first)`` returns a sample (default: psutil and NVML; ``first`` is True for the first one,
    which has no CPU reading). ``on_critical(resource, sample)`` is awaited for each critical resource
    of a sample; ``on_level(resource, old, new, sample)`` for each level change.
    """

    def __init__(
        self,
        *,
        cpu: Thresholds = Thresholds(80.0, 95.0),
        memory: Thresholds = Thresholds(80.0, 95.0),
        gpu: Thresholds = Thresholds(90.0, 95.0),
        interval: float = 60.0,
        sampler: Callable[[bool], ResourceSample] | None = None,
        on_critical: Callable[[str, ResourceSample], Awaitable[object]] | None = None,
        on_level: Callable[[str, Level, Level, ResourceSample], Awaitable[object]] | None = None,
        name: str = "resources",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not interval > 0:
            raise ConfigError("resources.interval", f"must be positive, got {interval}")
        self.name = name
        """The ``source`` of this monitor's events."""
        self.thresholds = {"cpu": cpu, "memory": memory, "gpu": gpu}
        """The limits by resource kind."""
        self.interval = interval
        """Seconds between samples."""
        self.levels: dict[str, Level] = {}
        """The current level of every resource seen."""
        self.last: ResourceSample | None = None
        """The latest sample."""
        self.samples = 0
        """Samples taken."""
        self.alerts: Counter[tuple[str, str]] = Counter()
        """Level changes by (resource, new level): ``resource_alerts_total``."""
        self.criticals = 0
        """Critical readings handed to ``on_critical``."""
        self._gpu = GpuProbe()
        self.sampler: Callable[[bool], ResourceSample] = sampler or self._system_sampler
        """Takes one sample (``first``: the first since start); replaceable, e.g. to read another host."""
        self._on_critical = on_critical
        self._on_level = on_level
        self._clock = clock
        self._events = events
        self._task: asyncio.Task[None] | None = None

    def _system_sampler(self, first: bool) -> ResourceSample:
        if first:
            import psutil

            psutil.cpu_percent(interval=None)  # starts the averaging window; the value is noise
        return system_sample(self._gpu, at=self._clock.now(), with_cpu=not first)

    @property
    def level(self) -> Level:
        """The worst level of any resource."""
        worst: Level = "ok"
        for level in self.levels.values():
            if _RANK[level] > _RANK[worst]:
                worst = level
        return worst

    def critical(self) -> list[str]:
        """The resources at critical now."""
        return [r for r, lv in self.levels.items() if lv == "critical"]

    def thresholds_for(self, resource: str) -> Thresholds:
        """The limits of ``resource`` ("gpu3" uses the gpu limits)."""
        return self.thresholds["gpu" if resource.startswith("gpu") else resource]

    async def observe(self, sample: ResourceSample) -> dict[str, Level]:
        """Apply the limits to ``sample``: update levels, emit alerts, call the callbacks."""
        self.last = sample
        self.samples += 1
        changed: list[tuple[str, Level, Level]] = []
        critical: list[str] = []
        for resource, percent in sample.readings().items():
            limits = self.thresholds_for(resource)
            new = limits.level(percent)
            old = self.levels.get(resource, "ok")
            self.levels[resource] = new
            if new == "critical":
                critical.append(resource)
            if new != old:
                changed.append((resource, old, new))
                self.alerts[(resource, new)] += 1
                threshold = (
                    limits.critical if new == "critical" else limits.warning if new == "warning" else 0.0
                )
                log = _log.info if new == "ok" else _log.warning
                log("%s at %.1f%%: %s (was %s)", resource, percent, new, old)
                if self._events.active:
                    self._events.emit(
                        ResourceAlert(
                            source=self.name,
                            at=self._clock.now(),
                            resource=resource,
                            level=new,
                            percent=round(percent, 2),
                            threshold=threshold,
                        )
                    )
        for resource, old, new in changed:
            if self._on_level is not None:
                await self._call(self._on_level, resource, old, new, sample)
        for resource in critical:
            self.criticals += 1
            if self._on_critical is not None:
                await self._call(self._on_critical, resource, sample)
        return dict(self.levels)

    async def _call(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:  # a failing reaction must not stop the monitor
            _log.exception("resource monitor callback %r failed", fn)

    async def check(self) -> ResourceSample:
        """Take a sample now and act on it (without waiting for the next tick)."""
        # Inline, not in a thread: psutil reads take microseconds and NVML's a millisecond.
        sample = self.sampler(self.samples == 0)
        await self.observe(sample)
        return sample

    def start(self) -> None:
        """Sample now and every ``interval`` seconds, in a background task."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"brownout-{self.name}")

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                _log.exception("resource sampling failed")
            await self._clock.sleep(self.interval)

    async def aclose(self) -> None:
        """Stop sampling; release NVML."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._gpu.close()

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: levels, the latest readings, GPU status, limits."""
        sample = self.last
        return {
            "level": self.level,
            "levels": dict(self.levels),
            "readings": {k: round(v, 1) for k, v in sample.readings().items()} if sample else {},
            "gpu": sample.gpu_status if sample else "not checked",
            "gpus": [
                {"index": g.index, "name": g.name, "used": g.used, "total": g.total} for g in sample.gpus
            ]
            if sample
            else [],
            "thresholds": {
                k: {"warning": t.warning, "critical": t.critical} for k, t in self.thresholds.items()
            },
            "interval_seconds": self.interval,
            "samples": self.samples,
        }
