"""Scheduling overhead per node: Orchestra vs LangGraph vs a floor, on the same 1,000-node layered DAG.

All three run every node through the same zero-latency ``FunctionModel`` (one call per node, its
prompt built from the node's dependencies' outputs), so what is measured is the framework.
Orchestra runs its full node pipeline (recruit from skills, expert call, events); no run store,
as LangGraph runs with no checkpointer. The floor is what a skilled user writes by hand: one
asyncio task per node that awaits its dependencies' tasks and makes the node's call, then the
same final call over the sinks' outputs that Orchestra makes (calls counted equal at the model).
Targets: ours <= 1.5 x the floor's µs per node, and so <= 0.2 x LangGraph's.

    pip install 'skill-orchestra[bench]'
    python bench/overhead.py [--layers 20] [--width 50] [--fan-in 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import time
from typing import Annotated, Any, TypedDict

from orchestra import Agent, Budget, Orchestra, Plan, Pool, Subtask
from orchestra.models import ChatRequest, FunctionModel


def layered_dag(layers: int, width: int, fan_in: int) -> Plan:
    """``layers`` x ``width`` nodes; each node after the first layer depends on ``fan_in`` of the layer before."""
    subtasks = []
    for layer in range(layers):
        for column in range(width):
            deps = [] if layer == 0 else sorted({f"n{layer - 1}_{(column + j) % width}" for j in range(fan_in)})
            subtasks.append(Subtask(id=f"n{layer}_{column}", instruction=f"step {layer}.{column}",
                                    depends_on=deps, skills=["general"]))
    return Plan(subtasks=subtasks)


def echo(request: ChatRequest) -> str:
    """The zero-latency model: answers at once."""
    return "ok"


async def run_orchestra(plan: Plan) -> float:
    model = FunctionModel(echo, name="zero")
    pool = Pool(agents=[Agent(name="solo", model=model, skills=("general",))])
    orc = Orchestra(pool, k=1, aggregate="none", store=False,
                    budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))
    started = time.perf_counter()
    result = await orc.arun("benchmark", plan=plan)
    elapsed = time.perf_counter() - started
    assert result.status == "done", result.error
    assert len(model.requests) == len(plan.subtasks) + 1  # every node, plus the final aggregation over the sinks
    return elapsed


async def run_floor(plan: Plan) -> float:
    """One asyncio task per node making the node's call once its dependencies' tasks are done."""
    model = FunctionModel(echo, name="zero")
    tasks: dict[str, asyncio.Task[str]] = {}

    async def node(subtask: Subtask) -> str:
        inputs = "\n".join([await tasks[d] for d in subtask.depends_on])
        [result] = await model.complete([ChatRequest.user(f"{inputs}\n{subtask.instruction}")])
        return result.text

    started = time.perf_counter()
    for subtask in plan.subtasks:  # the plan lists every node after its dependencies
        tasks[subtask.id] = asyncio.create_task(node(subtask))
    used = {d for subtask in plan.subtasks for d in subtask.depends_on}
    outputs = await asyncio.gather(*(tasks[s.id] for s in plan.subtasks if s.id not in used))
    [final] = await model.complete([ChatRequest.user("\n".join(outputs) + "\nbenchmark")])
    elapsed = time.perf_counter() - started
    assert final.text == "ok" and len(model.requests) == len(plan.subtasks) + 1  # the calls Orchestra makes
    return elapsed


def merge(left: dict[str, str], right: dict[str, str]) -> dict[str, str]:
    """LangGraph reducer: parallel branches add their outputs to one dict."""
    return {**left, **right}


class State(TypedDict):
    outputs: Annotated[dict[str, str], merge]
    calls: Annotated[int, operator.add]


def build_langgraph(plan: Plan, model: FunctionModel) -> Any:
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(State)

    def make_node(subtask: Subtask) -> Any:
        async def node(state: State) -> dict[str, Any]:
            inputs = "\n".join(state["outputs"][d] for d in subtask.depends_on)
            [result] = await model.complete([ChatRequest.user(f"{inputs}\n{subtask.instruction}")])
            return {"outputs": {subtask.id: result.text}, "calls": 1}
        return node

    dependents = {s.id: 0 for s in plan.subtasks}
    for subtask in plan.subtasks:
        builder.add_node(subtask.id, make_node(subtask))
        for dep in subtask.depends_on:
            dependents[dep] += 1
    for subtask in plan.subtasks:
        if not subtask.depends_on:
            builder.add_edge(START, subtask.id)
        elif len(subtask.depends_on) == 1:
            builder.add_edge(subtask.depends_on[0], subtask.id)
        else:
            builder.add_edge(list(subtask.depends_on), subtask.id)
    for node, count in dependents.items():
        if count == 0:
            builder.add_edge(node, END)
    return builder.compile()


async def run_langgraph(plan: Plan) -> float:
    model = FunctionModel(echo, name="zero")
    graph = build_langgraph(plan, model)
    started = time.perf_counter()
    state = await graph.ainvoke({"outputs": {}, "calls": 0},
                                config={"recursion_limit": 10 * len(plan.subtasks)})
    elapsed = time.perf_counter() - started
    assert len(state["outputs"]) == len(plan.subtasks), len(state["outputs"])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--fan-in", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()
    try:
        import langgraph  # noqa: F401
    except ImportError:
        raise SystemExit("LangGraph is not installed: pip install 'skill-orchestra[bench]'") from None

    plan = layered_dag(args.layers, args.width, args.fan_in)
    nodes = len(plan.subtasks)
    ours = theirs = floor = float("inf")
    def timed(run: Any) -> float:
        gc.collect()  # each starts from a clean heap: the garbage of the one before is not its to collect
        return float(asyncio.run(run(plan)))

    for _ in range(args.rounds):  # alternating, so a machine that slows down weighs on all three
        ours = min(ours, timed(run_orchestra))
        theirs = min(theirs, timed(run_langgraph))
        floor = min(floor, timed(run_floor))
    ours_us, theirs_us, floor_us = ours / nodes * 1e6, theirs / nodes * 1e6, floor / nodes * 1e6
    print(f"{nodes}-node layered DAG ({args.layers} layers x {args.width}, fan-in {args.fan_in}), "
          f"zero-latency model, best of {args.rounds}")
    print(f"floor      : {floor_us:8.1f} µs per node ({floor:.3f} s)  one asyncio task per node")
    print(f"LangGraph  : {theirs_us:8.1f} µs per node ({theirs:.3f} s)")
    print(f"Orchestra  : {ours_us:8.1f} µs per node ({ours:.3f} s)")
    for name, ratio, target in (("floor", ours_us / floor_us, 1.5), ("LangGraph", ours_us / theirs_us, 0.2)):
        print(f"ratio ours / {name}: {ratio:.3f}   (target <= {target}: {'met' if ratio <= target else 'NOT met'})")


if __name__ == "__main__":
    main()
