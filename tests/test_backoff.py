"""Every exponential backoff in brownout, driven through a million failures: finite, capped, growing.

A backoff is computed after a failure, so the longest outages give it the largest failure counts. Each
test here draws failure counts up to 10**6 (a database down for weeks at a one-second retry) and checks
the component's *own* backoff code: the wait is a finite number between 0 and the cap (plus the jitter
where one is added), it never shrinks as failures accumulate when jitter is off, and it equals the plain
formula ``min(cap, base * multiplier ** (failures - 1))`` wherever floats can compute that formula.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from brownout.policies.retry import capped_exponential

FAILURES = st.integers(0, 10**6)
EXPONENTS = st.integers(-10, 10**9) | st.floats(-10.0, 1e9, allow_nan=False)
SECONDS = st.floats(0.0, 1e6, allow_nan=False)
MULTIPLIERS = st.floats(0.0, 100.0, allow_nan=False)


def formula(base: float, multiplier: float, exponent: float, cap: float) -> float | None:
    """``min(cap, base * multiplier ** exponent)`` the plain way, or None where floats cannot compute it."""
    try:
        return min(cap, base * multiplier ** max(0.0, exponent))
    except OverflowError:
        return None


def assert_formula(result: float, expected: float | None) -> None:
    """``result`` is the plain formula's value wherever that one is computable (to float rounding)."""
    if expected is not None and not math.isnan(expected):
        assert math.isclose(result, expected, rel_tol=1e-12, abs_tol=0.0), (result, expected)


# -- the shared function ------------------------------------------------------------------------------


@given(
    base=SECONDS,
    multiplier=MULTIPLIERS,
    exponent=EXPONENTS,
    cap=SECONDS | st.just(math.inf),
)
@example(base=1.0, multiplier=2.0, exponent=10**9, cap=30.0)
@example(base=1.0, multiplier=2.0, exponent=1024, cap=math.inf)
@example(base=5e-324, multiplier=2.0, exponent=2000, cap=1e6)
@example(base=1e6, multiplier=2.0, exponent=3, cap=1.0)
def test_capped_exponential_never_raises_and_stays_in_bounds(
    base: float, multiplier: float, exponent: float, cap: float
) -> None:
    result = capped_exponential(base, multiplier, exponent, cap)
    assert isinstance(result, float)
    assert 0.0 <= result <= cap
    if cap != math.inf:
        assert math.isfinite(result)
    assert_formula(result, formula(base, multiplier, exponent, cap))


@given(
    base=st.floats(1e-9, 1e3),
    multiplier=st.floats(1.0, 100.0),
    cap=st.floats(0.0, 1e6) | st.just(math.inf),
    a=st.integers(0, 10**9),
    b=st.integers(0, 10**9),
)
def test_capped_exponential_never_shrinks_as_the_exponent_grows(
    base: float, multiplier: float, cap: float, a: int, b: int
) -> None:
    low, high = sorted((a, b))
    assert capped_exponential(base, multiplier, low, cap) <= capped_exponential(base, multiplier, high, cap)


@given(base=st.floats(1e-9, 1e3), multiplier=st.floats(1.0 + 1e-6, 100.0), cap=st.floats(1e-9, 1e6))
def test_capped_exponential_reaches_the_cap(base: float, multiplier: float, cap: float) -> None:
    assert capped_exponential(base, multiplier, 10**9, cap) == cap


@given(base=st.floats(0.0, 1e6), multiplier=st.floats(0.0, 1.0, exclude_max=True), n=st.integers(1, 10**9))
def test_a_multiplier_below_one_shrinks_towards_zero(base: float, multiplier: float, n: int) -> None:
    cap = 2 * base
    result = capped_exponential(base, multiplier, n, cap)
    assert 0.0 <= result <= base
    assert capped_exponential(base, multiplier, n + 1, cap) <= result


@given(base=st.floats(1.0, 1e6), cap=st.floats(0.0, 1.0, exclude_max=True), n=st.integers(0, 10**9))
def test_a_base_above_the_cap_gives_the_cap(base: float, cap: float, n: int) -> None:
    assert capped_exponential(base, 2.0, n, cap) == cap


def test_exact_where_the_formula_is_exact() -> None:
    # Whole seconds doubling: the plain formula, bit for bit, until the cap.
    assert [capped_exponential(1.0, 2.0, n, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert capped_exponential(0.5, 3.0, 4, math.inf) == 0.5 * 3.0**4
    assert capped_exponential(1.0, 2.0, -3, 30.0) == 1.0  # a negative exponent counts as 0


def test_exponents_beyond_the_float_range_give_the_cap() -> None:
    # An attempt counter is an int: 2 ** n on ints never overflows but gets huge; float(n) would raise.
    assert capped_exponential(1.0, 2.0, 10**400, 30.0) == 30.0
    assert capped_exponential(1.0, 2.0, 10**400, math.inf) == math.inf
    assert capped_exponential(1.0, 0.5, 10**400, 30.0) == 0.0
    assert capped_exponential(1.0, 2.0, math.inf, 30.0) == 30.0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ((-1.0, 2.0, 1, 30.0), "base=-1.0"),
        ((1.0, -2.0, 1, 30.0), "multiplier=-2.0"),
        ((1.0, 2.0, 1, -30.0), "cap=-30.0"),
        ((math.nan, 2.0, 1, 30.0), "base=nan"),
        ((1.0, math.nan, 1, 30.0), "multiplier=nan"),
        ((1.0, 2.0, math.nan, 30.0), "exponent=nan"),
        ((1.0, 2.0, 1, math.nan), "cap=nan"),
    ],
)
def test_meaningless_arguments_are_refused_by_name(
    args: tuple[float, float, float, float], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        capped_exponential(*args)
