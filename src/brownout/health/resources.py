"""The resource monitor: brownout's own CPU and memory (and GPU memory) against warning and critical limits.

**Ours, not the machine's.** Every ``interval`` seconds (default 60) the monitor measures brownout's
own process tree -- the server process and its children, among them the local llama.cpp model
servers (their memory; their CPU is their configured threads', below) -- against the CPU and memory
*available to us*: the cgroup's limits where there are any
(cgroup v2 ``cpu.max``, ``memory.max``, ``memory.current``; v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, ``memory.limit_in_bytes``, ``memory.usage_in_bytes``), else the CPUs this
process may run on and the machine's RAM. A neighbour's load on a shared host is not ours: it never
raises a level, degrades the system mode or starts a recovery. GPU memory is a device shared by
whoever uses it, so it is still read for the whole GPU, through NVIDIA's NVML (the ``nvidia-ml-py``
package, imported only if installed, and used only when a driver and a GPU answer).

========  =========  ==========
resource  warning    critical
========  =========  ==========
cpu       80 %       95 %
memory    80 %       95 %
gpu<N>    90 %       95 %
========  =========  ==========

A level change emits :class:`~brownout.events.ResourceAlert` (back to ``ok`` too). Every sample with a
critical resource calls ``on_critical(resource, sample)`` and ``on_level`` reports every level change.

**CPU over a kept window.** The sampler adds up the CPU seconds each process of the tree used since
the previous look (a process that appeared since counts in full), and keeps the running total with its
time. A CPU reading is the total's growth over at least one ``interval`` (the newest kept point that
old), divided by the CPUs available: so a re-sample taken milliseconds after the last one still reads
the last interval's load, never the near-zero of a few milliseconds (which once let a recovery chain
declare a busy CPU fixed). The first sample, and any sample with less than a second of history, has no
CPU reading: the CPU level then stays as it was.

**A model server's CPU is load, not a fault.** A local model server runs the threads it was given flat
out while it has calls to compute -- two threads on two cores read as 100 % -- and that is what it
is for: the concurrency limiter and the dimmer handle the load. The processes named by ``cpu_exempt``
(the local model servers, with their children) are therefore left out of the CPU reading, while their
memory still counts: without this, a busy model put the system mode in degraded and started a
proactive recovery chain on every sustained load. A model server that is wedged is found by its
health checks, not by its CPU.

Memory is the tree's proportional set size (shared pages split between the processes sharing them,
so three model servers mapping one model file count it once), or the resident size where the
proportional one cannot be read, against the memory available to us.

Everything read from ``/proc`` and ``/sys`` and about processes goes through a :class:`HostReader`
(tests give it a directory of cgroup files and their own process table), and every time through the
injected clock.

No GPU, no NVML, or no ``nvidia-ml-py``: the GPU is skipped, and :attr:`ResourceSample.gpu_status`
says why. Nothing is imported from NVML at module import time.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus, ResourceAlert

__all__ = [
    "CgroupLimits",
    "GpuProbe",
    "GpuReading",
    "HostReader",
    "Level",
    "ProcessReading",
    "ProcessTreeSampler",
    "ResourceMonitor",
    "ResourceSample",
    "Thresholds",
    "read_cgroup_limits",
    "usable_cores",
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


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """One process of the tree: its pid, CPU seconds used since it started, and memory in bytes."""

    pid: int
    cpu_seconds: float
    memory: int


class HostReader:
    """Reads what the monitor needs from ``/proc``, ``/sys`` and the process table.

    ``cgroup_root`` is where the cgroup file systems are mounted (``/sys/fs/cgroup``) and
    ``self_cgroup`` the file naming this process's cgroups (``/proc/self/cgroup``); tests point both at
    a temporary directory. :meth:`processes`, :meth:`cpu_count` and :meth:`total_memory` use psutil and
    the scheduler; a test may override them.
    """

    def __init__(
        self,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        self_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> None:
        self.cgroup_root = cgroup_root
        self.self_cgroup = self_cgroup
        self._procs: dict[int, Any] = {}  # psutil.Process by pid, kept: creating one reads /proc

    def read_text(self, path: Path) -> str | None:
        """The stripped text of ``path``, or None when it cannot be read."""
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def processes(self, root: int, *, memory: bool = True) -> list[ProcessReading]:
        """``root`` and all its descendants (children of children too) that can be read now.

        ``memory`` False: their CPU only (``memory`` reads 0). The memory read walks each process's
        mappings in the kernel -- for a local model server, its whole model and context -- which
        costs a reader that only wants to know whether the model makes progress more than the rest
        of the look, on the cores the model runs on."""
        import psutil  # the server extra

        try:
            found = self._tree(root)
        except psutil.Error:
            self._procs.clear()
            return []
        out: list[ProcessReading] = []
        kept: dict[int, Any] = {}
        for proc in found:
            # Reuse the Process we already hold for a pid: it remembers the start time, so a pid
            # recycled by another process is told apart (is_running) and not counted as ours.
            proc = self._procs.get(proc.pid, proc)
            try:
                if not proc.is_running():
                    proc = psutil.Process(proc.pid)
                times = proc.cpu_times()
                used = _memory_of(proc) if memory else 0
            except psutil.Error:  # it ended between the listing and the read
                continue
            kept[proc.pid] = proc
            out.append(ProcessReading(proc.pid, float(times.user + times.system), used))
        self._procs = kept
        return out

    def _tree(self, root: int) -> list[Any]:
        """The psutil processes of ``root`` and its descendants (raises ``psutil.Error`` when ``root``
        is gone); a process already held for ``root`` is reused."""
        import psutil  # the server extra

        top = self._procs.get(root) or psutil.Process(root)
        return [top, *top.children(recursive=True)]

    def run_queue_wait(self, root: int) -> float | None:
        """Seconds the threads of ``root`` and its descendants have spent so far runnable but waiting
        for a CPU (Linux's ``/proc/<pid>/task/<tid>/schedstat``, summed), or None where it cannot be
        read. A process starved by other processes waits; a wedged or stopped one neither runs nor
        waits. Threads that ended take their share with them: compare two readings, never trust a
        difference below 0."""
        import psutil  # the server extra

        try:
            pids = [p.pid for p in self._tree(root)]
        except psutil.Error:
            return None
        total = 0
        read = False
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                        fields = f.read().split()
                    total += int(fields[1])
                    read = True
                except (OSError, IndexError, ValueError):
                    continue
        return total / 1e9 if read else None

    def cpu_count(self) -> int:
        """The CPUs this process may run on (its affinity mask, else the machine's count)."""
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)

    def total_memory(self) -> int:
        """The machine's RAM in bytes."""
        import psutil

        return int(psutil.virtual_memory().total)


def _memory_of(proc: Any) -> int:
    try:
        full = proc.memory_full_info()
        pss = getattr(full, "pss", None)
        if pss:
            return int(pss)
        return int(full.rss)
    except Exception:  # AccessDenied, or no smaps on this kernel: the resident size will do
        return int(proc.memory_info().rss)


_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """The limits of this process's cgroup: CPUs (quota / period) and memory bytes, None when unlimited.

    ``version`` is "v2", "v1" or None (no cgroup files found); ``path`` the cgroup read;
    ``memory_current`` the bytes the whole cgroup uses (shown, not judged: a neighbour in our cgroup
    may use them).
    """

    version: str | None = None
    path: str = ""
    cpus: float | None = None
    memory_max: int | None = None
    memory_current: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "version": self.version,
            "path": self.path,
            "cpus": self.cpus,
            "memory_max": self.memory_max,
            "memory_current": self.memory_current,
        }


