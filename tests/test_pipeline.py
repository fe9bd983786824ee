"""The pipeline end to end on test doubles: plan, recruit, batch, aggregate, events, budgets."""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import kind_of, plan_json, scripted_pool
from pydantic import BaseModel

from orchestra import Agent, Budget, NodeSettings, Orchestra, Plan, Pool
from orchestra.errors import BadResponse, ConfigError
from orchestra.events import AggregationFellBack, BatchStarted, Event, NodeFailed, NodeSkipped, UsageUpdated
from orchestra.hints import run_hint
from orchestra.models import ChatRequest, FunctionModel
from orchestra.result import RunResult
from orchestra.settings import AnswerOptions
from orchestra.store import RunStore
from orchestra.workflow import Workflow


def test_dag_order_is_respected_and_nodes_see_their_dependencies() -> None:
    seen: list[tuple[str, str]] = []

    def expert(name: str, request: ChatRequest) -> str:
        prompt = request.prompt_text()
        node = prompt.split("Your assignment: do ")[1].split("\n")[0].strip()
        seen.append((node, prompt))
        return f"result of {node}"

    plan = plan_json(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))
    pool, _ = scripted_pool(plan=plan, expert=expert)
    result = Orchestra(pool, k=2, aggregate="none").run("diamond task")
    assert result.status == "done"
    order = [node for node, _ in seen]
    first = {node: order.index(node) for node in "abcd"}
    last = {node: len(order) - 1 - order[::-1].index(node) for node in "abcd"}
    assert last["a"] < first["b"] and last["a"] < first["c"]
    assert max(last["b"], last["c"]) < first["d"]
    d_prompt = next(p for node, p in seen if node == "d")
    assert "[b] do b\nresult of b" in d_prompt and "[c] do c\nresult of c" in d_prompt
    assert "result of a" not in d_prompt  # only direct dependencies are shown
    assert result.answer == "result of d"


def test_independent_nodes_overlap_in_time() -> None:
    started: set[str] = set()
    both = asyncio.Event()

    async def expert(request: ChatRequest) -> str:
        if kind_of(request) != "expert":
            return "The answer is 1"
        node = request.prompt_text().split("Your assignment: do ")[1].split("\n")[0]
        started.add(node)
        if {"left", "right"} <= started:
            both.set()
        await asyncio.wait_for(both.wait(), timeout=10)  # only returns if the other node is running too
        return f"{node} done"

    model = FunctionModel(expert, name="shared")
    plan = plan_json(("left", []), ("right", []), ("join", ["left", "right"]))
    pool, _ = scripted_pool(plan=plan)
    for agent in pool.agents:
        agent.model = model
    result = Orchestra(pool, k=1).run("two branches")
    assert result.status == "done", result.error
    assert result.node("left").output == "left done" and result.node("right").output == "right done"


def test_twenty_instances_batch_once_per_model_per_phase() -> None:
    events: list[Event] = []
    pool, models = scripted_pool(4)
    orc = Orchestra(pool, k=3, seed=7, on_event=events.append)
    results = orc.run_many([f"question {i}" for i in range(20)])
    assert all(r.status == "done" for r in results)
    batches = [(e.wave, e.model, e.size) for e in events if isinstance(e, BatchStarted)]
    waves = sorted({wave for wave, _, _ in batches})
    assert waves == [1, 2, 3]
    assert [(m, n) for w, m, n in batches if w == 1] == [("planner", 100)]  # 20 questions x 5 keyword samples
    expert_wave = [(m, n) for w, m, n in batches if w == 2]
    expert_models = [m for m, _ in expert_wave]
    assert len(expert_models) == len(set(expert_models)) >= 2  # exactly one batch per model
    assert sum(n for _, n in expert_wave) == 60
    used = {pool[e].model.name for r in results for e in r.node("answer").experts}
    assert set(expert_models) == used
    assert [(m, n) for w, m, n in batches if w == 3] == [(orc.stages.staffing.aggregator.model.name, 20)]
    assert all(len(models[m].batches) == 1 + (m == orc.stages.staffing.aggregator.model.name) for m in used)


def test_cyclic_plan_is_repaired() -> None:
    answers = iter([plan_json(("a", ["b"]), ("b", ["a"])), plan_json(("a", []), ("b", ["a"]))])

    def control(request: ChatRequest) -> object:
        return next(answers) if kind_of(request) == "plan" else "The answer is 1"

    pool, _ = scripted_pool()
    pool.planner = pool.keyword_model = FunctionModel(control, name="planner")
    result = Orchestra(pool, k=1).run("needs a repair")
    assert result.status == "done" and result.plan.attempts == 2
    repair = pool.planner.requests[1].prompt_text()
    assert "cycle: a -> b -> a" in repair or "cycle: b -> a -> b" in repair


def test_plan_that_stays_invalid_is_refused_clearly() -> None:
    """It counts the planner's attempts too (`ask --json` said `"attempts": 0` after 2 planner calls)."""
    pool, _ = scripted_pool(plan=plan_json(("a", ["ghost"])))
    result = Orchestra(pool, plan_repairs=1).run("bad planner")
    assert result.status == "failed" and result.answer is None
    assert result.plan.attempts == 2 == len(pool.planner.requests)
    assert result.error == ("the planner's plan stayed invalid after 1 repair(s): "
                            "subtask 'a' depends on unknown subtask 'ghost'")


def test_plan_fallback_runs_the_task_as_one_step() -> None:
    pool, _ = scripted_pool(plan={"subtasks": []})
    result = Orchestra(pool, plan_repairs=0, plan_fallback="single", k=1).run("simple")
    assert result.status == "done" and [n.id for n in result.plan.nodes] == ["answer"]
    assert "planner failed" in result.plan.note


