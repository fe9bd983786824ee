"""Aggregation: combining the experts' outputs for a node, and the sink nodes' outputs for the answer.

Strategies:
    synthesize: an aggregator LLM critically merges the responses (Mixture-of-Agents prompt).
    vote: answers are extracted by the grader and the majority wins, no LLM call.
    refine: the aggregator improves the strongest expert's draft using the others as reviews.
    none: the strongest expert's output as is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestra.grading import AutoGrader, Grader, strip_reasoning
from orchestra.prompts import render

Strategy = Literal["synthesize", "vote", "refine", "none"]
STRATEGIES: tuple[str, ...] = ("synthesize", "vote", "refine", "none")


@dataclass(frozen=True)
class Response:
    """One expert's output with the recruiting weight that ranks it."""

    agent: str
    text: str
    weight: float = 1.0
    data: Any = None


def ranked(responses: Sequence[Response]) -> list[Response]:
    """Strongest first: by weight, then by position."""
    order = {id(r): i for i, r in enumerate(responses)}
    return sorted(responses, key=lambda r: (-r.weight, order[id(r)]))


def synthesize_prompt(task: str, instruction: str, responses: Sequence[Response],
                      answer_format: str | None = None) -> str:
    """The MoA aggregate-and-synthesize prompt, reasoning stripped from every response."""
    return render("aggregator.j2", task=task, instruction=instruction, answer_format=answer_format,
                  responses=[strip_reasoning(r.text) for r in responses])


def refine_prompt(task: str, instruction: str, responses: Sequence[Response], answer_format: str | None = None) -> str:
    """The refine prompt: the strongest draft plus the other experts' answers as reviews."""
    best, *others = ranked(responses)
    return render("refine.j2", task=task, instruction=instruction, draft=strip_reasoning(best.text),
                  reviews=[strip_reasoning(r.text) for r in others], answer_format=answer_format)


@dataclass(frozen=True)
class VoteResult:
    """The winning output and the tally."""

    text: str
    answer: str | None
    tally: dict[str, int]
    data: Any = None


def vote(responses: Sequence[Response], grader: Grader | None = None) -> VoteResult:
    """Majority vote over extracted answers.

    Ties go to the answer whose supporters have the larger summed weight, then to the answer
    given first. Responses with no extractable answer do not vote; if none has one, the strongest
    response wins. The winning text is the strongest response that gave the winning answer.
    """
    grader = grader or AutoGrader()
    answers = [(r, grader.extract(r.text)) for r in responses]
    voting = [(r, a) for r, a in answers if a]
    if not voting:
        best = ranked(responses)[0]
        return VoteResult(text=strip_reasoning(best.text), answer=None, tally={}, data=best.data)
    tally = Counter(a for _, a in voting)
    weight = Counter()
    first: dict[str, int] = {}
    for index, (response, answer) in enumerate(voting):
        weight[answer] += response.weight
        first.setdefault(answer, index)
    winner = max(tally, key=lambda a: (tally[a], weight[a], -first[a]))
    supporters = ranked([r for r, a in voting if a == winner])
    return VoteResult(text=strip_reasoning(supporters[0].text), answer=winner, tally=dict(tally),
                      data=supporters[0].data)
