"""``brownout bench jobs``: reading the figures it measures by (the runs themselves take minutes; the
two-replica part is what ``tests/server/test_jobs_replicas.py`` runs under test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from brownout.bench.jobs import Replica, job_done, metric, replica_config, run_async
from brownout.cli import app

EXPOSITION = """\
# HELP brownout_jobs_claims_total Work this process took
# TYPE brownout_jobs_claims_total counter
brownout_jobs_claims_total{what="job"} 1.0
brownout_jobs_claims_total{what="item"} 17.0
brownout_jobs_reclaims_total{what="item"} 3.0
brownout_jobs_shared 1.0
brownout_jobs_shared_other 5.0
"""


def test_metric_reads_one_series_by_name_and_labels() -> None:
    assert metric(EXPOSITION, "brownout_jobs_claims_total", {"what": "item"}) == 17.0
    assert metric(EXPOSITION, "brownout_jobs_claims_total", {"what": "job"}) == 1.0
    assert metric(EXPOSITION, "brownout_jobs_reclaims_total", {"what": "job"}) == 0.0  # absent
    assert metric(EXPOSITION, "brownout_jobs_shared") == 1.0  # not the longer name beside it


def test_a_job_is_done_once_it_left_queued_and_running() -> None:
    assert not job_done({"state": "queued"})
    assert not job_done({"state": "running"})
    assert job_done({"state": "partially_succeeded"})


def test_a_replica_gets_its_own_port_config_and_shared_jobs(tmp_path: Path) -> None:
    config = replica_config(
        tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        database_url="postgresql+asyncpg://u@127.0.0.1:1/db",
        model_urls={"qwen": "http://127.0.0.1:2"},
        lease=3.0,
    )
    replica = Replica(tmp_path / "a", config)
    written = yaml.safe_load(replica.config_path.read_text())
    assert written["server"]["port"] == replica.port
    assert written["jobs"] == {"distribute": "redis", "lease": 3.0, "poll_interval": 0.1}
    assert replica.url == f"http://127.0.0.1:{replica.port}"


async def test_bad_arguments_are_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="levels"):
        await run_async(levels=(0,))
    with pytest.raises(ValueError, match="items"):
        await run_async(items=0)


def test_the_command_is_mounted() -> None:
    result = CliRunner().invoke(app, ["bench", "jobs", "--help"])
    assert result.exit_code == 0
    assert "--items" in result.output
    assert "--no-reclaim" in result.output