def test_oversized_and_duplicate_plans_are_rejected() -> None:
    big = plan_json(*[(f"n{i}", []) for i in range(5)])
    pool, _ = scripted_pool(plan=big)
    assert "at most 3" in Orchestra(pool, max_nodes=3, plan_repairs=0).run("x").error
    dup = plan_json(("a", []), ("a", []))
    pool, _ = scripted_pool(plan=dup)
    assert "duplicate subtask id 'a'" in Orchestra(pool, plan_repairs=0).run("x").error


def test_failing_node_skips_dependents_and_says_why() -> None:
    def expert(name: str, request: ChatRequest) -> object:
        if "do broken" in request.prompt_text():
            return BadResponse("simulated endpoint failure")
        return "fine"

    events: list[Event] = []
    plan = plan_json(("ok", []), ("broken", []), ("after", ["broken"]), ("later", ["after"]), ("side", ["ok"]))
    pool, _ = scripted_pool(plan=plan, expert=expert)
    result = Orchestra(pool, k=2, on_event=events.append).run("partly broken")
    assert result.status == "partial"
    assert result.node("broken").status == "failed"
    assert "every expert failed; first error: simulated endpoint failure" in result.node("broken").error
    assert result.node("after").status == "skipped" and result.node("later").status == "skipped"
    assert result.node("after").error == "skipped: dependency 'broken' failed"
    assert result.node("side").status == "done" and result.answer
    assert "broken: every expert failed" in result.error
    assert sum(isinstance(e, NodeFailed) for e in events) == 1
    assert sum(isinstance(e, NodeSkipped) for e in events) == 2


def test_budget_stops_dispatch_and_says_how_to_raise_it() -> None:
    pool, models = scripted_pool(plan=plan_json(("a", []), ("b", ["a"])))
    result = Orchestra(pool, k=3, budget=Budget(max_calls=4)).run("expensive")
    assert result.status == "budget_exceeded"
    assert result.error.startswith("budget max_calls=4 reached") and "--max-calls" not in result.error  # library words
    assert f"`orchestra resume {result.run_id} --max-calls N`, N above it, goes on with it" in run_hint(result)
    sent = sum(len(m.requests) for m in models.values())
    assert sent == 4 and result.usage.calls == 4


def test_cost_budget_reserves_worst_case_before_dispatch() -> None:
    pool, models = scripted_pool(plan=plan_json(("a", [])))
    for model in models.values():
        model.price = model.price.model_copy(update={"input": 1000.0, "output": 1000.0})
    result = Orchestra(pool, budget=Budget(max_cost_usd=0.5)).run("pricey")
    assert result.status == "budget_exceeded" and "max_cost_usd=0.5" in result.error
    assert sum(len(m.requests) for m in models.values()) == 0
    # nothing was spent: the message says why the budget is reached (it read "reached ($0.0000 spent)")
    assert re.fullmatch(r"budget max_cost_usd=0\.5 is less than the next call alone may need \(\$0\.0000 spent, the next call may cost \$(\d+\.\d{4}): "
                        r"\d+ tokens of prompt and up to \d+ of answer\)", result.error), result.error


def test_events_and_result_json_shape() -> None:
    events: list[Event] = []
    pool, _ = scripted_pool(plan=plan_json(("a", []), ("b", []), ("c", ["a", "b"])))
    result = Orchestra(pool, k=2, on_event=events.append).run("shape")
    data = json.loads(result.dumps())
    assert set(data) >= {"answer", "plan", "usage", "batches", "model_loads", "elapsed_s"}
    assert set(data["plan"]["nodes"][0]) >= {"id", "instruction", "depends_on", "experts", "aggregator"}
    assert set(data["usage"]) >= {"calls", "prompt_tokens", "completion_tokens", "cost_usd"}
    assert all(set(b) >= {"model", "size"} for b in data["batches"])
    kinds = [e.kind for e in events]
    for kind in ("run_started", "plan_ready", "node_ready", "experts_recruited", "batch_started",
                 "batch_finished", "node_done", "run_done"):
        assert kind in kinds
    assert kinds.index("plan_ready") < kinds.index("node_ready") < kinds.index("node_done") < kinds.index("run_done")
    explanation = result.node("a").recruitment["explanation"]
    *chosen, note, aggregator = explanation  # an unprofiled pool: the paper's draw, a note saying so, the aggregator
    assert chosen and all(line.startswith("agent") for line in chosen)
    assert note.startswith("no agent has a measured profile: drawn as symbolic-moe does")
    assert aggregator == (f"aggregator {result.node('a').aggregator}: nothing measured (run orchestra profile): the "
                          "last agent by name")
    batch_events = [e for e in events if isinstance(e, BatchStarted)]
    assert sum(e.size for e in batch_events) == result.usage.calls


def test_given_plan_and_no_plan_fast_paths() -> None:
    pool, models = scripted_pool()
    orc = Orchestra(pool, k=1)
    plan = Plan.model_validate(plan_json(("x", []), ("y", ["x"])))
    assert [n.id for n in orc.run("given", plan=plan).plan.nodes] == ["x", "y"]
    result = orc.run("no planning", plan=False)
    assert [n.id for n in result.plan.nodes] == ["answer"] and result.plan.note == "planning off"
    assert not any(kind_of(r) == "plan" for r in models["planner"].requests)


