"""The creative-brief domain (a fragrance brief from free text), as pure Python with no I/O.

* :mod:`~brownout.briefs.schema` -- the brief users get (:class:`CreativeBrief`) and the grammar-friendly
  shapes the generator, validator and hinter models are asked for;
* :mod:`~brownout.briefs.rules` -- the deterministic fallbacks: rule-based brief and validation,
  template hints, popular briefs, the cost of a mode downshift;
* :mod:`~brownout.briefs.similar` -- the similar-request index the generator's failure falls back to;
* :mod:`~brownout.briefs.prompts` -- the chat messages for the three model roles;
* :mod:`~brownout.briefs.answer` -- the answer to a request, as a typed dict (:class:`BriefAnswer`);
* :mod:`~brownout.briefs.service` -- the pipeline that runs them under brownout's policies.
"""

from __future__ import annotations

from brownout.briefs.answer import BriefAnswer, StageRecord
from brownout.briefs.prompts import generator_messages, hinter_messages, validator_messages
from brownout.briefs.rules import (
    IFRA_SKIPPED_WARNING,
    MODE_IMPACT,
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
    Longevity,
    Mode,
    ModelBrief,
    ModelNote,
    Note,
    ProductCategory,
    Style,
    ValidationReport,
    ValidatorVerdict,
    grammar_schema,
)
from brownout.briefs.similar import Embedder, SimilarityIndex, lexical_similarity

__all__ = [
    "CATEGORIES",
    "IFRA_SKIPPED_WARNING",
    "LONGEVITIES",
    "MODES",
    "MODE_IMPACT",
    "NOTES",
    "STYLES",
    "BriefAnswer",
    "CreativeBrief",
    "Embedder",
    "HintList",
    "Longevity",
    "Mode",
    "ModelBrief",
    "ModelNote",
    "Note",
    "ProductCategory",
    "SimilarityIndex",
    "StageRecord",
    "Style",
    "ValidationReport",
    "ValidatorVerdict",
    "extract_keywords",
    "generator_messages",
    "grammar_schema",
    "hinter_messages",
    "lexical_similarity",
    "mode_impact",
    "popular_brief",
    "rule_based_brief",
    "rule_based_validation",
    "template_hints",
    "validator_messages",
]
