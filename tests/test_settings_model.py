"""The one settings model: layering defaults < pool < workflow < call, every field reachable and
kept, the run spec a resume rebuilds from alone, and the old record format converted."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from helpers import scripted_pool
from loopback_llm import ScriptedLLM, write_pool
from pydantic import BaseModel, TypeAdapter, ValidationError
from test_cli import cli

from orchestra import Budget, Orchestra, RecruitConfig, RunSpec, Settings
from orchestra.agents import Pool
from orchestra.errors import ConfigError
from orchestra.numbers import Count
from orchestra.store import RunStore
from orchestra.vocabulary import MODES, Mode, Strategy
from orchestra.workflow import Workflow
from orchestra.workflow_run import orchestra_for

#: a value other than the default for every top-level setting
NON_DEFAULTS: dict[str, Any] = {
    "k": 2, "mode": "topk", "aggregate": "vote", "aggregator_choice": "per-node", "aggregator": "a",
    "grader": "mc", "plan": False, "max_nodes": 5, "plan_repairs": 0, "plan_fallback": "single",
    "planner_max_tokens": 99, "fast_path": False, "plan_check": False, "context_chars": 321,
    "max_response_chars": 4321, "max_resident_models": 2, "memory_budget_gb": 1.5,
    "recruit": {"competence_weight": 0.0}, "keywords": {"samples": 2}, "matcher": {"min_similarity": 0.5},
    "budget": {"max_calls": 7}, "cache": True, "seed": 11, "executor": "ray", "ray_address": "auto",
}


def test_every_setting_has_a_non_default_value_here() -> None:
    assert set(NON_DEFAULTS) == set(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_every_setting_in_a_pool_file_reaches_the_orchestra_and_the_run_record(tmp_path: Path, name: str) -> None:
    value = NON_DEFAULTS[name]
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text("models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                         f"agents:\n  - {{name: a, model: m}}\nsettings: {json.dumps({name: value})}\n")
    orc = Orchestra(Pool.load(pool_file), store=tmp_path / "runs.db")
    resolved = orc.settings.model_dump(mode="json")[name]
    expected = Settings.layer({name: value}).model_dump(mode="json")[name]
    assert resolved == expected != Settings().model_dump(mode="json")[name]

    async def record() -> str:
        run_spec = orc._make_run("a task").spec
        assert json.loads(run_spec.record_json()) == json.loads(json.dumps({"spec": run_spec.model_dump(mode="json")}))
        return run_spec.record_json()  # what the store keeps

    spec = RunSpec.from_record(json.loads(asyncio.run(record())), "a task")
    assert spec.settings == orc.settings


def test_layers_apply_in_order_and_nested_settings_merge_field_by_field(tmp_path: Path) -> None:
    (tmp_path / "pool.yaml").write_text(
        "models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\nagents:\n  - {name: a, model: m}\n"
        "settings: {k: 2, mode: topk, recruit: {p: 0.5, k_max: 4}, keywords: {samples: 4}, seed: 1}\n")
    (tmp_path / "flow.yaml").write_text(
        "pool: pool.yaml\nseed: 5\nbudget: {max_cost_usd: 0.25}\n"
        "settings: {k: 3, recruit: {competence_weight: 0}}\nsteps:\n  - {id: s, prompt: hi}\n")
    flow = Workflow.load(tmp_path / "flow.yaml")
    orc = orchestra_for(flow, Settings.layer({"k": 4, "recruit": {"k_max": 2}, "budget": {"max_calls": 9}}),
                        store=False)
    s = orc.settings
    assert (s.k, s.mode, s.seed) == (4, "topk", 5)  # call > workflow > pool > default
    assert s.recruit == RecruitConfig(p=0.5, k_max=2, competence_weight=0)  # merged from three layers
    assert s.keywords.samples == 4 and s.keywords.min_count == 2
    assert s.budget == Budget(max_calls=9, max_cost_usd=0.25)  # the flag keeps the workflow's cost limit
    # the workflow alone, and the pool alone
    assert orchestra_for(flow, store=False).settings.k == 3
    assert Orchestra(flow.pool, store=False).settings.k == 2 and Orchestra(flow.pool, store=False).settings.seed == 1
    # keyword arguments win over settings=, which wins over the pool; a run's overrides over both
    orc = Orchestra(flow.pool, {"k": 5, "mode": "adaptive"}, mode="random", store=False)
    assert (orc.settings.k, orc.settings.mode) == (5, "random")
    assert orc.run_settings({"k": 1}).k == 1 and orc.settings.k == 5


def test_a_matcher_is_replaced_whole_and_an_unknown_nested_key_is_an_error() -> None:
    embedding = {"type": "embedding", "model": "e", "base_url": "http://127.0.0.1:9/v1"}
    layered = Settings.layer({"matcher": embedding}).layered({"matcher": {"min_similarity": 0.2}})
    assert layered.matcher.type == "lexical" and layered.matcher.min_similarity == 0.2
    with pytest.raises(ConfigError, match=r"setting recruit\.q: no such setting"):
        Settings.layer({"recruit": {"q": 1}})
    with pytest.raises(ConfigError, match=r"--set recruit\.mode: no such setting"):  # k and mode are top level
        Settings().assigned(["recruit.mode=topk"])
    # (only a keyword argument named the setting it misspelt: settings={"kk": 2} said "no such setting")
    with pytest.raises(ConfigError, match=r"^setting kk: no such setting; did you mean 'k'\?$"):
        Settings.layer({"kk": 2})
    with pytest.raises(ConfigError, match=r"^setting recruit\.cost_lamda: no such setting; did you mean 'cost_lambda'"):
        Settings.layer({"recruit": {"cost_lamda": 1}})
    # a setting in the wrong group says where it belongs (it was a near name of the wrong group's)
    with pytest.raises(ConfigError, match=r"^setting recruit\.max_tokens: no such setting; it is a keywords or budget "
                                          r"setting: keywords: \{max_tokens: \.\.\.\} or budget: "):
        Settings.layer({"recruit": {"max_tokens": 5}})


def test_the_vocabulary_is_the_models_and_the_command_lines() -> None:
    assert MODES == get_args(Mode) == get_args(Settings.model_fields["mode"].annotation)
    assert get_args(Strategy) == get_args(Settings.model_fields["aggregate"].annotation)
    help_text = cli("ask", "--help").stdout
    assert "[calibrated|symbolic-moe|topk|adaptive|global|random]" in help_text
    assert "[synthesize|vote|refine|none]" in help_text


def test_a_python_resume_uses_the_recorded_settings_not_the_orchestras(tmp_path: Path) -> None:
    pool, _ = scripted_pool(4)
    store = RunStore(tmp_path / "runs.db")
    first = Orchestra(pool, store=store, k=2, mode="topk", budget={"max_calls": 2})
    stopped = first.run("What is 1 + 1?", plan=False)
    assert stopped.status == "budget_exceeded"
    other = Orchestra(pool, store=store, k=4, mode="random", aggregate="none")
    resumed = other.resume(stopped.run_id, budget={"max_calls": 50})
    assert resumed.status == "done", resumed.error
    node = resumed.node("answer")
    assert len(node.experts) == 2 and node.recruitment["mode"] == "topk" and node.aggregator is not None
    spec = RunSpec.from_record(store.run(stopped.run_id).config, "What is 1 + 1?")
    assert spec.settings.budget.max_calls == 50 and spec.settings.k == 2


def test_a_cli_resume_rebuilds_the_run_from_its_record_even_when_the_pool_file_changed(loopback,
                                                                                       tmp_path: Path) -> None:
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    pool = write_pool(tmp_path, server.url, extra="settings: {k: 2, aggregate: vote}\n")
    stopped = cli("ask", "What is 6 x 7?", "--pool", str(pool), "--no-plan", "--max-calls", "3", "--json")
    assert stopped.returncode == 3, stopped.stderr
    run_id = json.loads(stopped.stdout)["run_id"]
    pool.write_text(pool.read_text().replace("settings: {k: 2, aggregate: vote}", "settings: {k: 1}"))
    resumed = cli("resume", run_id, "--max-calls", "40", "--json")
    assert resumed.returncode == 0, resumed.stderr
    node = json.loads(resumed.stdout)["plan"]["nodes"][0]
    assert len(node["experts"]) == 2 and node["strategy"] == "vote" and scripted.kinds["aggregate"] == 0


def test_a_run_recorded_by_version_0_1_is_converted() -> None:
    legacy = {"pool": "/pools/p.yaml", "options": {"k": 2, "mode": "topk", "answer_format": "End with X.",
                                                   "context": "earlier", "budget": {"max_calls": 9}},
              "orchestra": {"recruit": {"mode": "topk", "k": 2, "p": 0.6}, "keywords": {"samples": 3},
                            "grader": "mc", "matcher": None, "aggregator": None},
              "plan": None, "fixed_experts": {"answer": ["a", "b"]},
              "meta": {"kind": "workflow", "workflow": "/flows/f.yaml", "inputs": {"x": 1}, "item": "q7"}}
    spec = RunSpec.from_record(legacy, "task")
    assert (spec.settings.k, spec.settings.mode, spec.settings.grader) == (2, "topk", "mc")
    assert spec.settings.recruit.p == 0.6 and spec.settings.keywords.samples == 3
    assert spec.settings.budget.max_calls == 9 and spec.answer_format == "End with X." and spec.context == "earlier"
    assert spec.pinned == {"answer": ["a", "b"]} and spec.pool == "/pools/p.yaml"
    assert spec.workflow is not None and (spec.workflow.path, spec.workflow.inputs) == ("/flows/f.yaml", {"x": 1})
    assert spec.meta == {"kind": "workflow", "item": "q7"}


def test_settings_of_the_executor_cannot_change_per_run() -> None:
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, store=False, max_resident_models=2)
    with pytest.raises(ConfigError, match="memory_budget_gb set"):
        orc.run("x", memory_budget_gb=3)
    with pytest.raises(ConfigError, match="the response cache lives in the run store"):
        orc.run("x", cache=True)


def _config_models() -> list[type[BaseModel]]:
    """Every model that reads a pool file, a workflow file or settings, nested ones included."""
    from orchestra.agents import AgentDefaults, AgentFile, PoolFile
    from orchestra.matching import MatcherSpec
    from orchestra.models.config import AnthropicSpec, LlamaCppSpec, OpenAISpec, VLLMSpec
    from orchestra.models.placement import EngineResources
    from orchestra.models.pricing import Price
    from orchestra.settings import AnswerOptions
    from orchestra.skills import KeywordConfig
    from orchestra.workflow import DatasetSpec, RecruitSpec, StepSpec, WorkflowFile

    return [Settings, Budget, RecruitConfig, KeywordConfig, MatcherSpec, AnswerOptions, AgentDefaults, AgentFile,
            PoolFile, OpenAISpec, AnthropicSpec, LlamaCppSpec, VLLMSpec, EngineResources, Price, RecruitSpec,
            StepSpec, DatasetSpec, WorkflowFile]


def _numeric(annotation: Any) -> bool:
    return any(a in (int, float) for a in (annotation, *get_args(annotation)))


def _switched(name: str, annotation: Any, switch: bool) -> dict[str, Any]:
    """The field given ``switch`` where a number goes (as a value of a dict of numbers)."""
    numbers_by_name = get_args(annotation)[-1:] if get_origin(annotation) is dict else ()
    return {name: {"gpu": switch} if numbers_by_name else switch}


@pytest.mark.parametrize("model", _config_models(), ids=lambda m: m.__name__)
def test_no_number_setting_takes_true_or_false(model: type[BaseModel]) -> None:
    """pydantic reads true as 1 (and 1.0): ``k: true`` was one expert, ``max_cost_usd: yes`` one dollar."""
    numbers = [name for name, field in model.model_fields.items() if _numeric(field.annotation)]
    for name in numbers:
        for switch in (True, False):
            with pytest.raises(ValidationError) as refused:
                model.model_validate(_switched(name, model.model_fields[name].annotation, switch))
            problems = [e for e in refused.value.errors() if e["loc"][0] == name]
            assert problems and problems[0]["msg"] == f"Value error, give a number, not {str(switch).lower()}", name


def test_a_whole_number_written_with_an_exponent_says_what_to_write(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e3`` (no dot, no sign) as text; pydantic said only that it is not an integer."""
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text("models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                         "agents:\n  - {name: a, model: m, max_tokens: 1.5e3}\n")
    with pytest.raises(ConfigError, match=r"pool.yaml:4:\d+: agents.a.max_tokens: give a whole number; YAML reads "
                                          r"1.5e3 as text, not a number: write 1500$"):
        Pool.load(pool_file)
    assert TypeAdapter(Count).validate_python(" 12 ") == 12  # (a quoted number pydantic reads stays one)


def test_a_pool_file_with_true_for_a_number_names_its_line(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text("models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                         "agents:\n  - {name: a, model: m, temperature: on}\n")
    with pytest.raises(ConfigError, match=r"pool.yaml:4:\d+: agents.a.temperature: give a number, not true$"):
        Pool.load(pool_file)


@pytest.mark.parametrize(("model", "written", "message"), [
    # (a misspelt price was dropped: the model cost nothing, and a cost budget said to give prices)
    ("{type: openai, model: m, base_url: 'http://127.0.0.1:9/v1', prices: {inptu: 0.15, output: 0.6}}",
     "inptu", "did you mean 'input'?"),
    ("{type: anthropic, model: c, max_tokns: 100}", "max_tokns", "did you mean 'max_tokens'?"),
])
def test_a_misspelt_key_inside_a_model_names_the_field_it_is_closest_to(tmp_path: Path, model: str, written: str,
                                                                      message: str) -> None:
    """The closest field was looked for in the first kind of model of the union, whatever the type."""
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(f"models:\n  m: {model}\nagents:\n  - {{name: a, model: m}}\n")
    with pytest.raises(ConfigError, match=rf"pool.yaml:2:\d+: unknown field '{written}' \({re.escape(message)}\)$"):
        Pool.load(pool_file)
