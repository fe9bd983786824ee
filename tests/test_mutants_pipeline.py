"""Behaviour of the scheduler, planning, staffing, workflow runs and what the CLI prints that a
mutation run found unpinned.

Each test pins one behaviour a user depends on; only model answers are scripted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import kind_of, plan_json, scripted_pool
from rich.console import Console

from orchestra import Budget, Orchestra
from orchestra.errors import BadResponse, ContextTooLong
from orchestra.inspect import show_run
from orchestra.models import ChatRequest, ChatResult, FunctionModel
from orchestra.pipeline.planning import Planner, content_words, is_simple_task, off_topic_steps
from orchestra.pipeline.scheduler import NodeSettings
from orchestra.plan import Plan
from orchestra.result import RunResult, RunUsage
from orchestra.settings import AnswerOptions, Settings
from orchestra.store import RunStore
from orchestra.view import summary_line


def test_a_single_sinks_answer_cut_at_its_token_limit_reads_as_cut() -> None:
    """An answer written by the one sink's expert and stopped at max_tokens is flagged ``answer_cut``."""

    def expert(name: str, request: ChatRequest) -> ChatResult:
        return ChatResult(text="The answer is half a sen", model=name, finish_reason="length")

    pool, _ = scripted_pool(1, expert=expert)
    result = Orchestra(pool, k=1, aggregate="none").run("one step")
    assert result.status == "done", result.error
    assert result.answer == "The answer is half a sen"
    assert result.answer_cut


def test_a_nodes_own_strategy_overrides_the_runs() -> None:
    """A workflow step's ``aggregate`` is the node's strategy, not the run's (no aggregation call for a vote)."""
    pool, models = scripted_pool(2, expert=lambda name, request: f"{name}: The answer is {name[-1]}")
    result = Orchestra(pool, k=2, mode="topk", aggregate="synthesize").run(
        "one step", node_settings={"answer": NodeSettings(aggregate="vote")})
    assert result.status == "done", result.error
    node = result.node("answer")
    assert node.strategy == "vote" and node.aggregator is None
    assert not any(kind_of(r) == "aggregate" for model in models.values() for r in model.requests)
    assert result.answer in ("m0: The answer is 0", "m1: The answer is 1")


def test_with_several_sinks_only_the_final_synthesis_gets_the_answers_options() -> None:
    """Two sinks: neither sink's experts write the answer (the final synthesis does), so only it gets
    the answer's token limit and temperature."""
    pool, models = scripted_pool(2, plan=plan_json(("a", []), ("b", [])))
    result = asyncio.run(Orchestra(pool, k=1).arun("two parts", answer=AnswerOptions(max_tokens=7, temperature=0.3)))
    assert result.status == "done", result.error
    sent = {kind: [(r.max_tokens, r.temperature) for m in models.values() for r in m.requests if kind_of(r) == kind]
            for kind in ("expert", "final")}
    assert len(sent["expert"]) == 2 and (7, 0.3) not in sent["expert"]
    assert sent["final"] == [(7, 0.3)]


def test_a_nodes_own_k_holds_when_its_skills_were_matched_before() -> None:
    """A node whose skills an earlier node matched already is drawn at once, and with its own ``k``."""
    plan = plan_json(("a", [], ["algebra"]), ("b", ["a"], ["algebra"]))
    pool, _ = scripted_pool(4, plan=plan)
    result = Orchestra(pool, k=1, mode="topk").run(
        "two steps", node_settings={"a": NodeSettings(k=3), "b": NodeSettings(k=3)})
    assert result.status == "done", result.error
    assert [len(result.node(n).experts) for n in ("a", "b")] == [3, 3]


def test_a_nodes_own_skills_override_the_plans() -> None:
    """Skills given for a node (a workflow step's ``recruit.skills``) are recruited on, not the plan's."""
    pool, _ = scripted_pool(2, plan=plan_json(("a", [], ["algebra"])))
    result = Orchestra(pool, k=1).run("one step", node_settings={"a": NodeSettings(skills=("poetry",))})
    assert result.status == "done", result.error
    assert result.node("a").skills == ["poetry"]


