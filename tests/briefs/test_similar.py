"""The similar-request index: lexical TF-IDF cosine, threshold, LRU bound, pruned search, embedder plug."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.briefs import similar
from brownout.briefs.similar import Embedder, SimilarityIndex, lexical_similarity, text_features
from brownout.errors import ConfigError

PARAPHRASES = [
    ("I want a fresh citrus perfume for summer", "I'd like a fresh citrus fragrance for the summer"),
    (
        "A warm oriental scent with vanilla and amber for winter evenings",
        "a warm oriental fragrance with vanilla and amber for cold winter evenings",
    ),
    ("rose and jasmine bouquet for a spring wedding", "roses and jasmine bouquets for a spring wedding!"),
    ("Crème brûlée gourmand with caramel and vanilla", "creme-brulee gourmand with vanilla and caramels"),
    ("a bold smoky leather and tobacco scent for evenings", "bold smoky leather and tobacco for the evening"),
]
UNRELATED = [
    ("fresh citrus perfume for summer", "woody leather cologne for autumn nights"),
    ("A warm oriental scent with vanilla and amber", "light aquatic body spray with sea salt"),
    ("rose and jasmine bouquet", "smoky tobacco and oud"),
]


def test_identical_text_scores_one() -> None:
    text = "A warm oriental scent with vanilla and amber"
    assert lexical_similarity(text, text) == pytest.approx(1.0)
    index: SimilarityIndex[str] = SimilarityIndex()
    index.add(text, "brief")
    assert index.search(text) == ("brief", 1.0)
    # Normalisation: case, accents, punctuation and spacing do not make a text different.
    index.add("Crème Brûlée, please!", "gourmand")
    assert index.search("  creme   BRULEE please ") == ("gourmand", 1.0)


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_close_paraphrase_scores_high(a: str, b: str) -> None:
    assert lexical_similarity(a, b) >= 0.8
    index: SimilarityIndex[str] = SimilarityIndex()
    index.add(a, "cached")
    found = index.search(b)
    assert found is not None
    assert found[0] == "cached"
    assert 0.8 <= found[1] <= 1.0


@pytest.mark.parametrize(("a", "b"), UNRELATED)
def test_unrelated_texts_score_low(a: str, b: str) -> None:
    assert lexical_similarity(a, b) < 0.5
    index: SimilarityIndex[str] = SimilarityIndex(threshold=0.5)
    index.add(a, "cached")
    assert index.search(b) is None


def test_strength_words_weigh_more_than_filler() -> None:
    # "light" vs "intense" decides the brief, so it must cost more than "a" vs "the".
    base = "light floral perfume for a spring wedding"
    assert lexical_similarity(base, "light floral perfume for the spring wedding") == pytest.approx(1.0)
    assert lexical_similarity(base, "intense floral perfume for a spring wedding") < 0.8


def test_threshold_is_respected() -> None:
    a, b = "light floral perfume for a spring wedding", "intense floral perfume for a spring wedding"
    strict: SimilarityIndex[int] = SimilarityIndex(threshold=0.8)
    strict.add(a, 1)
    assert strict.search(b) is None
    loose: SimilarityIndex[int] = SimilarityIndex(threshold=0.5)
    loose.add(a, 1)
    found = loose.search(b)
    assert found is not None
    assert 0.5 <= found[1] < 0.8
    # With one entry, IDF barely moves the score away from the plain lexical cosine.
    assert found[1] == pytest.approx(lexical_similarity(a, b), abs=0.05)
    exact: SimilarityIndex[int] = SimilarityIndex(threshold=1.0)
    exact.add(a, 1)
    assert exact.search(b) is None
    assert exact.search(a) == (1, 1.0)


def test_best_match_wins() -> None:
    index: SimilarityIndex[str] = SimilarityIndex(threshold=0.3)
    index.add("fresh citrus cologne with lemon for summer", "citrus")
    index.add("fresh citrus cologne with lemon and mint for summer mornings", "citrus-mint")
    index.add("woody leather for autumn", "woody")
    found = index.search("fresh citrus cologne with lemon and mint for summer")
    assert found is not None
    assert found[0] == "citrus-mint"


def test_lru_bound_and_recency() -> None:
    index: SimilarityIndex[int] = SimilarityIndex(max_entries=3)
    texts = ["lemon cologne", "rose perfume", "cedar oud", "vanilla amber"]
    for i, text in enumerate(texts[:3]):
        index.add(text, i)
    assert len(index) == 3
    assert index.search("lemon cologne") == (0, 1.0)  # a hit makes it recent: "rose perfume" is now oldest
    index.add(texts[3], 3)
    assert len(index) == 3
    assert index.search("rose perfume") is None
    assert index.search("lemon cologne") == (0, 1.0)
    assert index.search("cedar oud") == (2, 1.0)
    assert index.search("vanilla amber") == (3, 1.0)


def test_eviction_forgets_features() -> None:
    index: SimilarityIndex[int] = SimilarityIndex(max_entries=2)
    for i in range(50):
        index.add(f"unique{i} rose jasmine", i)
    assert len(index) == 2
    assert len(index._by_id) == 2
    features = set(text_features("unique48 rose jasmine")) | set(text_features("unique49 rose jasmine"))
    assert set(index._postings) == features
    assert all(len(p) <= 2 for p in index._postings.values())


def test_add_replaces_the_value_of_the_same_text() -> None:
    index: SimilarityIndex[str] = SimilarityIndex()
    index.add("Lemon cologne", "old")
    index.add("lemon COLOGNE!", "new")
    assert len(index) == 1
    assert index.search("lemon cologne") == ("new", 1.0)


def test_texts_without_words_are_neither_stored_nor_matched() -> None:
    index: SimilarityIndex[str] = SimilarityIndex()
    assert index.search("anything") is None
    index.add("", "empty")
    index.add("!!! ...", "punctuation")
    assert len(index) == 0
    index.add("lemon cologne", "x")
    assert index.search("") is None
    assert index.search("???") is None


def test_other_scripts() -> None:
    index: SimilarityIndex[str] = SimilarityIndex()
    index.add("시원한 여름 향수 추천해 주세요", "korean")
    found = index.search("시원한 여름 향수를 추천해 주세요")  # one particle added
    assert found is not None
    assert found[0] == "korean"
    assert found[1] >= 0.8


def test_stop_words_only_text_still_has_features() -> None:
    assert text_features("the and of")
    assert lexical_similarity("it is what it is", "it is what it is") == pytest.approx(1.0)


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        SimilarityIndex(max_entries=0)
    for threshold in (0.0, -0.1, 1.01):
        with pytest.raises(ConfigError, match="threshold"):
            SimilarityIndex(threshold=threshold)


def test_clear() -> None:
    index: SimilarityIndex[int] = SimilarityIndex()
    index.add("lemon", 1)
    index.clear()
    assert len(index) == 0
    assert index.search("lemon") is None


# --- pruned search equals brute force ---------------------------------------------------------------

VOCABULARY = [
    word
    for line in (
        "lemon bergamot orange rose jasmine lily cedar sandalwood oud pepper cinnamon clove vanilla caramel",
        "honey musk amber incense grass tea mint sea ocean rain apple peach plum leather tobacco iris violet",
        "summer winter evening morning light intense bold soft warm fresh clean cozy exotic romantic garden",
        "forest beach city night wedding office party autumn spring",
    )
    for word in line.split()
]


def brute_force(index: SimilarityIndex[int], text: str) -> tuple[int, float] | None:
    """Score every entry with the same TF-IDF the index uses: the reference the pruning must match."""
    entries = list(index._entries.values())
    n = len(entries)
    df: dict[str, int] = {}
    for entry in entries:
        for feature in entry.features:
            df[feature] = df.get(feature, 0) + 1
    prior = similar._IDF_PRIOR

    def vector(features: dict[str, float]) -> dict[str, float]:
        return {f: w * (math.log((prior + n) / (prior + df.get(f, 0))) + 1) for f, w in features.items()}

    query = vector(text_features(text))
    query_norm = math.sqrt(sum(w * w for w in query.values()))
    best: tuple[int, float] | None = None
    for entry in entries:
        doc = vector(entry.features)
        dot = sum(w * doc.get(f, 0.0) for f, w in query.items())
        score = dot / (query_norm * math.sqrt(sum(w * w for w in doc.values())))
        if score >= index.threshold and (best is None or score > best[1]):
            best = (entry.value, score)
    return best


def make_corpus(seed: int, size: int) -> list[str]:
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < size:
        texts[" ".join(rng.sample(VOCABULARY, rng.randint(3, 7)))] = None
    return list(texts)


def perturb(rng: random.Random, text: str) -> str:
    words = text.split()
    rng.shuffle(words)  # a new word order is not the same key: it takes the lexical path
    choice = rng.random()
    if choice < 0.3:
        words[rng.randrange(len(words))] = rng.choice(VOCABULARY)
    elif choice < 0.5:
        words.append(rng.choice(VOCABULARY))
    elif choice < 0.6 and len(words) > 3:
        words.pop()
    return " ".join(words)


def test_thousand_entries_search_is_correct() -> None:
    corpus = make_corpus(seed=7, size=1000)
    index: SimilarityIndex[int] = SimilarityIndex(max_entries=1000, threshold=0.8)
    for i, text in enumerate(corpus):
        index.add(text, i)
    assert len(index) == 1000
    rng = random.Random(11)
    # Every stored text is found as itself.
    for i in rng.sample(range(1000), 100):
        assert index.search(corpus[i]) == (i, 1.0)
    # A reordered text is the same bag of words: found with a score of (almost) 1.
    for i in rng.sample(range(1000), 100):
        words = corpus[i].split()
        found = index.search(" ".join(reversed(words)))
        assert found is not None
        assert found[0] == i or found[1] == pytest.approx(1.0)
        assert found[1] == pytest.approx(1.0)
    # Perturbed texts: the pruned search returns exactly what scoring every entry returns.
    hits = 0
    for _ in range(200):
        query = perturb(rng, corpus[rng.randrange(1000)])
        expected = brute_force(index, query)
        found = index.search(query)
        if expected is None:
            assert found is None
        else:
            hits += 1
            assert found is not None
            assert found[1] == pytest.approx(expected[1])
    assert 20 < hits < 200  # the sample exercises both outcomes


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(1, 60),
    threshold=st.sampled_from([0.3, 0.5, 0.8, 0.95]),
)
def test_pruned_search_matches_brute_force(seed: int, size: int, threshold: float) -> None:
    corpus = make_corpus(seed, size)
    index: SimilarityIndex[int] = SimilarityIndex(max_entries=size, threshold=threshold)
    for i, text in enumerate(corpus):
        index.add(text, i)
    rng = random.Random(seed)
    for _ in range(10):
        query = perturb(rng, rng.choice(corpus))
        expected = brute_force(index, query)
        found = index.search(query)
        assert (found is None) == (expected is None), (query, found, expected)
        if found is not None and expected is not None:
            assert found[1] == pytest.approx(expected[1])


# --- an embedding model plugged in ------------------------------------------------------------------


class LetterEmbedder:
    """A real, if crude, embedder: letter frequencies. Enough to check the plug and the dense scan."""

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        return [[float(text.lower().count(ch)) for ch in "abcdefghijklmnopqrstuvwxyz"] for text in texts]


def test_embedder_plugs_in() -> None:
    embedder = LetterEmbedder()
    assert isinstance(embedder, Embedder)
    index: SimilarityIndex[str] = SimilarityIndex(threshold=0.9, embedder=embedder)
    index.add("lemon", "citrus")
    index.add("zzz", "sleep")
    assert embedder.calls == 2
    assert index._postings == {}  # the lexical index is not built
    found = index.search("melon")  # same letters: cosine 1 for this embedder
    assert found is not None
    assert found[0] == "citrus"
    assert found[1] == pytest.approx(1.0)
    assert index.search("qqqq") is None
    assert index.search("lemon") == ("citrus", 1.0)  # the exact key needs no embedding
    assert embedder.calls == 4
