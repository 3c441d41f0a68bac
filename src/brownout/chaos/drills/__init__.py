"""Chaos drills: every failure scenario brownout is built for, run for real against the real stack.

``brownout drill NAME ...`` (or ``all``) starts what each scenario needs -- the brownout server as a
subprocess, fault-injecting model servers, a private PostgreSQL -- drives bounded load from an async
client on 127.0.0.1, injects the fault, restores, and measures: requests by outcome, detection and
recovery times, acknowledged writes against the database, computations. Each scenario gets a verdict
against its goals, and :func:`write_report` writes Markdown, a PNG timeline per scenario and JSON.

* :mod:`.scenarios` -- one module per scenario: its description in the scenario template and its play;
* :mod:`.catalog` -- the scenarios in order, as data (:data:`CATALOG`), and the types of :mod:`.spec`;
* :mod:`.harness` -- :class:`~.harness.Drill`, what every play works with; :mod:`.processes`, the
  child processes it starts;
* :mod:`.runner` -- runs a scenario's play when what it needs is here (:func:`run_scenario`);
* :mod:`.load` -- the load client and the outcome of each answer (:func:`classify`);
* :mod:`.measure` -- health polling, detection/recovery times, lost writes, results;
* :mod:`.report` -- Markdown, PNG (matplotlib, the ``drill`` extra) and JSON;
* :mod:`.console` and :mod:`.command` -- ``brownout drill`` in the terminal.

The names below are loaded on first use: ``brownout`` mounts :mod:`.command` from this package, and its
other commands should not pay for loading the drills.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brownout.chaos.drills.catalog import (
        CATALOG,
        OUTCOMES,
        Fault,
        Goals,
        Outcome,
        Scenario,
        scenario,
    )
    from brownout.chaos.drills.load import Load, Sample, classify
    from brownout.chaos.drills.measure import Check, HealthSample, HealthWatcher, ScenarioResult
    from brownout.chaos.drills.report import report_json, write_report
    from brownout.chaos.drills.runner import (
        DrillProgress,
        DrillSettings,
        missing,
        run_drills,
        run_scenario,
    )

__all__ = [
    "CATALOG",
    "OUTCOMES",
    "Check",
    "DrillProgress",
    "DrillSettings",
    "Fault",
    "Goals",
    "HealthSample",
    "HealthWatcher",
    "Load",
    "Outcome",
    "Sample",
    "Scenario",
    "ScenarioResult",
    "classify",
    "missing",
    "report_json",
    "run_drills",
    "run_scenario",
    "scenario",
    "write_report",
]

_HOME = {
    "catalog": ("CATALOG", "OUTCOMES", "Fault", "Goals", "Outcome", "Scenario", "scenario"),
    "load": ("Load", "Sample", "classify"),
    "measure": ("Check", "HealthSample", "HealthWatcher", "ScenarioResult"),
    "report": ("report_json", "write_report"),
    "runner": ("DrillProgress", "DrillSettings", "missing", "run_drills", "run_scenario"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
