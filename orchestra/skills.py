"""Skill extraction: a keyword LLM names the skills a question or subtask needs.

As Symbolic-MoE does it: several samples at a raised temperature, normalised, long keywords
dropped, and only keywords produced more than once kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from orchestra.models import ChatRequest, ChatResult
from orchestra.models.structured import StructuredOutputError, extract_json
from orchestra.numbers import Amount, Count


class KeywordConfig(BaseModel):
    """How skills are extracted. The defaults are the paper's.

    Attributes:
        samples: keyword requests per question or subtask.
        temperature: their sampling temperature.
        max_length: the longest keyword kept (characters).
        min_count: a keyword is kept when this many samples name it.
        max_keywords: the most keywords one sample may give.
        max_tokens: each sample's answer limit.
        structured: ask for JSON (else the paper's ``Keywords: a, b`` text).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: Count = Field(default=5, ge=1)
    temperature: Amount = Field(default=0.7, ge=0, le=2)
    max_length: Count = Field(default=20, ge=1)
    min_count: Count = Field(default=2, ge=1)
    max_keywords: Count = Field(default=5, ge=1)
    max_tokens: Count = Field(default=64, ge=1)
    structured: bool = True


def _schema(config: KeywordConfig) -> dict[str, object]:
    return _keyword_schema(config.max_keywords, config.max_length)


@lru_cache(maxsize=16)
def _keyword_schema(max_keywords: int, max_length: int) -> dict[str, object]:
    """The keyword answer's schema, one dict for every request of these settings (never changed in
    place): a run store's request keys write a schema's JSON once per dict, not once per task."""
    # extra keys are allowed: a model that adds {"skills": [...]} beside the keywords still answered
    return {"type": "object", "title": "KeywordList", "required": ["keywords"],
            "properties": {"keywords": {"type": "array", "minItems": 1, "maxItems": max_keywords,
                                        "items": {"type": "string", "minLength": 1, "maxLength": max_length + 10}}}}


#: a skill name is plain words: letters (of any script), digits, spaces and a few joiners (c++, c#, q&a,
#: node.js, e-commerce, histoire-géo, математика)
SKILL_NAME = re.compile(r"[^\W_](?:[^\W_]|[ +#&'./-])*")
_TEXT_FORM = re.compile(r"keywords?\s*:\s*(.+)", re.IGNORECASE)


def skill_names(raw: Sequence[object], max_length: int) -> list[str]:
    """Normalised, distinct skill names from raw keywords; anything that is not plain words
    (JSON syntax, long phrases, non-strings) is dropped, never turned into a skill."""
    names: list[str] = []
    for keyword in raw:
        if not isinstance(keyword, str):
            continue
        cleaned = " ".join(keyword.strip().strip(".*`'\"").lower().split())
        if cleaned and len(cleaned) <= max_length and SKILL_NAME.fullmatch(cleaned) and cleaned not in names:
            names.append(cleaned)
    return names


def _listed(value: object) -> list[object] | None:
    """The keyword list in a parsed answer: a list, ``{"keywords": [...]}``, or the first list of
    strings under any other key (``{"skills": [...]}``, ``{"topics": [...]}``)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("keywords"), list):
            return value["keywords"]
        for item in value.values():
            if isinstance(item, list) and item and all(isinstance(v, str) for v in item):
                return item
    return None


class SkillExtractor:
    """Builds the keyword requests for a text and combines the samples into a skill list."""

    def __init__(self, config: KeywordConfig | None = None) -> None:
        self.config = config or KeywordConfig()

    def requests(self, text: str, *, seed: int = 0) -> list[ChatRequest]:
        """One request per sample (seeds ``seed``, ``seed + 1``...), to be sent as one batch."""
        from orchestra.prompts import render  # Jinja2 loads with the first prompt, not with the settings

        prompt = render("keywords.j2", question=text, max_keywords=self.config.max_keywords,
                        structured=self.config.structured)
        output = _schema(self.config) if self.config.structured else "text"
        first = ChatRequest.user(prompt, temperature=self.config.temperature, seed=seed,
                                 max_tokens=self.config.max_tokens, output=output)
        # the others share its messages (validated once; a store writes their keys' JSON once)
        return [first, *(first.model_copy(update={"seed": seed + i}) for i in range(1, self.config.samples))]

    def parse(self, result: ChatResult | Exception) -> list[str]:
        """The normalised keywords of one sample.

        What real models send is read: JSON with extra keys or under another key, JSON inside prose
        or code fences, and the paper's text form (``Keywords: a, b, c``), also from an answer that
        failed JSON validation. A sample with none of these gives no keywords.
        """
        if isinstance(result, Exception):
            text, parsed = getattr(result, "text", None) or "", None
        else:
            text, parsed = result.text, result.parsed
        listed = _listed(parsed)
        if listed is None and text.strip():
            try:
                listed = _listed(extract_json(text))
            except StructuredOutputError:
                listed = None
        if listed is None:
            found = _TEXT_FORM.findall(text)
            line = found[-1] if found else (text.strip() if "\n" not in text.strip() and len(text) < 120 else "")
            listed = re.split(r"[,;]", line) if line else []
        return skill_names(listed, self.config.max_length)

    def combine(self, results: Sequence[ChatResult | Exception]) -> list[str]:
        """Keywords produced by at least ``min_count`` samples, most frequent first."""
        counts: Counter[str] = Counter()
        first_seen: dict[str, int] = {}
        for result in results:
            for keyword in self.parse(result):
                counts[keyword] += 1
                first_seen.setdefault(keyword, len(first_seen))
        kept = [k for k, n in counts.items() if n >= self.config.min_count]
        return sorted(kept, key=lambda k: (-counts[k], first_seen[k]))

    def failure(self, results: Sequence[ChatResult | Exception]) -> str:
        """Why ``combine`` found no skill in these samples, in one line."""
        errors = [r for r in results if isinstance(r, Exception)]
        if len(errors) == len(results):
            return f"all {len(results)} keyword calls failed: {errors[0]}"
        if any(self.parse(r) for r in results):
            return f"no skill was named by at least {self.config.min_count} of the {len(results)} samples"
        return f"the keyword model named no readable skill in {len(results) - len(errors)} answer(s)"