def _v2_cpus(text: str | None) -> float | None:
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _bytes(text: str | None) -> int | None:
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def _tighter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def usable_cores(reader: HostReader | None = None, limits: CgroupLimits | None = None) -> float:
    """The CPU cores this process may use: the CPUs it may run on, or its cgroup's CPU limit when
    that is tighter (a container given 1.5 CPUs on a 16-core host has 1.5). ``limits``: the cgroup
    limits already read through ``reader`` (read now when not given)."""
    reader = reader if reader is not None else HostReader()
    cores = float(reader.cpu_count())
    limit = (limits if limits is not None else read_cgroup_limits(reader)).cpus
    return min(cores, limit) if limit is not None else cores


def read_cgroup_limits(reader: HostReader) -> CgroupLimits:
    """This process's cgroup limits (the tightest along its cgroup path), read through ``reader``.

    cgroup v2: ``cpu.max`` ("50000 100000" is half a CPU; "max" is no limit), ``memory.max``,
    ``memory.current``. v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no limit),
    ``memory.limit_in_bytes``, ``memory.usage_in_bytes``. A cgroup path that does not exist under the
    mount (inside a container the host's path is shown) falls back to the mount's top directory.
    """
    root = reader.cgroup_root
    v2_path: str | None = None
    v1: dict[str, str] = {}
    for line in (reader.read_text(reader.self_cgroup) or "").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path
        for name in controllers.split(","):
            if name:
                v1[name] = path

    def chain(base: Path, path: str) -> list[Path]:
        # The cgroup itself and its ancestors up to the mount: a parent's limit binds us too.
        parts = [p for p in path.strip("/").split("/") if p]
        dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
        return [d for d in dirs if d.is_dir()] or [base]

    if v2_path is not None and (root / "cgroup.controllers").exists():
        cpus: float | None = None
        memory: float | None = None
        dirs = chain(root, v2_path)
        for d in dirs:
            cpus = _tighter(cpus, _v2_cpus(reader.read_text(d / "cpu.max")))
            memory = _tighter(memory, _bytes(reader.read_text(d / "memory.max")))
        return CgroupLimits(
            "v2",
            v2_path,
            cpus,
            None if memory is None else int(memory),
            _bytes(reader.read_text(dirs[0] / "memory.current")),
        )
    cpu_dir = next((root / m for m in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / m).is_dir()), None)
    mem_dir = root / "memory" if (root / "memory").is_dir() else None
    if cpu_dir is None and mem_dir is None:
        return CgroupLimits()
    cpus = None
    if cpu_dir is not None:
        for d in chain(cpu_dir, v1.get("cpu", v1.get("cpuacct", "/"))):
            quota = _bytes(reader.read_text(d / "cpu.cfs_quota_us"))  # -1 reads as no limit
            period = _bytes(reader.read_text(d / "cpu.cfs_period_us"))
            if quota is not None and period:
                cpus = _tighter(cpus, quota / period)
    memory_max: int | None = None
    current: int | None = None
    path = v1.get("memory", v1.get("cpu", "/"))
    if mem_dir is not None:
        dirs = chain(mem_dir, v1.get("memory", "/"))
        for d in dirs:
            found = _bytes(reader.read_text(d / "memory.limit_in_bytes"))
            if found is not None:
                memory_max = found if memory_max is None else min(memory_max, found)
        current = _bytes(reader.read_text(dirs[0] / "memory.usage_in_bytes"))
    return CgroupLimits("v1", path, cpus, memory_max, current)


