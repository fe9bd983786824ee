"""Unit tests of orchestra.workflow's load-time checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestra import Agent, Pool
from orchestra.errors import ConfigError
from orchestra.models import FunctionModel
from orchestra.prompts import MAX_TASK_CHARS, MAX_TEMPLATE_OUTPUT
from orchestra.workflow import Workflow


@pytest.fixture
def pool() -> Pool:
    return Pool(agents=[Agent(name="writer", model=FunctionModel(lambda request: "The answer is 1", name="m"))])


DATASET_FLOW = "inputs:\n  question: {type: string}\ndataset: {path: gone.jsonl}\nsteps:\n  - id: a\n    prompt: '{{ inputs.question }}'\n"


def test_a_recorded_workflow_loads_without_its_data_set(tmp_path: Path, pool: Pool) -> None:
    path = tmp_path / "wf.yaml"
    with pytest.raises(ConfigError, match="data set not found"):
        path.write_text(DATASET_FLOW)
        Workflow.load(path, pool=pool)
    assert Workflow.load(path, pool=pool, text=DATASET_FLOW).spec.dataset is not None  # (a run's record)
    assert Workflow.load(path, pool=pool, data=False).spec.dataset is not None


def test_a_cycle_is_placed_at_the_needs_of_the_step_that_closes_it(tmp_path: Path, pool: Pool) -> None:
    text = ("steps:\n  - id: a\n    prompt: hi\n    needs: [c]\n  - id: b\n    prompt: hi\n    needs: [a]\n"
            "  - id: c\n    prompt: hi\n    needs: [b]\n")
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        Workflow.load(path, pool=pool)
    message = str(raised.value)
    assert "form a cycle" in message
    cycle = message.split("cycle: ")[1].split(" -> ")
    closing = "abc".index(cycle[1])  # the step whose needs close it: its needs line is reported
    assert message.startswith(f"{path}:{[4, 7, 10][closing]}:")


@pytest.mark.parametrize(("where", "limit"), [("task", MAX_TASK_CHARS), ("prompt", MAX_TEMPLATE_OUTPUT)])
def test_a_template_of_exactly_its_limit_loads_and_one_character_more_is_refused(tmp_path: Path, pool: Pool,
                                                                                  where: str, limit: int) -> None:
    def flow(size: int) -> str:
        if where == "task":
            return f"plan: auto\ntask: {'x' * size}\n"
        return f"steps:\n  - id: a\n    prompt: {'x' * size}\n"

    path = tmp_path / "wf.yaml"
    path.write_text(flow(limit))
    Workflow.load(path, pool=pool)
    path.write_text(flow(limit + 1))
    with pytest.raises(ConfigError, match="shorten it"):
        Workflow.load(path, pool=pool)
