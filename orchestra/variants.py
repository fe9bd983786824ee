"""A skill vocabulary that merges variants: "organic chem" and "organic chemistry" are one skill.

A keyword LLM names one skill in several ways across items, which splits its evidence: an agent
measured on 15 items of a topic ends up with five variants of 3 items each. When profiles are
built, keywords are clustered into canonical skills, most frequent first: a keyword joins the
skill with the most similar variant when their names are close (character n-gram cosine, or
embedding cosine with an embedding matcher) *and* the agents' results do not contradict it (no agent's
accuracy on the two differs by more than ``max_z`` standard errors), else it becomes a
canonical skill itself. The canonical name is the cluster's most frequent variant.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from orchestra.matching import EmbeddingMatcher, SkillMatcher, cosine, ngram_vector, sparse_cosine

LEXICAL_MERGE = 0.6
"""Name similarity (character n-gram cosine) at which two keywords may be one skill."""
EMBEDDING_MERGE = 0.85
"""Name similarity (embedding cosine) at which two keywords may be one skill."""
MAX_Z = 3.0
"""Two keywords stay apart when some agent's accuracy on them differs by more standard errors."""


@dataclass
class Vocabulary:
    """Canonical skills and the variants merged into each, with why."""

    aliases: dict[str, str] = field(default_factory=dict)
    """Every keyword -> its canonical skill (a canonical skill maps to itself)."""
    similarity: dict[str, float] = field(default_factory=dict)
    """A merged variant -> its name similarity to the closest variant already in its skill."""

    def canonical(self, keyword: str) -> str:
        """The canonical skill of a keyword (itself when unknown)."""
        return self.aliases.get(keyword, keyword)

    @property
    def merged(self) -> dict[str, list[str]]:
        """Canonical skill -> the variants merged into it (only skills with variants)."""
        groups: dict[str, list[str]] = {}
        for variant, skill in sorted(self.aliases.items()):
            if variant != skill:
                groups.setdefault(skill, []).append(variant)
        return groups

    def explain(self) -> list[str]:
        """One line per canonical skill that absorbed variants."""
        return [f"{skill} <- " + ", ".join(f"{v} ({self.similarity.get(v, 0):.2f})" for v in variants)
                for skill, variants in self.merged.items()]


def _counts(keyword_items: Collection[str], correct: Mapping[str, Mapping[str, bool]]) -> dict[str, tuple[int, int]]:
    return {agent: (sum(results[i] for i in keyword_items if i in results),
                    sum(1 for i in keyword_items if i in results))
            for agent, results in correct.items()}


def contradicts(a: Mapping[str, tuple[int, int]], b: Mapping[str, tuple[int, int]], max_z: float = MAX_Z) -> bool:
    """Whether some agent's accuracy on two keywords differs by more than ``max_z`` standard errors
    (a two-proportion z-test per agent, on its (correct, items) counts)."""
    for agent, (ca, na) in a.items():
        cb, nb = b.get(agent, (0, 0))
        if not na or not nb:
            continue
        pooled = (ca + cb) / (na + nb)
        spread = math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
        if spread and abs(ca / na - cb / nb) / spread > max_z:
            return True
    return False


async def merge_variants(item_keywords: Mapping[str, Sequence[str]], correct: Mapping[str, Mapping[str, bool]], *,
                         matcher: SkillMatcher | None = None, threshold: float | None = None,
                         max_z: float = MAX_Z) -> Vocabulary:
    """Cluster the keywords of a profiling run into canonical skills (see the module docstring).

    Args:
        item_keywords: item id -> its keywords.
        correct: agent -> item id -> whether the agent answered it correctly.
        matcher: an ``EmbeddingMatcher`` compares names by embedding; anything else lexically.
        threshold: the name similarity needed to merge (default: ``LEXICAL_MERGE`` or
            ``EMBEDDING_MERGE``); 1 or more merges nothing.
        max_z: the evidence check's limit.
    """
    items_of: dict[str, list[str]] = {}
    for item_id, keywords in item_keywords.items():
        for keyword in dict.fromkeys(keywords):
            items_of.setdefault(keyword, []).append(item_id)
    frequency = Counter({k: len(v) for k, v in items_of.items()})
    order = sorted(frequency, key=lambda k: (-frequency[k], len(k), k))
    embedding = isinstance(matcher, EmbeddingMatcher)
    limit = threshold if threshold is not None else (EMBEDDING_MERGE if embedding else LEXICAL_MERGE)
    vocabulary = Vocabulary()
    if limit >= 1 or not order:
        vocabulary.aliases = {k: k for k in order}
        return vocabulary
    if embedding:
        assert isinstance(matcher, EmbeddingMatcher)
        dense = dict(zip(order, await matcher.embed(order)))

        def similarity(a: str, b: str) -> float:
            return cosine(dense[a], dense[b])
    else:
        sparse = {k: ngram_vector(k) for k in order}

        def similarity(a: str, b: str) -> float:
            return sparse_cosine(sparse[a], sparse[b])

    members: dict[str, set[str]] = {}  # canonical -> the items of all its variants
    names: dict[str, list[str]] = {}  # canonical -> its variants, itself first
    for keyword in order:
        evidence = _counts(items_of[keyword], correct)
        scored = sorted(((max(similarity(keyword, name) for name in names[skill]), skill) for skill in members),
                        reverse=True)
        home = next(((score, skill) for score, skill in scored if score >= limit
                     and not contradicts(evidence, _counts(members[skill], correct), max_z)), None)
        if home is None:
            members[keyword] = set(items_of[keyword])
            names[keyword] = [keyword]
            vocabulary.aliases[keyword] = keyword
        else:
            score, skill = home
            members[skill].update(items_of[keyword])
            names[skill].append(keyword)
            vocabulary.aliases[keyword] = skill
            vocabulary.similarity[keyword] = round(score, 4)
    return vocabulary


def pooled_counts(item_keywords: Mapping[str, Sequence[str]], correct: Mapping[str, bool],
                  vocabulary: Vocabulary) -> dict[str, tuple[int, int]]:
    """One agent's (correct, items) per canonical skill: an item counts once per skill, however
    many of the skill's variants it was given."""
    counts: dict[str, list[int]] = {}
    for item_id, keywords in item_keywords.items():
        if item_id not in correct:
            continue
        for skill in dict.fromkeys(vocabulary.canonical(k) for k in keywords):
            entry = counts.setdefault(skill, [0, 0])
            entry[0] += correct[item_id]
            entry[1] += 1
    return {skill: (c, n) for skill, (c, n) in counts.items()}

