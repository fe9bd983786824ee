"""Recruiting and the Orchestra facade, where the other tests left a one-line mutant alive: who may
aggregate a calibrated team, per-node aggregation evidence under keyword variants, and the data-set
streaming, node settings and resume paths of ``Orchestra``."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from helpers import kind_of, plan_json, scripted_pool

from orchestra import Orchestra, core
from orchestra.budget import Budget
from orchestra.core import Instance
from orchestra.errors import BudgetExceeded, ConfigError
from orchestra.matching import Match
from orchestra.models import ChatRequest
from orchestra.pipeline.scheduler import NodeSettings
from orchestra.profile import Provenance, SkillProfile
from orchestra.prompts import MAX_CONTEXT_CHARS, MAX_TASK_CHARS
from orchestra.recruit import RecruitConfig, Recruiter, SkillTable, node_aggregation_estimate, node_aggregator
from orchestra.settings import MAX_K, RunSpec

GUARD_S = 10  # a deadlock guard, not a timing
PROVENANCE = Provenance(dataset="val.jsonl", dataset_sha256="0" * 64, items=40, model="test")


def profile(agent: str, skills: dict[str, int], *, accuracy: float = 0.7, aggregation: float | None = None,
            **fields: object) -> SkillProfile:
    return SkillProfile(agent=agent, skills=skills, accuracy=accuracy, aggregation_score=aggregation,
                        provenance=PROVENANCE, **fields)


def recruiter(profiles: dict[str, SkillProfile], config: RecruitConfig | None = None) -> Recruiter:
    config = config or RecruitConfig()
    return Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, config), config)


# --- recruit.py ---------------------------------------------------------------------------------


def test_a_calibrated_team_is_aggregated_by_a_measured_aggregator_not_one_assumed_average() -> None:
    """Z was never benchmarked as an aggregator: assumed at 0.5, it outranked the measured ones
    (0.30, 0.35) and aggregated every team."""
    profiles = {"X": profile("X", {"law": 3}, aggregation=0.30), "Y": profile("Y", {"law": 3}, aggregation=0.35),
                "Z": profile("Z", {"law": 3})}
    config = RecruitConfig(confidence=1.0, cost_lambda=0.0)
    r = recruiter(profiles, config)
    assert r.aggregators == ["X", "Y"]
    team = r.recruit(["law"], [Match("law", "law", 1.0)], seed=1, k=3, mode="calibrated").team
    assert team is not None and len(team.experts) == 3
    assert team.aggregator == "Y" and team.aggregation_skill == 0.35


def test_a_nodes_aggregation_evidence_is_read_under_the_canonical_skill_of_a_keyword_variant() -> None:
    """The benchmark's counts are kept per canonical skill: a node matched on the variant 'maths' read
    none of A's 10 items on 'math', and B (better overall, no evidence there) aggregated it."""
    a = profile("A", {"maths": 3}, aggregation=0.5, aliases={"maths": "math"},
                aggregation_skills={"math": (9, 10)})
    b = profile("B", {"maths": 3}, aggregation=0.7, aliases={"maths": "math"})
    node = [Match("sums", "maths", 1.0)]
    estimate, _, items = node_aggregation_estimate(a, node)
    assert (estimate, items) == (11 / 14, 10.0)  # (9 + 4 * 0.5) / (10 + 4)
    r = recruiter({"A": a, "B": b})
    chosen = r.recruit(["sums"], node, seed=0, k=2)
    assert node_aggregator({"A": a, "B": b}, r.table.competence, chosen, "B").agent == "A"


# --- core.py: data sets -------------------------------------------------------------------------