@dataclass(frozen=True, slots=True)
class _Point:
    at: float
    cpu_seconds: float  # the tree's CPU seconds used since the first look (a running total)


class ProcessTreeSampler:
    """Samples brownout's own process tree against the CPU and memory available to it.

    ``root`` is the top process (default: this one); ``reader`` reads the host; ``interval`` is the
    span a CPU reading averages over at least (the monitor's sampling interval); ``min_span`` the
    shortest history that gives a CPU reading at all. Limits are read once, at the first sample
    (they are set when the container starts; :meth:`refresh_limits` reads them again).
    ``cpu_exempt()`` names the processes whose trees' CPU is left out of the CPU reading (the local
    model servers; see the module docstring); their memory is counted.
    """

    def __init__(
        self,
        *,
        root: int | None = None,
        reader: HostReader | None = None,
        interval: float = 60.0,
        min_span: float = 1.0,
        gpu: GpuProbe | None = None,
        clock: Clock = SYSTEM_CLOCK,
        cpu_exempt: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.root = os.getpid() if root is None else root
        """The pid whose tree is measured."""
        self.cpu_exempt = cpu_exempt
        """The processes (with their children) whose CPU the CPU reading leaves out, or None."""
        self.reader = reader or HostReader()
        """Where /proc, /sys and the process table are read."""
        self.interval = interval
        self.min_span = min(min_span, interval)
        self.gpu = gpu
        self._clock = clock
        self.limits: CgroupLimits | None = None
        """The cgroup limits found (None before the first sample)."""
        self.cpus = 1.0
        """CPUs available to us: the cgroup's quota, at most the CPUs we may run on."""
        self.memory_limit = 1
        """Bytes of memory available to us: the cgroup's limit, at most the machine's RAM."""
        self.pids: tuple[int, ...] = ()
        """The processes counted in the latest sample."""
        self.exempt_pids: tuple[int, ...] = ()
        """The processes of the latest sample whose CPU was left out (their memory counted)."""
        self.memory_bytes = 0
        """The tree's memory in the latest sample."""
        self._last_cpu: dict[int, float] = {}
        self._total = 0.0
        self._points: list[_Point] = []
        self._cpu_percent: float | None = None

    def refresh_limits(self) -> CgroupLimits:
        """Read the cgroup limits and the machine's size again."""
        limits = read_cgroup_limits(self.reader)
        self.cpus = usable_cores(self.reader, limits)
        ram = self.reader.total_memory()
        self.memory_limit = max(1, min(ram, limits.memory_max) if limits.memory_max else ram)
        self.limits = limits
        return limits

    def cpu_seconds(self) -> float:
        """The tree's CPU seconds used since the first sample (a running total; see the module doc)."""
        return self._total

    def __call__(self, first: bool = False) -> ResourceSample:
        """Look at the tree now; ``first`` is ignored (the sampler knows whether it has history)."""
        if self.limits is None:
            self.refresh_limits()
        now = self._clock.now()
        procs = self.reader.processes(self.root)
        exempt: set[int] = set()
        if self.cpu_exempt is not None:
            for pid in self.cpu_exempt():
                exempt.update(p.pid for p in self.reader.processes(pid, memory=False))
        seen: dict[int, float] = {}
        for p in procs:
            if p.pid in exempt:
                continue
            before = self._last_cpu.get(p.pid)
            if self._points:  # the very first look only sets the baseline
                # A process new since the last look used all its CPU time inside this interval.
                self._total += max(0.0, p.cpu_seconds - (before if before is not None else 0.0))
            seen[p.pid] = p.cpu_seconds
        self._last_cpu = seen
        self.pids = tuple(sorted(p.pid for p in procs))
        self.exempt_pids = tuple(sorted(exempt.intersection(self.pids)))
        self.memory_bytes = sum(p.memory for p in procs)
        self._points.append(_Point(now, self._total))
        self._cpu_percent = self._windowed(now)
        gpus = self.gpu.read() if self.gpu is not None else ()
        return ResourceSample(
            at=now,
            cpu_percent=self._cpu_percent,
            memory_percent=min(100.0, 100.0 * self.memory_bytes / self.memory_limit),
            gpus=gpus,
            gpu_status=self.gpu.status if self.gpu is not None else "not checked",
        )

    def _windowed(self, now: float) -> float | None:
        points = self._points
        # The newest point at least one interval old; else the oldest, if it is old enough to judge.
        ref: _Point | None = None
        for i in range(len(points) - 2, -1, -1):
            if now - points[i].at >= self.interval:
                ref = points[i]
                del points[:i]  # older points are not needed any more
                break
        if ref is None and len(points) > 1 and now - points[0].at >= self.min_span:
            ref = points[0]
        if ref is None:
            return None
        span = now - ref.at
        used = points[-1].cpu_seconds - ref.cpu_seconds
        return min(100.0, max(0.0, 100.0 * used / span / self.cpus))

    def status(self) -> dict[str, Any]:
        """What is measured: scope, root, processes counted, CPUs and memory available, limits."""
        limits = self.limits
        return {
            "scope": "process_tree",
            "root_pid": self.root,
            "processes": len(self.pids),
            "pids": list(self.pids),
            "cpu_exempt_pids": list(self.exempt_pids),
            "cpus_available": round(self.cpus, 3),
            "memory_available": self.memory_limit,
            "memory_used": self.memory_bytes,
            "cgroup": limits.as_dict() if limits is not None else None,
        }


class ResourceMonitor:
    """Samples brownout's own processes every ``interval`` seconds and acts on the levels; see the
    module docstring.

    ``sampler(first)`` returns a sample (default: :attr:`tree`, the process tree against the cgroup's
    limits, and NVML; ``first`` is True for the first one). ``on_critical(resource, sample)`` is
    awaited for each critical resource of a sample; ``on_level(resource, old, new, sample)`` for each
    level change. ``cpu_exempt`` goes to the default sampler (:class:`ProcessTreeSampler`).
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
        cpu_exempt: Callable[[], Iterable[int]] | None = None,
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
        self.tree = ProcessTreeSampler(interval=interval, gpu=self._gpu, clock=clock, cpu_exempt=cpu_exempt)
        """The default sampler: brownout's own process tree against the CPU and memory it may use."""
        self.sampler: Callable[[bool], ResourceSample] = sampler or self.tree
        """Takes one sample (``first``: the first since start); replaceable, e.g. to read another host."""
        self._on_critical = on_critical
        self._on_level = on_level
        self._clock = clock
        self._events = events
        self._sampling = Periodic(
            f"brownout-{name}", self.check, lambda: self.interval, clock=clock, logger=_log
        )

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
        """Take a sample now and act on it (without waiting for the next tick).

        The CPU reading of a sample taken soon after the last one still spans the last interval (see
        the module docstring), so a check right after an action does not read a bogus 0 %.
        """
        # Inline, not in a thread: a few dozen /proc reads take well under a millisecond each.
        sample = self.sampler(self.samples == 0)
        await self.observe(sample)
        return sample

    def start(self) -> None:
        """Sample now and every ``interval`` seconds, in a background task."""
        self._sampling.start()

    async def aclose(self) -> None:
        """Stop sampling; release NVML."""
        await self._sampling.stop()
        self._gpu.close()

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: what is measured, levels, the latest readings, GPU status, limits."""
        sample = self.last
        measured: dict[str, Any] = (
            self.tree.status() if self.sampler is self.tree else {"scope": "custom sampler"}
        )
        return {
            "measured": measured,
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
