"""Skill matching: map a query's keywords onto the vocabulary that profiles were measured on."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestra.errors import BadResponse, ModelRequestsForbidden
from orchestra.models.metering import charge
from orchestra.models.types import Usage
from orchestra.numbers import Amount

if TYPE_CHECKING:
    import asyncio

    from orchestra.models.http import CallPolicy, Endpoint


class Match(NamedTuple):
    """A query keyword and the vocabulary skill it maps to."""

    keyword: str
    skill: str
    similarity: Amount


class SkillMatcher(Protocol):
    """Maps keywords to their nearest vocabulary skill (or to nothing below the threshold)."""

    async def match(self, keywords: Sequence[str], vocabulary: Sequence[str]) -> list[Match]:
        """One ``Match`` per keyword that has a close enough skill."""


class MatcherSpec(BaseModel):
    """A matcher as settings (``settings: {matcher: ...}`` in a pool or workflow): stored with each
    run, so a resume matches keywords the same way.

    ``type: lexical`` needs nothing; ``type: embedding`` needs ``model`` and ``base_url`` (an
    OpenAI-compatible ``/v1`` root) and takes ``api_key_env`` and ``timeout``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lexical", "embedding"] = "lexical"
    min_similarity: Amount | None = Field(default=None, ge=0, le=1)
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: Amount | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> MatcherSpec:
        if self.type == "embedding":
            if not self.model or not self.base_url:
                raise ValueError("an embedding matcher needs model and base_url")
            from orchestra.models.http import check_base_url  # the HTTP layer loads only for embeddings

            check_base_url(self.base_url)
        elif self.model or self.base_url or self.api_key_env:
            raise ValueError("model, base_url and api_key_env are settings of an embedding matcher (type: embedding)")
        return self

    def build(self) -> LexicalMatcher | EmbeddingMatcher:
        """The matcher these settings describe."""
        if self.type == "lexical":
            if self.min_similarity is None:
                return LexicalMatcher()
            return LexicalMatcher(min_similarity=self.min_similarity)
        matcher = EmbeddingMatcher(model=self.model or "", base_url=self.base_url or "", api_key_env=self.api_key_env,
                                   timeout=self.timeout)
        if self.min_similarity is not None:
            matcher.min_similarity = self.min_similarity
        return matcher


def matcher_spec(matcher: object) -> MatcherSpec | None:
    """The settings that rebuild ``matcher`` (None for a matcher Orchestra does not know)."""
    describe = getattr(matcher, "spec", None)
    return describe() if callable(describe) else None


def ngram_vector(text: str, sizes: tuple[int, ...] = (2, 3, 4)) -> Counter[str]:
    """A text's character n-gram counts (lower-cased, spaces normalised and padded)."""
    return _ngrams(text, sizes)


def sparse_cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """The cosine similarity of two sparse vectors."""
    if len(a) > len(b):
        a, b = b, a
    dot = sum(weight * b.get(key, 0.0) for key, weight in a.items())
    norm = math.sqrt(sum(w * w for w in a.values())) * math.sqrt(sum(w * w for w in b.values()))
    return dot / norm if norm else 0.0


def _ngrams(text: str, sizes: tuple[int, ...]) -> Counter[str]:
    padded = f" {' '.join(text.lower().split())} "
    grams: Counter[str] = Counter()
    for size in sizes:
        grams.update(padded[i:i + size] for i in range(max(1, len(padded) - size + 1)))
    return grams


def _word_starts(text: str) -> frozenset[str]:
    """The first three letters of each word (a shorter word whole), as a keyword and a skill that are
    one word's forms share them: "grammatical" and "grammar", "physical" and "physics"."""
    return frozenset(word[:3] for word in text.lower().split())