def test_vote_refine_and_none_strategies() -> None:
    answers = {"m0": "The answer is 7", "m1": "The answer is 7", "m2": "The answer is 9", "m3": "The answer is 9"}
    pool, _ = scripted_pool(expert=lambda name, request: answers[name])
    orc = Orchestra(pool, k=4, mode="topk", plan=False)
    voted = orc.run("vote please", aggregate="vote")
    assert voted.answer in ("The answer is 7", "The answer is 9")
    assert voted.usage.calls == 5 + 4  # keywords + experts, no aggregator call
    refined = orc.run("refine please", aggregate="refine")
    assert refined.node("answer").aggregator is not None and refined.status == "done"
    plain = orc.run("no aggregation", aggregate="none")
    assert plain.answer in answers.values()


def test_unknown_options_are_clear() -> None:
    pool, _ = scripted_pool()
    with pytest.raises(ConfigError, match="setting mode: unknown value 'best'; choose one of 'calibrated', 'symbolic-moe', "):
        Orchestra(pool, mode="best")
    with pytest.raises(ConfigError, match="setting aggregate: unknown value 'magic'"):
        Orchestra(pool, aggregate="magic")
    with pytest.raises(ConfigError, match="run setting k: Input should be greater than or equal to 1"):
        Orchestra(pool).run("x", k=0)
    with pytest.raises(ConfigError, match="the task is empty"):
        Orchestra(pool).run("  ")


async def _async_listener(event: Event) -> None:
    pass


class _AsyncCallable:
    async def __call__(self, event: Any) -> None:
        pass


async def _first(results: Any) -> Any:
    async for item in results:
        return item


class City(BaseModel):
    name: str


async def _async_tasks() -> AsyncIterator[str]:
    yield "q?"


