"""Fault injection: servers that misbehave on purpose, and the scenario drills that drive the real stack.

* :mod:`brownout.chaos.fakellm` -- an OpenAI-compatible chat server on 127.0.0.1 whose behaviour
  (answer, error, hang, slow, garbage, wrong schema, flaky, down, malformed) is switched at runtime.
* :mod:`brownout.chaos.drills` -- ``brownout drill``: every failure scenario brownout is built for, run
  for real against the real stack, with figures, verdicts and a report.

This package sits outside the resilience layers: it drives them from outside and nothing in
``brownout.policies`` or ``brownout.llm`` imports it.
"""

from __future__ import annotations

__all__: list[str] = []
