"""The similar-request cache: when the generator fails, serve the brief of a request close enough to this one.

When the generator is down, a "semantic search" over past requests finds one similar enough (a
similarity of at least 0.8) to serve its brief.
The default measure is lexical and dependency-free: the cosine of TF-IDF vectors over the request's word
unigrams and character 3-grams (so "roses" still meets "rose" and a typo costs little). An embedding
model can replace it through the :class:`Embedder` protocol.

Search scores only candidates that can reach the threshold: query features are taken rarest first
until the ones left could not, by Cauchy-Schwarz, add up to the threshold on their own; only entries
sharing one of those rare features are scored. That prunes without ever missing a match.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

from brownout.briefs.rules import STOP_WORDS, is_signal_word, tokenize
from brownout.errors import ConfigError

__all__ = ["Embedder", "SimilarityIndex", "lexical_similarity", "text_features"]

V = TypeVar("V")

# Words carry meaning, trigrams carry robustness (plurals, typos); weight words up so two requests
# that share their trigrams only by accident ("summer" vs "summit") do not look alike.
_WORD_WEIGHT = 2.0
_TRIGRAM_WEIGHT = 1.0
# Words the rules read a brief field from (notes, style, strength, category) decide which brief fits,
# so "light floral" and "intense floral" must differ more than "for a" and "for the" do.
_SIGNAL_WEIGHT = 2.0
# Every request here is about a fragrance: these words tell requests apart no better than stop words.
_DOMAIN_STOP_WORDS = frozenset(
    ("perfume", "perfumes", "fragrance", "fragrances", "scent", "scents", "smell", "smells", "aroma", "eau")
)
# IDF as if _IDF_PRIOR extra entries held every feature: a handful of entries cannot make a word
# look rare (with one entry, plain IDF would weigh every unshared word 1.7x), a thousand can.
_IDF_PRIOR = 10
# Guards the pruning bound against float rounding: prune a little less than the exact bound allows.
_PRUNE_MARGIN = 1.0 - 1e-9


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into dense vectors whose cosine says how alike they are (e.g. all-MiniLM-L6-v2)."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, all of the same length."""
        ...


def _stem(word: str) -> str:
    """A plural's singular, roughly: roses -> rose, berries -> berry; "citrus" and "grass" stay."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-3] + "y" if word.endswith("ies") else word[:-1]
    return word


def text_features(text: str) -> dict[str, float]:
    """The sparse term-frequency vector of ``text``: word unigrams and padded character 3-grams.

    Text is normalised first (case folded, accents and punctuation removed, see :func:`tokenize`).
    Stop words and words every request shares ("perfume", "scent") are left out unless they are all
    there is, plurals are folded, and words the rules read a brief field from weigh double.
    Frequencies are sublinear (``1 + log tf``) so a repeated word does not
    drown the rest. Word features are keyed ``"w:word"`` and trigram features ``"c:abc"``.
    """
    words = tokenize(text)
    meaningful = [
        _stem(word) for word in words if word not in STOP_WORDS and word not in _DOMAIN_STOP_WORDS
    ] or words
    counts: dict[str, int] = {}
    for word in meaningful:
        key = "w:" + word
        counts[key] = counts.get(key, 0) + 1
        padded = f" {word} "
        for i in range(len(padded) - 2):
            key = "c:" + padded[i : i + 3]
            counts[key] = counts.get(key, 0) + 1
    features: dict[str, float] = {}
    for key, count in counts.items():
        weight = 1.0 + math.log(count)
        if key[0] == "w":
            weight *= _WORD_WEIGHT * (_SIGNAL_WEIGHT if is_signal_word(key[2:]) else 1.0)
        else:
            weight *= _TRIGRAM_WEIGHT
        features[key] = weight
    return features


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if not a or not b:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    dot = sum(weight * b.get(key, 0.0) for key, weight in a.items())
    norm = math.sqrt(sum(w * w for w in a.values()) * sum(w * w for w in b.values()))
    return min(1.0, dot / norm)


def lexical_similarity(a: str, b: str) -> float:
    """Cosine similarity in 0..1 of two texts' :func:`text_features` (no corpus, so no IDF weighting)."""
    return _cosine(text_features(a), text_features(b))


class _Entry(Generic[V]):
    __slots__ = ("features", "id", "key", "value", "vector")

    def __init__(
        self, id: int, key: str, value: V, features: dict[str, float], vector: list[float] | None
    ) -> None:
        self.id = id
        self.key = key
        self.value = value
        self.features = features
        self.vector = vector


