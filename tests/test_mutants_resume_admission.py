"""Resume, a data set's admission under a shared budget and the scheduler's endings, where a
mutation round left a one-line mutant alive: what a resumed run paid before and does not spend
now, which run a data set takes as the costliest, a run counted without its calls' slack (a
server's), a data set's first stop, ``resume(force=True)``, a new run id that prefixes another's,
and how a run ends when a step, its final template or its final call fails, is cancelled or is
refused by the budget.

Only model answers are scripted; stores are real SQLite files under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import kind_of, plan_json, scripted_pool

from orchestra import Orchestra, Plan
from orchestra.budget import Budget, BudgetTracker, RunAdmission, Spent, task_budget
from orchestra.errors import BadResponse, BudgetExceeded, CallCancelled, RunHeld
from orchestra.models import ChatRequest, Usage
from orchestra.models.pricing import FREE
from orchestra.pipeline.scheduler import Outputs
from orchestra.result import RunResult
from orchestra.settings import AnswerOptions
from orchestra.store import RunStore


def _spend(tracker: BudgetTracker, calls: int, tokens: int, max_tokens: int = 1) -> None:
    """``calls`` calls that spend ``tokens`` tokens of prompt between them."""
    for _ in range(calls):
        tracker.settle(tracker.admit(ChatRequest.user("hi", max_tokens=max_tokens), FREE),
                       Usage(prompt_tokens=tokens // calls, requests=1))


# --- budget.py ---------------------------------------------------------------------------------


def test_a_resumed_runs_earlier_answer_tokens_are_not_spending_now() -> None:
    """What a run paid before its resume (answers included) counts in its usage, but not as spending
    now: a data set's admission would have counted its earlier answers against the shared budget."""
    tracker = BudgetTracker(Budget(), "r")
    tracker.count(Usage(prompt_tokens=10, completion_tokens=30, cost_usd=0.02, requests=2), calls=2)
    assert (tracker.calls, tracker.prompt_tokens + tracker.completion_tokens) == (2, 40)
    assert tracker.committed() == (0, 0, 0.0)
    shared = BudgetTracker(Budget(max_calls=None, max_tokens=100, max_cost_usd=None), None)
    admission = RunAdmission(shared)
    resumed = BudgetTracker(Budget(), "r1", parent=shared)
    resumed.count(Usage(prompt_tokens=10, completion_tokens=30, requests=1))  # paid before the resume
    _spend(resumed, 1, 20, max_tokens=1)  # spent now: 20 tokens
    admission.ended(resumed, on_its_own=True)  # a run takes 60 tokens; 20 of them are this budget's
    refused = admission.refusal(0)  # 20 + 60 + the last call's slack (none: it spent what it held) <= 100
    assert refused is None, refused


def test_a_tasks_own_budget_counts_its_planning_and_its_runs_earlier_calls_once() -> None:
    """A resumed chat run's task budget counts what the task spent planning and what the run spent
    before (a data set's shared budget does not), and a failed call sent again is not one more call
    there either: the resume counted only the run's own calls against the limit and went past it."""
    task = task_budget(Budget(max_calls=5), Spent(calls=3, usage=Usage(prompt_tokens=30, requests=3)))
    run = BudgetTracker(Budget(max_calls=5), "r", parent=task)
    run.count(Usage(prompt_tokens=10, requests=1), calls=1)  # a call that failed before the resume
    assert (task.calls, task.prompt_tokens, run.calls) == (4, 40, 1)
    run.settle(run.admit(ChatRequest.user("hi"), FREE, counted=True), Usage(prompt_tokens=5, requests=1),
               counted=True)  # that call, sent again
    assert (task.calls, task.prompt_tokens, run.calls) == (4, 45, 1)
    _spend(run, 1, 5)
    with pytest.raises(BudgetExceeded, match="this task's budget max_calls=5 is spent"):
        _spend(run, 1, 5)


