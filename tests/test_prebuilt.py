"""Models assembled without validation on a node's hot path are what validation would have made."""

from __future__ import annotations

import asyncio

import pytest

from orchestra import Agent, Orchestra, Plan, Pool, Subtask
from orchestra.errors import ConfigError
from orchestra.models import ChatRequest, ChatResult, ModelBase
from orchestra.prebuilt import assemble
from orchestra.result import ExpertOutput, NodeTrace
from orchestra.testing import FunctionModel


def same_as_validated(model: object) -> None:
    """Equal to the model validated from its own fields, each value of the type validation gives."""
    cls = type(model)
    assert set(model.__dict__) == set(cls.model_fields)  # type: ignore[attr-defined]  # every field, no other
    validated = cls.model_validate(dict(model.__dict__))  # type: ignore[attr-defined]
    assert validated == model
    for name in cls.model_fields:  # type: ignore[attr-defined]
        assert type(getattr(validated, name)) is type(getattr(model, name)), name


def test_an_assembled_model_is_its_validated_twin() -> None:
    built = assemble(ExpertOutput, {"agent": "a", "model": "m", "text": "t", "error": None})
    assert built == ExpertOutput(agent="a", model="m", text="t") and built.model_fields_set == {
        "agent", "model", "text", "error"}
    assert built.model_dump_json() == ExpertOutput(agent="a", model="m", text="t").model_dump_json()
    copied = built.model_copy(update={"text": "u"})
    assert copied.text == "u" and built.text == "t"


@pytest.mark.parametrize("options", [
    {"seed": 3}, {"seed": None, "temperature": 0.5, "max_tokens": 9, "output": "json"},
    {"seed": 1, "output": {"type": "object"}, "on_text": print},
])
def test_an_agents_request_is_the_validated_request(options: dict[str, object]) -> None:
    agent = Agent(name="a", model=FunctionModel(lambda r: "ok"), temperature=1, max_tokens=64)
    request = agent.request("a prompt", **options)  # type: ignore[arg-type]
    expected = ChatRequest.user("a prompt", system=agent.persona, temperature=options.get("temperature", 1.0),
                                max_tokens=options.get("max_tokens", 64), seed=options["seed"],
                                output=options.get("output", "text"), on_text=options.get("on_text"))
    assert request == expected and request.keyed("m") == expected.keyed("m")
    same_as_validated(request)
    assert request.model_copy(update={"seed": 5}).seed == 5 and request.seed == options["seed"]


def test_request_values_of_other_types_are_validated_and_bad_ones_refused() -> None:
    agent = Agent(name="a", model=FunctionModel(lambda r: "ok"))
    assert agent.request("p", temperature=1, max_tokens=5).temperature == 1.0  # type: ignore[arg-type]
    assert type(agent.request("p", temperature=1).temperature) is float  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output must be"):
        agent.request("p", output="yaml")
    with pytest.raises(ValueError):
        agent.request("p", max_tokens="many")  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("temperature", 3), ("temperature", True),
                                          ("max_tokens", 0), ("max_tokens", 2.5), ("persona", None)])