class SimilarityIndex(Generic[V]):
    """A bounded index of past requests and their values, searched by text similarity.

    ``search`` returns the value of the most similar stored text when its score reaches ``threshold``
    (cosine in 0..1; an identical text scores exactly 1.0). The index keeps the ``max_entries`` most
    recently added or found entries and forgets the least recently used beyond that. Adding a text
    already stored (after normalisation) replaces its value.

    With an ``embedder`` the score is the cosine of its vectors, found by a scan of every entry;
    without one it is the lexical TF-IDF cosine, found through an inverted index.
    """

    __slots__ = (
        "_by_id",
        "_embedder",
        "_entries",
        "_generation",
        "_next_id",
        "_norms",
        "_norms_generation",
        "_postings",
        "max_entries",
        "threshold",
    )

    def __init__(
        self, max_entries: int = 1000, threshold: float = 0.8, *, embedder: Embedder | None = None
    ) -> None:
        """Create an empty index; ``max_entries`` >= 1 and ``0 < threshold <= 1``."""
        if max_entries < 1:
            raise ConfigError("max_entries", f"must be >= 1, got {max_entries}")
        if not 0.0 < threshold <= 1.0:
            raise ConfigError("threshold", f"must be in (0, 1], got {threshold}")
        self.max_entries = max_entries
        self.threshold = threshold
        self._embedder = embedder
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._by_id: dict[int, _Entry[V]] = {}
        # feature -> {entry id: term weight}; a feature's document frequency is the size of its posting.
        self._postings: dict[str, dict[int, float]] = {}
        self._next_id = 0
        # Bumped whenever the set of entries changes, which invalidates the cached entry norms.
        self._generation = 0
        self._norms: dict[int, float] = {}
        self._norms_generation = -1

    def __len__(self) -> int:
        """How many entries the index holds."""
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._by_id.clear()
        self._postings.clear()
        self._generation += 1

    @staticmethod
    def _key(text: str) -> str:
        return " ".join(tokenize(text))

    def add(self, text: str, value: V) -> None:
        """Store ``value`` under ``text``, evicting the least recently used entry when full.

        A text without a single word (empty, only punctuation) is not stored: nothing could match it.
        """
        key = self._key(text)
        if not key:
            return
        existing = self._entries.get(key)
        if existing is not None:
            existing.value = value
            self._entries.move_to_end(key)
            return
        features: dict[str, float] = {}
        vector = None
        if self._embedder is not None:
            vector = _unit(self._embedder.embed([text])[0])
        else:
            features = text_features(text)
        entry = _Entry(self._next_id, key, value, features, vector)
        self._next_id += 1
        self._generation += 1
        self._entries[key] = entry
        self._by_id[entry.id] = entry
        if vector is None:
            for feature, weight in features.items():
                posting = self._postings.get(feature)
                if posting is None:
                    self._postings[feature] = {entry.id: weight}
                else:
                    posting[entry.id] = weight
        while len(self._entries) > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            self._forget(evicted)

    def _forget(self, entry: _Entry[V]) -> None:
        del self._by_id[entry.id]
        if entry.vector is not None:
            return
        for feature in entry.features:
            posting = self._postings[feature]
            del posting[entry.id]
            if not posting:
                del self._postings[feature]

    def search(self, text: str) -> tuple[V, float] | None:
        """The value of the stored text most like ``text``, and its score, if that reaches the threshold.

        A hit counts as a use for the LRU order.
        """
        key = self._key(text)
        if not key or not self._entries:
            return None
        exact = self._entries.get(key)
        if exact is not None:
            self._entries.move_to_end(key)
            return exact.value, 1.0
        if self._embedder is not None:
            found = self._search_dense(_unit(self._embedder.embed([text])[0]))
        else:
            found = self._search_lexical(text_features(text))
        if found is None:
            return None
        entry, score = found
        self._entries.move_to_end(entry.key)
        return entry.value, score

    def _search_dense(self, query: list[float]) -> tuple[_Entry[V], float] | None:
        best: _Entry[V] | None = None
        best_score = self.threshold
        for entry in self._entries.values():
            assert entry.vector is not None  # every entry was embedded when an embedder is set
            score = min(1.0, sum(a * b for a, b in zip(query, entry.vector, strict=True)))
            if score >= best_score:
                best, best_score = entry, score
        return None if best is None else (best, best_score)

    def _search_lexical(self, query: dict[str, float]) -> tuple[_Entry[V], float] | None:
        if not query:
            return None
        postings = self._postings
        n = len(self._entries)
        idf_cache: dict[str, float] = {}

        def idf(feature: str) -> float:
            value = idf_cache.get(feature)
            if value is None:
                posting = postings.get(feature)
                df = 0 if posting is None else len(posting)
                value = idf_cache[feature] = math.log((_IDF_PRIOR + n) / (_IDF_PRIOR + df)) + 1.0
            return value

        weighted = {feature: tf * idf(feature) for feature, tf in query.items()}
        total = sum(w * w for w in weighted.values())
        # Features no entry has add to the query's norm but can match nothing; then rarest first.
        ranked = sorted(weighted, key=lambda f: len(postings.get(f, ())))
        limit = self.threshold * self.threshold * total * _PRUNE_MARGIN
        remaining = total
        candidates: set[int] = set()
        for feature in ranked:
            if remaining < limit:
                break  # entries sharing only the features left cannot reach the threshold
            posting = postings.get(feature)
            if posting is not None:
                candidates.update(posting)
            remaining -= weighted[feature] ** 2

        # Entry norms depend on IDF, which every add or eviction shifts; cache them between changes
        # (during an outage nothing is added and every request searches, so the cache holds).
        norms = self._norms
        if self._norms_generation != self._generation:
            norms.clear()
            self._norms_generation = self._generation
        # dot(q, d) = sum over shared features of tf_q * tf_d * idf^2: fold idf^2 into the query once.
        folded = {feature: weighted[feature] * idf(feature) for feature in weighted}
        query_norm = math.sqrt(total)
        by_id = self._by_id
        best: _Entry[V] | None = None
        best_score = self.threshold
        for entry_id in candidates:
            entry = by_id[entry_id]
            features = entry.features
            norm = norms.get(entry_id)
            if norm is None:
                norm = norms[entry_id] = math.sqrt(sum((tf * idf(f)) ** 2 for f, tf in features.items()))
            if len(features) < len(folded):
                dot = sum(tf * folded[f] for f, tf in features.items() if f in folded)
            else:
                dot = sum(qw * features[f] for f, qw in folded.items() if f in features)
            score = min(1.0, dot / (query_norm * norm))
            # Ties go to the newer entry (ids grow with each add).
            if score > best_score or (score == best_score and (best is None or entry_id > best.id)):
                best, best_score = entry, score
        return None if best is None else (best, best_score)


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return list(vector) if norm == 0.0 else [x / norm for x in vector]