def test_the_costliest_run_is_what_a_run_takes_whichever_ended_last() -> None:
    """Runs of 5 then 3 calls: a run may take 5 (the latest, 3, started a run cut off with its calls
    spent); each limit reads the costliest run of its own (calls of one, tokens of another)."""
    calls = RunAdmission(BudgetTracker(Budget(max_calls=30, max_tokens=None, max_cost_usd=None), None))
    for spent in (5, 3):
        run = BudgetTracker(Budget(), f"v{spent}", parent=calls.shared)
        _spend(run, spent, 10 * spent)
        calls.ended(run, on_its_own=True)
    assert calls.admits(3) and not calls.admits(4)  # 8 + 15 + 5 <= 30 < 8 + 20 + 5
    assert "a run takes up to 5 calls" in str(calls.refusal(4))

    def mixed(**limits: int | None) -> RunAdmission:  # a run of many cheap calls, then one of a single dear call
        admission = RunAdmission(BudgetTracker(Budget(max_cost_usd=None, **limits), None))
        for spent, used in ((5, 50), (1, 400)):
            run = BudgetTracker(Budget(), f"t{spent}", parent=admission.shared)
            _spend(run, spent, used, max_tokens=1)
            admission.ended(run, on_its_own=True)
        return admission

    refused = mixed(max_calls=10, max_tokens=None).refusal(0)  # 6 + 5 > 10
    assert refused is not None and "(6 calls so far, and a run takes up to 5 calls," in str(refused)
    refused = mixed(max_calls=None, max_tokens=850).refusal(0)  # 450 + 400 + 24 (what a call held beyond) > 850
    assert refused is not None and "(450 tokens so far, and a run takes up to 400 tokens," in str(refused)


def test_a_run_counted_without_its_slack_makes_the_last_call_need_its_whole_worst_case() -> None:
    """A server counts a request's run without what its calls held beyond what they spent (``slack``
    None): the last call then needs its whole worst case left, not nothing."""
    shared = BudgetTracker(Budget(max_calls=None, max_tokens=300, max_cost_usd=None), None)
    admission = RunAdmission(shared)
    request = ChatRequest.user("x" * 236, max_tokens=30)  # 121 tokens at worst
    for name in ("r1", "r2"):
        run = BudgetTracker(Budget(), name, parent=shared)
        run.settle(run.admit(request, FREE), Usage(prompt_tokens=70, completion_tokens=5, requests=1))
        spent = (1, 75, 0.0)
        admission.count(spent, spent)  # (as serve counts a request's run)
    refused = admission.refusal(0)  # 150 + 75 + 121 > 300
    assert refused is not None and str(refused).endswith(
        "(150 tokens so far, and a run takes up to 75 tokens, and a call may need 121 tokens at worst, "
        "so it was not started)")


# --- core.py: run ids and resume -----------------------------------------------------------------


def test_a_new_run_id_that_begins_another_runs_id_is_a_new_run_not_that_run(tmp_path: Path) -> None:
    """The store finds a run by a unique prefix of its id: a new id that is such a prefix ("q-1" of
    "q-10") is not the run it prefixes, so a run of another task may take it."""
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, k=1, store=tmp_path / "runs.db")
    assert orc.run("question 10", run_id="q-10").status == "done"
    shorter = orc.run("question 1", run_id="q-1")
    assert (shorter.run_id, shorter.status) == ("q-1", "done")
    assert orc.store.run("q-1").task == "question 1"  # type: ignore[union-attr]


def test_a_resume_with_force_takes_over_a_run_another_store_holds(tmp_path: Path) -> None:
    """``resume(..., force=True)`` (``orchestra resume --force``) takes over a run another owner holds,
    which a plain resume refuses."""
    path = tmp_path / "runs.db"
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, k=1, store=path, budget=Budget(max_calls=1))
    stopped = orc.run("question 0")
    assert stopped.status == "budget_exceeded"
    holder = RunStore(path)  # another owner (as another process would be), holding the run with a fresh lease
    holder.begin_run(stopped.run_id, stopped.task, orc.store.run(stopped.run_id).config)  # type: ignore[union-attr]
    with pytest.raises(RunHeld):
        orc.resume(stopped.run_id, budget={"max_calls": 50})
    finished = orc.resume(stopped.run_id, budget={"max_calls": 50}, force=True)
    assert finished.status == "done"
    holder.close()


# --- scheduler.py: endings with a failed node ----------------------------------------------------


def _failing(node: str) -> Callable[[str, ChatRequest], Any]:
    """Experts that answer every node but ``node``, where each of them fails."""
    return lambda name, request: BadResponse(f"{name} is down") if f"do {node}" in request.prompt_text() else "4"