def test_of_several_experts_only_the_aggregator_streams_the_answer() -> None:
    """With two experts the answer is their aggregate: no expert's call is given the answer's stream."""
    pool, models = scripted_pool(2, expert=lambda name, request: f"{name}: The answer is {name[-1]}")
    streamed: list[str] = []
    result = asyncio.run(Orchestra(pool, k=2, mode="topk", aggregate="synthesize").arun(
        "Say one", plan=False, on_answer_text=streamed.append))
    assert result.status == "done", result.error
    streams = {kind: [r.on_text is not None for m in models.values() for r in m.requests if kind_of(r) == kind]
               for kind in ("expert", "aggregate")}
    assert streams == {"expert": [False, False], "aggregate": [True]}


def test_a_dependencys_output_one_character_over_context_chars_is_cut() -> None:
    """A dependency's output longer than ``context_chars`` (by one character) reaches its dependent cut and marked."""
    def expert(name: str, request: ChatRequest) -> str:
        return "0123456789X" if "do a" in request.prompt_text().split("Your assignment")[-1] else "fine"

    pool, models = scripted_pool(1, plan=plan_json(("a", []), ("b", ["a"])), expert=expert)
    result = Orchestra(pool, k=1, context_chars=10).run("two steps")
    assert result.status == "done", result.error
    [b_prompt] = [r.prompt_text() for r in models["m0"].requests if "do b" in r.prompt_text().split("Your assignment")[-1]]
    assert "0123456789 [...]" in b_prompt and "0123456789X" not in b_prompt


def test_an_expert_refused_by_the_budget_fails_its_node_rather_than_answering_with_fewer() -> None:
    """One expert answered, the next was refused by the budget: the node stops (a resume finishes it), it is not
    answered by the one expert, and the run is ``budget_exceeded``."""
    pool, _ = scripted_pool(2, expert=lambda name, request: f"{name}: The answer is 1")
    result = Orchestra(pool, k=2, mode="global", aggregate="vote", budget=Budget(max_calls=1)).run("x?", plan=False)
    assert result.status == "budget_exceeded"
    assert result.node("answer").status == "failed" and result.answer is None


def test_experts_failing_for_different_reasons_fail_the_node_as_every_expert_failed() -> None:
    """Only when every expert's error is the user's (a context too long) is that error the node's; mixed failures
    read "every expert failed" and are not the user's to fix."""
    def expert(name: str, request: ChatRequest) -> str:
        raise ContextTooLong("the prompt is too long") if name == "m1" else BadResponse("garbled")

    pool, _ = scripted_pool(2, expert=expert)
    result = Orchestra(pool, k=2, mode="global", aggregate="vote").run("x?", plan=False)
    assert result.status == "failed"
    assert result.node("answer").error.startswith("every expert failed; first error: ")
    assert not result.user_error


def test_a_dependent_sees_its_dependencys_rendered_prompt_as_its_instruction() -> None:
    """A node given a prompt renders its instruction; a dependent lists that rendered instruction with its output."""
    pool, models = scripted_pool(1, plan=plan_json(("a", []), ("b", ["a"])),
                                 expert=lambda name, request: "the output")
    result = Orchestra(pool, k=1).run("two steps", node_settings={"a": NodeSettings(prompt=lambda outputs: "Rendered A")})
    assert result.status == "done", result.error
    assert result.node("a").instruction == "Rendered A"
    [b_prompt] = [r.prompt_text() for r in models["m0"].requests if "do b" in r.prompt_text()]
    assert "[a] Rendered A\nthe output" in b_prompt


def test_one_expert_named_for_a_node_of_several_is_recruited_for_its_skills() -> None:
    """Experts named for a node whose ``k`` is above one still have the node's skills found (they are shown and
    explained); only a k = 1 node with its one agent named skips recruiting."""
    pool, _ = scripted_pool(3, keywords=["algebra"])
    node = Orchestra(pool, k=2, mode="topk").run("x?", plan=False, experts={"answer": ["agent1"]}).node("answer")
    assert node.experts == ["agent1"] and node.skills == ["algebra"]
    alone = Orchestra(pool, k=1, mode="topk").run("x?", plan=False, experts={"answer": ["agent1"]}).node("answer")
    assert alone.experts == ["agent1"] and alone.skills == []


# --- planning ------------------------------------------------------------------------------------