def test_an_agent_with_a_bad_sampling_value_is_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"agent 'a': {field}"):
        Agent(name="a", model=FunctionModel(lambda r: "ok"), **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("options, message", [
    ({"model": None}, "agent 'a': model must be a model object .* not NoneType"),
    ({"model": "gpt-4o"}, "agent 'a': model must be a model object .* not str 'gpt-4o'"),
    ({"skills": "math"}, r"agent 'a': skills must be a list of names .* not 'math'"),
    ({"skills": ["math", 3]}, "agent 'a': skills must be a list of names"),
    ({"name": " "}, "an agent's name must be non-empty text"),
    ({"name": "a\nb"}, r"an agent's name must be printable text on one line, not 'a\\nb'"),  # (it broke listings)
])
def test_an_agent_that_could_never_answer_is_refused_when_made(options: dict[str, object], message: str) -> None:
    # a model that is not one used to be taken, then hang the run at its first call
    with pytest.raises(ConfigError, match=message):
        Agent(**{"name": "a", "model": FunctionModel(lambda r: "ok"), **options})  # type: ignore[arg-type]


class CompleteOnly:
    """The interface the README's "batch first" line shows: a name and ``complete`` alone."""

    name = "c"

    async def complete(self, requests: list[ChatRequest]) -> list[object]:
        return []


class Nameless(ModelBase):
    """A model of one's own that never set ``self.name``."""

    async def _generate(self, request: ChatRequest) -> ChatResult:
        return ChatResult(text="x")


@pytest.mark.parametrize("model, message", [
    (CompleteOnly(), "agent 'a': model CompleteOnly has complete but no complete_each (batches are sent through it): "
                     "subclass orchestra.models.ModelBase, set self.name and implement async _generate(request) -> "
                     "ChatResult (see the README, Your own model)"),
    (Nameless(), "agent 'a': model Nameless has no name: set self.name (how Orchestra shows the model) in its __init__"),
])
def test_a_model_of_ones_own_that_lacks_part_of_the_interface_is_told_which(model: object, message: str) -> None:
    """Both were "model must be a model object (an OpenAICompatible, ...), not CompleteOnly", naming nothing missing."""
    with pytest.raises(ConfigError) as refused:
        Agent(name="a", model=model)  # type: ignore[arg-type]
    assert str(refused.value) == message


def test_a_pool_whose_planner_is_not_a_model_is_refused() -> None:
    agent = Agent(name="a", model=FunctionModel(lambda r: "ok"), skills=["math"])
    assert agent.skills == ("math",)
    assert Agent(name="b", model=FunctionModel(lambda r: "ok"), skills=(s for s in ["math", "code"])).skills == (
        "math", "code")  # a generator is read once, not emptied by the check
    with pytest.raises(ConfigError, match="the pool's planner must be a model object"):
        Pool(agents=[agent], planner="gpt-4o")  # type: ignore[arg-type]


def test_an_agents_temperature_is_kept_as_a_float() -> None:
    assert type(Agent(name="a", model=FunctionModel(lambda r: "ok"), temperature=1).temperature) is float


def test_node_traces_are_what_validation_would_make() -> None:
    def answer(request: ChatRequest) -> str:
        if "fails" in request.prompt_text():
            raise RuntimeError("no")
        return "done"

    pool = Pool(agents=[Agent(name="x", model=FunctionModel(answer), skills=("general",)),
                        Agent(name="y", model=FunctionModel(answer, name="other"), skills=("general",))])
    plan = Plan(subtasks=[Subtask(id="a", instruction="first", skills=["general"]),
                          Subtask(id="b", instruction="it fails", depends_on=["a"], skills=["general"]),
                          Subtask(id="c", instruction="third", depends_on=["b"])])
    orc = Orchestra(pool, k=2, aggregate="none", store=False)
    result = asyncio.run(orc.arun("task", plan=plan))
    assert [n.status for n in result.plan.nodes] == ["done", "failed", "skipped"]
    for node in result.plan.nodes:
        same_as_validated(node)
        for output in node.expert_outputs:
            same_as_validated(output)
    assert isinstance(result.plan.nodes[0], NodeTrace) and result.plan.nodes[0].recruitment is not None


def test_each_assembled_instance_has_its_own_fields_set() -> None:
    def make(name: str) -> ExpertOutput:
        return assemble(ExpertOutput, {"agent": name, "model": "m", "text": "t", "error": None})

    first, second = make("a"), make("b")
    first.model_fields_set.discard("error")
    assert "error" in second.model_fields_set and "error" in make("c").model_fields_set


def test_a_plan_given_as_a_dict_is_run_and_anything_else_is_refused() -> None:
    # a dict or a string used to be taken as "plan", and the planner was asked instead
    model = FunctionModel(lambda request: "ok")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)]), k=1, aggregate="none", store=False)
    given = {"subtasks": [{"id": "add", "instruction": "add", "skills": ["math"]},
                          {"id": "double", "instruction": "double", "depends_on": ["add"], "skills": ["math"]}]}
    result = orc.run("Compute 2+2 then double it", plan=given)
    assert result.status == "done" and [node.id for node in result.plan.nodes] == ["add", "double"]
    assert len(model.requests) == 2  # the two steps: no planner, and no keywords (the steps name their skills)
    with pytest.raises(ConfigError, match=r"^plan: subtasks\.0\.instruction: Field required$"):
        orc.run("Compute 2+2", plan={"subtasks": [{"id": "a"}]})
    with pytest.raises(ConfigError, match="^plan must be a Plan .* not str 'yes'$"):
        orc.run("Compute 2+2", plan="yes")  # type: ignore[arg-type]


def test_a_budget_stop_over_several_nodes_reads_once_with_the_runs_final_count() -> None:
    # each node refused wrote the counts of its moment ("0 calls made, 3 in flight"); they stood
    # beside the run's own line, which said otherwise
    pool = Pool(agents=[Agent(name=f"a{i}", model=FunctionModel(lambda r: "The answer is 4", name=f"m{i}"),
                              skills=["math"]) for i in range(3)])
    plan = {"subtasks": [{"id": name, "instruction": name, "skills": ["math"]} for name in ("one", "two", "three")]}
    result = Orchestra(pool, k=2, aggregate="synthesize", store=False, budget={"max_calls": 3}).run(
        "Compute things", plan=plan)
    assert result.status == "budget_exceeded" and result.usage.calls == 3
    assert result.error == "budget max_calls=3 reached (3 calls made)", result.error
