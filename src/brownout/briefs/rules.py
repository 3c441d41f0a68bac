"""The deterministic fallbacks of the creative-brief pipeline, one for each model that can be down.

When a model role is down these answer instead, without I/O and without failing:

* :func:`rule_based_brief` stands in for the generator: keywords of the request mapped to a valid brief;
* :func:`rule_based_validation` stands in for the validator: range and vocabulary checks, IFRA unknown;
* :func:`template_hints` stands in for the hinter: pre-written hints per style;
* :func:`popular_brief` is the emergency answer when nothing else is left;
* :func:`mode_impact` tells a user what a downshift cost them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from brownout.briefs.schema import (
    CATEGORIES,
    LONGEVITIES,
    NOTES,
    STYLES,
    CreativeBrief,
    Longevity,
    Note,
    ProductCategory,
    Style,
    ValidationReport,
)

__all__ = [
    "IFRA_SKIPPED_WARNING",
    "MODE_IMPACT",
    "STOP_WORDS",
    "TextSignals",
    "analyze_text",
    "extract_keywords",
    "is_signal_word",
    "mode_impact",
    "normalize_text",
    "popular_brief",
    "rule_based_brief",
    "rule_based_validation",
    "template_hints",
    "tokenize",
]

IFRA_SKIPPED_WARNING: Final = "Rule-based validation only (IFRA check skipped)"
"""The warning every rule-based validation carries: the safety (IFRA) check needs the validator model."""

# Requests are bounded here too: a 100 kB paste must not make the fallback the slow path.
_MAX_ANALYSED_CHARS: Final = 4000


def _words(text: str) -> frozenset[str]:
    """A word set written as one string: long vocabularies stay readable."""
    return frozenset(text.split())


STOP_WORDS: Final = _words(
    """
    a about above after again all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i i'd i'm if in into is it its itself just like
    me more most my myself no nor not now of off on once only or other our ours ourselves out over own
    please same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very want was we were what when where which while who whom
    why will with would you your yours yourself yourselves d s t ll m re ve something someone get make
    made need looking look give
    """
)
"""English words that carry no meaning for a brief (they are dropped from the keywords)."""

# Word -> note family. Plurals are handled by the lookup (roses -> rose), not listed here.
_NOTE_WORDS: Final[dict[str, Note]] = {
    word: cast(Note, note)
    for note, words in {
        "citrus": "citrus citrusy lemon lime bergamot orange grapefruit mandarin yuzu tangerine neroli zest",
        "floral": "floral flower rose jasmine lily peony tuberose gardenia magnolia lavender blossom orchid "
        "freesia petal bouquet",
        "woody": "woody wood cedar cedarwood sandalwood oud vetiver patchouli pine oak birch forest",
        "spicy": "spicy spice pepper cinnamon clove cardamom ginger nutmeg saffron",
        "sweet": "sweet vanilla caramel honey tonka chocolate sugar praline candy gourmand",
        "musk": "musk musky skin cashmere",
        "amber": "amber resin benzoin labdanum incense myrrh frankincense",
        "green": "green grass leaf leaves tea basil mint herbal herb fig",
        "aquatic": "aquatic sea ocean marine water rain salt salty breeze",
        "fruity": "fruity fruit apple peach pear berry raspberry strawberry plum cherry mango pineapple "
        "blackcurrant coconut",
        "leather": "leather suede tobacco smoke smoky",
        "powdery": "powdery powder iris orris violet heliotrope makeup",
    }.items()
    for word in words.split()
}

_STYLE_WORDS: Final[dict[str, Style]] = {
    word: cast(Style, style)
    for style, words in {
        "fresh": "fresh summer clean crisp morning sporty sport energetic airy daytime office",
        "floral": "floral romantic feminine spring garden wedding elegant delicate pretty",
        "woody": "woody earthy autumn cozy masculine fireside rustic",
        "oriental": "oriental evening warm exotic night sensual mysterious winter seductive opulent",
    }.items()
    for word in words.split()
}

# Each note family also votes for the style it belongs to, with less weight than an explicit style word.
_NOTE_STYLE: Final[dict[Note, Style]] = {
    "citrus": "fresh",
    "green": "fresh",
    "aquatic": "fresh",
    "floral": "floral",
    "fruity": "floral",
    "powdery": "floral",
    "woody": "woody",
    "leather": "woody",
    "musk": "woody",
    "amber": "oriental",
    "spicy": "oriental",
    "sweet": "oriental",
}

_LIGHTER: Final = frozenset(
    {"light", "subtle", "soft", "delicate", "gentle", "faint", "sheer", "airy", "discreet", "mild"}
)
_STRONGER: Final = frozenset(
    {"intense", "bold", "strong", "powerful", "heavy", "rich", "deep", "loud", "statement", "potent"}
)
_LONGER: Final = _words("lasting longlasting longevity allday overnight")
_SHORTER: Final = _words("quick refresh refreshing fleeting")

# Multi-word phrases, matched on the whole sequence of tokens.
_CATEGORY_PHRASES: Final[tuple[tuple[str, ProductCategory], ...]] = (
    ("body spray", "Body Spray"),
    ("body mist", "Body Spray"),
    ("eau de parfum", "EDP"),
    ("eau de toilette", "EDT"),
    ("eau de cologne", "Cologne"),
)
_CATEGORY_WORDS: Final[dict[str, ProductCategory]] = {
    "edp": "EDP",
    "parfum": "EDP",
    "edt": "EDT",
    "toilette": "EDT",
    "cologne": "Cologne",
}
_LONG_PHRASES: Final = ("long lasting", "all day", "all night")

_DEFAULT_NOTES: Final[dict[Style, dict[Note, float]]] = {
    "fresh": {"citrus": 0.7, "green": 0.5, "aquatic": 0.4},
    "floral": {"floral": 0.8, "fruity": 0.4, "musk": 0.3},
    "woody": {"woody": 0.8, "spicy": 0.4, "amber": 0.3},
    "oriental": {"amber": 0.8, "spicy": 0.6, "sweet": 0.5},
}
_MODE_COMPLEXITY: Final[dict[str, float]] = {"fast": 0.3, "balanced": 0.5, "creative": 0.7}
_CATEGORY_LONGEVITY: Final[dict[ProductCategory, Longevity]] = {
    "EDP": "long",
    "EDT": "medium",
    "Cologne": "short",
    "Body Spray": "short",
}
_CATEGORY_INTENSITY: Final[dict[ProductCategory, float]] = {
    "EDP": 0.65,
    "EDT": 0.5,
    "Cologne": 0.4,
    "Body Spray": 0.35,
}

_LASTING: Final[dict[Longevity, str]] = {
    "short": "made to last a few hours",
    "medium": "made to last most of the day",
    "long": "made to last all day and into the night",
}

_WORD_RE: Final = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def normalize_text(text: str) -> str:
    """Lower-case ``text`` and strip accents (``Crème Brûlée`` -> ``creme brulee``); other scripts stay."""
    decomposed = unicodedata.normalize("NFKD", text[:_MAX_ANALYSED_CHARS])
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    # NFC recomposes what NFKD split without being an accent (Hangul syllables, for one).
    return unicodedata.normalize("NFC", stripped).casefold()


def tokenize(text: str) -> list[str]:
    """The word tokens of ``text`` after :func:`normalize_text`; punctuation separates words, then goes."""
    return _WORD_RE.findall(normalize_text(text))


def extract_keywords(text: str) -> list[str]:
    """The meaningful words of ``text``: normalised word tokens without stop words, each once, in order."""
    seen: dict[str, None] = {}
    for token in tokenize(text):
        if token not in STOP_WORDS and token not in seen:
            seen[token] = None
    return list(seen)


def _lookup(token: str, table: Mapping[str, Any]) -> Any:
    """Find a word in a table, trying its singular too (roses -> rose, peaches -> peach, berries -> berry)."""
    if token in table:
        return table[token]
    if len(token) > 3 and token.endswith("s"):
        if token.endswith("ies") and token[:-3] + "y" in table:
            return table[token[:-3] + "y"]
        if token.endswith("es") and token[:-2] in table:
            return table[token[:-2]]
        return table.get(token[:-1])
    return None


def is_signal_word(token: str) -> bool:
    """True when the rules read a brief field from ``token`` (a note, style, strength or category word)."""
    return (
        _lookup(token, _NOTE_WORDS) is not None
        or _lookup(token, _STYLE_WORDS) is not None
        or token in _LIGHTER
        or token in _STRONGER
        or token in _CATEGORY_WORDS
        or token in _LONGER
        or token in _SHORTER
    )


@dataclass(frozen=True, slots=True)
class TextSignals:
    """What the rules read in a request: keywords and the hints they give for each brief field."""

    keywords: tuple[str, ...]
    notes: dict[Note, int] = field(default_factory=dict)
    """Note family -> number of mentions, in order of first mention."""
    style_votes: dict[Style, float] = field(default_factory=dict)
    intensity_shift: int = 0
    """Positive for "intense/bold" words, negative for "light/subtle" ones."""
    category: ProductCategory | None = None
    longevity: Longevity | None = None


def analyze_text(text: str) -> TextSignals:
    """Read the keywords of ``text`` and what they say about notes, style, intensity, category, longevity."""
    tokens = tokenize(text)
    keywords = tuple(dict.fromkeys(token for token in tokens if token not in STOP_WORDS))
    notes: dict[Note, int] = {}
    votes: dict[Style, float] = {}
    shift = 0
    category: ProductCategory | None = None
    longevity: Longevity | None = None

    # Phrases match on whole words, with punctuation gone: "long-lasting" is "long lasting".
    joined = f" {' '.join(tokens)} "
    for phrase, phrase_category in _CATEGORY_PHRASES:
        if f" {phrase} " in joined:
            category = phrase_category
            break
    if any(f" {phrase} " in joined for phrase in _LONG_PHRASES):
        longevity = "long"

    for token in tokens:
        if token in STOP_WORDS:
            continue
        note: Note | None = _lookup(token, _NOTE_WORDS)
        if note is not None:
            notes[note] = notes.get(note, 0) + 1
            style_of_note = _NOTE_STYLE[note]
            votes[style_of_note] = votes.get(style_of_note, 0.0) + 1.0
        style: Style | None = _lookup(token, _STYLE_WORDS)
        if style is not None:
            # An explicit mood word ("evening", "summer") says more about the style than one note does.
            votes[style] = votes.get(style, 0.0) + 1.5
        if token in _LIGHTER:
            shift -= 1
        elif token in _STRONGER:
            shift += 1
        if category is None and token in _CATEGORY_WORDS:
            category = _CATEGORY_WORDS[token]
        if longevity is None:
            if token in _LONGER:
                longevity = "long"
            elif token in _SHORTER:
                longevity = "short"
    return TextSignals(
        keywords=keywords,
        notes=notes,
        style_votes=votes,
        intensity_shift=shift,
        category=category,
        longevity=longevity,
    )


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(high, max(low, value)), 2)


def rule_based_brief(text: str, mode: str = "balanced") -> CreativeBrief:
    """A schema-valid brief built from the keywords of ``text`` alone (the generator's last fallback).

    Deterministic, and valid for any input -- empty, nonsense or not English: with nothing recognised it
    is a plain fresh EDT. ``mode`` sets the base complexity (``fast`` simple, ``creative`` layered, other
    values as ``balanced``), and ``creative`` adds the style's template hints.
    """
    signals = analyze_text(text)

    # Ties go to the earlier style in STYLES, so "fresh" wins when nothing was said.
    style: Style = max(STYLES, key=lambda s: (signals.style_votes.get(s, 0.0), -STYLES.index(s)))

    notes: dict[Note, float]
    if signals.notes:
        # Most mentioned first; dict order (first mention) breaks ties since sorted() is stable.
        ranked = sorted(signals.notes.items(), key=lambda item: -item[1])[:6]
        notes = {note: _clamp(0.5 + 0.15 * count, 0.0, 1.0) for note, count in ranked}
    else:
        notes = dict(_DEFAULT_NOTES[style])

    intensity_hint = 0.5 + 0.15 * signals.intensity_shift
    category: ProductCategory
    if signals.category is not None:
        category = signals.category
        intensity = _clamp((intensity_hint + _CATEGORY_INTENSITY[category]) / 2, 0.1, 0.95)
    else:
        intensity = _clamp(intensity_hint, 0.1, 0.95)
        category = "EDP" if intensity >= 0.65 else "EDT"
    longevity = signals.longevity or _CATEGORY_LONGEVITY[category]
    complexity = _clamp(_MODE_COMPLEXITY.get(mode, 0.5) + 0.05 * (len(notes) - 3), 0.1, 0.95)

    strength = "light" if intensity < 0.4 else "bold" if intensity >= 0.7 else "balanced"
    note_names = list(notes)
    listed = note_names[0] if len(note_names) == 1 else f"{', '.join(note_names[:-1])} and {note_names[-1]}"
    description = f"A {strength} {style} {category} built around {listed} notes, {_LASTING[longevity]}."
    return CreativeBrief(
        style=style,
        intensity=intensity,
        complexity=complexity,
        notes_preference=notes,
        product_category=category,
        longevity=longevity,
        description=description,
        creative_hints=template_hints(style) if mode == "creative" else [],
    )


def _unit_value(value: object) -> bool:
    """True for a real number in 0..1 (bools, NaN and strings are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


_MISSING: Final = object()


def rule_based_validation(brief: CreativeBrief | Mapping[str, object]) -> ValidationReport:
    """Validate a brief by rules alone (the fallback while the validator model is down).

    Works on unvalidated data -- a brief made with ``CreativeBrief.model_construct`` or a raw mapping --
    and reports what is wrong instead of raising. Errors are critical (the report is invalid); hint
    problems and odd-but-legal combinations are warnings. IFRA compliance is unknown without the
    model, so ``ifra_compliance`` is None and the report always carries :data:`IFRA_SKIPPED_WARNING`.
    """
    if isinstance(brief, Mapping):
        data = brief

        def get(name: str) -> object:
            return data.get(name, _MISSING)
    else:
        # model_construct leaves required fields it was not given unset, so read them defensively.
        def get(name: str) -> object:
            return getattr(brief, name, _MISSING)

    errors: list[str] = []
    warnings: list[str] = []

    style = get("style")
    if style not in STYLES:
        errors.append(f"Invalid style: {_show(style)}")
    intensity = get("intensity")
    if not _unit_value(intensity):
        errors.append(f"intensity out of range: {_show(intensity)}")
    complexity = get("complexity")
    if not _unit_value(complexity):
        errors.append(f"complexity out of range: {_show(complexity)}")

    notes = get("notes_preference")
    if not isinstance(notes, Mapping) or not notes:
        errors.append(
            "notes_preference is empty" if isinstance(notes, Mapping) else "notes_preference missing"
        )
    else:
        for note, value in notes.items():
            if note not in NOTES:
                errors.append(f"Unknown note family: {_show(note)}")
            if not _unit_value(value):
                errors.append(f"{note} preference out of range: {_show(value)}")
        if len(notes) > 6:
            errors.append(f"too many notes: {len(notes)} (at most 6)")
        elif all(_unit_value(v) and cast(float, v) == 0.0 for v in notes.values()):
            warnings.append("every note preference is 0")

    category = get("product_category")
    if category not in CATEGORIES:
        errors.append(f"Invalid product_category: {_show(category)}")
    longevity = get("longevity")
    if longevity not in LONGEVITIES:
        errors.append(f"Invalid longevity: {_show(longevity)}")

    description = get("description")
    if not isinstance(description, str) or not description.strip():
        errors.append("description is empty")
    elif len(description) > 400:
        errors.append(f"description too long: {len(description)} characters (at most 400)")

    hints = get("creative_hints")
    if hints is not _MISSING and hints is not None:
        if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
            warnings.append("creative_hints is not a list of strings")
        else:
            if len(hints) > 5:
                warnings.append(f"too many creative hints: {len(hints)} (at most 5)")
            if any(len(h) > 200 for h in hints):
                warnings.append("a creative hint is longer than 200 characters")

    # Legal but suspicious combinations: worth telling, not worth refusing.
    if category in ("Body Spray", "Cologne") and _unit_value(intensity) and cast(float, intensity) >= 0.85:
        warnings.append(f"intensity {intensity} is unusually strong for a {category}")
    if category == "EDP" and longevity == "short":
        warnings.append("short longevity is unusual for an EDP")

    warnings.append(IFRA_SKIPPED_WARNING)
    return ValidationReport(
        valid=not errors,
        errors=errors,
        warnings=warnings,
        ifra_compliance=None,
        source="rules",
    )


def _show(value: object) -> str:
    """A bounded repr for messages: the bad value may be a model's runaway output."""
    if value is _MISSING:
        return "<missing>"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TEMPLATE_HINTS: Final[dict[str, tuple[str, ...]]] = {
    "fresh": (
        "Crisp morning air with a hint of citrus",
        "Ocean breeze on a summer day",
        "Dewdrops on fresh green leaves",
    ),
    "floral": (
        "A garden in full bloom at dawn",
        "Petals dancing in the spring breeze",
        "The elegance of white flowers under moonlight",
    ),
    "woody": (
        "Ancient forest after rainfall",
        "Warm cedar and sandalwood embrace",
        "The comfort of a fireside evening",
    ),
    "oriental": (
        "Spices and silk along the ancient trade routes",
        "Golden amber warmed by desert sun",
        "Mystical incense in a temple at dusk",
    ),
}


def template_hints(style: str) -> list[str]:
    """Pre-written creative hints for ``style`` (fresh ones for an unknown style); a new list."""
    return list(_TEMPLATE_HINTS.get(style, _TEMPLATE_HINTS["fresh"]))


_POPULAR: Final[dict[str, CreativeBrief]] = {
    "fast": CreativeBrief(
        style="fresh",
        intensity=0.7,
        complexity=0.3,
        notes_preference={"citrus": 0.8, "aquatic": 0.5, "green": 0.4},
        product_category="EDT",
        longevity="medium",
        description="A bright, fresh EDT of sparkling citrus over a clean aquatic and green heart.",
    ),
    "balanced": CreativeBrief(
        style="floral",
        intensity=0.6,
        complexity=0.5,
        notes_preference={"floral": 0.9, "fruity": 0.4, "musk": 0.4, "powdery": 0.3},
        product_category="EDP",
        longevity="long",
        description="An elegant floral EDP: a rose and jasmine bouquet on soft musk, with a touch of fruit.",
    ),
    "creative": CreativeBrief(
        style="oriental",
        intensity=0.8,
        complexity=0.8,
        notes_preference={"amber": 0.9, "spicy": 0.7, "sweet": 0.5, "woody": 0.5, "leather": 0.3},
        product_category="EDP",
        longevity="long",
        description="A rich oriental EDP: warm amber and spice, a vanilla sweetness and a smoky woody trail.",
        creative_hints=list(_TEMPLATE_HINTS["oriental"]),
    ),
}


def popular_brief(mode: str) -> CreativeBrief:
    """The pre-computed popular brief for ``mode``, served when every model is down.

    An unknown mode gets the ``fast`` brief: the emergency path must always have an answer. The brief is
    a fresh deep copy, so a caller cannot alter the one the next caller gets.
    """
    return _POPULAR.get(mode, _POPULAR["fast"]).model_copy(deep=True)


# Which features each mode provides; a downshift loses the difference. "personalisation" (a brief made
# from this request's text) survives into fallback, whose rules read the text, but not into emergency.
_MODE_FEATURES: Final[dict[str, frozenset[str]]] = {
    "creative": frozenset({"creative_hints", "validation", "model_generation", "personalisation"}),
    "balanced": frozenset({"validation", "model_generation", "personalisation"}),
    "fast": frozenset({"model_generation", "personalisation"}),
    "fallback": frozenset({"personalisation"}),
}

MODE_IMPACT: Final[dict[str, dict[str, Any]]] = {
    "creative→balanced": {
        "latency": "improved (faster)",
        "quality": "slightly reduced",
        "features_lost": ["creative_hints"],
    },
    "creative→fast": {
        "latency": "significantly improved",
        "quality": "moderately reduced",
        "features_lost": ["creative_hints", "validation"],
    },
    "balanced→fast": {
        "latency": "improved",
        "quality": "slightly reduced",
        "features_lost": ["validation"],
    },
    "*→fallback": {
        "latency": "minimal (no model call)",
        "quality": "significantly reduced (a cached similar brief or a rule-based one)",
        "features_lost": ["creative_hints", "validation", "model_generation"],
    },
    "*→emergency": {
        "latency": "minimal (cache only)",
        "quality": "severely reduced (a cached or popular brief; new requests may be rejected)",
        "features_lost": ["creative_hints", "validation", "model_generation", "personalisation"],
    },
}
"""What each downshift costs (latency, quality, features lost), rules and emergency fallbacks included."""


def mode_impact(from_mode: str, to_mode: str) -> dict[str, Any]:
    """What downshifting from ``from_mode`` to ``to_mode`` costs: latency, quality and features lost.

    Exact pairs come from :data:`MODE_IMPACT`; ``fallback`` and ``emergency`` use the wildcard entries,
    listing only the features ``from_mode`` actually had. Anything else (same mode, an upshift, an
    unknown mode) has no impact: ``{}``. The result is a new dict the caller may change.
    """
    exact = MODE_IMPACT.get(f"{from_mode}→{to_mode}")
    if exact is not None:
        return {**exact, "features_lost": list(exact["features_lost"])}
    wildcard = MODE_IMPACT.get(f"*→{to_mode}")
    if wildcard is None or from_mode == to_mode:
        return {}
    had = _MODE_FEATURES.get(from_mode)
    lost = [f for f in wildcard["features_lost"] if had is None or f in had]
    return {**wildcard, "features_lost": lost}