@pytest.mark.parametrize("make, problem", [
    (lambda pool: Orchestra(123), "pool must be a Pool, a pool file's path or None (the embedded default), not int 123"),
    (lambda pool: Orchestra(pool, [1, 2]), "settings must be a Settings or a mapping of setting names to values, "
                                           "not list [1, 2]"),
    (lambda pool: Orchestra(pool, on_event=5), "on_event must be a plain function that takes an event, not int 5"),
    (lambda pool: Orchestra(pool, on_event=_async_listener), "on_event must be a plain function that takes an "
     "event, not an async function: it is called, not awaited; hand what it gets to your own task"),
    # (an object whose __call__ is async was never awaited; a string or None counted an error per event)
    (lambda pool: Orchestra(pool, on_event=_AsyncCallable()), "on_event must be a plain function that takes an "
     "event, not an async function: it is called, not awaited; hand what it gets to your own task"),
    (lambda pool: Orchestra(pool).events.subscribe(_AsyncCallable()), "an event listener must be a plain "
     "function, not an async one: it is called, not awaited; hand what it gets to your own task (an asyncio.Queue)"),
    (lambda pool: Orchestra(pool).events.subscribe("print"), "an event listener must be a plain function, not str "
     "'print'"),
    (lambda pool: Orchestra(pool).events.subscribe(None), "an event listener must be a plain function, not "
     "NoneType None"),
    (lambda pool: Orchestra(pool, store=5), "store must be a RunStore, a path, None ($ORCHESTRA_HOME/runs.db, else "
                                            "~/.orchestra/runs.db) or False (no record), not int 5"),
    (lambda pool: Orchestra(pool, store=""), "store must be a RunStore, a path, None ($ORCHESTRA_HOME/runs.db, else "
                                             "~/.orchestra/runs.db) or False (no record), not str ''"),
    # a nested setting given at the top said only "see orchestra.Settings"
    (lambda pool: Orchestra(pool, store=False, competence_weight=0), "unknown setting 'competence_weight'; it is a "
                                                                      "recruit setting: recruit={'competence_weight': ...}"),
    (lambda pool: Orchestra(pool, store=False).run("x?", cost_lambda=1), "unknown setting 'cost_lambda'; it is a "
                                                                         "recruit setting: recruit={'cost_lambda': ...}"),
    # (in settings=, the --set form was named, "budget.max_calls", which settings= refuses)
    (lambda pool: Orchestra(pool, store=False, settings={"max_calls": 3}),
     "setting max_calls: no such setting; it is a budget setting: budget: {max_calls: ...}"),
    # a Python mistake that was an AttributeError
    (lambda pool: Pool(agents=["a"]), "a pool's agents are Agent objects, not str ('a'): Agent(name=..., model=...)"),
    (lambda pool: Workflow.load("wf.yaml", pool="spool.yaml"), "pool must be a Pool, not str: Pool.load('spool.yaml') "
                                                               "reads a pool file"),
    # a callback that is not one cost the run's requests before it failed; an async one was never awaited
    (lambda pool: Orchestra(pool, store=False).run("x?", on_answer_text="print"),
     "on_answer_text must be a plain function that takes the answer's text so far, not str 'print'"),
    (lambda pool: Orchestra(pool, store=False).run("x?", on_answer_text=_async_listener),
     "on_answer_text must be a plain function that takes the answer's text so far, not an async function: it is "
     "called, not awaited; hand what it gets to your own task"),
    (lambda pool: asyncio.run(_first(Orchestra(pool, store=False).arun_iter(["x?"], on_stopped=5))),
     "on_stopped must be a plain function that takes (index, result), not int 5"),
    (lambda pool: Orchestra(pool, store=False).run("x?", final="{answer}"),  # (called after the calls: paid, failed)
     "final must be a plain function that takes the nodes' outputs, not str '{answer}'"),
    # an answer option that does not hold was pydantic's error naming RunSpec, a class the caller never named
    (lambda pool: Orchestra(pool, store=False).run("x?", answer={"output": "yaml"}),
     "answer.output: must be 'text', 'json' or a JSON schema, not 'yaml'"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer={"max_tokens": 0}),
     "answer.max_tokens: Input should be greater than or equal to 1"),
    # (an unknown answer option was named "no such setting", and would be given settings as the closest)
    (lambda pool: Orchestra(pool, store=False).run("x?", answer={"outptu": "json"}),
     "answer.outptu: no such option; did you mean 'output'?"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer={"nonsense": 1}),
     "answer.nonsense: no such option; the closest are 'max_tokens', 'temperature', 'output'"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer="json"),
     "answer must be AnswerOptions or its fields as a dict ({'output': 'json'}), not str 'json'"),
    (lambda pool: Orchestra(pool, store=False).run("x?", context=5), "context must be text, not int 5"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer_format=b"End"),
     "answer_format must be text, not bytes b'End'"),
    (lambda pool: Orchestra(pool, store=False).run("x?", meta=[1, 2]),
     "meta must be a dict of names to JSON-ready values, not list [1, 2]"),
    (lambda pool: Orchestra(pool, store=False).run("x?", meta={"x": object()}),  # (with a store, a crash)
     "meta must hold JSON-ready values (text, numbers, lists, dicts): Object of type object is not JSON serializable"),
    (lambda pool: Orchestra(pool, store=False).run_many(["x?"], meta={"n": float("nan")}),
     "meta must hold JSON-ready values (text, numbers, lists, dicts): Out of range float values are not JSON "
     "compliant"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=False, experts={"answer": "agent1"}),
     "experts['answer'] must be a list of agent names (['agent1']), not str 'agent1'"),
    (lambda pool: Orchestra(pool, store=False).run("hi \ud800 there"),
     "the task is not valid Unicode: character 4 is a lone surrogate ('\\ud800'); send UTF-8 text (on a command "
     "line: bytes that are not UTF-8 in this locale)"),
    (lambda pool: Orchestra(pool, store=False).run("hi", context="caf\udce9"),
     "the context is not valid Unicode: character 4 is a lone surrogate ('\\udce9'); send UTF-8 text (on a "
     "command line: bytes that are not UTF-8 in this locale)"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [
        {"id": "a", "instruction": "x", "depends_on": ["a"]}]}), "plan: subtask 'a' depends on itself"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer_format="End \ud800"),
     "the answer format is not valid Unicode: character 5 is a lone surrogate ('\\ud800'); send UTF-8 text (on a "
     "command line: bytes that are not UTF-8 in this locale)"),
    (lambda pool: Orchestra(pool).run("x?", meta={"x": "\ud800"}),  # (the store writes the meta)
     "the run holds text that is not valid Unicode (a lone surrogate, from JSON's \\ud800 escape or bytes that "
     "are not UTF-8) in its inputs, plan or meta; send UTF-8 text"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=Plan.model_validate({"subtasks": [
        {"id": "a", "instruction": "x", "depends_on": ["b"]}, {"id": "b", "instruction": "y", "depends_on": ["a"]}]})),
     "plan: the dependencies form a cycle: a -> b -> a"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [
        {"id": "a", "instruction": "x", "skills": ["math", "caf\udce9"]}]}),
     "plan: subtask 'a''s skill 'caf\\udce9' is not valid Unicode: character 4 is a lone surrogate ('\\udce9'); "
     "send UTF-8 text (on a command line: bytes that are not UTF-8 in this locale)"),
    # a given plan's step: blank or unreadable, or a field a plan has not, was run (9 requests each) or dropped
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [{"id": "a", "instruction": "  "}]}),
     "plan: subtask 'a''s instruction is empty"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [{"id": "a", "instruction": "\x00\x01"}]}),
     "plan: subtask 'a''s instruction has no visible character (only spaces, control characters such as NUL and "
     "format characters such as a zero-width space)"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [
        {"id": "a", "instruction": "x"}, {"id": "b", "instruction": "y", "dependson": ["a"]}]}),
     "plan: subtasks.1: unknown field 'dependson'; a step has id, instruction, depends_on, skills"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [{"id": "a", "instruction": "x"}],
                                                               "note": "draft"}),
     "plan: unknown field 'note'; a plan has subtasks"),
    # experts for a node the run has not (a typo) ran without them; none at all said "none given not agents"
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=False, experts={"answr": ["agent1"]}),
     "experts['answr']: the run has no node 'answr'; its nodes: answer"),
    (lambda pool: Orchestra(pool, store=False, plan=False).run("x?", experts={"answr": ["agent1"]}),
     "experts['answr']: the run has no node 'answr'; its nodes: answer"),  # (no plan by the settings: as well)
    (lambda pool: Orchestra(pool, store=False).run("x?", plan={"subtasks": [{"id": "a", "instruction": "x"}]},
                                                   experts={"b": ["agent1"]}),
     "experts['b']: the run has no node 'b'; its nodes: a"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=False, experts={"answer": []}),
     "experts['answer'] names no agent; give a list of agents of pool 'pool': agent0, agent1, agent2, agent3"),
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=False, experts={"answer": ["agent9"]}),
     "experts: agent9 not agents of pool 'pool'; agents: agent0, agent1, agent2, agent3"),
    (lambda pool: Orchestra(pool, store=False).run("x" * 500_001), "the task is 500,001 characters; at most "
     "500,000 fit Orchestra's prompts (the planner's holds the task twice): shorten it"),
    (lambda pool: Orchestra(pool, store=False).run_many("abc"),
     "tasks must be a list of tasks, not one string; run(...) answers one task"),
    # what a new user's own code met as Python's errors, or with the hint of another mistake
    (lambda pool: Orchestra(pool, store=False).run_many(_async_tasks()),
     "tasks must be a list of tasks, not an async iterable; arun_iter(tasks) takes one and yields each result as its "
     "run ends"),
    (lambda pool: Orchestra(pool, store=False).run("x?", on_event=print),
     "unknown setting 'on_event'; on_event is an Orchestra(...) argument: Orchestra(pool, on_event=...)"),
    (lambda pool: Pool(agents=pool.agents[0]), "agents= takes a list of Agent: agents=[agent0], not the Agent alone"),
    (lambda pool: Pool(agents=pool.agents, aggregator=pool.agents[1]),
     "aggregator takes an agent's name: give the agent's name ('agent1'), not the Agent"),
    (lambda pool: FunctionModel(lambda r: "ok", name=5),
     "name must be text that is not empty (how Orchestra shows the model), not int 5"),
    (lambda pool: FunctionModel(lambda r: "ok", name=" "),
     "name must be text that is not empty (how Orchestra shows the model), not str ' '"),
    # a pydantic class, which a ChatRequest takes, was "answer.output.str: Input should be a valid string"
    (lambda pool: Orchestra(pool, store=False).run("x?", plan=False, answer={"output": City}),
     "answer.output: give a JSON schema, not the class City: pass City.model_json_schema(), and read the answer with "
     "City.model_validate_json(...)"),
    (lambda pool: NodeSettings(output=City), "NodeSettings.output: give a JSON schema, not the class City: pass "
     "City.model_json_schema(), and read the answer with City.model_validate_json(...)"),
    # (the planner's template wrote more than it may, and jinja2's SecurityError came out raw)
    (lambda pool: Orchestra(pool, store=False).plan("x?", context="c" * 2_100_000),
     "the context is 2,100,000 characters; at most 500,000 fit Orchestra's prompts: shorten it"),
    (lambda pool: Orchestra(pool, store=False).run("x?", answer_format="f" * 500_001),
     "the answer format is 500,001 characters; at most 500,000 fit Orchestra's prompts: shorten it"),
])
def test_what_a_run_cannot_use_is_refused_at_once_in_one_line(make: Any, problem: str) -> None:
    pool, models = scripted_pool()
    with pytest.raises(ConfigError) as refused:
        make(pool)
    assert str(refused.value) == problem
    assert not any(model.requests for model in models.values())  # refused before any call


