"""The gateway's JSON guard: check answers to ``response_format: json_schema`` requests, re-ask once.

When a request asks for JSON matching a schema and its group has ``json_guard`` on, the gateway
parses each choice's ``message.content`` and validates it against the schema (jsonschema-rs). If one
fails, the model is asked once more: the original messages, the bad answer as the assistant's turn,
then a user turn naming each problem (``at /notes/0/weight: 11 is greater than the maximum of 9``).
The outcome goes back in the ``x-brownout-json-guard`` header:

* ``valid`` -- the first answer passed;
* ``fixed`` -- the first failed, the re-asked one passed (that one is returned);
* ``invalid`` -- both failed; the second answer is returned as it is, flagged, for the client to judge;
* ``skipped`` -- the request streams (nothing can be checked before it is sent) or its schema does
  not compile.

This is a front end of the JSON guard's one engine (:class:`brownout.llm.guard.GuardEngine`), which
parses, validates and decides the re-ask, as it does for the brief pipeline. The gateway's part is the
schema (the client's, compiled once), the words of the correction, and one setting the pipeline does
not share: no repair, because an answer is passed on as the upstream wrote it, and a client could not
read what only a repair could.

The re-ask is a new request that tells the model what was wrong; the same bad output is never examined
twice, since it would fail the same way again.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal, Protocol, TypeVar

import jsonschema_rs

from brownout.llm.guard import Accepted, GuardConfig, GuardEngine, Mismatch, Rejection
from brownout.llm.types import Message

__all__ = ["GuardOutcome", "SchemaCheck", "SchemaGuard", "requested_schema"]

GuardOutcome = Literal["valid", "fixed", "invalid", "skipped"]
"""The values of the ``x-brownout-json-guard`` header."""

_MAX_PROBLEMS: Final = 5
_COMPILED: Final = 256  # compiled schemas kept (clients tend to send the same few schemas)

_CONFIG: Final = GuardConfig(max_retries=1, backoff_base=0.0, jitter=0.0, repair=False)
"""One re-ask, sent at once (the client is waiting for its answer), and no repair (see the module
docstring)."""

_PASSES: Final[Accepted[Any]] = Accepted(None, False)


class _Completion(Protocol):
    """A whole upstream answer: what the gateway's router returns, as far as the guard reads it."""

    body: bytes


C = TypeVar("C", bound=_Completion)


def requested_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI ``response_format: {type: json_schema, json_schema: {schema}}``."""
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return None
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


class SchemaCheck(GuardEngine[Any]):
    """The guard's engine for one request schema: validates with jsonschema-rs, corrects in the
    gateway's words. Made by :meth:`SchemaGuard.for_schema`."""

    __slots__ = ("_validator",)

    def __init__(self, validator: Any) -> None:
        # No events: the gateway counts its guard's outcomes per group (gateway_json_guard_total).
        super().__init__("gateway", _CONFIG, events=None)
        self._validator = validator

    def judge(self, completion: bytes) -> Accepted[Any] | Rejection:
        """The first choice whose ``message.content`` fails, or a pass when every one passes.

        A body that is not a chat completion, or a choice without text content (a tool call), is not
        the guard's to judge and passes.
        """
        try:
            doc = json.loads(completion)
        except (ValueError, RecursionError):
            return _PASSES
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list):
            return _PASSES
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                continue
            verdict = self.check(content)
            if isinstance(verdict, Rejection):
                return verdict
        return _PASSES

    def _validate(self, obj: Any) -> Any:
        found = []
        for error in self._validator.iter_errors(obj):
            where = "/" + "/".join(str(p) for p in error.instance_path)
            found.append(f"at {where}: {error.message}")
            if len(found) >= _MAX_PROBLEMS:
                break
        if found:
            raise Mismatch(found)
        return obj

    def _words(self, rejection: Rejection) -> str:
        problems = rejection.problems
        if rejection.detail is not None:
            problems = (f"the answer is not JSON: {rejection.detail}",)
        return (
            "Your answer does not match the required JSON schema:\n"
            + "\n".join(f"- {p}" for p in problems)
            + "\nReply with the corrected JSON only, nothing else."
        )


class _NoAnswer(Exception):
    """The re-ask got no whole answer (no upstream answered, or one answered with an error)."""


class SchemaGuard:
    """The gateway's JSON guard: one :class:`SchemaCheck` per request schema, kept compiled."""

    __slots__ = ("_checks",)

    def __init__(self) -> None:
        self._checks: OrderedDict[str, SchemaCheck] = OrderedDict()

    def for_schema(self, schema: dict[str, Any]) -> SchemaCheck | None:
        """The check of ``schema``, or None when the schema does not compile."""
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        found = self._checks.get(key)
        if found is not None:
            self._checks.move_to_end(key)
            return found
        try:
            compiled = jsonschema_rs.validator_for(schema)
        except (ValueError, jsonschema_rs.ReferencingError):
            return None
        check = self._checks[key] = SchemaCheck(compiled)
        if len(self._checks) > _COMPILED:
            self._checks.popitem(last=False)
        return check

    async def run(
        self,
        schema: dict[str, Any],
        body: Mapping[str, Any],
        first: C,
        ask: Callable[[dict[str, Any]], Awaitable[C | None]],
    ) -> tuple[C, GuardOutcome]:
        """Judge ``first``, the answer to ``body``; re-ask once through ``ask`` if it fails.

        ``ask`` sends a request body and returns the whole answer, or None when none came back; the
        guard then returns the last answer it has, flagged ``invalid``. Returns the answer to send
        and the outcome for the ``x-brownout-json-guard`` header.
        """
        check = self.for_schema(schema)
        if check is None:
            return first, "skipped"
        last = first

        async def reask(messages: list[Message], attempt: int) -> C:
            nonlocal last
            answer = await ask({**body, "messages": messages})
            if answer is None:
                raise _NoAnswer
            last = answer
            return answer

        try:
            outcome = await check.exchange(
                reask, list(body.get("messages") or []), lambda a: check.judge(a.body), first=first
            )
        except _NoAnswer:
            return last, "invalid"
        if outcome.stopped is not None:
            return outcome.answer, "invalid"
        return outcome.answer, "valid" if outcome.attempts == 1 else "fixed"