def test_a_final_template_is_not_rendered_over_a_failed_step() -> None:
    """A run whose step failed answers with a finished step's output, partial, and says which step
    failed: its final template, which reads every step, is not rendered over the outputs there are
    (it failed the run with "final: KeyError: 'b'", the failed step unsaid, or rendered half of it)."""
    pool, models = scripted_pool(2, plan=plan_json(("a", []), ("b", [])), expert=_failing("b"))
    plan = Plan.model_validate(plan_json(("a", []), ("b", [])))
    rendered: list[Outputs] = []

    def final(outputs: Outputs) -> str:
        rendered.append(outputs)
        return f"{outputs['a']['output']} and {outputs['b']['output']}"

    result = Orchestra(pool, k=1, aggregate="none", store=False).run("both", plan=plan, final=final)
    assert (result.status, result.answer) == ("partial", result.node("a").output)
    assert result.error is not None and result.error.startswith("b: ") and "is down" in result.error
    assert rendered == []
    assert not [r for m in models.values() for r in m.requests if kind_of(r) == "final"]


def test_the_sinks_that_answered_are_merged_when_another_sink_failed() -> None:
    """Three sinks, one failed: the two that answered are merged by the final call (the run is
    partial), not one of them taken as the answer alone."""
    pool, models = scripted_pool(2, plan=plan_json(("a", []), ("b", []), ("c", [])), expert=_failing("c"))
    result = Orchestra(pool, k=1, aggregate="none", store=False).run("three sides")
    [final] = [r for m in models.values() for r in m.requests if kind_of(r) == "final"]
    assert "do a" in final.prompt_text() and "do b" in final.prompt_text() and "do c" not in final.prompt_text()
    assert result.status == "partial" and result.answer.endswith("The answer is 1")  # the final call's answer
    assert result.node("c").status == "failed" and result.error.startswith("c: ")


def test_a_cancelled_final_call_fails_the_run_instead_of_answering_with_the_steps_outputs() -> None:
    """The steps' outputs stand in for a final synthesis whose call failed, but not for one whose
    call was cancelled: nothing failed to answer, the run was being stopped."""
    pool, _ = scripted_pool(2, plan=plan_json(("left", []), ("right", [])))
    orc = Orchestra(pool, k=1, aggregate="none", store=False)
    aggregator = orc.stages.staffing.aggregator.model
    answer = aggregator.fn
    aggregator.fn = lambda request: (CallCancelled("final: cancelled while its request was in flight")
                                     if kind_of(request) == "final" else answer(request))
    result = orc.run("two sides, then merge")
    assert (result.status, result.answer) == ("failed", None)
    assert result.error == "final aggregation: final: cancelled while its request was in flight"


def test_a_cancelled_aggregator_call_fails_its_node_instead_of_falling_back_to_a_vote() -> None:
    """A node's experts' vote stands in for an aggregator whose call failed, not for one whose call
    was cancelled."""
    pool, models = scripted_pool(2)
    def cancelled(answer: Callable[[ChatRequest], Any]) -> Callable[[ChatRequest], Any]:
        return lambda request: (CallCancelled("aggregate: cancelled while its request was in flight")
                                if kind_of(request) == "aggregate" else answer(request))

    for model in (models["m0"], models["m1"]):
        model.fn = cancelled(model.fn)
    result = Orchestra(pool, k=2, mode="topk", aggregate="synthesize", store=False).run(
        "one question", plan=Plan.model_validate(plan_json(("answer", []))))
    assert (result.status, result.answer) == ("failed", None)
    assert result.node("answer").status == "failed" and "cancelled while its request was in flight" in result.error


def test_a_json_answer_is_its_parsed_value_written_compact() -> None:
    """A run asked for a JSON answer answers with the sink's parsed value, compact, not the expert's
    text as it was written."""
    pool, _ = scripted_pool(2, expert=lambda name, request: '{ "n" : 4 }')
    result = Orchestra(pool, k=1, aggregate="none", store=False).run(
        "count them", plan=Plan.model_validate(plan_json(("answer", []))), answer=AnswerOptions(output="json"))
    assert (result.status, result.answer) == ("done", '{"n":4}')


