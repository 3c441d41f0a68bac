"""The shapes of the creative-brief domain, and the smaller shapes the models are asked to produce.

Two families of models live here, on purpose:

* the **domain** shapes users get: :class:`CreativeBrief` (floats in 0..1, a note -> weight mapping) and
  :class:`ValidationReport`;
* the **model** shapes the three model roles are asked for: :class:`ModelBrief` (generator),
  :class:`ValidatorVerdict` (validator) and :class:`HintList` (hinter). They use only what a llama.cpp
  grammar built from a JSON schema can enforce -- bounded integers, enums, bounded strings and arrays --
  because the tiny local model ignores float ranges (it answers ``"intensity": 21`` for a 0..1 field) but
  does respect ``{"type": "integer", "minimum": 0, "maximum": 100}``. Code converts them to the domain
  shapes (:meth:`ModelBrief.to_domain`, :meth:`ValidatorVerdict.to_report`).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "CATEGORIES",
    "LONGEVITIES",
    "MODES",
    "NOTES",
    "STYLES",
    "CreativeBrief",
    "HintList",
    "Longevity",
    "Mode",
    "ModelBrief",
    "ModelNote",
    "Note",
    "ProductCategory",
    "Style",
    "ValidationReport",
    "ValidatorVerdict",
    "grammar_schema",
]

Style = Literal["fresh", "floral", "woody", "oriental"]
"""The four fragrance styles a brief can have."""

ProductCategory = Literal["EDP", "EDT", "Cologne", "Body Spray"]
"""Product categories, strongest (eau de parfum) to lightest (body spray)."""

Longevity = Literal["short", "medium", "long"]
"""How long the scent should last on skin."""

Note = Literal[
    "citrus",
    "floral",
    "woody",
    "spicy",
    "sweet",
    "musk",
    "amber",
    "green",
    "aquatic",
    "fruity",
    "leather",
    "powdery",
]
"""The note families a brief may weight."""

Mode = Literal["fast", "balanced", "creative"]
"""The pipeline modes a user may request: generator only, + validator, + hinter."""

STYLES: tuple[Style, ...] = get_args(Style)
CATEGORIES: tuple[ProductCategory, ...] = get_args(ProductCategory)
LONGEVITIES: tuple[Longevity, ...] = get_args(Longevity)
NOTES: tuple[Note, ...] = get_args(Note)
MODES: tuple[Mode, ...] = get_args(Mode)

# NaN passes neither bound check in intent but would slip through a float field that allows it.
Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Percent = Annotated[int, Field(ge=0, le=100)]
Hint = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Issue = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


class CreativeBrief(BaseModel):
    """The creative brief a user gets back: what the fragrance should be like.

    Frozen because briefs are shared between requests (the similar-request cache and the popular
    briefs hand the same object to many callers); derive a changed copy with ``model_copy(update=...)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Style
    intensity: Unit = Field(description="0 = barely there, 1 = as strong as it gets")
    complexity: Unit = Field(description="0 = a single accord, 1 = many layered facets")
    notes_preference: dict[Note, Unit] = Field(min_length=1, max_length=6)
    product_category: ProductCategory
    longevity: Longevity
    description: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=400)]
    creative_hints: list[Hint] = Field(default_factory=list, max_length=5)


class ModelNote(BaseModel):
    """One weighted note family in a :class:`ModelBrief` (a list item, since grammars handle lists)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    note: Note
    weight: Percent


class ModelBrief(BaseModel):
    """What the generator model is asked for: a brief made only of grammar-enforceable fields.

    Integers 0..100 stand for the domain's 0..1 floats, and the notes are a short list of
    ``{note, weight}`` objects rather than a mapping (a grammar cannot bound a mapping's keys to an enum).
    Field order is the order the model writes them in: the free-text description comes last so the
    constrained fields are settled before the part most likely to run long.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Style
    intensity: Percent
    complexity: Percent
    notes: list[ModelNote] = Field(min_length=1, max_length=4)
    product_category: ProductCategory
    longevity: Longevity
    description: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]

    def to_domain(self) -> CreativeBrief:
        """Convert to the domain brief: percentages become fractions; a repeated note keeps its top weight."""
        notes: dict[Note, float] = {}
        for item in self.notes:
            weight = item.weight / 100
            if weight > notes.get(item.note, -1.0):
                notes[item.note] = weight
        return CreativeBrief(
            style=self.style,
            intensity=self.intensity / 100,
            complexity=self.complexity / 100,
            notes_preference=notes,
            product_category=self.product_category,
            longevity=self.longevity,
            description=self.description,
        )


class ValidationReport(BaseModel):
    """The outcome of validating a brief, by the validator model or by the rule-based fallback."""

    model_config = ConfigDict(extra="forbid")

    valid: bool
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    ifra_compliance: bool | None = Field(
        default=None, description="None when unknown: the rule-based fallback cannot judge IFRA limits"
    )
    source: Literal["model", "rules"]

    @property
    def has_critical_errors(self) -> bool:
        """True when the brief must not be served as is (any error is critical; warnings are not)."""
        return bool(self.errors)


class ValidatorVerdict(BaseModel):
    """What the validator model is asked for: small, so a grammar can hold it and a tiny model fill it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    valid: bool
    issues: list[Issue] = Field(default_factory=list, max_length=5)
    ifra_concerns: list[Issue] = Field(default_factory=list, max_length=5)

    def to_report(self) -> ValidationReport:
        """Convert to a :class:`ValidationReport`: issues are errors when invalid and warnings otherwise."""
        issues = [issue for issue in self.issues if issue]
        concerns = [concern for concern in self.ifra_concerns if concern]
        if self.valid:
            errors: list[str] = []
            warnings = issues
        else:
            # An invalid verdict must carry at least one error, or callers checking errors would serve it.
            errors = issues or ["validator rejected the brief without giving a reason"]
            warnings = []
        warnings += [f"IFRA: {concern}" for concern in concerns]
        return ValidationReport(
            valid=self.valid,
            errors=errors,
            warnings=warnings,
            ifra_compliance=not concerns,
            source="model",
        )


class HintList(BaseModel):
    """What the hinter model is asked for: one to three short evocative hints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hints: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=5, max_length=160)]] = (
        Field(min_length=1, max_length=3)
    )


_ANNOTATIONS = frozenset({"title", "description"})


def grammar_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema made self-contained for grammar builders and prompts.

    ``$ref``s into ``$defs`` are inlined (not every constrained-decoding backend resolves them) and
    ``title`` and ``description`` annotations dropped (they cost prompt tokens and constrain nothing).
    Bounds, enums, required keys and ``additionalProperties`` are kept.
    """
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            # "properties" maps field names to schemas; a field may be called "description": keep those.
            return {
                key: (
                    {name: resolve(sub) for name, sub in value.items()}
                    if key == "properties"
                    else resolve(value)
                )
                for key, value in node.items()
                if key not in _ANNOTATIONS or not isinstance(value, str)
            }
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
