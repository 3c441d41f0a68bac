"""The gateway's provider-fault scenarios: ``brownout drill gateway`` and its scorecard.

Sixteen ways a model provider misbehaves (rate limits with and without a hint, 500/503, a reset, a
silent provider, a slow first token, a stream cut, stalled or malformed mid-way, no ``[DONE]``,
context length exceeded, a content-filter refusal, a fallback that refuses assistant prefill, a
flapping primary, fail-over accounting), each run against a real ``brownout serve`` with its default
gateway settings through the official ``openai`` client, and graded pass / partial / safe / fail.

* :mod:`.upstream` -- the fault-injecting OpenAI-compatible upstream (plain asyncio, 127.0.0.1);
* :mod:`.scenarios` -- the 16 scenarios as data, and their plays;
* :mod:`.grading` -- what the caller saw (:class:`~.grading.Exchange`) and the grade it earns;
* :mod:`.runner` -- one ``brownout serve``, every scenario at once, the :class:`~.runner.Scorecard`;
* :mod:`.console` -- the scorecard in the terminal (``brownout drill gateway``, ``--json``, ``--list``).
"""

from __future__ import annotations

__all__: list[str] = []
