"""The drill catalog: every failure scenario, written in the scenario template, as data.

:data:`CATALOG` lists them in the order ``brownout drill all`` runs them; :func:`scenario` looks one up
by name and :meth:`Scenario.to_markdown` renders the template. Each scenario is one module of
:mod:`brownout.chaos.drills.scenarios` (its description and its play); the catalog is assembled there.

The scenario types (:class:`Scenario`, :class:`Fault`, :class:`Goals`, :class:`DetectionRow`, the
outcomes and :data:`REQUIREMENT_NOTES`) are defined in :mod:`brownout.chaos.drills.spec` and re-exported
here, where they have always been importable from.
"""

from __future__ import annotations

from brownout.chaos.drills.scenarios import CATALOG
from brownout.chaos.drills.spec import (
    OUTCOMES,
    REQUIREMENT_NOTES,
    DetectionRow,
    Fault,
    Goals,
    Kind,
    Outcome,
    Scenario,
)

__all__ = [
    "CATALOG",
    "OUTCOMES",
    "REQUIREMENT_NOTES",
    "DetectionRow",
    "Fault",
    "Goals",
    "Kind",
    "Outcome",
    "Scenario",
    "scenario",
]


def scenario(name: str) -> Scenario:
    """The scenario called ``name``; raises KeyError naming the known ones."""
    for s in CATALOG:
        if s.name == name:
            return s
    raise KeyError(f"unknown scenario {name!r}; known: {', '.join(s.name for s in CATALOG)}")
