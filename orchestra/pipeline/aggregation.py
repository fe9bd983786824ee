"""Aggregation: how a node's expert answers become its output, and the sinks' outputs the answer.

Each strategy is an object behind one protocol (``Aggregation``), chosen by name:
    synthesize: an aggregator LLM critically merges the responses (Mixture-of-Agents prompt).
    vote: answers are extracted by the grader and the majority wins, no LLM call.
    refine: the aggregator improves the strongest expert's draft using the others as reviews.
    none: the strongest expert's output as is.
``FinalSynthesis`` merges the outputs of several sink nodes into the run's answer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestra.agents import Agent
from orchestra.datasets import Item
from orchestra.grading import AutoGrader, Grader, choices_of, strip_reasoning
from orchestra.models import ChatRequest, ChatResult, Model
from orchestra.prompts import render
from orchestra.settings import AnswerOptions
from orchestra.vocabulary import Strategy

Call = Callable[[Sequence[tuple[Model, ChatRequest]]], Awaitable[list[ChatResult | Exception]]]
"""Sends calls for a run and returns their outcomes."""


@dataclass(slots=True)  # made for every expert answer: not frozen, as frozen fields cost a call each to set
class Response:
    """One expert's output with the recruiting weight that ranks it."""

    agent: str
    text: str
    weight: float = 1.0
    data: Any = None
    limit: int | None = None
    """The most characters of it an aggregator's prompt shows (``max_response_chars``); its text
    stays whole everywhere else (a node's output picked from it, a vote, the grader)."""


def shown(response: Response) -> str:
    """A response as an aggregator's prompt shows it: reasoning stripped, then cut at its ``limit``."""
    return cut_for_aggregator(strip_reasoning(response.text), response.limit)


def cut_for_aggregator(text: str, limit: int | None) -> str:
    """``text`` as an aggregator's prompt shows it: at most ``limit`` characters (``max_response_chars``),
    the cut marked."""
    return text if limit is None or len(text) <= limit else f"{text[:limit]} [... cut at max_response_chars={limit}]"


def ranked(responses: Sequence[Response]) -> list[Response]:
    """Strongest first: by weight, then by position."""
    if len(responses) < 2:
        return list(responses)
    order = {id(r): i for i, r in enumerate(responses)}
    return sorted(responses, key=lambda r: (-r.weight, order[id(r)]))


def synthesize_prompt(task: str, instruction: str, responses: Sequence[Response],
                      answer_format: str | None = None, context: str = "") -> str:
    """The MoA aggregate-and-synthesize prompt, every response as ``shown``;
    ``context``: the conversation so far (a chat's earlier turns and system messages)."""
    return render("aggregator.j2", task=task, instruction=instruction, answer_format=answer_format,
                  responses=[shown(r) for r in responses], context=context)


def refine_prompt(task: str, instruction: str, responses: Sequence[Response], answer_format: str | None = None,
                  context: str = "") -> str:
    """The refine prompt: the strongest draft plus the other experts' answers as reviews."""
    best, *others = ranked(responses)
    return render("refine.j2", task=task, instruction=instruction, draft=shown(best),
                  reviews=[shown(r) for r in others], answer_format=answer_format, context=context)


@dataclass(frozen=True)
class VoteResult:
    """The winning output and the tally."""

    text: str
    answer: str | None
    tally: dict[str, int]
    data: Any = None


def vote(responses: Sequence[Response], grader: Grader | None = None, item: Item | None = None) -> VoteResult:
    """Majority vote over extracted answers (read with ``item``'s choices where it has them).

    Ties go to the answer whose supporters have the larger summed weight, then to the answer
    given first. Responses with no extractable answer do not vote; if none has one, the strongest
    response wins. The winning text is the strongest response that gave the winning answer.
    """
    grader = grader or AutoGrader()
    answers = [(r, grader.extract(r.text, item)) for r in responses]
    voting = [(r, a) for r, a in answers if a]
    if not voting:
        best = ranked(responses)[0]
        return VoteResult(text=strip_reasoning(best.text), answer=None, tally={}, data=best.data)
    tally = Counter(a for _, a in voting)
    weight: dict[str, float] = defaultdict(float)
    first: dict[str, int] = {}
    for index, (response, answer) in enumerate(voting):
        weight[answer] += response.weight
        first.setdefault(answer, index)
    winner = max(tally, key=lambda a: (tally[a], weight[a], -first[a]))
    supporters = ranked([r for r, a in voting if a == winner])
    return VoteResult(text=strip_reasoning(supporters[0].text), answer=winner, tally=dict(tally),
                      data=supporters[0].data)


@dataclass(slots=True)  # one per node: not frozen, as frozen fields cost a call each to set
class Job:
    """What a strategy combines: one node's responses and what it needs to write about them."""

    task: str
    instruction: str
    responses: Sequence[Response]
    seed: int
    aggregator: Agent
    grader: Grader
    answer_format: str | None = None
    schema: str | dict[str, Any] | None = None
    """The output's format: "json" or a JSON schema (None: text)."""
    max_tokens: int | None = None
    temperature: float | None = None
    """The aggregator's token limit and temperature (None: its own)."""
    on_text: Callable[[str], None] | None = None
    """Given the aggregator's text so far as it streams (the run's answer being written)."""
    context: str = ""
    """The conversation so far, which the experts saw too."""


