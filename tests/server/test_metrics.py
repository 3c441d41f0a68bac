"""``/metrics``: the seeds' metric names from a running app, and metrics shared by several workers.

* The app is built as in ``tests/server/test_server.py``: each model role on its own
  :class:`~brownout.chaos.fakellm.FakeLLM` on 127.0.0.1, the lifespan run, requests through
  ``httpx.ASGITransport``.
* Several workers: :class:`~brownout.server.metrics.WorkerSnapshots` merging hand-built families on a
  :class:`~brownout.testing.FakeClock` (sums, per-worker gauges, stopped and stale workers), and two
  real ``brownout serve`` processes sharing one ``PROMETHEUS_MULTIPROCESS_DIR``.
* Every metric the alert rules and the Grafana dashboard query is one ``/metrics`` exports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import free_port
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.server.app import create_app
from brownout.server.metrics import MULTIPROCESS_ENV, WorkerSnapshots, multiprocess_dir
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock
from support import ROOT
from support.wait import until

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "brownout-dashboard.json"

# Issue 4 item 1, with the sample names Prometheus stores (counters end in _total).
SEED_SAMPLES = (
    "model_health_status",
    "queue_size",
    "http_errors_total",
    "cache_requests_total",
    "cache_hits_total",
    "cache_misses_total",
    "cache_size",
    "cache_evictions_total",
    "cache_ttl_expirations_total",
    "circuit_breaker_state",
    "llm_requests_total",
    "llm_request_failures_total",
    "llm_mode_downshift_total",
    "llm_json_parse_failures_total",
    "llm_json_retry_count_bucket",
    "llm_json_retry_count_count",
    "llm_json_retry_count_sum",
    "llm_json_fallback_used_total",
    "llm_health_status",
    "llm_health_check_duration_seconds",
    "llm_health_check_failures_total",
    "spool_pending",
    "spool_oldest_age_seconds",
    "spool_replayed_total",
    "spool_replay_failures_total",
    "spool_replay_running",
    "spool_replay_consecutive_failures",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def exported_names(text: str) -> set[str]:
    """The sample names an exposition declares, with or without samples yet (a labelled counter
    that has not counted anything still declares its family)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


# ----------------------------------------------------------------------------------- PromQL names

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = _GROUPING.sub(" ", text)  # by (...), without (...), on (...)
    names = set()
    # Not after a digit: the "m" of "5m" or the "e" of "1e3" is no name.
    for match in re.finditer(r"(?<![A-Za-z0-9_.:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or after.startswith("("):
            continue  # a keyword, or a function / aggregation called
        names.add(word)
    return names


def test_promql_metric_names_finds_metrics_only() -> None:
    expr = (
        'sum without (status) (rate(http_errors_total{status=~"5.."}[5m])) / rate(http_requests_total[5m])'
        " > 0.1 and on (instance) max by (le, stage) (llm_json_retry_count_bucket offset 5m) > bool 1"
    )
    assert promql_metric_names(expr) == {
        "http_errors_total",
        "http_requests_total",
        "llm_json_retry_count_bucket",
    }
    assert promql_metric_names('histogram_quantile(0.95, rate(x_bucket{a="b(c)"}[5m]))') == {"x_bucket"}


def alert_exprs() -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in doc["panels"]:
        exprs.extend(target["expr"] for target in panel.get("targets", []))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert inner, query
            exprs.append(inner.group(1))
    return exprs


# ----------------------------------------------------------------------------------- the app


def make_config(urls: Mapping[str, str], tmp_path: Path, name: str = "briefs") -> dict[str, Any]:
    """Defaults with each role on its fake, short timeouts, no periodic probing, files in ``tmp_path``."""
    return {
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "health_timeout": 2.0,
            "roles": {role: {"endpoints": [{"url": urls[role]}], "timeout": 2.0} for role in ROLES},
        },
        "json_guard": {"backoff_base": 0.0, "jitter": 0.0},
        "database": {
            "url": f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}",
            "spool_path": str(tmp_path / f"{name}.spool.db"),
        },
    }


