"""Side-by-side benchmarks behind ``brownout bench``.

Each benchmark runs brownout and its peers in one process, in one run, on the same workload, and
reports figures and ratios -- never a pass/fail on wall-clock time inside the test suite. The peers
come from the ``bench`` extra (``pip install 'brownout[bench]'``); a peer that is not installed is
reported as missing rather than failing the run.

The results recorded on our machines live in ``benchmarks/`` at the repository root.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))])
