"""Planning: the planner's requests and repairs, small-planner safeguards, and the fallback.

A given plan runs as is; with planning off, or for a short single-sentence task (the fast path),
the task runs as one step. Otherwise the planner is asked for a JSON plan; an invalid one is sent
back with the problem (``plan_repairs`` times), a plan whose steps are not about the task runs as
one step (``plan_check``), and a plan that stays invalid fails the run or, with
``plan_fallback: single``, runs the task as one step.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from orchestra.dag import Dag
from orchestra.errors import InvalidOutput, PlanError
from orchestra.models import ChatRequest, ChatResult, Model
from orchestra.models.structured import follow_up
from orchestra.plan import Plan, PlanInvalid, parse_plan, plan_schema, validate_plan, without_method_names
from orchestra.prompts import render
from orchestra.settings import Settings

Call = Callable[[Sequence[tuple[Model, ChatRequest]]], Awaitable[list[ChatResult | Exception]]]
"""Sends calls for a run (through its ledger and the shared executor) and returns their outcomes."""


@dataclass(frozen=True)
class PlanOutcome:
    """A plan with its validated DAG, the planner attempts it took and a note for the user."""

    plan: Plan
    graph: Dag
    attempts: int
    note: str


class Planner:
    """Turns a task into a validated plan with the pool's planner model."""

    def __init__(self, model: Model) -> None:
        self.model = model

    async def plan(self, task: str, settings: Settings, call: Call, *, given: Plan | None = None,
                   context: str = "", on_attempt: Callable[[int], None] = lambda attempt: None) -> PlanOutcome:
        """The plan: given, single-step, or from the planner with repairs (``on_attempt`` hears of each request)."""
        if given is not None:
            return PlanOutcome(given, validate_plan(given, max_nodes=max(settings.max_nodes, len(given.subtasks))),
                               0, "given")
        if not settings.plan:
            return _single(task, 0, "planning off")
        if settings.fast_path and is_simple_task(task):
            return _single(task, 0, "simple task: one step, no planner call (fast path)")
        request = planner_request(task, max_nodes=settings.max_nodes, context=context, seed=settings.seed,
                                  max_tokens=settings.planner_max_tokens)
        problem = ""
        for attempt in range(1, settings.plan_repairs + 2):
            on_attempt(attempt)
            [outcome] = await call([(self.model, request)])
            if isinstance(outcome, InvalidOutput):  # a plan problem: worth a repair
                problem, answer = str(outcome), "(invalid JSON)"
            elif isinstance(outcome, Exception):  # HTTP or transport: not the plan's fault, never "repaired"
                raise outcome
            else:
                answer = outcome.text
                try:
                    plan = without_method_names(parse_plan(outcome.parsed))
                    # steps about something else are not mended by a repair: checked before the DAG
                    strays = ", ".join(off_topic_steps(plan, task, context) if settings.plan_check else [])
                    if strays:
                        return _single(task, attempt, f"the planner's steps ({strays}) were not about the task; "
                                                      "ran it as one step")
                    graph = validate_plan(plan, max_nodes=settings.max_nodes)
                except PlanInvalid as invalid:
                    problem = str(invalid)
                else:
                    return PlanOutcome(plan, graph, attempt, "planned as one step" if len(plan.subtasks) == 1 else "")
            request = repair_request(request, answer, problem)
        if settings.plan_fallback == "single":
            return _single(task, settings.plan_repairs + 1, f"planner failed ({problem}); ran the task as one step")
        raise PlanError(f"the planner's plan stayed invalid after {settings.plan_repairs} repair(s): {problem}")


def _single(task: str, attempts: int, note: str) -> PlanOutcome:
    single = Plan.single(task)
    return PlanOutcome(single, validate_plan(single), attempts, note)


def planner_request(task: str, *, max_nodes: int, context: str = "", seed: int = 0,
                    max_tokens: int = 1024) -> ChatRequest:
    """The first request to the planner."""
    prompt = render("planner.j2", task=task, max_nodes=max_nodes, context=context)
    return ChatRequest.user(prompt, temperature=0.0, seed=seed, max_tokens=max_tokens,
                            output=plan_schema(max_nodes, len(task)))


def repair_request(previous: ChatRequest, answer: str, problem: str) -> ChatRequest:
    """The follow-up that shows the planner its invalid plan and why, asking for a fixed one."""
    return follow_up(previous, answer, f"That plan is invalid: {problem}. Return the whole corrected plan as JSON. "
                                       "Every depends_on entry must be the id of another subtask, and there must "
                                       "be no cycles.")


# --- small-planner safeguards ---------------------------------------------------------------

_STOPWORDS = frozenset("""
a about above after again all also an and any are as at be been before being below between both but by can
could did do does doing done each few for from further give had has have having here how i if in into is it
its itself just list me more most my name no nor not now of off on once one only or other our out over own
say same she should so some state such task tell than that the their them then there these they this those
three through to too two under until up use very was we were what when where which while who whom why will
with would write you your
""".split())
_SEQUENCING = frozenset("then after afterwards finally first second third next later compare contrast versus vs "
                        "steps step before".split())
_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> set[str]:
    """The words of ``text`` that carry its subject: lower case, no stop words, a crude stem."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS}


def _stem(word: str) -> str:
    """Plural ``s`` dropped and the word cut to 7 letters: ``tides``/``tide``, ``planets``/``planetary``."""
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    return word[:7]


def is_simple_task(task: str, *, max_words: int = 12) -> bool:
    """A short, single-sentence task with no sequencing words: one step answers it, no planner call.

    ``"Why is the sky blue?"`` is simple; ``"Give two facts about the Moon, then say which matters
    most for tides."`` is not (``then``), nor is anything of several sentences.
    """
    words = _WORD.findall(task.lower())
    sentences = [s for s in re.split(r"[.?!;:\n]+", task) if s.strip()]
    return len(words) <= max_words and len(sentences) <= 1 and not _SEQUENCING.intersection(words)


#: how a user's hint for another plan is put to the planner (``with_replan_hint``)
_REPLAN_HINT = "The user asks for a different plan: "


def with_replan_hint(context: str, hint: str) -> str:
    """The context of a planner asked again for a different plan, with the user's ``hint``."""
    return f"{context}\n{_REPLAN_HINT}{hint}".strip()


def off_topic_steps(plan: Plan, task: str, context: str = "") -> list[str]:
    """The ids of the plan's steps that share no content word with the task (or the conversation).

    A small planner copies whatever example it saw; such a plan has no step about the task. An
    empty list means the plan is about the task, or the task has too few content words to judge.
    The words that ask for another plan are not the task's ("A different plan" passed as a step).
    """
    subject = content_words(task) | content_words(context.replace(_REPLAN_HINT, "\n"))
    if not subject:
        return []
    return [s.id for s in plan.subtasks if not content_words(f"{s.id} {s.instruction}") & subject]