@asynccontextmanager
async def running_app(fakes: Mapping[str, FakeLLM], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    urls = {role: fake.url for role, fake in fakes.items()}
    config = BrownoutConfig.model_validate(
        {**load_config(None, environ={}).model_dump(), **make_config(urls, tmp_path)}
    )
    runtime = Runtime(config)
    app = create_app(config, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout", timeout=30.0) as http:
            # The health loop probes every role once at start.
            await until(
                lambda: runtime.service is not None and len(runtime.service.stats.health) == len(ROLES),
                "the first probes",
            )
            yield http


async def test_metrics_carry_every_seed_name_with_its_meaning(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    async with running_app(fakes, tmp_path) as http:
        ok = await http.post("/v1/briefs", json={"text": "a rose perfume for spring", "mode": "creative"})
        assert ok.status_code == 200, ok.text
        again = await http.post("/v1/briefs", json={"text": "a rose perfume for spring", "mode": "creative"})
        assert again.json()["cached"] is True
        bad = await http.post("/v1/briefs", json={"text": "x", "mode": "turbo"})
        assert bad.status_code == 422
        text = (await http.get("/metrics")).text

    names = exported_names(text)
    missing = [n for n in SEED_SAMPLES if n not in names]
    assert not missing, missing
    m = parse(text)
    # One process: no pid label on anything.
    assert not any("pid" in dict(labels) for _, labels in m)
    for role in ROLES:
        assert value(m, "llm_requests_total", model=role) == 1
        assert value(m, "llm_request_failures_total", model=role) == 0
        assert value(m, "circuit_breaker_state", model=role, endpoint=role) == 0
        assert value(m, "model_health_status", model=role) == 1
        assert value(m, "llm_health_status", model=role) == 1
        assert value(m, "llm_health_check_failures_total", model=role) == 0
        duration = value(m, "llm_health_check_duration_seconds", model=role)
        assert duration is not None
        assert duration > 0
    for mode in ("fast", "balanced", "creative"):
        assert value(m, "llm_mode_available", mode=mode) == 1
    # The cache: one miss (first request) and one hit (the repeat); requests = hits + misses.
    assert value(m, "cache_hits_total") == 1
    assert value(m, "cache_misses_total") == 1
    assert value(m, "cache_requests_total") == 2
    assert value(m, "cache_size") == 1
    assert value(m, "cache_evictions_total") == 0
    assert value(m, "cache_ttl_expirations_total") == 0
    # HTTP: three brief requests and the scrape itself; the invalid one counted as a 422.
    assert value(m, "http_requests_total") == 4
    assert value(m, "http_errors_total", status="422") == 1
    assert value(m, "queue_size") == 0
    # The guard: every stage answered at the first ask.
    for stage in ("generate", "validate", "hint"):
        assert value(m, "llm_json_retry_count_bucket", stage=stage, le="0.0") == 1
        assert value(m, "llm_json_retry_count_count", stage=stage) == 1
        assert value(m, "llm_json_parse_failures_total", stage=stage) == 0
    assert value(m, "llm_json_fallback_used_total") == 0
    assert value(m, "spool_pending") == 0
    assert value(m, "spool_replay_running") == 1
    # Operations: the system mode, the TTL in force, resources, loop blocks (none yet).
    assert value(m, "system_mode") == 0
    assert value(m, "cache_ttl_seconds") == 3600
    assert "event_loop_blocked_total" in names or "event_loop_blocked" in text
    assert "recovery_actions" in text


async def test_alerts_and_dashboard_query_only_exported_metrics(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    async with running_app(fakes, tmp_path) as http:
        await http.post("/v1/briefs", json={"text": "a vetiver cologne", "mode": "balanced"})
        text = (await http.get("/metrics")).text
    exported = exported_names(text)

    used_by_alerts = {name: promql_metric_names(expr) for name, expr in alert_exprs().items()}
    for alert, names in used_by_alerts.items():
        assert names, f"{alert} selects no metric"
        assert names <= exported, (
            f"{alert} queries {sorted(names - exported)}, which /metrics does not export"
        )

    dashboard = [promql_metric_names(expr) for expr in dashboard_exprs()]
    used = set().union(*dashboard)
    assert used - exported == set(), sorted(used - exported)
    # The dashboard shows everything the alerts watch.
    assert set().union(*used_by_alerts.values()) <= used


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        # Every panel and query reads the chosen data source, never a hard-coded one.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
    queried = " ".join(t["expr"] for p in panels for t in p["targets"])
    for topic in (
        "llm_mode_available",
        "model_health_status",
        "circuit_breaker_state",
        "queue_size",
        "cache_hits_total",
        "llm_json_fallback_used_total",
        "llm_json_retry_count_bucket",
        "http_errors_total",
        "spool_pending",
    ):
        assert topic in queried, topic


# ----------------------------------------------------------------------------------- several workers


def worker_families(requests: int, queue: int, retries: dict[int, int] | None = None) -> list[Metric]:
    """What one worker's collector yields: a counter, a gauge and a histogram."""
    counter = CounterMetricFamily("llm_requests", "calls", labels=["model"])
    counter.add_metric(["qwen"], requests)
    gauge = GaugeMetricFamily("queue_size", "waiting", value=queue)
    hist = HistogramMetricFamily("llm_json_retry_count", "re-asks", labels=["stage"])
    counts = retries or {0: requests}
    buckets = [(str(float(b)), sum(n for k, n in counts.items() if k <= b)) for b in (0, 1, 2)]
    buckets.append(("+Inf", sum(counts.values())))
    hist.add_metric(["generate"], buckets, float(sum(k * n for k, n in counts.items())))
    return [counter, gauge, hist]


def merged(snapshots: WorkerSnapshots, own: list[Metric]) -> Samples:
    out: Samples = {}
    for family in snapshots.merge(own):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def test_workers_sum_counters_and_keep_gauges_per_worker(tmp_path: Path, clock: FakeClock) -> None:
    a = WorkerSnapshots(tmp_path, clock=clock, pid=101)
    b = WorkerSnapshots(tmp_path, clock=clock, pid=102)
    b.publish(worker_families(requests=5, queue=2, retries={0: 4, 2: 1}))
    m = merged(a, worker_families(requests=3, queue=7, retries={0: 2, 1: 1}))
    assert value(m, "llm_requests_total", model="qwen") == 8
    assert value(m, "queue_size", pid="101") == 7
    assert value(m, "queue_size", pid="102") == 2
    assert value(m, "queue_size") is None  # gauges only per worker
    # Histograms add bucket by bucket.
    assert value(m, "llm_json_retry_count_bucket", stage="generate", le="0.0") == 6
    assert value(m, "llm_json_retry_count_bucket", stage="generate", le="1.0") == 7
    assert value(m, "llm_json_retry_count_bucket", stage="generate", le="2.0") == 8
    assert value(m, "llm_json_retry_count_count", stage="generate") == 8
    assert value(m, "llm_json_retry_count_sum", stage="generate") == 3
    # The exposition renders it (types and names intact).
    text = "".join(
        f"# TYPE {f.name} {f.type}\n" + "".join(f"{s.name}{_labels(s.labels)} {s.value}\n" for s in f.samples)
        for f in a.merge([])
    )
    assert value(parse(text), "llm_requests_total", model="qwen") == 5  # b only: a published nothing


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


def test_a_stopped_worker_keeps_its_counts_but_not_its_gauges(tmp_path: Path, clock: FakeClock) -> None:
    a = WorkerSnapshots(tmp_path, clock=clock, pid=101)
    b = WorkerSnapshots(tmp_path, clock=clock, pid=102)
    b.publish(worker_families(requests=5, queue=2))
    b.publish(worker_families(requests=6, queue=0), alive=False)  # b's shutdown
    m = merged(a, worker_families(requests=3, queue=1))
    assert value(m, "llm_requests_total", model="qwen") == 9
    assert value(m, "queue_size", pid="101") == 1
    assert value(m, "queue_size", pid="102") is None
    # Its replacement (a new pid) adds to the total instead of resetting it.
    c = WorkerSnapshots(tmp_path, clock=clock, pid=103)
    c.publish(worker_families(requests=1, queue=4))
    m = merged(a, worker_families(requests=3, queue=1))
    assert value(m, "llm_requests_total", model="qwen") == 10
    assert value(m, "queue_size", pid="103") == 4


def test_a_silent_worker_goes_stale_and_a_snapshot_from_the_future_is_not_live(
    tmp_path: Path, clock: FakeClock
) -> None:
    a = WorkerSnapshots(tmp_path, clock=clock, pid=101, stale_after=10.0)
    b = WorkerSnapshots(tmp_path, clock=clock, pid=102, stale_after=10.0)
    b.publish(worker_families(requests=5, queue=2))
    clock.advance(10.0)
    assert value(merged(a, []), "queue_size", pid="102") == 2  # 10 s old: still live
    clock.advance(0.5)
    m = merged(a, [])
    assert value(m, "queue_size", pid="102") is None  # killed, or its loop blocked: no gauges
    assert value(m, "llm_requests_total", model="qwen") == 5  # its counts stay
    # A directory kept across a reboot holds snapshots "newer" than the restarted monotonic clock.
    early = FakeClock(start=clock.now() - 1000.0)
    assert value(merged(WorkerSnapshots(tmp_path, clock=early, pid=101), []), "queue_size", pid="102") is None


def test_summed_counters_never_go_back_whichever_worker_answers(tmp_path: Path, clock: FakeClock) -> None:
    """Each scrape publishes the answering worker's live values before merging, so the next scrape,
    answered by the other worker, reads them at least as new."""
    a = WorkerSnapshots(tmp_path, clock=clock, pid=101)
    b = WorkerSnapshots(tmp_path, clock=clock, pid=102)
    counts = {101: 0, 102: 0}
    seen = []
    for step in range(12):
        counts[101] += step % 3
        counts[102] += 1
        answering, pid = (a, 101) if step % 2 == 0 else (b, 102)
        own = worker_families(requests=counts[pid], queue=0)
        answering.publish(own)  # what _MergingCollector does before merging
        seen.append(value(merged(answering, own), "llm_requests_total", model="qwen"))
        clock.advance(0.3)
    assert seen == sorted(seen)
    assert seen[-1] == 22  # a's calls since its last publish (step 10) are not in yet
    a.publish(worker_families(requests=counts[101], queue=0))  # a's periodic publish
    own = worker_families(requests=counts[102], queue=0)
    assert value(merged(b, own), "llm_requests_total", model="qwen") == counts[101] + counts[102]


def test_unreadable_or_foreign_snapshots_are_skipped(tmp_path: Path, clock: FakeClock) -> None:
    a = WorkerSnapshots(tmp_path, clock=clock, pid=101)
    b = WorkerSnapshots(tmp_path, clock=clock, pid=102)
    b.publish(worker_families(requests=5, queue=2))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 99, "families": []}))
    # A worker of another version declaring queue_size a counter: its family is left out, not mixed in.
    clash = WorkerSnapshots(tmp_path, clock=clock, pid=103)
    clash.publish([CounterMetricFamily("queue_size", "not a gauge", value=50)])
    (tmp_path / "prometheus_client_counter_7.db").write_bytes(b"\0" * 16)  # not ours: not read
    m = merged(a, worker_families(requests=1, queue=3))
    assert value(m, "llm_requests_total", model="qwen") == 6
    assert {k for k in m if k[0] == "queue_size"} == {
        ("queue_size", frozenset({("pid", "101")})),
        ("queue_size", frozenset({("pid", "102")})),
    }


def test_multiprocess_dir_comes_from_the_prometheus_variable(tmp_path: Path) -> None:
    assert multiprocess_dir({}) is None
    assert multiprocess_dir({MULTIPROCESS_ENV: ""}) is None
    assert multiprocess_dir({MULTIPROCESS_ENV: str(tmp_path)}) == tmp_path
    assert multiprocess_dir({"prometheus_multiproc_dir": str(tmp_path)}) == tmp_path


class Worker:
    """A ``brownout serve`` process of its own (as one uvicorn worker is), on its own port."""

    def __init__(self, name: str, config: dict[str, Any], tmp_path: Path, shared: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROWNOUT")}
        env[MULTIPROCESS_ENV] = str(shared)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "brownout", "serve", "--config", str(path), "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
            )

    @property
    def pid(self) -> str:
        return str(self.proc.pid)

    async def ready(self, http: httpx.AsyncClient, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if (await http.get(f"{self.url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} did not start:\n{self.log.read_text()}")

    async def scrape(self, http: httpx.AsyncClient) -> Samples:
        response = await http.get(f"{self.url}/metrics")
        assert response.status_code == 200
        return parse(response.text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown runs the lifespan's end
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


async def test_two_server_processes_sharing_the_directory_answer_for_both(
    fakes: dict[str, FakeLLM], tmp_path: Path, workers: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker a is an app in this process, worker b a ``brownout serve`` process; both share ``prom/``."""
    shared = tmp_path / "prom"
    shared.mkdir()
    urls = {role: fake.url for role, fake in fakes.items()}
    b = Worker("b", make_config(urls, tmp_path, "b"), tmp_path, shared)
    workers.append(b)
    monkeypatch.setenv(MULTIPROCESS_ENV, str(shared))
    a_pid = str(os.getpid())
    async with running_app(fakes, tmp_path) as a, httpx.AsyncClient(timeout=30.0) as http:
        await b.ready(http)
        for text in ("a citrus cologne", "a smoky leather scent"):
            response = await a.post("/v1/briefs", json={"text": text, "mode": "fast"})
            assert response.status_code == 200, response.text
        response = await http.post(f"{b.url}/v1/briefs", json={"text": "a green tea mist", "mode": "fast"})
        assert response.status_code == 200, response.text
        assert (await http.post(f"{b.url}/v1/briefs", json={"text": "", "mode": "fast"})).status_code == 422

        async def scrape_a() -> Samples:
            response = await a.get("/metrics")
            assert response.status_code == 200
            return parse(response.text)

        # a answers first: b's snapshot may be up to a second old. b answers next, publishing its own
        # counts and reading a's fresh ones; then a again, reading b's: both complete, and no counter
        # is lower than in the scrape before.
        first, second, third = await scrape_a(), await b.scrape(http), await scrape_a()
        assert 2 <= (value(first, "llm_requests_total", model="qwen") or 0) <= 3
        for m in (second, third):
            assert value(m, "llm_requests_total", model="qwen") == 3
            assert value(m, "http_errors_total", status="422") == 1
            assert value(m, "cache_misses_total") == 3
            for pid in (a_pid, b.pid):
                assert value(m, "queue_size", pid=pid) == 0
                assert value(m, "model_health_status", model="qwen", pid=pid) == 1
                assert value(m, "circuit_breaker_state", model="qwen", endpoint="qwen", pid=pid) == 0
            assert value(m, "cache_size", pid=a_pid) == 2
            assert value(m, "cache_size", pid=b.pid) == 1
            assert value(m, "queue_size") is None  # gauges only per worker

        b.stop()
        assert b.proc.returncode == 0, b.log.read_text()
        m = await scrape_a()
        assert value(m, "llm_requests_total", model="qwen") == 3  # b's calls still count
        assert value(m, "http_errors_total", status="422") == 1
        assert value(m, "queue_size", pid=a_pid) == 0
        assert value(m, "queue_size", pid=b.pid) is None  # b is gone: no gauges of it
        assert value(m, "cache_size", pid=b.pid) is None
    # a stopped too: its last snapshot says so, and keeps its counts for whoever scrapes next.
    (snapshot,) = [json.loads(f.read_text()) for f in shared.glob(f"{a_pid}-*.json")]
    assert snapshot["alive"] is False
