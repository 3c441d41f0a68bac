"""``brownout bench stampede`` called as a function (brownout.bench.stampede): concurrent callers of a
cold key, counted computations, and brownout's goals."""

from __future__ import annotations

import pytest

from brownout.bench import stampede
from brownout.bench.stampede import LIBRARIES, run


def test_brownout_computes_a_cold_key_once_for_every_caller() -> None:
    result = run(callers=100, compute_ms=5.0, libraries=["brownout"])
    assert result["callers"] == 100
    (row,) = result["rows"]
    assert (row["library"], row["computations"], row["error"]) == ("brownout", 1, "")
    assert row["p50_ms"] >= 5.0  # every caller waited for the one computation
    assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert result["goals"]["one_computation"] is True
    assert result["goals"]["p99_above_compute_ms"] == round(row["p99_ms"] - 5.0, 2)


def test_every_library_gets_a_row() -> None:
    rows = run(callers=20, compute_ms=1.0)["rows"]
    assert [r["library"] for r in rows] == list(LIBRARIES)
    assert all(r["computations"] is not None and r["computations"] >= 1 for r in rows)


def test_an_unknown_library_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown librar\(y/ies\) \['memcached'\]; choose from \['brownout'"
    ):
        run(callers=10, libraries=["memcached"])


def test_a_library_that_cannot_be_set_up_is_a_row_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(comp: object) -> object:
        raise RuntimeError("no server")

    monkeypatch.setitem(stampede.LIBRARIES, "cashews", broken)
    result = run(callers=10, compute_ms=1.0, libraries=["cashews"])
    (row,) = result["rows"]
    assert (row["computations"], row["p99_ms"], row["error"]) == (None, None, "RuntimeError: no server")
    assert result["goals"] == {}  # brownout did not run
