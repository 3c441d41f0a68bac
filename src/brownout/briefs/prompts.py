"""Chat messages for the three model roles: generator, validator and hinter.

The embedded model has 135M parameters: prompts are short and explicit. The JSON schema sent as
``response_format`` does the enforcing (keys, enums, integer ranges); the prompt only has to make good
values likely. User text is bounded and fenced so a long or
hostile request cannot crowd the instructions out of the context.
"""

from __future__ import annotations

import json
from typing import Final

from brownout.briefs.schema import CATEGORIES, LONGEVITIES, NOTES, STYLES, CreativeBrief
from brownout.llm.types import Message

__all__ = [
    "MAX_TEXT_CHARS",
    "REDUCED_TEXT_CHARS",
    "bound_text",
    "generator_messages",
    "hinter_messages",
    "validator_messages",
]

MAX_TEXT_CHARS: Final = 1000
"""The most characters of a user's request a prompt carries."""
REDUCED_TEXT_CHARS: Final = 300
"""The same bound for the reduced-context retry (a shorter prompt the generator may still manage)."""

_MODE_STYLE: Final[dict[str, str]] = {
    "fast": "Keep it simple.",
    "balanced": "Be precise.",
    "creative": "Be imaginative.",
}


def _one_of(values: tuple[str, ...]) -> str:
    return "|".join(values)


def bound_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` without control characters, whitespace collapsed, cut to ``limit`` characters (marked "…")."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text[: limit * 4]).split())
    if len(cleaned) <= limit:
        return cleaned
    return cleaned[: limit - 1].rstrip() + "…"


# Measured on the embedded 135M model with the grammar on: it copies prompt text into string fields
# ("description": "one or two sentences, under 300 characters"; issues: "valid: true or false"), and
# it copies lists of allowed values into the description. So the constrained prompts name no values
# and no placeholder prose -- the grammar supplies the vocabulary -- and anchor the 0-100 scales
# (without anchors it counts 0, 1, 2, 3). An endpoint without a grammar needs the vocabulary spelled
# out: ``constrained=False`` appends it.
_GENERATOR_SYSTEM: Final = (
    "You are a perfumer. Write a fragrance brief for the customer's request as JSON.\n"
    "intensity and complexity: 20 = light, 50 = moderate, 80 = strong.\n"
    "notes: the 1 to 4 note families the request asks for, weight 20 to 100.\n"
    "description: describe the scent in your own words."
)
_GENERATOR_SYSTEM_REDUCED: Final = (
    "Write a fragrance brief for the request as JSON. Numbers: 20 = light, 80 = strong."
)
_GENERATOR_KEYS: Final = (
    "Keys: style ("
    + ", ".join(STYLES)
    + "), intensity (0-100), complexity (0-100), notes (1-4 of {note, weight 0-100}; note one of "
    + ", ".join(NOTES)
    + "), product_category ("
    + ", ".join(CATEGORIES)
    + "), longevity ("
    + ", ".join(LONGEVITIES)
    + "), description (under 300 characters). Reply with the JSON object only."
)


def generator_messages(
    text: str, mode: str, *, reduced: bool = False, constrained: bool = True
) -> list[Message]:
    """Messages asking the generator for a :class:`~brownout.briefs.schema.ModelBrief` JSON object.

    ``reduced=True`` is the generator's retry with reduced context: a shorter instruction and at most
    :data:`REDUCED_TEXT_CHARS` of the request. ``constrained=False`` is for an endpoint that does not
    enforce the JSON schema: the keys and their allowed values are then spelled out.
    """
    keys = "" if constrained else "\n" + _GENERATOR_KEYS
    if reduced:
        return [
            {"role": "system", "content": _GENERATOR_SYSTEM_REDUCED + keys},
            {"role": "user", "content": f"Request: {bound_text(text, REDUCED_TEXT_CHARS)}"},
        ]
    system = f"{_GENERATOR_SYSTEM}\n{_MODE_STYLE.get(mode, '')}".rstrip() + keys
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f'Customer request: """{bound_text(text)}"""'},
    ]


def _brief_json(brief: CreativeBrief) -> str:
    # The hints are the hinter's output, not part of what is validated or hinted about.
    return json.dumps(brief.model_dump(mode="json", exclude={"creative_hints"}), ensure_ascii=False)


_VALIDATOR_SYSTEM: Final = (
    "You are a fragrance safety expert. Check the brief as JSON. valid is false only if the brief "
    "contradicts itself. Put real problems in issues and IFRA safety limits in ifra_concerns; "
    "leave a list empty when there is nothing to say."
)
_VALIDATOR_KEYS: Final = (
    "Keys: valid (true or false), issues (0-5 strings), ifra_concerns (0-5 strings). "
    "Reply with the JSON object only."
)


def validator_messages(brief: CreativeBrief, *, constrained: bool = True) -> list[Message]:
    """Messages asking the validator for a :class:`~brownout.briefs.schema.ValidatorVerdict` JSON object."""
    keys = "" if constrained else "\n" + _VALIDATOR_KEYS
    return [
        {"role": "system", "content": _VALIDATOR_SYSTEM + keys},
        {"role": "user", "content": f"Brief: {_brief_json(brief)}"},
    ]


_HINTER_SYSTEM: Final = (
    "You are a perfumer. Give 1 to 3 short poetic images of this fragrance's mood as JSON, "
    "a few words each, like lines of a poem."
)
_HINTER_KEYS: Final = 'Reply with the JSON object {"hints": [1-3 strings of 5-160 characters]} only.'


def hinter_messages(brief: CreativeBrief, *, constrained: bool = True) -> list[Message]:
    """Messages asking the hinter for a :class:`~brownout.briefs.schema.HintList` JSON object."""
    keys = "" if constrained else "\n" + _HINTER_KEYS
    # Style and notes only: given the description, the small model echoes it back as every hint.
    ranked = sorted(brief.notes_preference.items(), key=lambda item: -item[1])
    notes = ", ".join(note for note, _ in ranked)
    return [
        {"role": "system", "content": _HINTER_SYSTEM + keys},
        {"role": "user", "content": f"Style: {brief.style}. Notes: {notes}."},
    ]
