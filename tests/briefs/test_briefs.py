"""The creative-brief domain: schemas, the rule-based fallbacks of seed 000, and the prompts."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from brownout.briefs.prompts import (
    MAX_TEXT_CHARS,
    REDUCED_TEXT_CHARS,
    bound_text,
    generator_messages,
    hinter_messages,
    validator_messages,
)
from brownout.briefs.rules import (
    IFRA_SKIPPED_WARNING,
    MODE_IMPACT,
    analyze_text,
    extract_keywords,
    mode_impact,
    popular_brief,
    rule_based_brief,
    rule_based_validation,
    template_hints,
)
from brownout.briefs.schema import (
    CATEGORIES,
    LONGEVITIES,
    MODES,
    NOTES,
    STYLES,
    CreativeBrief,
    HintList,
    ModelBrief,
    ValidatorVerdict,
    grammar_schema,
)


def brief_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "style": "woody",
        "intensity": 0.6,
        "complexity": 0.4,
        "notes_preference": {"woody": 0.9, "spicy": 0.3},
        "product_category": "EDP",
        "longevity": "long",
        "description": "Cedar and pepper for autumn evenings.",
    }
    data.update(changes)
    return data


# --- schema -----------------------------------------------------------------------------------------


def test_vocabularies() -> None:
    assert STYLES == ("fresh", "floral", "woody", "oriental")
    assert CATEGORIES == ("EDP", "EDT", "Cologne", "Body Spray")
    assert LONGEVITIES == ("short", "medium", "long")
    assert MODES == ("fast", "balanced", "creative")
    assert len(NOTES) == 12
    assert {"citrus", "floral", "woody", "aquatic", "powdery"} <= set(NOTES)


def test_model_brief_schema_is_grammar_enforceable() -> None:
    schema = ModelBrief.model_json_schema()
    props = schema["properties"]
    for name in ("intensity", "complexity"):
        assert props[name] == {"type": "integer", "minimum": 0, "maximum": 100, "title": name.capitalize()}
    assert props["style"]["enum"] == list(STYLES)
    assert props["product_category"]["enum"] == list(CATEGORIES)
    assert props["longevity"]["enum"] == list(LONGEVITIES)
    assert props["description"]["maxLength"] == 300
    assert props["notes"]["minItems"] == 1
    assert props["notes"]["maxItems"] == 4
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(props)
    # The same in the self-contained form sent to grammar builders: no $ref left, no titles.
    inline = grammar_schema(ModelBrief)
    text = json.dumps(inline)
    assert "$ref" not in text
    assert "$defs" not in text
    assert '"title"' not in text
    item = inline["properties"]["notes"]["items"]
    assert item["properties"]["note"]["enum"] == list(NOTES)
    assert item["properties"]["weight"] == {"type": "integer", "minimum": 0, "maximum": 100}
    assert item["additionalProperties"] is False
    # Nothing a float: floats are what the small model does not keep in range.
    assert '"number"' not in text


def test_grammar_schema_keeps_a_property_named_description() -> None:
    assert "description" in grammar_schema(ModelBrief)["properties"]
    assert grammar_schema(ModelBrief)["properties"]["description"]["type"] == "string"


def test_validator_and_hint_schemas_are_small_and_bounded() -> None:
    verdict = grammar_schema(ValidatorVerdict)
    assert verdict["properties"]["valid"] == {"type": "boolean"}
    assert verdict["properties"]["issues"]["maxItems"] == 5
    assert verdict["properties"]["issues"]["items"]["maxLength"] == 200
    assert verdict["properties"]["ifra_concerns"]["maxItems"] == 5
    hints = grammar_schema(HintList)["properties"]["hints"]
    assert (hints["minItems"], hints["maxItems"]) == (1, 3)
    assert (hints["items"]["minLength"], hints["items"]["maxLength"]) == (5, 160)


def test_to_domain_converts_exactly() -> None:
    model = ModelBrief.model_validate(
        {
            "style": "oriental",
            "intensity": 85,
            "complexity": 0,
            "notes": [
                {"note": "amber", "weight": 40},
                {"note": "spicy", "weight": 100},
                {"note": "amber", "weight": 90},  # a repeat keeps its highest weight
                {"note": "sweet", "weight": 7},
            ],
            "product_category": "Body Spray",
            "longevity": "short",
            "description": "  Warm amber and spice.  ",
        }
    )
    brief = model.to_domain()
    assert brief == CreativeBrief(
        style="oriental",
        intensity=0.85,
        complexity=0.0,
        notes_preference={"amber": 0.9, "spicy": 1.0, "sweet": 0.07},
        product_category="Body Spray",
        longevity="short",
        description="Warm amber and spice.",
        creative_hints=[],
    )
    assert list(brief.notes_preference) == ["amber", "spicy", "sweet"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("intensity", 101), ("intensity", -1), ("complexity", 100.5), ("style", "gourmand")],
)
def test_model_brief_rejects_what_the_grammar_forbids(field: str, value: object) -> None:
    data: dict[str, Any] = {
        "style": "fresh",
        "intensity": 50,
        "complexity": 50,
        "notes": [{"note": "citrus", "weight": 50}],
        "product_category": "EDT",
        "longevity": "medium",
        "description": "Lemon.",
    }
    data[field] = value
    with pytest.raises(ValidationError) as info:
        ModelBrief.model_validate(data)
    assert info.value.errors()[0]["loc"] == (field,)


def test_model_brief_rejects_too_many_notes_and_long_description() -> None:
    base: dict[str, Any] = {
        "style": "fresh",
        "intensity": 50,
        "complexity": 50,
        "notes": [{"note": "citrus", "weight": 50}] * 5,
        "product_category": "EDT",
        "longevity": "medium",
        "description": "x" * 301,
    }
    with pytest.raises(ValidationError) as info:
        ModelBrief.model_validate(base)
    assert {e["loc"][0] for e in info.value.errors()} == {"notes", "description"}


def test_creative_brief_rejects_out_of_range_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        CreativeBrief.model_validate(brief_data(intensity=33))
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("intensity",)
    assert "intensity" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"complexity": -0.1}, ("complexity",)),
        ({"intensity": math.nan}, ("intensity",)),
        ({"notes_preference": {}}, ("notes_preference",)),
        ({"notes_preference": {"woody": 1.5}}, ("notes_preference", "woody")),
        ({"notes_preference": {"bacon": 0.5}}, ("notes_preference", "bacon", "[key]")),
        ({"product_category": "Candle"}, ("product_category",)),
        ({"description": "   "}, ("description",)),
        ({"description": "x" * 401}, ("description",)),
        ({"creative_hints": ["h"] * 6}, ("creative_hints",)),
        ({"creative_hints": ["x" * 201]}, ("creative_hints", 0)),
        ({"surprise": 1}, ("surprise",)),
    ],
)
def test_creative_brief_rejects(changes: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        CreativeBrief.model_validate(brief_data(**changes))
    assert info.value.errors()[0]["loc"] == loc


def test_creative_brief_is_frozen() -> None:
    brief = CreativeBrief.model_validate(brief_data())
    with pytest.raises(ValidationError):
        brief.intensity = 0.1  # type: ignore[misc]


def test_verdict_to_report() -> None:
    ok = ValidatorVerdict(valid=True, issues=["a bit sweet"], ifra_concerns=[]).to_report()
    assert (ok.valid, ok.errors, ok.warnings, ok.ifra_compliance, ok.source) == (
        True,
        [],
        ["a bit sweet"],
        True,
        "model",
    )
    bad = ValidatorVerdict(valid=False, issues=[], ifra_concerns=["oakmoss above limit"]).to_report()
    assert bad.valid is False
    assert bad.has_critical_errors
    assert bad.errors == ["validator rejected the brief without giving a reason"]
    assert bad.warnings == ["IFRA: oakmoss above limit"]
    assert bad.ifra_compliance is False


def test_hint_list_bounds() -> None:
    assert HintList(hints=["  Moonlit jasmine  "]).hints == ["Moonlit jasmine"]
    for hints in ([], ["one hint", "two hint", "three hint", "four hint"], ["tiny"], ["x" * 161]):
        with pytest.raises(ValidationError):
            HintList(hints=hints)


# --- rules: keywords --------------------------------------------------------------------------------


def test_extract_keywords_drops_stop_words_and_accents() -> None:
    assert extract_keywords("I want a Crème Brûlée scent, with VANILLA and vanilla!") == [
        "creme",
        "brulee",
        "scent",
        "vanilla",
    ]
    assert extract_keywords("") == []
    assert extract_keywords("the and of !!!") == []
    assert extract_keywords("향수 추천해 주세요") == ["향수", "추천해", "주세요"]


@pytest.mark.parametrize(
    ("text", "notes"),
    [
        ("lemon and bergamot with a touch of orange", {"citrus": 3}),
        ("roses, jasmine and lilies", {"floral": 3}),
        ("cedar, sandalwood and oud", {"woody": 3}),
        ("pepper, cinnamon and cloves", {"spicy": 3}),
        ("vanilla caramel honey", {"sweet": 3}),
        ("sea breeze over the ocean", {"aquatic": 3}),
        ("peaches and berries with leather", {"fruity": 2, "leather": 1}),
    ],
)
def test_note_words_map_to_families(text: str, notes: dict[str, int]) -> None:
    assert analyze_text(text).notes == notes


def test_signals_for_style_intensity_category_longevity() -> None:
    summer = analyze_text("A light, subtle summer cologne")
    assert max(summer.style_votes, key=summer.style_votes.__getitem__) == "fresh"
    assert summer.intensity_shift == -2
    assert summer.category == "Cologne"
    evening = analyze_text("an intense, bold and exotic long-lasting body spray for the evening")
    assert max(evening.style_votes, key=evening.style_votes.__getitem__) == "oriental"
    assert evening.intensity_shift == 2
    assert evening.category == "Body Spray"
    assert evening.longevity == "long"
    assert analyze_text("nobody sprays this").category is None
    text = "I want a Crème Brûlée scent, with VANILLA and vanilla!"
    assert list(analyze_text(text).keywords) == extract_keywords(text)


# --- rules: briefs ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=2000), mode=st.sampled_from([*MODES, "fallback", "???"]))
def test_rule_based_brief_is_always_valid(text: str, mode: str) -> None:
    brief = rule_based_brief(text, mode)
    # Round-trip through validation: model_construct would not catch a bad value, this does.
    assert CreativeBrief.model_validate(brief.model_dump()) == brief
    report = rule_based_validation(brief)
    assert report.valid, report.errors
    assert rule_based_brief(text, mode) == brief  # deterministic


def test_rule_based_brief_reads_the_request() -> None:
    brief = rule_based_brief("A light summer cologne with lemon, bergamot, orange and sea salt", "fast")
    assert brief.style == "fresh"
    assert brief.product_category == "Cologne"
    assert brief.longevity == "short"
    assert list(brief.notes_preference) == ["citrus", "aquatic"]
    assert brief.notes_preference["citrus"] > brief.notes_preference["aquatic"]
    assert brief.intensity < 0.5
    assert brief.creative_hints == []
    assert "citrus" in brief.description
    assert "aquatic" in brief.description

    warm = rule_based_brief("intense warm evening perfume: amber, vanilla, cinnamon and oud", "creative")
    assert warm.style == "oriental"
    assert warm.intensity > 0.5
    assert set(warm.notes_preference) == {"amber", "sweet", "spicy", "woody"}
    assert warm.creative_hints == template_hints("oriental")
    assert warm.complexity > rule_based_brief("amber vanilla cinnamon oud", "fast").complexity


def test_rule_based_brief_of_nothing_is_a_plain_fresh_brief() -> None:
    for text in ("", "   ", "asdf qwerty", "향수 추천해 주세요", "🌸🌸🌸"):
        brief = rule_based_brief(text, "balanced")
        assert brief.style == "fresh"
        assert brief.notes_preference == {"citrus": 0.7, "green": 0.5, "aquatic": 0.4}
        assert brief.product_category == "EDT"


def test_rule_based_brief_keeps_at_most_six_notes() -> None:
    text = " ".join(["lemon rose cedar pepper vanilla musk amber grass sea apple leather powder"] * 2)
    brief = rule_based_brief(text + " rose rose", "balanced")
    assert len(brief.notes_preference) == 6
    assert next(iter(brief.notes_preference)) == "floral"  # the most mentioned comes first


# --- rules: validation ------------------------------------------------------------------------------


def test_rule_validation_of_a_good_brief() -> None:
    report = rule_based_validation(CreativeBrief.model_validate(brief_data()))
    assert report.valid
    assert report.errors == []
    assert report.warnings == [IFRA_SKIPPED_WARNING]
    assert report.ifra_compliance is None
    assert report.source == "rules"
    assert not report.has_critical_errors


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"intensity": 33}, "intensity out of range: 33"),
        ({"intensity": math.nan}, "intensity out of range: nan"),
        ({"intensity": "high"}, "intensity out of range: 'high'"),
        ({"complexity": -0.5}, "complexity out of range: -0.5"),
        ({"notes_preference": {"woody": 1.2}}, "woody preference out of range: 1.2"),
        ({"notes_preference": {"bacon": 0.5}}, "Unknown note family: 'bacon'"),
        ({"notes_preference": {}}, "notes_preference is empty"),
        ({"notes_preference": None}, "notes_preference missing"),
        ({"notes_preference": dict.fromkeys(NOTES[:7], 0.5)}, "too many notes: 7 (at most 6)"),
        ({"product_category": "Candle"}, "Invalid product_category: 'Candle'"),
        ({"style": "gourmand"}, "Invalid style: 'gourmand'"),
        ({"longevity": "forever"}, "Invalid longevity: 'forever'"),
        ({"description": ""}, "description is empty"),
        ({"description": "x" * 401}, "description too long: 401 characters (at most 400)"),
    ],
)
def test_rule_validation_reports_each_error(changes: dict[str, Any], error: str) -> None:
    brief = CreativeBrief.model_construct(**brief_data(**changes))
    report = rule_based_validation(brief)
    assert report.errors == [error]
    assert report.valid is False
    assert report.has_critical_errors
    assert report.warnings[-1] == IFRA_SKIPPED_WARNING
    assert report.ifra_compliance is None


def test_rule_validation_of_a_brief_missing_fields_and_of_mappings() -> None:
    report = rule_based_validation(CreativeBrief.model_construct(style="fresh"))
    assert report.valid is False
    assert "intensity out of range: <missing>" in report.errors
    assert "description is empty" in report.errors
    assert len(report.errors) == 6  # all but style
    mapping = rule_based_validation(brief_data(intensity=2))
    assert mapping.errors == ["intensity out of range: 2"]
    assert rule_based_validation(brief_data()).valid


def test_rule_validation_warnings() -> None:
    report = rule_based_validation(
        CreativeBrief.model_construct(
            **brief_data(
                product_category="Body Spray",
                intensity=0.9,
                notes_preference={"woody": 0.0},
                creative_hints=["h"] * 6,
            )
        )
    )
    assert report.valid  # warnings never invalidate
    assert report.warnings == [
        "every note preference is 0",
        "too many creative hints: 6 (at most 5)",
        "intensity 0.9 is unusually strong for a Body Spray",
        IFRA_SKIPPED_WARNING,
    ]
    edp = rule_based_validation(CreativeBrief.model_construct(**brief_data(longevity="short")))
    assert edp.warnings == ["short longevity is unusual for an EDP", IFRA_SKIPPED_WARNING]


# --- rules: templates, popular briefs, mode impact -------------------------------------------------


def test_template_hints() -> None:
    assert template_hints("fresh") == [
        "Crisp morning air with a hint of citrus",
        "Ocean breeze on a summer day",
        "Dewdrops on fresh green leaves",
    ]
    assert template_hints("woody")[1] == "Warm cedar and sandalwood embrace"
    assert template_hints("oriental")[0] == "Spices and silk along the ancient trade routes"
    assert template_hints("floral")[2] == "The elegance of white flowers under moonlight"
    assert template_hints("unknown") == template_hints("fresh")
    hints = template_hints("fresh")
    hints.append("mutated")
    assert len(template_hints("fresh")) == 3  # a new list each time


@pytest.mark.parametrize(
    ("mode", "style", "intensity"),
    [("fast", "fresh", 0.7), ("balanced", "floral", 0.6), ("creative", "oriental", 0.8)],
)
def test_popular_briefs(mode: str, style: str, intensity: float) -> None:
    brief = popular_brief(mode)
    assert (brief.style, brief.intensity) == (style, intensity)
    assert rule_based_validation(brief).valid
    assert bool(brief.creative_hints) == (mode == "creative")


def test_popular_brief_copies_and_defaults() -> None:
    first = popular_brief("creative")
    first.notes_preference["amber"] = 0.0
    first.creative_hints.clear()
    again = popular_brief("creative")
    assert again.notes_preference["amber"] == 0.9
    assert again.creative_hints == template_hints("oriental")
    assert popular_brief("no-such-mode") == popular_brief("fast")


def test_mode_impact_seed_entries() -> None:
    assert mode_impact("creative", "balanced") == {
        "latency": "improved (faster)",
        "quality": "slightly reduced",
        "features_lost": ["creative_hints"],
    }
    assert mode_impact("creative", "fast")["features_lost"] == ["creative_hints", "validation"]
    assert mode_impact("creative", "fast")["quality"] == "moderately reduced"
    assert mode_impact("balanced", "fast") == {
        "latency": "improved",
        "quality": "slightly reduced",
        "features_lost": ["validation"],
    }
    assert {"creative→balanced", "creative→fast", "balanced→fast", "*→fallback", "*→emergency"} == set(
        MODE_IMPACT
    )


def test_mode_impact_fallback_and_emergency_list_what_the_mode_had() -> None:
    assert mode_impact("fast", "fallback")["features_lost"] == ["model_generation"]
    assert mode_impact("creative", "fallback")["features_lost"] == [
        "creative_hints",
        "validation",
        "model_generation",
    ]
    assert mode_impact("balanced", "emergency")["features_lost"] == [
        "validation",
        "model_generation",
        "personalisation",
    ]
    assert mode_impact("fallback", "emergency")["features_lost"] == ["personalisation"]
    assert "latency" in mode_impact("fast", "emergency")


def test_mode_impact_without_impact() -> None:
    assert mode_impact("fast", "fast") == {}
    assert mode_impact("fast", "creative") == {}
    assert mode_impact("fallback", "fallback") == {}
    changed = mode_impact("creative", "balanced")
    changed["features_lost"].append("x")
    assert mode_impact("creative", "balanced")["features_lost"] == ["creative_hints"]


# --- prompts ----------------------------------------------------------------------------------------


def test_generator_messages() -> None:
    messages = generator_messages("A light summer cologne with lemon", "balanced")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "JSON" in messages[0]["content"]
    assert "20 = light" in messages[0]["content"]  # the 0-100 scales are anchored
    assert "A light summer cologne with lemon" in messages[1]["content"]
    assert "imaginative" in generator_messages("x", "creative")[0]["content"]


def test_generator_messages_truncate_the_request() -> None:
    text = "rose " * 1000
    user = generator_messages(text, "fast")[1]["content"]
    assert "rose rose" in user
    assert len(user) < MAX_TEXT_CHARS + 40
    assert "…" in user
    reduced = generator_messages(text, "fast", reduced=True)
    assert len(reduced[1]["content"]) < REDUCED_TEXT_CHARS + 20
    full = generator_messages(text, "fast")
    assert sum(len(m["content"]) for m in reduced) < sum(len(m["content"]) for m in full) / 2
    assert len(reduced[0]["content"]) < len(full[0]["content"])
    assert "JSON" in reduced[0]["content"]


def test_unconstrained_prompts_spell_out_the_vocabulary() -> None:
    system = generator_messages("x", "fast", constrained=False)[0]["content"]
    for word in (*STYLES, *NOTES, *CATEGORIES, *LONGEVITIES):
        assert word in system
    constrained = generator_messages("x", "fast")[0]["content"]
    # The small model copies value lists into the description, so the grammar supplies them instead.
    assert "Body Spray" not in constrained
    assert "powdery" not in constrained
    assert "ifra_concerns (0-5" in validator_messages(popular_brief("fast"), constrained=False)[0]["content"]
    assert '"hints"' in hinter_messages(popular_brief("fast"), constrained=False)[0]["content"]


def test_bound_text() -> None:
    assert bound_text("  a\tb\x00c\n\nd  ") == "a b c d"
    assert bound_text("abcdef", 4) == "abc…"
    assert len(bound_text("x" * 5000)) == MAX_TEXT_CHARS


def test_validator_and_hinter_messages() -> None:
    brief = popular_brief("creative")
    validator = validator_messages(brief)
    assert "JSON" in validator[0]["content"]
    assert "IFRA" in validator[0]["content"]
    payload = json.loads(validator[1]["content"].removeprefix("Brief: "))
    assert payload["style"] == "oriental"
    assert payload["intensity"] == 0.8
    assert "creative_hints" not in payload
    hinter = hinter_messages(brief)
    assert "JSON" in hinter[0]["content"]
    assert hinter[1]["content"] == "Style: oriental. Notes: amber, spicy, sweet, woody, leather."
