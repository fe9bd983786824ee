"""Plans: a task decomposed into a DAG of subtasks, validated before anything runs."""

from __future__ import annotations

import copy
import re
from typing import Any

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestra.models import ChatRequest
from orchestra.models.structured import follow_up
from orchestra.prompts import render

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"


class Subtask(BaseModel):
    """One node of a plan."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=ID_PATTERN, max_length=40)
    instruction: str = Field(min_length=1)
    depends_on: list[str] = Field(default_factory=list, max_length=12)
    skills: list[str] = Field(default_factory=list, max_length=5)


class Plan(BaseModel):
    """Subtasks with dependencies; must form a DAG."""

    model_config = ConfigDict(extra="ignore")

    subtasks: list[Subtask] = Field(min_length=1)

    @classmethod
    def single(cls, task: str) -> Plan:
        """The one-node plan: the task itself (the fast path, or ``plan=False``)."""
        return cls(subtasks=[Subtask(id="answer", instruction=task)])

    def by_id(self) -> dict[str, Subtask]:
        """Subtasks keyed by id."""
        return {s.id: s for s in self.subtasks}


class PlanInvalid(ValueError):
    """Why a plan is not a valid DAG; fed back to the planner on repair."""


def validate_plan(plan: Plan, *, max_nodes: int = 12) -> nx.DiGraph:
    """The plan as a DAG (edges dependency -> dependent); ``PlanInvalid`` says what is wrong."""
    if len(plan.subtasks) > max_nodes:
        raise PlanInvalid(f"the plan has {len(plan.subtasks)} subtasks; at most {max_nodes} are allowed")
    ids: set[str] = set()
    for subtask in plan.subtasks:
        if subtask.id in ids:
            raise PlanInvalid(f"duplicate subtask id {subtask.id!r}")
        ids.add(subtask.id)
    edges = []
    for subtask in plan.subtasks:
        for dependency in subtask.depends_on:
            if dependency not in ids:
                raise PlanInvalid(f"subtask {subtask.id!r} depends on unknown subtask {dependency!r}")
            if dependency == subtask.id:
                raise PlanInvalid(f"subtask {subtask.id!r} depends on itself")
            edges.append((dependency, subtask.id))
    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(s.id for s in plan.subtasks)
    graph.add_edges_from(edges)
    if nx.is_directed_acyclic_graph(graph):
        return graph
    cycle = nx.find_cycle(graph)
    path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
    raise PlanInvalid(f"the dependencies form a cycle: {path}")


def plan_schema(max_nodes: int) -> dict[str, Any]:
    """The JSON schema the planner must follow, with the node limit built in.

    Strings and lists are bounded too, so a grammar-constrained local model cannot ramble past
    its token limit and leave the JSON unfinished.
    """
    schema = copy.deepcopy(Plan.model_json_schema())
    schema["properties"]["subtasks"]["maxItems"] = max_nodes
    subtask = schema["$defs"]["Subtask"]["properties"]
    subtask["instruction"]["maxLength"] = 240
    subtask["depends_on"]["maxItems"] = max_nodes
    subtask["depends_on"]["items"]["maxLength"] = 40
    subtask["skills"]["maxItems"] = 3
    subtask["skills"]["items"]["maxLength"] = 30
    return schema


def parse_plan(value: Any) -> Plan:
    """A ``Plan`` from the planner's parsed JSON; ``PlanInvalid`` if it does not fit the schema."""
    try:
        return Plan.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise PlanInvalid(f"{where}: {first['msg']}") from None


def planner_request(task: str, *, max_nodes: int, context: str = "", seed: int = 0,
                    max_tokens: int = 1024) -> ChatRequest:
    """The first request to the planner."""
    prompt = render("planner.j2", task=task, max_nodes=max_nodes, context=context)
    return ChatRequest.user(prompt, temperature=0.0, seed=seed, max_tokens=max_tokens,
                            output=plan_schema(max_nodes))


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


def off_topic_steps(plan: Plan, task: str, context: str = "") -> list[str]:
    """The ids of the plan's steps that share no content word with the task (or the conversation).

    A small planner copies whatever example it saw; such a plan has no step about the task. An
    empty list means the plan is about the task, or the task has too few content words to judge.
    """
    subject = content_words(task) | content_words(context)
    if not subject:
        return []
    return [s.id for s in plan.subtasks if not content_words(f"{s.id} {s.instruction}") & subject]


def about_the_task(plan: Plan, task: str, context: str = "") -> bool:
    """Whether every step of the plan shares content with the task (see ``off_topic_steps``); the
    planner is asked to write each instruction in the task's own words."""
    return not off_topic_steps(plan, task, context)
