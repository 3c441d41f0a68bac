"""Side-by-side benchmarks behind ``brownout bench``.

Each benchmark runs brownout and its peers in one process, in one run, on the same workload, and
reports figures and ratios -- never a pass/fail on wall-clock time inside the test suite. The peers
come from the ``bench`` extra (``pip install 'brownout[bench]'``); a peer that is not installed is
reported as missing rather than failing the run.

The results recorded on our machines live in ``benchmarks/`` at the repository root.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["child_env", "percentile"]

# Where the brownout package is imported from; a source checkout (not site-packages) must be put on
# the PYTHONPATH of a child ``python -m brownout`` so the child runs the same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_FROM_SOURCE_TREE = Path(_PACKAGE_ROOT).name not in ("site-packages", "dist-packages")


def child_env() -> dict[str, str]:
    """The environment of a ``brownout serve`` that a bench or a drill starts.

    The run's own config must be the one in force, so the user's ``BROWNOUT__*`` overrides and admin
    token are left out; from a source checkout the package's root goes on ``PYTHONPATH``.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROWNOUT__")}
    env.pop("BROWNOUT_ADMIN_TOKEN", None)
    if _FROM_SOURCE_TREE:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))])
