"""``brownout bench durable`` on tiny sizes: the JSON's shape, and that every count adds up.

Real servers (the session's private PostgreSQL and Redis, or the bench's own); no timing is asserted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from typer.testing import CliRunner

from brownout.bench import durable
from brownout.chaos.servers import PostgresDatabase, PostgresServer, RedisServer, ensure_installed
from brownout.cli import app

RECORDS, PER_ENTRY, BATCH, READS, HOT_KEYS = 60, 10, 8, 40, 4


def _check_counts(result: dict[str, Any], records: int, per_entry: int, batch: int) -> None:
    replay = result["replay"]
    batched = records - per_entry
    assert replay["spooled"] == records
    assert replay["per_entry_records"] == per_entry
    assert replay["batched_records"] == batched
    assert replay["batch_sink_calls"] == math.ceil(batched / batch)
    assert replay["replayed"] == replay["rows_in_database"] == records
    assert (replay["spool_pending_after"], replay["dead_lettered"]) == (0, 0)
    assert result["goals"]["every_record_stored_once"] is True

    reads = result["reads"]
    cache = result["cache"]
    for name in ("redis", "front", "raw_redis"):
        assert cache[name]["misses"] == 0
        assert cache[name]["reads_per_s"] > 0
        assert 0 < cache[name]["p50_us"] <= cache[name]["p99_us"]
    # Every read of the one-entry front goes to Redis; every read of the default front stays local.
    assert (cache["redis"]["redis_hits"], cache["redis"]["local_hits"]) == (reads, 0)
    assert (cache["front"]["local_hits"], cache["front"]["redis_hits"]) == (reads, 0)
    assert cache["redis"]["redis_errors"] == cache["front"]["redis_errors"] == 0


def test_cli_json_on_given_servers_adds_up_and_leaves_nothing_behind(
    fresh_postgres_db: PostgresDatabase, postgres_server: PostgresServer, fresh_redis: RedisServer
) -> None:
    args = [
        "bench", "durable", "--json",
        "--records", str(RECORDS), "--per-entry", str(PER_ENTRY), "--batch", str(BATCH),
        "--reads", str(READS), "--hot-keys", str(HOT_KEYS),
        "--postgres-url", fresh_postgres_db.url, "--redis-url", fresh_redis.url,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)

    for key in (
        "replay_writes_per_s",
        "replay_writes_per_s_per_entry",
        "spool_appends_per_s",
        "cache_reads_per_s_redis",
        "cache_reads_per_s_front",
        "cache_reads_per_s_raw_redis",
        "cache_p50_us_redis",
        "cache_p99_us_redis",
        "cache_p50_us_front",
        "cache_p99_us_front",
    ):
        assert isinstance(out[key], float), key
        assert out[key] > 0, key
    assert out["replay_writes_per_s"] == out["replay"]["replay_writes_per_s"]
    assert out["cache_reads_per_s_front"] == out["cache"]["front"]["reads_per_s"]
    assert (out["records"], out["reads"], out["hot_keys"]) == (RECORDS, READS, HOT_KEYS)
    assert out["replay"]["postgres"] == "url"
    assert set(out["goals"]) == {
        "replay_writes_per_s >= 5000",
        "every_record_stored_once",
        "front_over_redis_reads",
    }
    _check_counts(out, RECORDS, PER_ENTRY, BATCH)

    # The run's rows and keys are gone from servers it did not start.
    rows = postgres_server.execute("SELECT count(*) FROM briefs", database=fresh_postgres_db.name)
    assert rows == [("0",)]
    assert fresh_redis.command("KEYS", "brownout:bench:*") == []


def test_run_on_its_own_private_servers() -> None:
    ensure_installed()  # as the fixtures do: a clean machine gets the servers, never a skip
    out = durable.run(records=20, per_entry=5, batch=4, reads=10, hot_keys=2, durable=False)
    assert out["replay"]["postgres"] == "private, in memory"
    assert out["replay"]["postgres_fsync"] == "off"
    _check_counts(out, 20, 5, 4)


def test_per_entry_is_capped_at_half_of_the_records(
    fresh_postgres_db: PostgresDatabase, fresh_redis: RedisServer
) -> None:
    out = durable.run(
        records=10,
        per_entry=1000,
        batch=3,
        reads=4,
        hot_keys=2,
        postgres_url=fresh_postgres_db.url,
        redis_url=fresh_redis.url,
    )
    _check_counts(out, 10, 5, 3)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"records": 1}, "records"),
        ({"per_entry": -1}, "per_entry"),
        ({"batch": 0}, "batch"),
        ({"reads": 0}, "reads"),
        ({"hot_keys": 1}, "hot_keys"),
        ({"budget": 0}, "budget"),
    ],
)
def test_bad_sizes_are_refused_before_any_server_starts(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        durable.run(**kwargs)
