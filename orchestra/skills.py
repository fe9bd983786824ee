"""Skill extraction: a keyword LLM names the skills a question or subtask needs.

As Symbolic-MoE does it: several samples at a raised temperature, normalised, long keywords
dropped, and only keywords produced more than once kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from orchestra.models import ChatRequest, ChatResult
from orchestra.prompts import render


@dataclass(frozen=True)
class KeywordConfig:
    """How skills are extracted. The defaults are the paper's."""

    samples: int = 5
    temperature: float = 0.7
    max_length: int = 20
    min_count: int = 2
    max_keywords: int = 5
    max_tokens: int = 64
    structured: bool = True


def _schema(config: KeywordConfig) -> dict[str, object]:
    return {"type": "object", "title": "KeywordList", "additionalProperties": False,
            "required": ["keywords"],
            "properties": {"keywords": {"type": "array", "minItems": 1, "maxItems": config.max_keywords,
                                        "items": {"type": "string", "minLength": 1,
                                                  "maxLength": config.max_length + 10}}}}


class SkillExtractor:
    """Builds the keyword requests for a text and combines the samples into a skill list."""

    def __init__(self, config: KeywordConfig | None = None) -> None:
        self.config = config or KeywordConfig()

    def requests(self, text: str, *, seed: int = 0) -> list[ChatRequest]:
        """One request per sample (seeds ``seed``, ``seed + 1``...), to be sent as one batch."""
        prompt = render("keywords.j2", question=text, max_keywords=self.config.max_keywords,
                        structured=self.config.structured)
        output = _schema(self.config) if self.config.structured else "text"
        return [ChatRequest.user(prompt, temperature=self.config.temperature, seed=seed + i,
                                 max_tokens=self.config.max_tokens, output=output)
                for i in range(self.config.samples)]

    def parse(self, result: ChatResult | Exception) -> list[str]:
        """The normalised keywords of one sample.

        JSON (``{"keywords": [...]}``) or the paper's text form (``Keywords: a, b, c``) are both
        read, also from an answer that failed JSON validation; a sample with neither gives none.
        """
        if isinstance(result, Exception):
            text, parsed = getattr(result, "text", None) or "", None
        else:
            text, parsed = result.text, result.parsed
        if isinstance(parsed, dict) and isinstance(parsed.get("keywords"), list):
            raw = [str(k) for k in parsed["keywords"]]
        else:
            found = re.findall(r"keywords?\s*:\s*(.+)", text, flags=re.IGNORECASE)
            line = found[-1] if found else (text.strip() if "\n" not in text.strip() and len(text) < 120 else "")
            raw = re.split(r"[,;]", line) if line else []
        keywords = []
        for keyword in raw:
            cleaned = " ".join(keyword.strip().strip(".\"'`*[]{}").lower().split())
            if cleaned and len(cleaned) <= self.config.max_length and cleaned not in keywords:
                keywords.append(cleaned)
        return keywords

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