def test_a_task_of_exactly_twelve_words_in_one_sentence_takes_the_fast_path() -> None:
    """``is_simple_task``'s word limit is inclusive: twelve words are simple, thirteen are not."""
    twelve = "Why do cats like to sleep in warm sunny spots near windows?"
    assert len(twelve.split()) == 12 and is_simple_task(twelve)
    assert not is_simple_task(twelve.replace("Why", "Why exactly"))


def test_content_words_stem_plurals_but_not_double_s_and_keep_seven_letters_and_three_letter_words() -> None:
    """A plural ``s`` is dropped but not the end of ``glass``; stems keep seven letters; ``sun`` is a content word."""
    assert content_words("glass planets planetary sun") == {"glass", "planet", "planeta", "sun"}


def test_a_step_whose_id_names_the_tasks_subject_is_about_the_task() -> None:
    """A step is on topic when its id or its instruction shares a content word with the task."""
    plan = Plan.model_validate({"subtasks": [{"id": "tides", "instruction": "Explain it briefly"}]})
    assert off_topic_steps(plan, "How do tides work?") == []


def test_a_given_plan_may_have_more_steps_than_a_planner_may_write() -> None:
    """A given plan (a workflow's steps, a resumed run's plan) is not held to ``max_nodes``."""
    plan = Plan.model_validate({"subtasks": [{"id": f"s{i}", "instruction": f"do {i}"} for i in range(3)]})

    async def no_calls(calls: object) -> list[object]:
        raise AssertionError("a given plan asks the planner nothing")

    outcome = asyncio.run(Planner(FunctionModel(lambda request: "unused", name="p")).plan(
        "task", Settings(max_nodes=2), no_calls, given=plan))
    assert (outcome.plan, outcome.attempts, outcome.note) == (plan, 0, "given")


# --- what the CLI prints -------------------------------------------------------------------------


def test_the_summary_line_counts_tokens_in_and_out_failed_calls_and_tenths_of_a_second() -> None:
    """``summary_line``: run id, status, calls (with the failed ones), requests, prompt plus completion tokens,
    cost and seconds to a tenth."""
    usage = RunUsage(calls=9, requests=11, prompt_tokens=1200, completion_tokens=345, cost_usd=0.25, failed_calls=2)
    result = RunResult(run_id="r1", task="t", status="partial", answer="a", error="e", usage=usage, elapsed_s=3.26)
    assert summary_line(result) == "run r1 · partial · 9 calls (2 failed) · 11 requests · 1,545 tokens · $0.2500 · 3.3 s"
    quiet = result.model_copy(update={"usage": usage.model_copy(update={"failed_calls": 0})})
    assert summary_line(quiet) == "run r1 · partial · 9 calls · 11 requests · 1,545 tokens · $0.2500 · 3.3 s"


def test_show_prints_the_runs_totals_its_failed_nodes_error_and_resumes(tmp_path: Path) -> None:
    """``orchestra show``: the resume count, a failed node's error, the totals line (tokens in and out) and the
    run's error."""
    pool, _ = scripted_pool(2, plan=plan_json(("a", []), ("b", [])),
                            expert=lambda name, request: BadResponse("garbled") if "do b" in request.prompt_text()
                            else "The answer is 1")
    result = Orchestra(pool, k=1, store=tmp_path / "runs.db").run("two parts")
    assert result.status == "partial"
    console = Console(record=True, width=200)
    show_run(console, RunStore(tmp_path / "runs.db"), result.run_id)
    shown = console.export_text()
    usage = result.usage
    assert "resumed" not in shown  # (it read "resumed 0x")
    assert f"b: {result.node('b').error}" in shown
    assert usage.failed_calls == 1 and (f"calls {usage.calls} (1 failed) · requests {usage.requests} · tokens {usage.prompt_tokens:,} in / "
            f"{usage.completion_tokens:,} out · ") in shown
    assert usage.prompt_tokens != usage.completion_tokens
    assert shown.rstrip().endswith(result.error.split("\n")[-1][-60:])
    Orchestra(pool, k=1, store=tmp_path / "runs.db").resume(result.run_id)
    again = Console(record=True, width=200)
    show_run(again, RunStore(tmp_path / "runs.db"), result.run_id)
    assert "  resumed 1 time " in again.export_text()