def test_a_data_sets_first_stop_is_what_its_budget_says_stopped_it() -> None:
    """A data set whose first run was cut short by the shared budget (its synthesis no longer fitted)
    reports that refusal, not the later "no room for another run" of the runs not started."""
    pool, _ = scripted_pool(4)
    orc = Orchestra(pool, store=False)

    async def main(max_tokens: int | None) -> tuple[list[RunResult], BudgetTracker]:
        shared = BudgetTracker(Budget(max_calls=None, max_tokens=max_tokens, max_cost_usd=None), None)
        results = [result async for _, result in orc.arun_iter(
            [f"question {i:02d}" for i in range(4)], shared_budget=shared, rare_filter=False)]
        return results, shared

    results, _ = asyncio.run(main(None))
    per_run = results[0].usage.prompt_tokens + results[0].usage.completion_tokens
    results, shared = asyncio.run(main(per_run + 600))
    assert [r.status for r in results] == ["budget_exceeded"] * 4 and [r.usage.calls for r in results][1:] == [0] * 3
    stop = str(shared.exceeded)
    assert "has no room for another run" not in stop and "is spent" in stop and "the next call may take" in stop


def test_a_final_synthesis_the_budget_refuses_ends_the_run_budget_exceeded() -> None:
    """Both steps answered and the final call found no room: the run stopped at its budget (exit 3,
    resumable with a raised limit), it did not fail."""
    pool, _ = scripted_pool(2)
    plan = Plan.model_validate(plan_json(("left", []), ("right", [])))
    result = Orchestra(pool, k=1, aggregate="none", store=False, budget={"max_calls": 2}).run(
        "two sides, then merge", plan=plan)
    assert [node.status for node in result.plan.nodes] == ["done", "done"]
    assert (result.status, result.answer, result.exit_code) == ("budget_exceeded", None, 3)
    assert result.error.startswith("budget max_calls=2 reached")


def test_runs_of_each_kind_are_expected_to_cost_what_their_own_kind_took() -> None:
    """A server's requests for one agent and for a team cost apart: a team's run is not let in beside others by
    what an agent's took, nor an agent's refused by what a team's took; a kind not seen yet starts alone."""
    shared = BudgetTracker(Budget(max_calls=20, max_tokens=None, max_cost_usd=None), None)
    admission = RunAdmission(shared)
    admission.count((1, 0, 0.0), (1, 0, 0.0), kind="agent")  # an agent's run: 1 call
    assert admission.admits({"agent": 1}, "agent") and admission.admits({}, "team")  # nothing in flight: it starts
    assert not admission.admits({"team": 1}, "team") and not admission.admits({"agent": 1}, "team")  # not learned
    assert not admission.admits({"team": 1}, "agent")  # nor beside a team's run, whose cost is not known yet
    admission.count((9, 0, 0.0), (9, 0, 0.0), kind="team")  # 10 ended
    assert admission.admits({"agent": 1}, "team")  # 10 + 1 in flight + 9 <= 20
    assert not admission.admits({"team": 1}, "team")  # 10 + 9 + 9 > 20
    assert admission.admits({"team": 1}, "agent") and not admission.admits({"team": 1, "agent": 1}, "agent")
    refused = admission.refusal({"agent": 2}, "team")  # 10 + 2 + 9 > 20
    assert refused is not None and str(refused).endswith("and a run takes up to 9 calls, so it was not started)")
    assert admission.refusal({"team": 1}, "agent") is None  # 10 + 9 + 1 <= 20
    assert admission.refusal({"team": 1, "agent": 1}, "agent") is not None  # 10 + 9 + 1 + 1 > 20


