"""``brownout bench policies`` called as a function (brownout.bench.policies): one row per library and
case, a peer that cannot run reported rather than fatal, and goals computed only from what ran."""

from __future__ import annotations

import pytest

from brownout.bench import policies
from brownout.bench.policies import CASES, Row, run


def test_every_library_of_a_case_gets_a_row() -> None:
    result = run(calls=50, rounds=1, cases=["breaker", "deadline"])
    assert (result["calls"], result["rounds"]) == (50, 1)
    rows = result["rows"]
    assert [(r["case"], r["library"]) for r in rows] == [
        (case, library) for case in ("breaker", "deadline") for library, _ in CASES[case]
    ]
    for row in rows:
        assert row["error"] == "", row
        assert isinstance(row["added_ns"], float)
    assert set(result["goals"]) == {"breaker_vs_pybreaker_ratio", "breaker_at_most_quarter_of_pybreaker"}


def test_an_unknown_case_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown case\(s\) \['nope'\]; choose from \['breaker'"):
        run(calls=10, rounds=1, cases=["breaker", "nope"])


def test_a_peer_that_cannot_run_is_a_row_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> object:
        raise ImportError("no module named pybreaker")

    monkeypatch.setitem(
        policies.CASES, "breaker", [("brownout", CASES["breaker"][0][1]), ("pybreaker", broken)]
    )
    rows = run(calls=20, rounds=1, cases=["breaker"])["rows"]
    assert rows[1] == {
        "case": "breaker",
        "library": "pybreaker",
        "added_ns": None,
        "note": "",
        "error": "ImportError: no module named pybreaker",
    }


def test_the_goals_compare_brownout_with_the_peers() -> None:
    rows = [
        Row("breaker", "brownout", 100.0),
        Row("breaker", "pybreaker", 800.0),
        Row("breaker", "aiobreaker", 500.0),
        Row("breaker", "purgatory", None, error="ImportError: gone"),
        Row("composition", "brownout", 400.0),
    ]
    assert policies._goals(rows) == {
        "breaker_vs_pybreaker_ratio": 0.125,
        "breaker_at_most_quarter_of_pybreaker": True,
        "composition_vs_fastest_peer_breaker_ratio": 0.8,  # the fastest peer that ran: 500
        "composition_below_fastest_peer_breaker": True,
    }
    assert policies._goals([Row("breaker", "brownout", 100.0)]) == {}  # nothing to compare with
