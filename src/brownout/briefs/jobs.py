"""The ``briefs`` job type: a list of customer texts, a brief for each through the brief pipeline.

Each item is ``{"text": ..., "mode": ...}`` and is served by :meth:`BriefService.create_brief`, the
same path as ``POST /v1/briefs`` (cache, dimmer, admission, modes and downshift, the JSON guard, the
fallbacks): a job item is one more brief request, queued behind interactive ones by the workers
(:mod:`brownout.server.jobs`). Its outcome keeps the whole answer as the item's ``result``, what
wrote the brief as ``served_by`` (``model:qwen``, ``cache``, ``rules``, ...), and ``mock`` when the
brief is our rule-based one -- no model wrote it (the answer's reliability is ``low``): a job says
how many of its items were answered that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefService
from brownout.durable.jobs import ItemOutcome

__all__ = ["BRIEFS", "BriefsJob", "is_mock"]

BRIEFS: Final = "briefs"
"""The job type's name, as clients send it."""


def is_mock(answer: BriefAnswer | Mapping[str, Any]) -> bool:
    """True when no model wrote the brief: the rule-based brief (or the popular template), which the
    service marks with reliability ``low``."""
    return answer.get("reliability") == "low"


class BriefsJob:
    """Runs one ``briefs`` item through ``service``."""

    type: Final = BRIEFS

    def __init__(self, service: BriefService) -> None:
        self.service = service

    def check(self, item: Mapping[str, Any]) -> None:
        """Raise ValueError, with the reason, for an item the service would refuse (at submission,
        so a job never holds an item that cannot be served)."""
        self.service.validate_request(str(item.get("text", "")), str(item.get("mode", "balanced")))

    async def run(self, item: Mapping[str, Any]) -> ItemOutcome:
        """Serve the item; raises what the service raised (ServiceUnavailable when it cannot answer)."""
        answer = await self.service.create_brief(str(item["text"]), str(item.get("mode", "balanced")))
        stages = answer["stages"]
        return ItemOutcome(
            result=dict(answer),
            served_by=stages[0]["served_by"] if stages else None,
            mock=is_mock(answer),
        )