@pytest.mark.parametrize("pinned", [True, False])
def test_a_run_is_not_resumed_on_a_pool_that_cannot_go_on_with_it(tmp_path: Path, pinned: bool) -> None:
    """Resumed on another Orchestra's pool: with its experts pinned, 5 keyword calls were paid before
    "unknown agent 'a'"; without, none of its 6 recorded calls was replayed and the other pool's models
    answered anew (8 calls), the record mixing two pools. Refused before any call; the same pool goes on."""
    from orchestra import Agent, Pool
    from orchestra.errors import ConfigError
    from orchestra.testing import FunctionModel

    def pool(suffix: str) -> tuple[Pool, list[FunctionModel]]:
        keywords = FunctionModel(lambda r: {"keywords": ["math"]}, name=f"kw{suffix}")
        expert = FunctionModel(lambda r: "The answer is 10.", name=f"m{suffix}")
        agents = [Agent(name=f"{name}{suffix}", model=expert) for name in ("a", "b")]
        return Pool(agents=agents, planner=keywords), [keywords, expert]

    first, _ = pool("1")
    orc = Orchestra(first, k=2, store=tmp_path / "runs.db")
    stopped = orc.run("What is 5+5?", plan=False, budget=Budget(max_calls=6),
                      **({"experts": {"answer": ["a1", "b1"]}} if pinned else {}))
    assert stopped.status == "budget_exceeded"
    other, models = pool("9")
    with pytest.raises(ConfigError) as refused:
        Orchestra(other, store=tmp_path / "runs.db").resume(stopped.run_id, budget={"max_calls": 100})
    assert str(refused.value) == (
        f"run {stopped.run_id} fixed its experts to a1, b1, which this Orchestra's pool has not (its agents: a9, b9); "
        "resume it on the pool it ran on" if pinned else
        f"run {stopped.run_id}'s recorded answers came from kw1, m1, which this Orchestra's pool has not (its models: "
        "m9, kw9); resume it on the pool it ran on (they would be asked anew of other models, not replayed)")
    assert not any(model.requests for model in models)
    assert orc.resume(stopped.run_id, budget={"max_calls": 100}).status == "done"


def test_a_run_id_given_again_with_other_settings_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run's id given again with k=1 ran it again under k=1: its record overwritten (k=3's
    answer gone) and its usage saying 9 calls, the first run's, for a run of 6. The same settings
    (a raised budget too) still go on with it, the stored run looked up once for both checks (task, settings)."""
    from orchestra.errors import ConfigError

    pool, models = scripted_pool(3)
    orc = Orchestra(pool, k=3, mode="topk", store=tmp_path / "runs.db")
    first = orc.run("What is 4+4?", plan=False, run_id="r-1")
    sent = sum(len(m.requests) for m in models.values())
    with pytest.raises(ConfigError) as refused:
        orc.run("What is 4+4?", plan=False, run_id="r-1", k=1)
    assert str(refused.value) == ("run r-1 was made with other settings (k 3, now 1); leave out run_id for a new "
                                  "run, or go on with it as it was (orchestra resume r-1)")
    assert sum(len(m.requests) for m in models.values()) == sent
    assert orc.store is not None and orc.store.result("r-1") == first
    looked_up: list[str] = []
    lookup = orc.store.run
    monkeypatch.setattr(orc.store, "run", lambda run_id: looked_up.append(run_id) or lookup(run_id))
    again = orc.run("What is 4+4?", plan=False, run_id="r-1", budget=Budget(max_calls=100))
    assert again.answer == first.answer and sum(len(m.requests) for m in models.values()) == sent
    assert looked_up == ["r-1"]


def test_a_kind_only_expected_is_replaced_by_its_first_measured_run() -> None:
    """A longer request's run is expected to take the measured run's tokens and more in each call, at
    its price per token, until one ends on its own: then what it took is the measure (an expectation
    kept as the largest would hold the server to the guess for good)."""
    admission = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=100_000, max_cost_usd=None), None))
    admission.count((9, 300, 0.003), (9, 300, 0.003), kind="short")
    admission.expect("long", "short", 100)  # 9 calls of 100 tokens more each
    admission.expect("long", "short", 1)  # (expected already: kept)
    admission.expect("other", "unknown", 100)  # (nothing measured to expect it from)
    assert admission._largest["long"] == (9, 1200, pytest.approx(0.012)) and "other" not in admission._largest
    assert admission.admits({"long": 1}, "long")  # (both kinds known: it runs beside the one in flight)
    admission.count((9, 700, 0.007), (9, 700, 0.007), kind="long")
    assert admission._largest["long"] == (9, 700, 0.007)
    admission.count((9, 500, 0.005), (9, 500, 0.005), kind="long")
    assert admission._largest["long"] == (9, 700, 0.007)  # (measured now: the costliest is kept)