def test_run_many_takes_any_iterable_of_tasks_and_instances() -> None:
    from orchestra import Instance

    pool, models = scripted_pool()
    orc = Orchestra(pool, store=False, k=1)
    results = orc.run_many(task for task in ("a?", "b?"))
    assert [r.task for r in results] == ["a?", "b?"] and all(r.status == "done" for r in results)
    mixed = orc.run_many([Instance("c?", answer_format="End with X."), "d?"], answer_formats=[None, "End with Y."])
    assert [(r.task, r.status) for r in mixed] == [("c?", "done"), ("d?", "done")]
    prompts = [r.prompt_text() for m in models.values() for r in m.requests if "Your assignment" in r.prompt_text()]
    assert any("c?" in p and "End with X." in p for p in prompts)  # an Instance's own format
    assert any("d?" in p and "End with Y." in p for p in prompts) and not any("c?" in p and "Y." in p for p in prompts)


def test_a_data_set_whose_keyword_endpoint_refuses_the_key_asks_it_once_per_item() -> None:
    from orchestra.errors import AuthenticationError

    def refuse(request: ChatRequest) -> str:
        raise AuthenticationError("http://keywords.test/v1 rejected the credentials (HTTP 401)")

    pool, models = scripted_pool()
    keywords = FunctionModel(refuse, name="keywords")
    pool.keyword_model = keywords
    seen: list[Event] = []
    results = Orchestra(pool, store=False, on_event=seen.append).run_many(["What is 1 + 1?", "What is 2 + 2?"])
    assert [(r.status, r.exit_code) for r in results] == [("failed", 2), ("failed", 2)]
    for result in results:  # each ended where it failed: it was not begun after its end
        kinds = [e.kind for e in seen if getattr(e, "run_id", None) == result.run_id and e.kind.startswith("run_")]
        assert kinds == ["run_done"], kinds
    assert all("rejected the credentials" in (r.error or "") for r in results)
    # each item's five samples once: a run that ended while its chunk was recruited is not begun again
    assert len(keywords.requests) == 10
    assert not any(m.requests for m in models.values() if m is not keywords)  # no expert was asked


def test_sync_api_refuses_inside_an_event_loop() -> None:
    pool, _ = scripted_pool()
    orc = Orchestra(pool)

    async def inside() -> None:
        with pytest.raises(RuntimeError, match="use the async method"):
            orc.run("x")
        result = await orc.arun("x", plan=False, k=1)
        assert result.status == "done"

    asyncio.run(inside())


def test_invalid_per_run_overrides_are_one_clear_error() -> None:
    pool, _ = scripted_pool()
    orc = Orchestra(pool)
    with pytest.raises(ConfigError, match="run setting mode: unknown value 'bogus'"):
        orc.run("x", mode="bogus")
    with pytest.raises(ConfigError, match="run setting aggregate: unknown value 'bogus'"):
        orc.run("x", aggregate="bogus")
    with pytest.raises(ConfigError, match="max_resident_models set"):
        orc.run("x", max_resident_models=3)


