"""Recovery: classify failures, run action chains with cooldowns and attempt limits, keep a
history, and check model files' integrity.

* :mod:`brownout.recovery.classify` -- :func:`classify` an exception (or error text) into a
  :class:`FailureType`;
* :mod:`brownout.recovery.actions` -- :class:`Action`, the chains per failure type
  (:data:`DEFAULT_CHAINS`) and the concrete actions of ``brownout serve``;
* :mod:`brownout.recovery.manager` -- :class:`RecoveryManager`;
* :mod:`brownout.recovery.artifact` -- :class:`ModelArtifact`: a model file's expected sha256
  (shipped in its wheel's RECORD, or recorded at first load) and re-download.
"""

from __future__ import annotations

from brownout.recovery.actions import DEFAULT_CHAINS, Action, ActionResult, BackoffSpec, brief_server_actions
from brownout.recovery.artifact import ModelArtifact, UrlSource, WheelSource
from brownout.recovery.classify import Classification, FailureType, classify
from brownout.recovery.manager import RecoveryAttempt, RecoveryManager, RecoveryOutcome

__all__ = [
    "DEFAULT_CHAINS",
    "Action",
    "ActionResult",
    "BackoffSpec",
    "Classification",
    "FailureType",
    "ModelArtifact",
    "RecoveryAttempt",
    "RecoveryManager",
    "RecoveryOutcome",
    "UrlSource",
    "WheelSource",
    "brief_server_actions",
    "classify",
]
