"""What is acknowledged can be stored: text the database cannot hold is refused before the 200, a
write refused for its data is dead-lettered at once instead of blocking healthy writes behind it, and
storage errors are summarised without SQL, parameters or customers' text (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import PostgresDatabase
from brownout.durable.spool import Spool, default_data_fault, default_transient, error_summary
from brownout.durable.store import BriefRecord, BriefStore
from brownout.testing import FakeClock
from support.stack import serve
from support.wait import until

SECRET = "my secret wish for jasmine"


def _payload(i: int, text: str = "rose and oud") -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "text": text,
        "requested_mode": "fast",
        "served_mode": "fast",
        "degraded": False,
        "response": {"request_id": f"req-{i}"},
        "created_at": "2026-01-01T00:00:00+00:00",
        "cache_key": None,
    }


async def _nul_refusal(store: BriefStore) -> Exception:
    """The real error PostgreSQL gives for a brief whose text holds a NUL."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 -- the driver's own error is the subject
        await store.save(BriefRecord.from_payload(_payload(99, SECRET + "\x00!")))
    assert isinstance(caught.value, Exception)
    return caught.value


async def test_a_nul_refused_by_postgresql_is_dead_lettered_at_once_and_the_rest_stored(
    fresh_postgres_db: PostgresDatabase, tmp_path: Path
) -> None:
    store = BriefStore(fresh_postgres_db.url)
    spool = Spool(tmp_path / "s.db", clock=FakeClock())
    await spool.open()
    try:
        await store.init()
        await spool.append("req-0", "brief", _payload(0))
        await spool.append("req-1", "brief", _payload(1, SECRET + "\x00"))
        for i in range(2, 6):
            await spool.append(f"req-{i}", "brief", _payload(i))

        async def batch_sink(entries: list[tuple[str, str, dict[str, Any]]]) -> None:
            await store.save_many([BriefRecord.from_payload(p) for _, _, p in entries])

        # One run: the poison entry does not hold the healthy ones behind it (before: the run stopped
        # at it, and it was retried max_attempts times, with back-off, before it moved aside).
        result = await spool.replay(batch_sink=batch_sink, batch=100)
        assert result.error is None
        assert result.replayed == 5
        assert result.dead_lettered == 1
        assert spool.pending == 0
        assert sorted(await store.request_ids()) == [f"req-{i}" for i in (0, 2, 3, 4, 5)]
        (dead,) = await spool.dead_letters()
        assert dead.key == "req-1"
        assert dead.attempts == 1
        assert dead.payload["text"] == SECRET + "\x00"  # kept whole for the operator, not lost
        assert dead.last_error is not None
        assert "[SQL" not in dead.last_error
        assert "INSERT" not in dead.last_error
        assert SECRET not in dead.last_error
    finally:
        await spool.aclose()
        await store.aclose()


async def test_data_faults_and_outages_are_told_apart_on_real_errors(
    fresh_postgres_db: PostgresDatabase,
) -> None:
    store = BriefStore(fresh_postgres_db.url)
    try:
        await store.init()
        nul = await _nul_refusal(store)
        assert default_data_fault(nul)
        assert not default_transient(nul)
        await store.save(BriefRecord.from_payload(_payload(1)))
        too_long = BriefRecord("x" * 100, "t", "fast", "fast", False, {})  # over its column's length
        with pytest.raises(Exception) as caught:  # noqa: PT011
            await store.save(too_long)
        assert default_data_fault(caught.value)
    finally:
        await store.aclose()
    down = BriefStore("postgresql+asyncpg://postgres@127.0.0.1:1/none", connect_timeout=1.0)
    try:
        with pytest.raises(Exception) as refused:  # noqa: PT011
            await down.init()
        assert default_transient(refused.value)
        assert not default_data_fault(refused.value)  # an outage is never the data's fault
    finally:
        await down.aclose()


async def test_error_summary_has_no_sql_parameters_or_customer_text(
    fresh_postgres_db: PostgresDatabase,
) -> None:
    store = BriefStore(fresh_postgres_db.url)
    try:
        await store.init()
        error = await _nul_refusal(store)
    finally:
        await store.aclose()
    raw = f"{type(error).__name__}: {error}"
    assert SECRET in raw  # what /health and the spool used to show
    summary = error_summary(error)
    assert "CharacterNotInRepertoire" in summary or "0x00" in summary, summary
    for leak in (SECRET, "[SQL", "INSERT", "parameters", "req-99"):
        assert leak not in summary, summary


@pytest.mark.parametrize(
    ("text", "status", "where"),
    [
        ("rose \x00 and oud", 422, "NUL"),
        ("\x00", 422, "NUL"),
        ("rose \ud800 oud", 400, "surrogate"),  # refused while parsing the JSON (one error shape)
    ],
)
async def test_text_that_cannot_be_stored_is_refused_before_the_200(
    fakes: dict[str, FakeLLM], tmp_path: Path, text: str, status: int, where: str
) -> None:
    async with serve(fakes, tmp_path) as stack:
        before = sum(f.chat_requests for f in fakes.values())
        # Escaped JSON (\u0000, \ud800), as a client sends them.
        body = json.dumps({"text": text, "mode": "fast"})
        response = await stack.http.post(
            "/v1/briefs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert where in error["message"]
        assert error["param"] == "text"
        assert error["errors"][0]["loc"][-1] == "text"
        # Nothing was asked of a model, stored or spooled.
        assert sum(f.chat_requests for f in fakes.values()) == before
        assert await stack.runtime.store.count() == 0
        assert stack.runtime.spool.pending == 0


async def test_health_says_degraded_while_writes_wait_in_the_spool(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # check_interval: the replayer waits that long before its next try, so the entry stays spooled.
    async with serve(fakes, tmp_path, {"database": {"check_interval": 3600.0}}) as stack:
        health = (await stack.http.get("/health")).json()
        assert health["database"]["status"] == "healthy"
        assert health["status"] == "healthy"
        await stack.runtime.spool.append("req-1", "brief", _payload(1))
        health = (await stack.http.get("/health")).json()
        assert health["database"]["status"] == "degraded"
        assert health["database"]["spooled_writes"] == 1
        assert health["status"] == "degraded"
        assert stack.runtime.replayer is not None
        stack.runtime.replayer.wake()
        await until(lambda: stack.runtime.spool.pending == 0, "the replay")
        assert (await stack.http.get("/health")).json()["database"]["status"] == "healthy"
        assert await stack.runtime.store.count() == 1
