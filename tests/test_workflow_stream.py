"""A data-set workflow streams its items through a bounded window of runs, and its report is the
same whatever the window and the order in which the runs finish."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import scripted_pool

from orchestra import Budget, Orchestra
from orchestra.errors import ConfigError
from orchestra.events import Event, RunDone, RunStarted
from orchestra.models import ChatRequest
from orchestra.workflow import Workflow
from orchestra.workflow_run import aevaluate_workflow

FLOW = ("pool: pool.yaml\ninputs:\n  question: {type: string}\n"
        "steps:\n  - id: answer\n    prompt: 'Q: {{ inputs.question }}'\n    agent: agent0\n"
        "dataset: {path: qa.jsonl}\n")


def report_of(tmp_path: Path, window: int | None, **settings: Any) -> tuple[dict[str, Any], int]:
    """The report of the data set with ``window`` runs at most in flight, and the most that were."""
    (tmp_path / "qa.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                    "category": ("slow", "b", "a")[min(i, 2)]}) + "\n" for i in range(7)))
    (tmp_path / "flow.yaml").write_text(FLOW)

    async def expert(name: str, request: ChatRequest) -> str:
        prompt = request.prompt_text()
        if "What is 0 + 1?" in prompt:
            await asyncio.sleep(0.2)  # the first item finishes last
        number = int(prompt.split("What is ")[1].split(" +")[0])
        return f"The answer is {number + 1 if number != 3 else 0}"  # item q3 is wrong

    pool, _ = scripted_pool(1, expert=expert)  # (an async expert function: awaited by the test double)
    live = {"now": 0, "most": 0}

    def count(event: Event) -> None:
        if isinstance(event, RunStarted):
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
        elif isinstance(event, RunDone):
            live["now"] -= 1

    flow = Workflow.load(tmp_path / "flow.yaml", pool=pool)
    orc = Orchestra(pool, store=False, on_event=count, **settings)
    report = asyncio.run(aevaluate_workflow(flow, {}, orchestra=orc, window=window)).to_json()
    for row in report["answers"]:
        row.pop("run_id")
    report.pop("elapsed_s")
    return report, live["most"]


def test_a_data_set_workflow_streams_through_its_window_and_reports_in_data_set_order(tmp_path: Path) -> None:
    streamed, most = report_of(tmp_path, window=2)
    assert most == 2  # never more runs than the window, though the first is slow
    whole, most_at_once = report_of(tmp_path, window=None)
    # the data set shares a budget (the default one): until a run has ended, nothing is known of
    # what a run costs, so the first runs alone; then the six others go at once
    assert most_at_once == 6
    assert streamed == whole
    unbounded, most_at_once = report_of(tmp_path, window=None,
                                        budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))
    assert most_at_once == 7 and unbounded == whole  # a budget without limits does not hold runs back
    assert list(streamed["per_category"]) == ["slow", "b", "a"]  # data-set order, not completion order
    assert [(a["id"], a["correct"]) for a in streamed["answers"]] == [(f"q{i}", i != 3) for i in range(7)]
    assert streamed["items"] == 7 and streamed["correct"] == 6 and streamed["failed"] == 0


def test_an_input_the_data_set_sets_per_item_is_refused_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text(json.dumps({"id": "q0", "question": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp_path / "flow.yaml").write_text(FLOW)
    pool, _ = scripted_pool(1)
    flow = Workflow.load(tmp_path / "flow.yaml", pool=pool)
    with pytest.raises(ConfigError, match="input 'question' is set from each item of the data set; leave it out"):
        asyncio.run(aevaluate_workflow(flow, {"question": "hi"}, orchestra=Orchestra(pool, store=False)))
    (tmp_path / "flow.yaml").write_text(FLOW.replace("question: {type: string}", "question: {type: integer}"))
    with pytest.raises(ConfigError, match=r"flow.yaml:3:20: the input 'question' of a workflow with a dataset is each "
                                          "item's question, which is text: declare it as type string"):
        Workflow.load(tmp_path / "flow.yaml", pool=pool)  # (validate said ok; every item then failed)
