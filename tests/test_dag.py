"""The dependency graph plans and workflows are checked and run with."""

from __future__ import annotations

import itertools
import random

import pytest

from orchestra.dag import Dag
from orchestra.plan import Plan, PlanInvalid, Subtask, validate_plan

DIAMOND = Dag({"a": [], "b": ["a"], "c": ["a"], "d": ["c", "b"]})


def test_order_puts_each_node_after_its_dependencies_ties_in_given_order() -> None:
    assert DIAMOND.order() == ["a", "b", "c", "d"]
    assert Dag({"z": [], "y": [], "x": ["z"]}).order() == ["z", "y", "x"]
    assert Dag({"late": ["early"], "early": []}).order() == ["early", "late"]


def test_sinks_descendants_and_ancestors() -> None:
    assert DIAMOND.sinks == ["d"]
    assert DIAMOND.descendants("a") == {"b", "c", "d"} and DIAMOND.descendants("b") == {"d"}
    assert DIAMOND.descendants("d") == set()
    assert DIAMOND.ancestors("d") == {"a", "b", "c"} and DIAMOND.ancestors("a") == set()
    assert DIAMOND.dependents["a"] == ["b", "c"] and "d" in DIAMOND and "e" not in DIAMOND and len(DIAMOND) == 4


def test_a_dependency_named_twice_is_one_edge() -> None:
    graph = Dag({"a": [], "b": ["a", "a"]})
    assert graph.dependencies["b"] == ["a"] and graph.dependents["a"] == ["b"] and graph.order() == ["a", "b"]


@pytest.mark.parametrize("needs, cycle", [
    ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
    ({"x": ["x"]}, ["x", "x"]),
    ({"s": [], "a": ["s", "c"], "b": ["a"], "c": ["b"], "t": ["c"]}, ["a", "b", "c", "a"]),
])
def test_a_cycle_is_named_as_the_path_that_closes_it(needs: dict[str, list[str]], cycle: list[str]) -> None:
    graph = Dag(needs)
    assert graph.cycle() == cycle
    with pytest.raises(ValueError, match="cycle: " + " -> ".join(cycle)):
        graph.order()


def test_random_graphs_order_and_reach_agree_with_their_edges() -> None:
    draw = random.Random(7)
    for _ in range(50):
        names = [f"n{i}" for i in range(draw.randint(1, 30))]
        draw.shuffle(names)  # given order is not the topological one
        rank = {name: i for i, name in enumerate(sorted(names, key=lambda n: int(n[1:])))}
        needs = {n: [m for m in names if rank[m] < rank[n] and draw.random() < 0.2] for n in names}
        graph = Dag(needs)
        assert graph.cycle() is None
        order = graph.order()
        position = {n: i for i, n in enumerate(order)}
        assert sorted(order) == sorted(names)
        assert all(position[m] < position[n] for n in names for m in needs[n])
        for n in names:  # descendants: exactly the nodes with a path from n
            reach = {m for m in names if n in graph.ancestors(m)}
            assert graph.descendants(n) == reach
        if len(names) > 1:  # one back edge from the last to the first in order makes a cycle through both
            first, last = order[0], order[-1]
            if first in graph.ancestors(last):
                cyclic = Dag({**needs, first: [*needs[first], last]})
                cycle = cyclic.cycle()
                assert cycle is not None and cycle[0] == cycle[-1]
                assert all(b in cyclic.dependents[a] for a, b in itertools.pairwise(cycle))


def test_a_plan_with_a_cycle_is_refused_with_the_cycle() -> None:
    plan = Plan(subtasks=[Subtask(id="a", instruction="x", depends_on=["b"]),
                          Subtask(id="b", instruction="y", depends_on=["a"])])
    with pytest.raises(PlanInvalid, match="the dependencies form a cycle: a -> b -> a"):
        validate_plan(plan)
    assert validate_plan(Plan(subtasks=[*plan.subtasks[:1], Subtask(id="b", instruction="y")])).order() == ["b", "a"]


@pytest.mark.parametrize("subtasks, problem", [
    ([("a", []), ("a", [])], "duplicate subtask id 'a'"),
    ([("a", ["ghost"]), ("b", ["a"])], "subtask 'a' depends on unknown subtask 'ghost'"),
    ([("a", []), ("b", ["b", "a"])], "subtask 'b' depends on itself"),
    # a node that needs itself is named as such, even next to a cycle of others and after it
    ([("a", ["c"]), ("c", ["a"]), ("b", ["a", "b"])], "subtask 'b' depends on itself"),
    # the first problem in the plan's order, whatever its kind
    ([("a", ["a"]), ("b", ["ghost"])], "subtask 'a' depends on itself"),
])
def test_a_plan_names_the_first_thing_wrong_with_it(subtasks: list[tuple[str, list[str]]], problem: str) -> None:
    plan = Plan(subtasks=[Subtask(id=id_, instruction=id_, depends_on=needs) for id_, needs in subtasks])
    with pytest.raises(PlanInvalid) as raised:
        validate_plan(plan)
    assert str(raised.value) == problem


def test_a_dependency_named_twice_is_shown_to_the_experts_once() -> None:
    from orchestra import Agent, Orchestra, Pool
    from orchestra.models import FunctionModel

    model = FunctionModel(lambda request: "The answer is 42", name="m")
    pool = Pool(agents=[Agent(name="a", model=model, skills=("general",))])
    plan = Plan(subtasks=[Subtask(id="a", instruction="do a", skills=["general"]),
                          Subtask(id="b", instruction="do b", depends_on=["a", "a"], skills=["general"])])
    result = Orchestra(pool, k=1, aggregate="none", store=False).run("task", plan=plan)
    assert result.status == "done"
    [prompt] = [r.prompt_text() for r in model.requests if "Your assignment: do b" in r.prompt_text()]
    assert prompt.count("[a] do a") == 1


def test_a_plan_whose_dependency_is_named_twice_runs_it_once() -> None:
    plan = Plan(subtasks=[Subtask(id="a", instruction="x"), Subtask(id="b", instruction="y", depends_on=["a", "a"]),
                          Subtask(id="c", instruction="z", depends_on=["b", "a", "b"])])
    graph = validate_plan(plan)
    assert graph.dependencies == {"a": [], "b": ["a"], "c": ["b", "a"]}
    assert graph.dependents == {"a": ["b", "c"], "b": ["c"], "c": []} and graph.order() == ["a", "b", "c"]