def test_skills_that_are_no_plain_words_are_extracted_per_node_from_its_own_instruction() -> None:
    # both nodes give the same unusable skills: each node's keywords come from its own instruction,
    # and nodes with the same plain skills share one matching
    plan = plan_json(("a", [], ["{json}"]), ("b", ["a"], ["{json}"]), ("c", ["b"], ["optics"]),
                     ("d", ["c"], ["optics"]))
    pool, models = scripted_pool(2, plan=plan)
    result = Orchestra(pool, k=1, aggregate="none", store=False).run("Build it")
    assert result.status == "done", result.error
    asked = [r.prompt_text() for r in models["planner"].requests if kind_of(r) == "keywords"]
    per_node = Counter(("do a" in p, "do b" in p) for p in asked)
    assert set(per_node) == {(True, False), (False, True)} and len(set(per_node.values())) == 1
    assert [n.skills for n in result.plan.nodes] == [["general"], ["general"], ["optics"], ["optics"]]


def test_a_task_that_is_not_text_is_one_line_before_any_call() -> None:
    pool, models = scripted_pool(1)
    orc = Orchestra(pool, store=False)
    for task, message in ((42, "the task must be a string, not int"), (None, "the task must be a string, not NoneType"),
                          (" \n", "the task is empty"),
                          # (NUL bytes piped to `ask -` were nine paid requests that answered nothing)
                          ("\x00\x00", "the task has no visible character \\(only spaces, control characters such "
                                         "as NUL and format characters such as a zero-width space\\)"),
                          (" \x00\x1b\x7f\n", "the task has no visible character .*"),
                          # (zero-width spaces, a word joiner and a byte-order mark ran 13 paid calls)
                          ("\u200b\u2060\ufeff \u200d", "the task has no visible character .*")):
        with pytest.raises(ConfigError, match=f"^{message}$"):
            orc.run(task)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^the task must be a string, not bytes$"):
        orc.run_many(["fine", b"bytes"])  # type: ignore[list-item]
    assert not any(m.requests for m in models.values())


def test_a_run_whose_recruiting_failed_with_its_chunk_fails_without_paying_for_it_twice(tmp_path: Path) -> None:
    class BrokenMatcher:
        async def match(self, keywords: Sequence[str], vocabulary: Sequence[str]) -> list[Any]:
            raise RuntimeError("matcher broke")

    pool, models = scripted_pool(3, keywords=["algebra"])
    orc = Orchestra(pool, k=2, store=tmp_path / "runs.db", matcher=BrokenMatcher())
    results = orc.run_many(["What is 1 + 1?", "What is 2 + 2?"])
    assert [r.status for r in results] == ["failed", "failed"]
    assert all("matcher broke" in (r.error or "") for r in results), [r.error for r in results]
    # each run's 5 keyword samples were sent once, with its chunk; its own recruiting made no more
    assert sum(kind_of(request) == "keywords" for request in models["planner"].requests) == 10
    assert not any(models[f"m{i}"].requests for i in range(3))


async def run_with_experts_in_flight(orc: Orchestra) -> asyncio.Future[RunResult]:
    """A run of ``orc`` (whose pool came from ``held_experts_pool``) once all 3 of its expert calls
    are in flight."""
    run = asyncio.ensure_future(orc.arun("What is 1 + 1?", run_id="r1"))
    while sum(len(agent.model.requests) for agent in orc.pool.agents) < 3:
        await asyncio.sleep(0)
    return run


def held_experts_pool(release: asyncio.Event, kind: str = "expert") -> Pool:
    """3 agents whose calls of ``kind`` (``kind_of``) are answered once ``release`` is set."""
    async def answer(request: ChatRequest) -> str:
        if kind_of(request) == kind:
            await release.wait()
        return "The answer is 1"

    pool, _ = scripted_pool(3)
    for agent in pool.agents:
        agent.model = FunctionModel(answer, name=agent.model.name)
    return pool


def test_closing_an_orchestra_stops_the_calls_a_cancelled_run_left_going(tmp_path: Path) -> None:
    # (they went on after the connections closed: a retry then opened a session nobody closed)
    async def cancel_then_close() -> tuple[list[str], set[asyncio.Task[Any]]]:
        never = asyncio.Event()
        orc = Orchestra(held_experts_pool(never), k=3, store=tmp_path / "runs.db")
        run = await run_with_experts_in_flight(orc)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await orc.aclose()
        await asyncio.sleep(0)  # (tasks cancelled on the way out end at the loop's next turn)
        left = asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]
        assert orc.store is not None
        errors = [call["error"] for call in orc.store.calls("r1") if call["purpose"] == "expert"]
        return errors, left

    errors, left = asyncio.run(cancel_then_close())
    assert not left  # nothing of the run goes on once the orchestra is closed
    assert len(errors) == 3 and all("cancelled while its request was in flight" in e for e in errors)


def test_the_requests_a_cancel_cuts_off_in_flight_reach_the_usage_listeners() -> None:
    """The live panel (ask's, chat's) ended on the run's spending without the requests a Ctrl-C cut
    off in flight, which its record counts: the listeners of usage are told of them too."""
    async def cancel() -> tuple[list[UsageUpdated], RunResult | None, int]:
        never = asyncio.Event()
        seen: list[UsageUpdated] = []
        orc = Orchestra(held_experts_pool(never), k=3, store=False,
                        on_event=lambda e: seen.append(e) if isinstance(e, UsageUpdated) else None)
        run = await run_with_experts_in_flight(orc)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await orc.aclose()
        models = {id(m): m for m in (orc.pool.planner, *(a.model for a in orc.pool.agents))}.values()
        return seen, orc.ended("r1"), sum(len(m.requests) for m in models)  # type: ignore[union-attr]

    seen, recorded, sent = asyncio.run(cancel())
    assert recorded is not None and recorded.usage.requests == sent >= 3
    assert seen[-1].run_id == "r1" and seen[-1].requests == sent  # (it said 3 fewer: the experts' requests)


