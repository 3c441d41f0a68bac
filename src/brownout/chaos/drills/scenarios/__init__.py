"""The drill scenarios, one module each; :data:`MODULES` lists them in the order ``brownout drill all``
runs them, and the catalog and the plays are assembled from it here.

A scenario module holds ``SCENARIO``, its :class:`~brownout.chaos.drills.spec.Scenario` (the scenario
template and how to judge it), and ``play``, the coroutine that drives its fault against a
:class:`~brownout.chaos.drills.harness.Drill`. Scenarios driven the same way import one play (the model
faults share :func:`._model_fault.play`); helpers several plays use are in :mod:`._shared`. To add a
drill, write its module and list it in :data:`MODULES` (``docs/drills/README.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

from brownout.chaos.drills.harness import Play
from brownout.chaos.drills.scenarios import (
    all_models_down,
    broker_down,
    cache_stampede,
    garbage_json,
    generator_down,
    hinter_down,
    loop_blocking,
    memory_pressure,
    model_hang,
    model_server_crash,
    overload,
    postgres_down,
    postgres_failover,
    queue_overflow,
    redis_down,
    slow_model,
    validator_down,
)
from brownout.chaos.drills.spec import Scenario

__all__ = ["CATALOG", "MODULES", "PLAYS"]

MODULES: tuple[ModuleType, ...] = (
    generator_down,
    validator_down,
    hinter_down,
    all_models_down,
    model_hang,
    garbage_json,
    slow_model,
    model_server_crash,
    redis_down,
    postgres_down,
    postgres_failover,
    broker_down,
    cache_stampede,
    queue_overflow,
    overload,
    loop_blocking,
    memory_pressure,
)
"""Every scenario module, in the order ``brownout drill all`` runs them."""


def _scenario(module: ModuleType) -> Scenario:
    found = getattr(module, "SCENARIO", None)
    if not isinstance(found, Scenario):
        raise TypeError(f"{module.__name__} has no SCENARIO (a Scenario)")
    return found


def _plays(modules: Iterable[ModuleType]) -> dict[str, Play]:
    # A module without ``play`` is a scenario described before it can be driven: it waits on its play.
    plays: dict[str, Play] = {}
    for module in modules:
        play = getattr(module, "play", None)
        if play is None:
            continue
        name = _scenario(module).play
        if plays.setdefault(name, play) is not play:
            raise ValueError(f"two different plays are called {name!r} (the second in {module.__name__})")
    return plays


CATALOG: tuple[Scenario, ...] = tuple(_scenario(m) for m in MODULES)
"""Every scenario, in the order ``brownout drill all`` runs them."""

PLAYS: dict[str, Play] = _plays(MODULES)
"""The plays written so far, by :attr:`Scenario.play` name."""
