"""Plans: a task decomposed into a DAG of subtasks, validated before anything runs."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestra.dag import Dag

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"
MAX_SKILLS = 5
"""The most skills a subtask (or a workflow step) may name."""


#: the one node of a run without a plan
SINGLE_NODE = "answer"


class Subtask(BaseModel):
    """One node of a plan."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=ID_PATTERN, max_length=40)
    instruction: str = Field(min_length=1)
    #: (a workflow's step may merge any number of steps; the planner's schema caps a planner's)
    depends_on: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list, max_length=MAX_SKILLS)


class Plan(BaseModel):
    """Subtasks with dependencies; must form a DAG."""

    model_config = ConfigDict(extra="ignore")

    subtasks: list[Subtask] = Field(min_length=1)

    @classmethod
    def single(cls, task: str) -> Plan:
        """The one-node plan: the task itself (the fast path, or ``plan=False``)."""
        return cls(subtasks=[Subtask(id=SINGLE_NODE, instruction=task)])

    def by_id(self) -> dict[str, Subtask]:
        """Subtasks keyed by id."""
        return {s.id: s for s in self.subtasks}


#: names a template reads as the dict's method (``steps.items()`` in a workflow's ``final``)
TEMPLATE_METHODS = frozenset(name for name in dir(dict) if not name.startswith("_"))


def without_method_names(plan: Plan) -> Plan:
    """``plan`` with each subtask the planner named as a dict method (``items``, ``get``...) renamed
    ``items-step``: in a template a step's name comes before the method, so ``steps.items()`` in a
    ``final`` would call the step."""
    taken = {subtask.id for subtask in plan.subtasks}
    renamed: dict[str, str] = {}
    for subtask in plan.subtasks:
        if subtask.id in TEMPLATE_METHODS:
            new, number = f"{subtask.id}-step", 2
            while new in taken:
                new, number = f"{subtask.id}-step{number}", number + 1
            renamed[subtask.id] = new
            taken.add(new)
    if not renamed:
        return plan
    return Plan(subtasks=[subtask.model_copy(update={"id": renamed.get(subtask.id, subtask.id),
                                                     "depends_on": [renamed.get(d, d) for d in subtask.depends_on]})
                          for subtask in plan.subtasks])


class PlanInvalid(ValueError):
    """Why a plan is not a valid DAG; fed back to the planner on repair."""


def validate_plan(plan: Plan, *, max_nodes: int = 12) -> Dag:
    """The plan as a DAG (edges dependency -> dependent); ``PlanInvalid`` says what is wrong."""
    subtasks = plan.subtasks
    if len(subtasks) > max_nodes:
        raise PlanInvalid(f"the plan has {len(subtasks)} subtasks; at most {max_nodes} are allowed")
    dependencies = {subtask.id: subtask.depends_on for subtask in subtasks}
    # checked in bulk (a given plan can have thousands of nodes); what is wrong is then found one by one
    if len(dependencies) < len(subtasks) or not dependencies.keys() >= set().union(*dependencies.values()):
        _name_problem(subtasks)
    graph = Dag(dependencies)
    try:
        graph.order()
    except ValueError:
        _name_problem(subtasks)  # a subtask that depends on itself is named as such, not as a cycle
        raise PlanInvalid(f"the dependencies form a cycle: {' -> '.join(graph.cycle() or [])}") from None
    return graph


def _name_problem(subtasks: list[Subtask]) -> None:
    """Raise ``PlanInvalid`` for the first duplicate id, unknown dependency or self-dependency."""
    ids: set[str] = set()
    for subtask in subtasks:
        if subtask.id in ids:
            raise PlanInvalid(f"duplicate subtask id {subtask.id!r}")
        ids.add(subtask.id)
    for subtask in subtasks:
        for dependency in subtask.depends_on:
            if dependency not in ids:
                raise PlanInvalid(f"subtask {subtask.id!r} depends on unknown subtask {dependency!r}")
            if dependency == subtask.id:
                raise PlanInvalid(f"subtask {subtask.id!r} depends on itself")


#: the most characters of a planned step's instruction (a task's own, as one step, may be longer)
INSTRUCTION_CHARS = 240


def plan_schema(max_nodes: int, task_chars: int = 0) -> dict[str, Any]:
    """The JSON schema the planner must follow, with the node limit built in.

    Strings and lists are bounded too, so a grammar-constrained local model cannot ramble past
    its token limit and leave the JSON unfinished; an instruction may be as long as the task
    (``task_chars``), which the planner is told to return as the one step of a simple task.
    """
    schema = _without_descriptions(copy.deepcopy(Plan.model_json_schema()))
    schema["properties"]["subtasks"]["maxItems"] = max_nodes
    subtask = schema["$defs"]["Subtask"]["properties"]
    subtask["instruction"]["maxLength"] = max(INSTRUCTION_CHARS, task_chars)
    subtask["depends_on"]["maxItems"] = max_nodes
    subtask["depends_on"]["items"]["maxLength"] = 40
    subtask["skills"]["maxItems"] = 3
    subtask["skills"]["items"]["maxLength"] = 30
    return schema


def _without_descriptions(schema: Any) -> Any:
    """The schema without its descriptions (the models' docstrings): a small planner copied "One node of
    a plan" as a step, where its prompt holds no example text to copy."""
    if isinstance(schema, dict):
        return {key: _without_descriptions(value) for key, value in schema.items()
                if not (key == "description" and isinstance(value, str))}  # (a field so named is a dict)
    if isinstance(schema, list):
        return [_without_descriptions(value) for value in schema]
    return schema


def parse_plan(value: Any) -> Plan:
    """A ``Plan`` from the planner's parsed JSON; ``PlanInvalid`` if it does not fit the schema."""
    try:
        return Plan.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise PlanInvalid(f"{where}: {first['msg']}") from None