def test_closing_an_orchestra_leaves_a_run_that_is_still_going_to_finish(tmp_path: Path) -> None:
    async def close_while_it_runs() -> RunResult:
        release = asyncio.Event()
        orc = Orchestra(held_experts_pool(release), k=3, store=tmp_path / "runs.db")
        run = await run_with_experts_in_flight(orc)
        await orc.aclose()  # (another part of the program closes it: the run's calls are not its to stop)
        release.set()
        return await run

    result = asyncio.run(close_while_it_runs())
    assert result.status == "done", result.error


def test_a_node_whose_two_dependencies_failed_is_skipped_once_and_the_healthy_branch_finishes() -> None:
    # (skipped again at its second failed dependency, it was counted twice: the run ended while an
    # independent branch was still working, and lost its answer)
    gate = asyncio.Event()

    async def expert(name: str, request: ChatRequest) -> Any:
        text = request.prompt_text()
        if "do bad2" in text:
            for _ in range(50):  # fails after bad1, on a later turn of the loop
                await asyncio.sleep(0)
            return BadResponse("bad2 is down")
        if "do bad1" in text:
            return BadResponse("bad1 is down")
        if "do slow" in text:
            await gate.wait()  # answers only after both failures were handled
            for _ in range(50):
                await asyncio.sleep(0)
        return "The answer is 1"

    def seen(event: Event) -> None:
        if isinstance(event, NodeFailed) and event.node == "bad2":
            gate.set()

    events: list[Event] = []
    plan = plan_json(("bad1", []), ("bad2", []), ("both", ["bad1", "bad2"]), ("slow", []))
    pool, _ = scripted_pool(plan=plan, expert=expert)
    result = Orchestra(pool, k=1, on_event=lambda e: (events.append(e), seen(e))).run("four steps")
    assert result.status == "partial" and result.node("slow").status == "done", (result.status, result.error)
    assert result.node("both").status == "skipped" and sum(isinstance(e, NodeSkipped) for e in events) == 1


