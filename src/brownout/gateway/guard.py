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

Unlike seed 004's guard, the re-ask is a new request that tells the model what was wrong; the same bad
output is never examined twice.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final, Literal

import jsonschema_rs

__all__ = ["GuardOutcome", "SchemaGuard", "reask_body", "requested_schema"]

GuardOutcome = Literal["valid", "fixed", "invalid", "skipped"]
"""The values of the ``x-brownout-json-guard`` header."""

_MAX_PROBLEMS: Final = 5
_MAX_ECHO: Final = 4000  # characters of the bad answer sent back: a re-ask must not grow with garbage
_COMPILED: Final = 256  # compiled schemas kept (clients tend to send the same few schemas)


def requested_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI ``response_format: {type: json_schema, json_schema: {schema}}``."""
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return None
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


class SchemaGuard:
    """Validates completion bodies against request schemas, keeping compiled validators by schema."""

    __slots__ = ("_validators",)

    def __init__(self) -> None:
        self._validators: OrderedDict[str, Any] = OrderedDict()

    def validator(self, schema: dict[str, Any]) -> Any | None:
        """The compiled validator of ``schema``, or None when the schema does not compile."""
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        found = self._validators.get(key)
        if found is not None:
            self._validators.move_to_end(key)
            return found
        try:
            compiled = jsonschema_rs.validator_for(schema)
        except (ValueError, jsonschema_rs.ReferencingError):
            return None
        self._validators[key] = compiled
        if len(self._validators) > _COMPILED:
            self._validators.popitem(last=False)
        return compiled

    @staticmethod
    def problems(validator: Any, completion: bytes) -> tuple[str, list[str]] | None:
        """None when every choice's content is schema-valid JSON; else (the bad content, its problems).

        A body that is not a chat completion, or a choice without text content (a tool call), is not
        the guard's to judge and passes.
        """
        try:
            doc = json.loads(completion)
        except ValueError:
            return None
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list):
            return None
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                continue
            try:
                value = json.loads(content)
            except ValueError as e:
                return content, [f"the answer is not JSON: {e}"]
            found = []
            for error in validator.iter_errors(value):
                where = "/" + "/".join(str(p) for p in error.instance_path)
                found.append(f"at {where}: {error.message}")
                if len(found) >= _MAX_PROBLEMS:
                    break
            if found:
                return content, found
        return None


def reask_body(body: Mapping[str, Any], bad: str, problems: list[str]) -> dict[str, Any]:
    """The request that asks again: the same body, plus the bad answer and what was wrong with it."""
    echo = bad if len(bad) <= _MAX_ECHO else bad[:_MAX_ECHO] + "..."
    messages = list(body.get("messages") or [])
    messages.append({"role": "assistant", "content": echo})
    messages.append(
        {
            "role": "user",
            "content": "Your answer does not match the required JSON schema:\n"
            + "\n".join(f"- {p}" for p in problems)
            + "\nReply with the corrected JSON only, nothing else.",
        }
    )
    return {**body, "messages": messages}
