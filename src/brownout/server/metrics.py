"""Prometheus metrics under the names dashboards and alerts expect, read from the parts at scrape time.

Nothing on the request path touches Prometheus: the service, guards, cache, breakers, admission, spool
and HTTP middleware keep plain counters, and :class:`RuntimeCollector` turns them into metric families
when ``/metrics`` is scraped. Each app has its own registry, so several apps (tests, workers) never
clash.

**Several workers** (``uvicorn --workers N``): each worker process has its own runtime, and a scrape
reaches one of them. With ``PROMETHEUS_MULTIPROCESS_DIR`` set (the variable prometheus_client's
multiprocess mode uses), every worker writes a snapshot of its metrics into that directory
(:class:`WorkerSnapshots`: about once a second, at every scrape it answers, and once more when it stops),
and a scrape merges its own live values with the other workers' snapshots:

* counters and histograms are **summed** over every worker that ever wrote into the directory,
  including workers that have exited, so totals never go backwards when a worker is replaced;
* gauges are reported **per worker** with a ``pid`` label, for live workers only: a worker that
  stopped (or whose snapshot is older than ``stale_after``) no longer reports a queue or a health.

Other collectors of the process (the gateway's) register on :attr:`RuntimeMetrics.registry` and are
shared the same way.

This is prometheus_client's multiprocess behaviour (counters summed over live and dead processes,
gauges per ``pid``) without its design cost: in that mode every ``inc()`` writes to a shared mmap file
on the request path, while here the request path keeps its plain integer counters and only a
background task and the scrape touch files. The price is freshness: another worker's values are up to
one snapshot interval old. Counters still never decrease across scrapes, because a worker publishes
its snapshot before answering a scrape with it, and snapshots are replaced atomically.

As with prometheus_client, empty the directory when the whole server (all workers) starts: a snapshot
left from an earlier run would keep adding that run's counter totals.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from brownout.background import Periodic
from brownout.briefs.service import DIMMED_FEATURES
from brownout.clock import Clock
from brownout.config import ROLES
from brownout.server.runtime import Runtime

__all__ = [
    "MULTIPROCESS_ENV",
    "RuntimeCollector",
    "RuntimeMetrics",
    "WorkerSnapshots",
    "make_registry",
    "multiprocess_dir",
]

_log = logging.getLogger("brownout.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROCESS_DIR"
"""The environment variable naming the directory the workers of one server share their metrics in."""

# Buckets of llm_json_retry_count: re-asks per guarded call (the guard's max_retries is 3 by default).
_RETRY_BUCKETS = (0, 1, 2, 3, 5)
# Types whose samples add up across workers; gauges do not (a queue per worker is not one queue).
_SUMMED = frozenset({"counter", "histogram", "summary"})
_SNAPSHOT_VERSION = 1


class RuntimeCollector(Collector):
    """Collects the runtime's state as Prometheus metrics (this process only)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        """Every metric family of this process, built from the parts' plain counters."""
        rt = self.runtime
        service = rt.service
        if not service.started:
            return
        stats = service.stats

        # ---- models: calls, failures, breakers, health
        requests = CounterMetricFamily("llm_requests", "Model calls made, by model role", labels=["model"])
        failures = CounterMetricFamily(
            "llm_request_failures", "Model calls that failed, by model role", labels=["model"]
        )
        for role in ROLES:
            requests.add_metric([role], stats.requests[role])
            failures.add_metric([role], stats.failures[role])
        yield requests
        yield failures

        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open",
            labels=["model", "endpoint"],
        )
        for role, client in rt.clients.items():
            for name, breaker in client.breakers.items():
                state.add_metric([role, name], breaker.state.metric)
        yield state

        # ---- the adaptive concurrency limit of each model endpoint (overload is not failure)
        labels = ["model", "endpoint"]
        limit = GaugeMetricFamily(
            "brownout_model_concurrency_limit", "Calls allowed in flight to the endpoint now", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "brownout_model_concurrency_in_flight", "Calls in flight to the endpoint now", labels=labels
        )
        queued = GaugeMetricFamily(
            "brownout_model_concurrency_queued",
            "Calls waiting in our queue for a slot of the endpoint (never inside the model server)",
            labels=labels,
        )
        completed = CounterMetricFamily(
            "brownout_model_completed", "Well-formed completions from the endpoint", labels=labels
        )
        tokens = CounterMetricFamily(
            "brownout_model_completion_tokens",
            "Completion tokens of the endpoint's well-formed completions, as it reported them",
            labels=labels,
        )
        slow = CounterMetricFamily(
            "brownout_model_slow_calls",
            "Calls that timed out under load on a live endpoint (slow, not failed: no breaker counts them)",
            labels=labels,
        )
        for role, client in rt.clients.items():
            for ep in client.endpoints_status():
                key = [role, ep["breaker"]]
                limit.add_metric(key, ep["limit"])
                in_flight.add_metric(key, ep["in_flight"])
                queued.add_metric(key, ep["queued"])
                completed.add_metric(key, ep["completed"])
                tokens.add_metric(key, ep["completion_tokens"])
                slow.add_metric(key, ep["slow"])
        yield limit
        yield in_flight
        yield queued
        yield completed
        yield tokens
        yield slow

        model_health = GaugeMetricFamily(
            "model_health_status",
            "1 when the model role can serve (process up, a breaker lets calls through, last probe passed)",
            labels=["model"],
        )
        llm_health = GaugeMetricFamily(
            "llm_health_status", "1 when the last health check passed (1 before the first)", labels=["model"]
        )
        duration = GaugeMetricFamily(
            "llm_health_check_duration_seconds", "Latency of the last health check", labels=["model"]
        )
        health_failures = CounterMetricFamily(
            "llm_health_check_failures", "Health checks that failed", labels=["model"]
        )
        for role in ROLES:
            model_health.add_metric([role], 1.0 if service.role_available(role) else 0.0)
            probe = stats.health.get(role)
            llm_health.add_metric([role], 1.0 if probe is None or probe.healthy else 0.0)
            if probe is not None:  # no series before the first check, rather than a made-up 0 s
                duration.add_metric([role], probe.latency)
            health_failures.add_metric([role], stats.health_failures[role])
        yield model_health
        yield llm_health
        yield duration
        yield health_failures

        restarts = CounterMetricFamily(
            "model_server_restarts", "Local model server restarts", labels=["model"]
        )
        for role, server in rt.local.items():
            restarts.add_metric([role], server.restarts)
        yield restarts

        # ---- modes and downshift: which modes can serve, what was served instead, what was refused
        available = GaugeMetricFamily(
            "llm_mode_available", "1 when every model role the mode needs can serve", labels=["mode"]
        )
        for mode in service.pipeline.modes:
            ok = all(service.role_available(r) for r in service.pipeline.roles(mode))
            available.add_metric([mode.name], 1.0 if ok else 0.0)
        yield available

        downshift = CounterMetricFamily(
            "llm_mode_downshift", "Requests served below the requested mode", labels=["from_mode", "to_mode"]
        )
        for (src, dst), n in sorted(stats.downshifts.items()):
            downshift.add_metric([src, dst], n)
        yield downshift

        served = CounterMetricFamily(
            "brief_requests", "Briefs served, by served mode", labels=["served_mode"]
        )
        for mode_name, n in sorted(stats.served.items()):
            served.add_metric([mode_name], n)
        yield served

        rejected = CounterMetricFamily(
            "brief_rejections", "Brief requests answered 503, by reason", labels=["reason"]
        )
        for reason, n in sorted(stats.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected

        # ---- the dimmer: overload is not failure (optional stages left out under load)
        dim = service.dimmer.snapshot()
        yield GaugeMetricFamily(
            "brownout_dimmer_level",
            "Dimmer level: how many optional steps are left out for some requests (0: full service)",
            value=dim.level,
        )
        yield GaugeMetricFamily(
            "brownout_dimmer_value", "Dimmer value, 0 (full service) to 1 (rules only)", value=dim.value
        )
        budget = service.cpu_budget
        if budget is not None:
            cpu = budget.snapshot()
            yield GaugeMetricFamily(
                "brownout_cpu_budget_used",
                "Cores the server's own work used over the CPU budget's last step (dimmer.cpu_budget)",
                value=cpu.used or 0.0,
            )
            yield GaugeMetricFamily(
                "brownout_cpu_budget_refusing",
                "Share of answers without a model the CPU budget refuses now (0..1)",
                value=cpu.refusing,
            )
        dimmed = CounterMetricFamily(
            "brownout_briefs_dimmed", "Answers that left out a step under load, by step", labels=["dimmed"]
        )
        for step in DIMMED_FEATURES:
            dimmed.add_metric([step], stats.dimmed.get(step, 0))
        yield dimmed

        # ---- JSON hard guard: answers that were not valid JSON, repairs, re-asks
        parse = CounterMetricFamily(
            "llm_json_parse_failures", "Model answers that were not JSON", labels=["stage"]
        )
        invalid = CounterMetricFamily(
            "llm_json_validation_failures", "Model answers that broke the schema", labels=["stage"]
        )
        repairs = CounterMetricFamily(
            "llm_json_repairs", "Model answers repaired into JSON", labels=["stage"]
        )
        retry_hist = HistogramMetricFamily(
            "llm_json_retry_count", "Re-asks per guarded call", labels=["stage"]
        )
        for stage, guard in service.guards.items():
            g = guard.stats
            parse.add_metric([stage], g.parse_failures)
            invalid.add_metric([stage], g.validation_failures)
            repairs.add_metric([stage], g.repairs)
            buckets = [
                (str(float(bound)), sum(n for k, n in g.retry_counts.items() if k <= bound))
                for bound in _RETRY_BUCKETS
            ]
            buckets.append(("+Inf", sum(g.retry_counts.values())))
            total = float(sum(k * n for k, n in g.retry_counts.items()))
            retry_hist.add_metric([stage], buckets, total)
        yield parse
        yield invalid
        yield repairs
        yield retry_hist
        yield CounterMetricFamily(
            "llm_json_fallback_used",
            "Stages served by a fallback after the guard gave up",
            value=stats.fallback_used,
        )

        # ---- response cache. Counters end in _total in the exposition, so the cache_requests /
        # cache_misses the HighCacheMissRate alert reads are cache_requests_total / cache_misses_total.
        cache = service.cache.stats()
        yield CounterMetricFamily("cache_requests", "Response-cache lookups", value=cache.hits + cache.misses)
        yield CounterMetricFamily("cache_hits", "Response-cache hits", value=cache.hits)
        yield CounterMetricFamily("cache_misses", "Response-cache misses", value=cache.misses)
        yield CounterMetricFamily("cache_evictions", "Entries evicted (LRU)", value=cache.evictions)
        yield CounterMetricFamily("cache_ttl_expirations", "Entries expired (TTL)", value=cache.expirations)
        yield GaugeMetricFamily("cache_size", "Entries in the response cache", value=cache.size)
        yield GaugeMetricFamily("cache_max_size", "Capacity of the response cache", value=cache.max_entries)

        # ---- queue: requests waiting for a pipeline slot (QueueOverload reads it), runs in progress
        yield GaugeMetricFamily(
            "queue_size", "Requests waiting for a pipeline slot", value=service.admission.queue_size
        )
        yield GaugeMetricFamily(
            "pipeline_in_flight", "Pipeline runs in progress", value=service.admission.in_flight
        )
        yield GaugeMetricFamily(
            "brownout_retry_line_seconds",
            "Seconds until the last refused caller was told to come back (queue.retry_pacing)",
            value=service.admission.retry_line,
        )

        # ---- HTTP
        yield CounterMetricFamily("http_requests", "HTTP requests received", value=rt.http.requests)
        shed = HistogramMetricFamily(
            "brownout_shed_seconds",
            "Time from a request reaching the app to its refusal (503 or 429 with Retry-After)",
        )
        shed.add_metric([], rt.http.shed.cumulative(), rt.http.shed.total)
        yield shed
        errors = CounterMetricFamily("http_errors", "HTTP responses with status >= 400", labels=["status"])
        for status, n in sorted(rt.http.errors.items()):
            errors.add_metric([str(status)], n)
        yield errors

        # ---- the write spool and its replay: briefs kept locally while the database is unavailable
        spool = rt.spool.stats()
        yield GaugeMetricFamily(
            "spool_pending", "Writes waiting in the local spool for the database", value=spool.pending
        )
        yield GaugeMetricFamily(
            "spool_oldest_age_seconds", "Age of the oldest spooled write", value=spool.oldest_age
        )
        yield GaugeMetricFamily(
            "spool_dead_letters", "Spooled writes the database refused for good", value=spool.dead
        )
        yield GaugeMetricFamily("spool_bytes", "Size of the spool file on disk", value=spool.bytes_on_disk)
        # Acknowledged writes a damaged spool file lost (found when it was opened), by spool; they stay
        # counted until an operator clears them, so the alert holds until someone has looked.
        lost = GaugeMetricFamily(
            "spool_lost_entries",
            "Acknowledged spooled entries found missing from a damaged spool file, not cleared yet",
            labels=["spool"],
        )
        lost.add_metric(["briefs"], spool.lost)
        if rt.outbox is not None:
            lost.add_metric(["events"], rt.outbox.stats().lost)
        yield lost
        yield CounterMetricFamily("spool_appended", "Writes spooled", value=spool.appended)
        yield CounterMetricFamily(
            "spool_rejected", "Writes refused because the spool was full", value=spool.rejected
        )
        yield CounterMetricFamily(
            "spool_replayed", "Spooled writes replayed into the database", value=spool.replayed
        )
        yield CounterMetricFamily(
            "spool_replay_failures", "Replay runs stopped by a database error", value=spool.failed_attempts
        )
        replayer = rt.replayer
        yield GaugeMetricFamily(
            "spool_replay_running",
            "1 while the background replayer runs",
            value=1.0 if replayer.running else 0.0,
        )
        yield GaugeMetricFamily(
            "spool_replay_consecutive_failures",
            "Replay runs in a row a database error stopped (0 after a success)",
            value=replayer.consecutive_failures,
        )
        yield CounterMetricFamily(
            "spool_replay_attempts",
            "Replay runs started",
            value=replayer.attempts,
        )
        yield from _operations(rt)
        yield from _shared(rt)


def _operations(rt: Runtime) -> Iterator[Metric]:
    """Recovery, resources, system mode, adaptive TTL and event-loop blocks (issue 4, items 3-6)."""
    ops = rt.ops
    yield GaugeMetricFamily(
        "system_mode", "System mode: 0 normal, 1 degraded, 2 emergency", value=ops.modes.mode.rank
    )
    changes = CounterMetricFamily("system_mode_changes", "System mode changes, by new mode", labels=["mode"])
    for mode, n in sorted(ops.modes.changes.items()):
        changes.add_metric([mode], n)
    yield changes
    yield GaugeMetricFamily("cache_ttl_seconds", "TTL of the response cache in force", value=ops.ttl.current)
    actions = CounterMetricFamily(
        "recovery_actions", "Recovery actions run, by action and outcome", labels=["action", "status"]
    )
    for (action, status), n in sorted(ops.recovery.runs.items()):
        actions.add_metric([action, status], n)
    yield actions
    classified = CounterMetricFamily(
        "recovery_failures", "Failures handed to recovery, by type", labels=["failure_type"]
    )
    for failure, n in sorted(ops.recovery.failures.items()):
        classified.add_metric([str(failure)], n)
    yield classified
    usage = GaugeMetricFamily("resource_usage_percent", "Percent of a resource in use", labels=["resource"])
    last = ops.resources.last
    if last is not None:
        for name, pct in sorted(last.readings().items()):
            usage.add_metric([name], pct)
    yield usage
    blocks = CounterMetricFamily(
        "event_loop_blocked",
        "Event-loop blocks over the threshold, by kind and route",
        labels=["kind", "route"],
    )
    for (kind, route), n in sorted(ops.loop_blocks.blocked.items()):
        blocks.add_metric([kind, route], n)
    yield blocks
    seconds = CounterMetricFamily(
        "event_loop_blocked_seconds", "Seconds the event loop was blocked, by kind", labels=["kind"]
    )
    for kind, total in sorted(ops.loop_blocks.blocked_seconds.items()):
        seconds.add_metric([kind], total)
    yield seconds


def _shared(rt: Runtime) -> Iterator[Metric]:
    """Redis status, where breaker state lives, and the event outbox (issue 3)."""
    shared = rt.shared
    if shared is not None:
        status = {"healthy": 0, "degraded": 1, "fallback": 2}.get(shared.detector.status, 2)
        yield GaugeMetricFamily("redis_status", "Redis: 0 healthy, 1 degraded, 2 fallback", value=status)
        yield GaugeMetricFamily(
            "breaker_state_shared",
            "1 while breaker state is shared through Redis",
            value=int(shared.breakers.ok),
        )
    outbox = rt.outbox
    if outbox is not None:
        st = outbox.stats()
        yield GaugeMetricFamily("events_outbox_pending", "Events waiting for the broker", value=st.pending)
        yield CounterMetricFamily("events_published", "Events published to the broker", value=st.replayed)
        yield GaugeMetricFamily("events_dead_letters", "Events the broker refused, kept aside", value=st.dead)


def make_registry(runtime: Runtime) -> CollectorRegistry:
    """A fresh registry holding the runtime's collector (this process's metrics only)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry


def multiprocess_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The directory named by ``PROMETHEUS_MULTIPROCESS_DIR`` (or prometheus_client's older
    ``prometheus_multiproc_dir``), if set."""
    env = os.environ if environ is None else environ
    value = env.get(MULTIPROCESS_ENV) or env.get("prometheus_multiproc_dir")
    return Path(value) if value else None


# ------------------------------------------------------------------------------------- several workers


@dataclass(frozen=True, slots=True)
class _Snapshot:
    worker: str
    pid: int
    alive: bool
    written_at: float
    families: list[dict[str, Any]]


def _encode(families: Sequence[Metric]) -> list[dict[str, Any]]:
    return [
        {
            "name": f.name,
            "type": f.type,
            "help": f.documentation,
            "samples": [[s.name, s.labels, s.value] for s in f.samples],
        }
        for f in families
    ]


class WorkerSnapshots:
    """This worker's metrics shared with the other workers of one server through ``directory``.

    ``publish`` writes this worker's families to ``<directory>/<pid>-<token>.json`` (atomically:
    a temporary file, then a rename); ``merge`` combines this worker's live families with every other
    snapshot in the directory as the module docstring describes. A snapshot counts as live while its
    worker has not said it stopped and it is at most ``stale_after`` seconds old by ``clock`` (a
    monotonic clock is shared by all processes of one machine; the directory is per machine).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        clock: Clock,
        stale_after: float = 10.0,
        pid: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clock = clock
        self.stale_after = float(stale_after)
        self.pid = os.getpid() if pid is None else pid
        # The token keeps a restarted worker that got a recycled pid from overwriting the old totals.
        self.worker = f"{self.pid}-{uuid.uuid4().hex[:8]}"
        self.path = self.directory / f"{self.worker}.json"

    def publish(self, families: Sequence[Metric], *, alive: bool = True) -> None:
        """Write this worker's families (synchronously: a later write never lands before an earlier one)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": _SNAPSHOT_VERSION,
            "worker": self.worker,
            "pid": self.pid,
            "alive": alive,
            "written_at": self.clock.now(),
            "families": _encode(families),
        }
        tmp = self.directory / f".{self.worker}.tmp"
        tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, self.path)

    def others(self) -> list[_Snapshot]:
        """The other workers' snapshots in the directory (unreadable ones skipped)."""
        found: list[_Snapshot] = []
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return found
        for path in paths:
            if path == self.path:
                continue
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                if doc.get("version") != _SNAPSHOT_VERSION:
                    continue
                found.append(
                    _Snapshot(
                        worker=str(doc["worker"]),
                        pid=int(doc["pid"]),
                        alive=bool(doc["alive"]),
                        written_at=float(doc["written_at"]),
                        families=list(doc["families"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                _log.warning("skipping unreadable metrics snapshot %s: %s", path, e)
        return found

    def is_live(self, snapshot: _Snapshot) -> bool:
        """Whether ``snapshot``'s gauges still count: its worker runs and wrote it recently.

        A snapshot from the future (a directory kept across a reboot resets the monotonic clock)
        is not live either.
        """
        age = self.clock.now() - snapshot.written_at
        return snapshot.alive and -self.stale_after <= age <= self.stale_after

    def merge(self, own: Sequence[Metric]) -> list[Metric]:
        """This worker's ``own`` families merged with the other workers' snapshots."""
        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

        def family(name: str, typ: str, doc: str) -> Metric | None:
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, doc, typ)
                sums[name] = {}
            return metric if metric.type == typ else None  # a worker of another version disagrees

        def add(
            metric: Metric, sample: str, labels: Mapping[str, str], value: float, pid: int, live: bool
        ) -> None:
            if metric.type in _SUMMED:
                key = (sample, tuple(sorted(labels.items())))
                table = sums[metric.name]
                table[key] = table.get(key, 0.0) + value
            elif live:
                metric.samples.append(Sample(sample, {**labels, "pid": str(pid)}, value))

        for mine in own:
            metric = family(mine.name, mine.type, mine.documentation)
            if metric is not None:
                for s in mine.samples:
                    add(metric, s.name, s.labels, s.value, self.pid, True)
        for snap in self.others():
            live = self.is_live(snap)
            for f in snap.families:
                try:
                    metric = family(str(f["name"]), str(f["type"]), str(f["help"]))
                    if metric is None:
                        continue
                    for name, labels, value in f["samples"]:
                        add(
                            metric,
                            str(name),
                            {str(k): str(v) for k, v in labels.items()},
                            float(value),
                            snap.pid,
                            live,
                        )
                except (KeyError, TypeError, ValueError) as e:
                    _log.warning(
                        "skipping a malformed family in the snapshot of worker %s: %s", snap.worker, e
                    )
        for name, table in sums.items():
            metric = merged[name]
            metric.samples.extend(
                Sample(sample, dict(labels), value) for (sample, labels), value in table.items()
            )
        return list(merged.values())


class _MergingCollector(Collector):
    """Publishes this worker's snapshot, then yields it merged with the other workers'."""

    def __init__(self, own: CollectorRegistry, shared: WorkerSnapshots) -> None:
        self.own = own
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        families = list(self.own.collect())
        if not families:  # not started yet (or stopped): nothing of ours to share
            yield from self.shared.merge([])
            return
        # Publish first: whichever worker answers the next scrape sees at least these values, so the
        # summed counters never go backwards between scrapes served by different workers.
        try:
            self.shared.publish(families)
        except OSError as e:
            _log.warning("cannot write the metrics snapshot %s: %s", self.shared.path, e)
        yield from self.shared.merge(families)


class RuntimeMetrics:
    """The ``/metrics`` of one app: this process's collectors, shared with the other workers when asked.

    ``registry`` holds this process's collectors (the runtime's, and whatever else registers there,
    such as the gateway's); :meth:`exposition` renders them. With ``directory`` (default: none;
    ``create_app`` passes :func:`multiprocess_dir`) the exposition merges them with the other workers'
    snapshots, :meth:`start` runs a task that publishes this worker's snapshot every ``interval``
    seconds, and :meth:`aclose` publishes a last one marked stopped.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        directory: Path | str | None = None,
        interval: float = 1.0,
        stale_after: float | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.runtime = runtime
        self.interval = float(interval)
        self.collector = RuntimeCollector(runtime)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.shared: WorkerSnapshots | None = None
        self._exposed = self.registry
        if directory is not None:
            self.shared = WorkerSnapshots(
                directory,
                clock=runtime.clock,
                stale_after=stale_after if stale_after is not None else max(10.0, 5 * self.interval),
            )
            self._exposed = CollectorRegistry(auto_describe=False)
            self._exposed.register(_MergingCollector(self.registry, self.shared))
        self._publishing = Periodic(
            "brownout-metrics", self._publish_now, lambda: self.interval, clock=runtime.clock, logger=_log
        )

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (merged over the workers when shared)."""
        return generate_latest(self._exposed)

    def publish(self, *, alive: bool = True) -> None:
        """Write this worker's snapshot now (nothing without a shared directory, or before start)."""
        if self.shared is None:
            return
        families = list(self.registry.collect())
        if families:
            self.shared.publish(families, alive=alive)

    def start(self) -> None:
        """Start publishing this worker's snapshot periodically (needs a running loop)."""
        if self.shared is not None:
            self._publishing.start()

    def _publish_now(self) -> None:
        try:
            self.publish()
        except OSError as e:  # a full or vanished directory must not stop the server
            _log.warning("cannot write the metrics snapshot: %s", e)

    async def aclose(self) -> None:
        """Stop publishing, and mark this worker's snapshot stopped (its counters keep counting)."""
        await self._publishing.stop()
        try:
            self.publish(alive=False)
        except OSError as e:
            _log.warning("cannot write the last metrics snapshot: %s", e)
