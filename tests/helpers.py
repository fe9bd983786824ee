"""Builders shared by the tests: pools of scripted experts and canned planner answers."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from typing import Any

from orchestra import Agent, Pool
from orchestra.models import ChatRequest, FunctionModel
from orchestra.settings import Settings

PLANNER_MARK = "Break the task"
KEYWORDS_MARK = "school subjects or skills"
AGGREGATE_MARK = "responses from several experts"
FINAL_MARK = "was split into steps"


def kind_of(request: ChatRequest) -> str:
    """Which pipeline stage a request comes from, judged by its prompt template."""
    prompt = request.prompt_text()
    for mark, kind in ((PLANNER_MARK, "plan"), (KEYWORDS_MARK, "keywords"), (AGGREGATE_MARK, "aggregate"),
                       (FINAL_MARK, "final")):
        if mark in prompt:
            return kind
    return "expert"


def plan_json(*nodes: tuple[str, list[str]] | tuple[str, list[str], list[str]]) -> dict[str, Any]:
    """A planner answer: ``("id", [deps])`` or ``("id", [deps], [skills])`` per node."""
    subtasks = []
    for node in nodes:
        node_id, deps = node[0], node[1]
        skills = node[2] if len(node) > 2 else ["general"]  # type: ignore[misc]
        subtasks.append({"id": node_id, "instruction": f"do {node_id}", "depends_on": deps, "skills": skills})
    return {"subtasks": subtasks}


def scripted_pool(n_models: int = 4, *, plan: dict[str, Any] | None = None,
                  expert: Callable[[str, ChatRequest], Any] | None = None,
                  keywords: list[str] | None = None, **pool_options: Any) -> tuple[Pool, dict[str, FunctionModel]]:
    """A pool of ``n_models`` agents, one model each, plus a planner/keyword model named ``planner``."""

    def control(request: ChatRequest) -> Any:
        kind = kind_of(request)
        if kind == "plan":
            return plan or plan_json(("answer", []))
        if kind == "keywords":
            return {"keywords": keywords or ["general"]}
        return "The answer is 1"

    models = {f"m{i}": FunctionModel(
        (lambda name: lambda request: expert(name, request) if expert and kind_of(request) == "expert"
         else f"{name}: The answer is 1")(f"m{i}"), name=f"m{i}") for i in range(n_models)}
    planner = FunctionModel(control, name="planner")
    agents = [Agent(name=f"agent{i}", model=models[f"m{i}"]) for i in range(n_models)]
    models["planner"] = planner
    # the scripted plans are abstract ("do a"): the planner safeguards for small models stay off unless asked
    pool_options.setdefault("settings", Settings(fast_path=False, plan_check=False))
    return Pool(agents=agents, planner=planner, **pool_options), models


def single_agent_pool(model: FunctionModel) -> Pool:
    """One agent on ``model``, which also plans and extracts keywords."""
    return Pool(agents=[Agent(name="solo", model=model)])


def wait_for(child: subprocess.Popen[str], condition: Callable[[], bool], what: str) -> None:
    """Block until ``condition()`` holds while ``child`` runs; fail (naming ``what``) if the child
    ends first or it takes longer than two minutes (a guard against hanging, not a timing check)."""
    for _ in range(12_000):
        if condition():
            return
        if child.poll() is not None:
            _, err = child.communicate()
            raise AssertionError(f"the process ended (exit {child.returncode}) before {what}: {err[-2000:]}")
        threading.Event().wait(0.01)
    child.kill()
    raise AssertionError(f"waited two minutes for {what}")


class Slots:
    """A placement of ``count`` equal slots, one engine each; an engine is its own stand-in."""

    def __init__(self, count: int) -> None:
        self.count = count

    def engine(self, model: Any) -> Any:
        return model

    def fits(self, resident: Any, engine: Any) -> bool:
        return len(resident) < self.count