def test_planned_data_set_runs_are_not_recruited_together_as_one_answer_node() -> None:
    """The rare-expert filter recruits a chunk's single node before the runs start; a planned run
    has the planner's nodes instead, and recruiting an 'answer' node on the whole task sent a keyword
    call per task that no node used."""
    sent = []
    for rare_filter in (True, False):
        pool, models = scripted_pool(3, plan=plan_json(("a", [], ["algebra"]), ("b", ["a"], ["geometry"])))
        results = Orchestra(pool, k=2, store=False).run_many([f"question {i}" for i in range(4)], plan=True,
                                                              rare_filter=rare_filter)
        assert [r.status for r in results] == ["done"] * 4
        sent.append(Counter(kind_of(r) for m in models.values() for r in m.requests))
    assert sent[0] == sent[1] == Counter({"plan": 4, "expert": 16, "aggregate": 8})  # no keyword call


def test_a_data_set_instance_with_its_own_experts_keeps_them_under_the_rare_expert_filter() -> None:
    """One task of 25 names its expert: recruited with the chunk, that expert was rare there (1 in
    25, under the 5% threshold) and the filter replaced it with the one every other task got."""
    pool, _ = scripted_pool(3)
    tasks: list[str | Instance] = [f"question {i}" for i in range(24)]
    tasks.append(Instance("question 24", options={"experts": {"answer": ["agent2"]}}))
    results = Orchestra(pool, k=1, mode="topk", store=False).run_many(tasks, window=60)  # one chunk of 30
    assert {tuple(r.node("answer").experts) for r in results[:-1]} == {("agent0",)}
    assert results[-1].node("answer").experts == ["agent2"]


def test_an_instances_meta_options_and_format_win_over_those_of_the_call(tmp_path: Path) -> None:
    pool, _ = scripted_pool(3)
    orc = Orchestra(pool, k=1, store=tmp_path / "runs.db")
    mine = Instance("question 0", meta={"kind": "mine"}, options={"k": 2, "seed": 7})
    results = orc.run_many([mine, "question 1"], meta={"kind": "call", "dataset": "d"}, k=3, seed=1,
                           answer_formats=["a number", None])
    specs = [RunSpec.from_record(orc.store.run(r.run_id).config, r.task) for r in results]  # type: ignore[union-attr]
    assert [s.meta for s in specs] == [{"kind": "mine", "dataset": "d"}, {"kind": "call", "dataset": "d"}]
    assert [(s.settings.k, s.settings.seed) for s in specs] == [(2, 7), (3, 1)]
    assert [len(r.node("answer").experts) for r in results] == [2, 3]
    assert [s.answer_format for s in specs] == ["a number", None]  # a per-task format over the Instance's own


def test_a_data_set_is_refused_before_any_call_for_a_bad_window_formats_or_a_run_id_given_twice() -> None:
    pool, models = scripted_pool(3)
    orc = Orchestra(pool, store=False)
    with pytest.raises(ValueError, match="window must be a whole number of at least 1"):  # (not a window that
        asyncio.run(asyncio.wait_for(orc.arun_many(["question 0"], window=0), GUARD_S))  # never opens)
    with pytest.raises(ValueError, match="one entry per task"):
        orc.run_many(["question 0", "question 1"], answer_formats=["a number"])
    twice = [Instance(f"question {i}", options={"run_id": "same-id"}) for i in range(2)]
    with pytest.raises(ConfigError, match="run id same-id is given to two of the tasks"):
        orc.run_many(twice)
    assert not any(model.requests for model in models.values())


# --- core.py: single runs, settings, resume -----------------------------------------------------


def test_a_run_id_of_another_task_is_refused_and_a_done_run_resumes_as_it_was_recorded(tmp_path: Path) -> None:
    pool, models = scripted_pool(3)
    orc = Orchestra(pool, k=1, store=tmp_path / "runs.db")
    first = orc.run("question 0", run_id="first")
    sent = sum(len(model.requests) for model in models.values())
    with pytest.raises(ConfigError, match="run first answers another task"):
        orc.run("question 1", run_id="first")
    again = orc.resume("first")
    assert (again.status, again.answer) == ("done", first.answer)
    assert orc.store.run("first").resumes == 0  # type: ignore[union-attr]  # (not begun again)
    orc.plan("question 2")  # planning alone records no run
    assert [run.id for run in orc.store.runs()] == ["first"]  # type: ignore[union-attr]
    assert sum(len(model.requests) for model in models.values()) == sent + 1  # (the plan call)