class Aggregation(Protocol):
    """A way to turn a node's responses into its output text and parsed value."""

    name: Strategy
    uses_aggregator: bool
    """Whether it calls the aggregator LLM (a node then has an aggregator, and an ``aggregating`` phase)."""

    async def combine(self, job: Job, call: Call) -> tuple[str, Any]:
        """The output text and its parsed value (None without an output schema)."""


class Strongest:
    """``none``: the strongest expert's output as is."""

    name: Strategy = "none"
    uses_aggregator = False

    async def combine(self, job: Job, call: Call) -> tuple[str, Any]:
        """The strongest response, reasoning stripped."""
        return self.pick(job.responses, job.grader)

    @staticmethod
    def pick(responses: Sequence[Response], grader: Grader, task: str = "") -> tuple[str, Any]:
        """``combine`` without a job: this strategy calls no model (a node does not build one)."""
        best = ranked(responses)[0]
        return strip_reasoning(best.text), best.data


class Vote:
    """``vote``: the grader reads each answer and the majority wins; no LLM call."""

    name: Strategy = "vote"
    uses_aggregator = False

    async def combine(self, job: Job, call: Call) -> tuple[str, Any]:
        """The winning response (see ``vote``)."""
        return self.pick(job.responses, job.grader, job.task)

    @staticmethod
    def pick(responses: Sequence[Response], grader: Grader, task: str = "") -> tuple[str, Any]:
        """``combine`` without a job: this strategy calls no model (a node does not build one); the
        answers are read with the choices ``task`` lists, if it lists some (see ``choices_of``)."""
        winner = vote(responses, grader, choices_of(task))
        return winner.text, winner.data


class Synthesize:
    """``synthesize``: the aggregator merges every response (the Mixture-of-Agents prompt)."""

    name: Strategy = "synthesize"
    uses_aggregator = True
    prompt = staticmethod(synthesize_prompt)

    async def combine(self, job: Job, call: Call) -> tuple[str, Any]:
        """The aggregator's answer to the strategy's prompt."""
        request = job.aggregator.request(self.prompt(job.task, job.instruction, job.responses, job.answer_format,
                                                     job.context),
                                         seed=job.seed + 101, output="text" if job.schema is None else job.schema,
                                         max_tokens=job.max_tokens, temperature=job.temperature, on_text=job.on_text)
        [outcome] = await call([(job.aggregator.model, request)])
        if isinstance(outcome, Exception):
            raise outcome
        return strip_reasoning(outcome.text), _plain(outcome.parsed)


class Refine(Synthesize):
    """``refine``: the aggregator improves the strongest draft with the other answers as reviews."""

    name: Strategy = "refine"
    prompt = staticmethod(refine_prompt)


#: each strategy, by name (they hold no state: one of each serves every node)
STRATEGIES: dict[str, Strongest | Vote | Synthesize] = {
    "none": Strongest(), "vote": Vote(), "synthesize": Synthesize(), "refine": Refine()}


def strategy(name: Strategy, responses: int) -> Aggregation:
    """The strategy that combines ``responses`` answers: one answer needs no aggregator (a vote
    still reads it, so a vote's output is always an extracted answer)."""
    return STRATEGIES["none" if responses == 1 and name != "vote" else name]


#: the default answer: text, each agent's own token limit and temperature
TEXT_ANSWER = AnswerOptions()


def _plain(parsed: Any) -> Any:
    """A parsed output as JSON-ready data (a pydantic model dumped)."""
    return parsed.model_dump(mode="json") if hasattr(parsed, "model_dump") else parsed


class FinalSynthesis:
    """Merges the outputs of a plan's sink nodes into one answer with the aggregator."""

    def __init__(self, aggregator: Agent) -> None:
        self.aggregator = aggregator

    def request(self, task: str, inputs: Sequence[dict[str, Any]], *, seed: int, context: str = "",
                options: AnswerOptions = TEXT_ANSWER, on_text: Callable[[str], None] | None = None) -> ChatRequest:
        """The final request: the task and each sink's instruction and output, in the answer's format."""
        return self.aggregator.request(render("final.j2", task=task, inputs=list(inputs), context=context), seed=seed,
                                       output=options.output, max_tokens=options.max_tokens,
                                       temperature=options.temperature, on_text=on_text)

    @staticmethod
    def unsynthesized(outputs: Sequence[tuple[str, str]]) -> str:
        """The answer when the final call failed: each sink's output whole under its instruction
        (``outputs``: instruction and output pairs)."""
        return "\n\n".join(f"## {' '.join(instruction.split())}\n\n{output}" for instruction, output in outputs)

    async def answer(self, task: str, inputs: Sequence[dict[str, Any]], call: Call, *, seed: int,
                     context: str = "", options: AnswerOptions = TEXT_ANSWER,
                     on_text: Callable[[str], None] | None = None) -> str:
        """The run's answer, its JSON compact when the answer is JSON (an exception from the call is
        raised); ``on_text`` is given the answer so far as it streams."""
        request = self.request(task, inputs, seed=seed, context=context, options=options, on_text=on_text)
        [outcome] = await call([(self.aggregator.model, request)])
        if isinstance(outcome, Exception):
            raise outcome
        if options.output != "text":
            return json.dumps(_plain(outcome.parsed), ensure_ascii=False, separators=(",", ":"))
        return strip_reasoning(outcome.text)