def test_a_run_cancelled_while_aggregating_records_its_node_as_failed(tmp_path: Path) -> None:
    pool = held_experts_pool(asyncio.Event(), kind="aggregate")  # never answers an aggregation

    async def cancel_while_aggregating() -> None:
        orc = Orchestra(pool, k=3, store=tmp_path / "runs.db")
        run = asyncio.ensure_future(orc.arun("What is 1 + 1?", run_id="r1"))
        while not any(kind_of(r) == "aggregate" for a in pool.agents for r in a.model.requests):
            await asyncio.sleep(0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await orc.aclose()

    asyncio.run(cancel_while_aggregating())
    [node] = RunStore(tmp_path / "runs.db").nodes("r1")
    assert (node["status"], node["error"]) == ("failed", "cancelled by the user")  # not left "aggregating"


def test_answer_options_skip_a_sink_whose_answer_a_final_template_renders() -> None:
    """With a ``final`` template no call writes the answer: the one sink's experts and aggregator
    keep their own token limit and temperature, and nothing streams as the answer."""
    pool, models = scripted_pool(3)
    streamed: list[str] = []

    async def run() -> RunResult:
        return await Orchestra(pool, k=2).arun(
            "Say one", plan=False, final=lambda outputs: f"[{outputs['answer']['output']}]",
            answer=AnswerOptions(max_tokens=7, temperature=0.3), on_answer_text=streamed.append)

    result = asyncio.run(run())
    assert result.status == "done" and result.answer.startswith("[") and "answer is 1" in result.answer, result.error
    sent = [r for m in models.values() for r in m.requests if kind_of(r) in ("expert", "aggregate")]
    assert len(sent) == 3 and all((r.max_tokens, r.temperature) != (7, 0.3) for r in sent)
    assert not streamed


def test_answer_options_reach_the_calls_that_write_the_answer() -> None:
    """Without a template the one sink's experts and aggregator write the answer: they get its
    token limit and temperature."""
    pool, models = scripted_pool(3)
    result = asyncio.run(Orchestra(pool, k=2).arun("Say one", plan=False,
                                                   answer=AnswerOptions(max_tokens=7, temperature=0.3)))
    assert result.status == "done", result.error
    sent = [r for m in models.values() for r in m.requests if kind_of(r) in ("expert", "aggregate")]
    assert len(sent) == 3 and all((r.max_tokens, r.temperature) == (7, 0.3) for r in sent)


def test_no_context_is_no_context() -> None:
    pool, _ = scripted_pool()
    assert Orchestra(pool, store=False, k=1).run("x?", plan=False, context=None).status == "done"


def test_a_function_model_that_returns_nothing_fails_its_call() -> None:
    """A forgotten ``return`` answered the text "null", and the run was done."""
    silent = FunctionModel(lambda request: None, name="silent")
    result = Orchestra(Pool(agents=[Agent(name="a", model=silent)], planner=silent), store=False).run(
        "x?", plan=False, k=1)
    assert result.status == "failed" and "silent replied None" in (result.error or ""), result.error
    assert "null" not in (result.answer or "")


def test_run_many_takes_a_budget_for_all_its_runs() -> None:
    """run_many's budget= bounds each run; a shared budget bounds them together (it was refused)."""
    from orchestra.budget import BudgetTracker

    pool, models = scripted_pool()
    shared = BudgetTracker(Budget(max_calls=20), None)
    results = Orchestra(pool, store=False, k=1).run_many([f"q{i}?" for i in range(6)], shared_budget=shared)
    sent = sum(len(model.requests) for model in models.values())
    assert sent == shared.calls == sum(r.usage.requests for r in results) == 18  # (not 36: each run's own 500)
    assert [r.status for r in results] == ["done"] * 3 + ["budget_exceeded"] * 3  # (5 keyword samples, 1 expert)


def test_a_cost_budget_says_a_model_of_ones_own_without_a_price_is_counted_only_as_calls_return() -> None:
    """It said "counts no dollars for m1 ... give prices= in Python", though the cost m1 reports was counted
    (the run ended budget_exceeded) and a model of one's own takes no prices=."""
    from orchestra.models import ChatResult, ModelBase, Usage

    class Reporting(ModelBase):
        is_test_double = True

        def __init__(self, name: str) -> None:
            self.name = name

        async def _generate(self, request: ChatRequest) -> ChatResult:
            return ChatResult(text="The answer is 42", usage=Usage(prompt_tokens=100, completion_tokens=10,
                                                                   cost_usd=0.0003))

    pool = Pool(agents=[Agent(name="a", model=Reporting("m1")), Agent(name="b", model=FunctionModel(
        lambda r: "ok", name="fm"))])
    with pytest.warns(UserWarning) as told:
        orc = Orchestra(pool, store=False, k=1, budget=Budget(max_cost_usd=0.0005))
    assert [str(w.message) for w in told] == [
        "the cost budget counts no dollars for fm: it has no price (give prices: [input, output] per million tokens "
        "in the pool, or prices= in Python); the cost budget cannot hold back calls to m1 in advance: it has no "
        "price (set self.price = orchestra.models.Price(input=..., output=...), USD per million tokens, in its "
        "__init__); the cost it reports in Usage.cost_usd is counted as its calls return"]
    results = orc.run_many(["q1?", "q2?", "q3?", "q4?"], plan=False)
    assert all(r.status == "budget_exceeded" and r.usage.cost_usd > 0.0005 for r in results)  # (counted once paid)


def test_a_cost_budget_in_python_names_the_models_it_cannot_bound() -> None:
    pool, _ = scripted_pool()
    with pytest.warns(UserWarning, match=r"^the cost budget counts no dollars for m0, m1, m2, m3, planner: they have "
                                         r"no price"):
        Orchestra(pool, store=False, budget=Budget(max_cost_usd=0.5))
    orc = Orchestra(pool, store=False)
    with pytest.warns(UserWarning, match="the cost budget counts no dollars"):
        orc.run("x?", plan=False, budget={"max_cost_usd": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orc.run("x?", plan=False, budget={"max_cost_usd": 0.5})  # once per Orchestra
        Orchestra(pool, store=False, budget=Budget(max_calls=9)).run("x?", plan=False)  # no cost budget: no word
        Orchestra(pool, store=False).run("x?", plan=False, budget={"max_calls": 9})
    # the default's own value, set, is a limit set (it capped answers, and was silent of what it cannot bound)
    with pytest.warns(UserWarning, match="the cost budget counts no dollars"):
        Orchestra(pool, store=False, budget=Budget(max_cost_usd=1.0))
    with pytest.warns(UserWarning, match="the cost budget counts no dollars"):
        Orchestra(pool, store=False).run("x?", plan=False, budget={"max_cost_usd": 1.0})


def test_a_node_left_with_one_answer_names_no_aggregator(tmp_path: Path) -> None:
    """Two of three experts failed and the third's answer stood, yet the trace (and the store's node
    rows, which ``orchestra show --json`` lists) named an aggregator that was never asked."""
    def expert(name: str, request: ChatRequest) -> str:
        if name != "m0":
            raise BadResponse(f"{name} is down")
        return "The answer is 4"

    pool, models = scripted_pool(expert=expert)
    store = RunStore(tmp_path / "runs.db")
    result = Orchestra(pool, store=store).run("x?", plan=False, experts={"answer": ["agent0", "agent1", "agent2"]})
    [node] = result.plan.nodes
    assert result.status == "done" and node.output == "The answer is 4" and node.aggregator is None
    [row] = store.nodes(result.run_id)
    assert (row["status"], row["aggregator"]) == ("done", None)
    assert [bool(output.error) for output in node.expert_outputs] == [False, True, True]
    assert [kind_of(r) for m in models.values() for r in m.requests].count("aggregate") == 0


def test_a_budget_that_refuses_the_aggregators_call_stops_the_node_rather_than_voting(tmp_path: Path) -> None:
    """README: a node whose call is refused stops there. The aggregator's refused call fell back to a
    vote of the experts, as a failing endpoint does: the node read done, with no aggregator, and a
    resume had nothing left to aggregate."""
    pool, models = scripted_pool(plan=plan_json(("a", []),))
    whole = Orchestra(pool, k=3, store=False).run("expensive")
    calls = sum(len(m.requests) for m in models.values())
    assert whole.status == "done" and whole.node("a").aggregator is not None
    for model in models.values():
        model.requests.clear()
    events: list[Event] = []
    store = tmp_path / "runs.db"
    cut = Orchestra(pool, k=3, store=store, on_event=events.append,
                    budget=Budget(max_calls=calls - 1)).run("expensive", run_id="cut")
    assert cut.status == "budget_exceeded" and cut.node("a").status == "failed"
    assert cut.node("a").error.startswith(f"budget max_calls={calls - 1} reached")
    assert not [e for e in events if isinstance(e, AggregationFellBack)]
    resumed = Orchestra(pool, k=3, store=store).resume("cut", budget=Budget(max_calls=calls))
    assert resumed.status == "done" and resumed.node("a").aggregator == whole.node("a").aggregator
    assert resumed.answer == whole.answer and sum(len(m.requests) for m in models.values()) == calls