def test_without_a_store_ended_gives_only_the_run_that_ended_last() -> None:
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, k=1, store=False)
    result = orc.run("question 0")
    assert orc.ended(result.run_id) is result and orc.ended("another-run") is None


def test_aggregator_none_for_a_run_clears_the_orchestras_aggregator() -> None:
    pool, _ = scripted_pool(3)
    orc = Orchestra(pool, aggregator="agent2", store=False)
    assert orc.settings.aggregator == "agent2"
    assert orc.run_settings({"aggregator": None}).aggregator is None
    assert orc.run_settings({"k": None}).k == orc.settings.k  # (None leaves any other setting as it is)


def test_tasks_and_inputs_are_refused_at_their_exact_limits() -> None:
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, k=1, aggregate="none", store=False)
    assert orc.run("x" * MAX_TASK_CHARS).status == "done"  # exactly the longest task fits
    assert orc.run("question 0", context="c" * MAX_CONTEXT_CHARS).status == "done"  # and the longest context
    with pytest.raises(ConfigError, match="the context is"):
        orc.run("question 0", context="c" * (MAX_CONTEXT_CHARS + 1))
    with pytest.raises(ConfigError, match="the task is"):
        orc.run("x" * (MAX_TASK_CHARS + 1))
    with pytest.raises(ConfigError, match=r"experts\['answer'\] names no agent"):
        orc.run("question 0", experts={"answer": []})
    with pytest.raises(ConfigError, match="meta must hold JSON-ready values"):
        orc.run("question 0", meta={"score": float("nan")})
    with pytest.raises(ConfigError, match="plan: subtasks.0: unknown field 'dependson'"):
        orc.run("question 0", plan={"subtasks": [{"id": "a", "instruction": "do a", "dependson": []}]})


def test_run_ids_drawn_twice_in_one_second_are_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["aaaaaa", "aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(core.secrets, "token_hex", lambda _: next(drawn))
    monkeypatch.setattr(core, "_issued", ("", set()))
    frozen = datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(core, "datetime", type("Frozen", (), {"now": staticmethod(lambda: frozen)}))
    assert [core.new_run_id(), core.new_run_id()] == ["20260102-030405-aaaaaa", "20260102-030405-bbbbbb"]


def test_a_run_cancelled_with_a_reason_is_recorded_with_that_reason(tmp_path: Path) -> None:
    async def main() -> tuple[str, str | None]:
        asked = asyncio.Event()

        async def expert(name: str, request: ChatRequest) -> str:
            asked.set()
            await asyncio.sleep(GUARD_S)
            return "The answer is 1"

        pool, _ = scripted_pool(2, expert=expert)
        orc = Orchestra(pool, k=1, store=tmp_path / "runs.db")
        task = asyncio.ensure_future(orc.arun("question 0", run_id="stopped"))
        await asyncio.wait_for(asked.wait(), GUARD_S)
        task.cancel("stopped by the operator")
        with pytest.raises(asyncio.CancelledError):
            await task
        record = orc.store.run("stopped")  # type: ignore[union-attr]
        await orc.aclose()
        return record.status, record.error

    assert asyncio.run(main()) == ("cancelled", "stopped by the operator")  # (not "cancelled by the user")


def test_a_budget_stop_while_planning_alone_has_no_run_to_resume() -> None:
    pool, _ = scripted_pool(2)
    with pytest.raises(BudgetExceeded) as stopped:
        Orchestra(pool, store=False).plan("question 0", budget=Budget(max_tokens=1))
    assert stopped.value.resumable is False


def test_a_nodes_own_k_may_be_the_largest_k_a_run_takes() -> None:
    pool, _ = scripted_pool(3)
    orc = Orchestra(pool, k=1, aggregate="vote", store=False)
    result = orc.run("question 0", node_settings={"answer": NodeSettings(k=MAX_K)})
    assert result.status == "done" and len(result.node("answer").experts) == MAX_K