class LexicalMatcher:
    """Character n-gram TF-IDF cosine similarity; no model, no heavy dependency. A keyword maps only to
    a skill one of whose words starts as one of its own does: spelling alike in the middle or the end
    of words is no kinship ("programming" matched "grammar", "biography" "geography", and decided
    who was recruited).

    Args:
        min_similarity: keywords whose best skill scores below this map to nothing.
        sizes: the n-gram lengths.
    """

    def __init__(self, *, min_similarity: float = 0.3, sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        self.min_similarity = min_similarity
        self.sizes = sizes
        self._index_key: tuple[str, ...] = ()
        self._idf: dict[str, float] = {}
        self._postings: dict[str, list[tuple[int, float]]] = {}
        self._starts: list[frozenset[str]] = []
        self._cache: dict[str, Match | None] = {}

    def spec(self) -> MatcherSpec:
        """The settings that rebuild this matcher."""
        return MatcherSpec(type="lexical", min_similarity=self.min_similarity)

    def _build(self, vocabulary: tuple[str, ...]) -> None:
        documents = [_ngrams(skill, self.sizes) for skill in vocabulary]
        frequency: Counter[str] = Counter(g for doc in documents for g in doc)
        total = len(documents)
        self._idf = {g: math.log((1 + total) / (1 + n)) + 1 for g, n in frequency.items()}
        self._postings = {}
        for index, doc in enumerate(documents):
            weights = {g: c * self._idf[g] for g, c in doc.items()}
            norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
            for gram, weight in weights.items():
                self._postings.setdefault(gram, []).append((index, weight / norm))
        self._starts = [_word_starts(skill) for skill in vocabulary]
        self._index_key = vocabulary
        self._cache = {}

    def nearest(self, keyword: str, vocabulary: Sequence[str]) -> Match | None:
        """The best skill for one keyword (cached per vocabulary)."""
        vocab = tuple(vocabulary)
        if vocab != self._index_key:
            self._build(vocab)
        if keyword in self._cache:
            return self._cache[keyword]
        unseen_idf = math.log(1 + len(vocab)) + 1  # an n-gram no skill has: the rarest possible
        weights = {g: c * self._idf.get(g, unseen_idf) for g, c in _ngrams(keyword, self.sizes).items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        scores: dict[int, float] = {}
        for gram, weight in weights.items():
            for index, doc_weight in self._postings.get(gram, ()):
                scores[index] = scores.get(index, 0.0) + weight * doc_weight
        starts = _word_starts(keyword)
        kin = [(index, score) for index, score in scores.items() if starts & self._starts[index]]
        best: Match | None = None
        if kin and norm:
            index, score = max(kin, key=lambda kv: (kv[1], -kv[0]))
            if score / norm >= self.min_similarity:
                best = Match(keyword, vocab[index], round(score / norm, 4))
        self._cache[keyword] = best
        return best

    async def match(self, keywords: Sequence[str], vocabulary: Sequence[str]) -> list[Match]:
        """Map each keyword to its nearest skill."""
        return [m for m in (self.nearest(k, vocabulary) for k in keywords) if m is not None]


class EmbeddingMatcher:
    """Cosine similarity of embeddings from any OpenAI-compatible ``/v1/embeddings`` endpoint.

    Embeddings are cached per text, so the vocabulary is embedded once, and a text wanted by
    several recruitments at the same time is fetched once.

    Args:
        model: the embedding model name.
        base_url: the API root (``.../v1``).
        api_key_env: the environment variable holding the key, or None.
        min_similarity: keywords whose best skill scores below this map to nothing.
    """

    def __init__(self, *, model: str, base_url: str, api_key_env: str | None = None,
                 min_similarity: float = 0.5, timeout: float | None = None) -> None:
        from orchestra.models.http import CallPolicy, Endpoint

        self.model = model
        self.min_similarity = min_similarity
        self.endpoint: Endpoint = Endpoint(base_url, api_key_env=api_key_env)
        self.policy: CallPolicy = CallPolicy.of(timeout=timeout)
        self.api_key_env = api_key_env
        self.timeout = timeout
        self._vectors: dict[str, list[float]] = {}
        self._fetching: dict[str, asyncio.Future[None]] = {}

    async def aclose(self) -> None:
        """Close the endpoint's connections in this event loop."""
        await self.endpoint.aclose()

    def spec(self) -> MatcherSpec:
        """The settings that rebuild this matcher."""
        return MatcherSpec(type="embedding", model=self.model, base_url=self.endpoint.base_url,
                           api_key_env=self.api_key_env, timeout=self.timeout, min_similarity=self.min_similarity)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embeddings for ``texts``. Each text is fetched once: texts already being fetched for
        another recruitment are waited for, not asked again."""
        import asyncio  # (loaded with the HTTP layer when this matcher was made)

        loop = asyncio.get_running_loop()
        fetching = {t: f for t, f in self._fetching.items() if f.get_loop() is loop}  # not a dead loop's
        wanted = list(dict.fromkeys(texts))
        missing = [t for t in wanted if t not in self._vectors and t not in fetching]
        if missing:
            fetch = asyncio.ensure_future(self._fetch(missing))  # runs in this task's context: its meter
            for text in missing:
                self._fetching[text] = fetching[text] = fetch
            fetch.add_done_callback(lambda done: self._fetched(done, missing))
        for pending in {id(f): f for t in wanted if (f := fetching.get(t)) is not None}.values():
            await asyncio.shield(pending)  # a cancelled recruitment does not cancel the others' fetch
        return [self._vectors[t] for t in texts]

    def _fetched(self, fetch: asyncio.Future[None], texts: list[str]) -> None:
        for text in texts:
            if self._fetching.get(text) is fetch:
                del self._fetching[text]
        if not fetch.cancelled():
            fetch.exception()  # seen here, so a failure nobody waits for any more is not reported twice

    async def _fetch(self, texts: list[str]) -> None:
        from orchestra.models import base
        from orchestra.models.http import display_url
        from orchestra.models.openai import bearer_headers

        if not base.ALLOW_MODEL_REQUESTS:  # (a test that forgot a double sent a real request)
            raise ModelRequestsForbidden(f"real model requests are switched off (embeddings from "
                                         f"{display_url(self.endpoint.base_url)}); wrap the test in "
                                         "orchestra.models.allow_model_requests()")
        body = await self.endpoint.post_json("/embeddings", {"model": self.model, "input": texts}, model=self.model,
                                             headers=bearer_headers, policy=self.policy)
        usage = body.get("usage")
        if isinstance(usage, dict):
            charge(Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0)))
        try:
            rows = sorted(body["data"], key=lambda row: row["index"])
            vectors = [list(map(float, row["embedding"])) for row in rows]
        except (KeyError, TypeError, ValueError):
            url = display_url(self.endpoint.base_url)
            raise BadResponse(f"{url}/embeddings returned no data[].embedding") from None
        if len(vectors) != len(texts):
            raise BadResponse(f"{display_url(self.endpoint.base_url)}/embeddings returned {len(vectors)} vectors "
                              f"for {len(texts)} inputs")
        self._vectors.update(zip(texts, vectors))

    async def match(self, keywords: Sequence[str], vocabulary: Sequence[str]) -> list[Match]:
        """Map each keyword to the skill with the most similar embedding."""
        if not keywords or not vocabulary:
            return []
        vectors = await self.embed([*keywords, *vocabulary])
        query, skills = vectors[: len(keywords)], vectors[len(keywords):]
        matches = []
        for keyword, vector in zip(keywords, query):
            scored = [(cosine(vector, other), -i) for i, other in enumerate(skills)]
            similarity, negative_index = max(scored)
            if similarity >= self.min_similarity:
                matches.append(Match(keyword, vocabulary[-negative_index], round(similarity, 4)))
        return matches


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine similarity of two dense vectors."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
