"""Behaviour of data-set workflow runs, what ``ask`` and ``show`` print, a served conversation's
context and the chat loop that a mutation run found unpinned.

Each test pins one behaviour a user depends on; only model answers are scripted.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from helpers import kind_of, plan_json, scripted_pool
from rich.console import Console

from orchestra import Agent, Orchestra, Pool
from orchestra.chat import ChatSession
from orchestra.events import CallDone, CallsResolved, RunDone, RunStarted, UsageUpdated
from orchestra.inspect import show_run
from orchestra.models import FunctionModel
from orchestra.openai_wire import CONTEXT_CHARS, parse_completion
from orchestra.store import RunStore
from orchestra.view import LogView, RunState
from orchestra.workflow import Workflow
from orchestra.workflow_run import aevaluate_workflow, orchestra_for, run_workflow

ASK = [{"role": "user", "content": "What is 2 + 2?"}]


# --- openai_wire: a long conversation's context ---------------------------------------------------


def context_of(*turns: tuple[str, str]) -> str:
    """The context ``parse_completion`` reads from ``turns`` (role, content) before a last user question."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return parse_completion({"model": "orchestra", "messages": [*messages, *ASK]}).context


def test_system_messages_over_the_context_limit_are_cut_to_it_with_a_mark() -> None:
    """System messages longer than ``CONTEXT_CHARS`` keep their beginning, ``…`` included, in exactly that many."""
    context = context_of(("system", "s" * CONTEXT_CHARS), ("user", "earlier"))
    assert context == ("System: " + "s" * CONTEXT_CHARS)[:CONTEXT_CHARS - 1] + "…"


def test_system_messages_exactly_at_the_context_limit_are_kept_whole() -> None:
    """System messages of exactly ``CONTEXT_CHARS`` characters are the whole context, not cut or marked."""
    system = "System: " + "s" * (CONTEXT_CHARS - len("System: "))
    assert context_of(("system", system[len("System: "):]), ("user", "earlier")) == system


def test_a_turn_that_exactly_fills_the_context_is_kept_whole() -> None:
    """A turn whose line takes exactly the room left is kept as written, not cut and marked."""
    recent = "Assistant: recent"
    older = "a" * (CONTEXT_CHARS - len(recent) - 1 - len("User: "))
    assert context_of(("user", older), ("assistant", "recent")) == f"User: {older}\n{recent}"


def test_the_oldest_kept_turn_is_cut_at_its_start_and_older_turns_stay_out() -> None:
    """The turn that does not fit keeps its end (``User: …`` and its last words); the turns before it
    are left out even when they are short enough to fit."""
    context = context_of(("user", "first question"), ("assistant", "first answer"),
                         ("user", "start " + "m" * 20_000 + " end"), ("assistant", "recent"))
    assert len(context) == CONTEXT_CHARS
    assert context.startswith("User: …mmm") and context.endswith("mmm end\nAssistant: recent")
    assert "first" not in context and "start" not in context


def test_a_turn_with_no_room_left_for_any_of_its_text_is_left_out() -> None:
    """When the room left holds only ``User: …``, the older turn is left out, not a bare mark (or all of it)."""
    recent = "Assistant: " + "r" * (CONTEXT_CHARS - len("User: …") - 1 - len("Assistant: "))
    assert context_of(("user", "an older question"), ("assistant", recent[len("Assistant: "):])) == recent


# --- chat: answers at the plan prompt, replans, history ------------------------------------------


def chat_session(answers: list[str], *, history_chars: int = 1500) -> tuple[ChatSession, io.StringIO,
                                                                               FunctionModel, FunctionModel]:
    """A chat session over a scripted pool reading ``answers`` (then end of input); its output, planner and expert."""
    lines = iter(answers)
    out = io.StringIO()
    pool, models = scripted_pool(1, plan=plan_json(("a", []), ("b", ["a"])))
    session = ChatSession(Orchestra(pool, k=1, store=False), Console(file=out, width=200),
                          read=lambda prompt: next(lines, None), history_chars=history_chars)
    return session, out, models["planner"], models["m0"]


def experts_asked(model: FunctionModel) -> int:
    """How many expert calls ``model`` answered."""
    return sum(kind_of(request) == "expert" for request in model.requests)


@pytest.mark.parametrize("answer", ["y", "yes", "a", "accept"])
def test_chat_runs_the_plan_on_each_accepting_answer(answer: str) -> None:
    """``y`` and ``yes`` accept a plan as ``a`` and ``accept`` do."""
    session, out, _, expert = chat_session(["Write a report, then check it", answer])
    session.loop()
    assert experts_asked(expert) == 2 and "cancelled" not in out.getvalue()
    assert len(session.history) == 1


@pytest.mark.parametrize("answer", ["n", "no", "c", "cancel"])
def test_chat_drops_the_task_on_each_refusing_answer(answer: str) -> None:
    """``n`` and ``no`` cancel a task as ``c`` and ``cancel`` do: nothing runs and no retry is asked for."""
    session, out, _, expert = chat_session(["Write a report, then check it", answer])
    session.loop()
    text = out.getvalue()
    assert experts_asked(expert) == 0 and "cancelled" in text and "answer a, e, r or c" not in text
    assert session.history == []


def test_end_of_input_at_the_plan_prompt_cancels_the_task() -> None:
    """Input that ends at the plan prompt (a closed pipe, Ctrl-D) cancels the task; it does not run it."""
    session, out, _, expert = chat_session(["Write a report, then check it"])
    session.loop()
    assert experts_asked(expert) == 0 and out.getvalue().endswith("cancelled\nbye\n")


def test_a_replan_asks_with_a_new_seed_and_the_users_hint() -> None:
    """``r HINT`` asks the planner again with another seed (the same request would be the same plan)
    and the hint in its context; a plain ``r`` asks with yet another seed."""
    session, _, planner, _ = chat_session(["Write a report, then check it", "r make it shorter", "r", "c"])
    session.loop()
    plans = [request for request in planner.requests if kind_of(request) == "plan"]
    assert len(plans) == 3 and len({request.seed for request in plans}) == 3
    assert "The user asks for a different plan: make it shorter" in plans[1].prompt_text()
    assert "different plan" not in plans[0].prompt_text() + plans[2].prompt_text()


def test_chat_history_keeps_the_most_recent_turns_when_trimmed() -> None:
    """Past ``history_chars`` the context keeps the end of the history (the latest turn), not its start."""
    session, _, planner, _ = chat_session(["First task: " + "x" * 200, "a", "Second task, then more", "a",
                                           "Third task, then more", "c"], history_chars=120)
    session.loop()
    third = [request for request in planner.requests if kind_of(request) == "plan"][-1].prompt_text()
    assert "Q: Second task, then more" in third and "First task" not in third


# --- the log and the counters line of ask ---------------------------------------------------------


def test_the_counters_add_up_cache_hits_and_replayed_calls_by_their_counts() -> None:
    """Calls resolved in groups count each call: three from the cache, two replayed from the store."""
    state = RunState()
    for source, count in (("cache", 3), ("store", 2), ("cache", 1), ("budget", 4)):
        state.handle(CallsResolved(model="m", count=count, run_id="r1", source=source))
    state.handle(UsageUpdated(run_id="r1", calls=1, requests=1, prompt_tokens=5, completion_tokens=2,
                              cost_usd=0.0, cache_misses=1))
    assert " · cache 4 hit / 1 miss · replayed 2 · " in state.counters()


def test_the_counters_show_cache_misses_with_no_hit_yet() -> None:
    """A cold cache (misses, no hit) is shown, ``cache 0 hit / 2 miss``."""
    state = RunState()
    state.handle(UsageUpdated(run_id="r1", calls=2, requests=2, prompt_tokens=5, completion_tokens=2,
                              cost_usd=0.0, cache_misses=2))
    assert " · cache 0 hit / 2 miss · " in state.counters()


def test_a_failed_call_does_not_release_the_held_log_lines() -> None:
    """Only an answered call releases the held lines: a run whose calls all failed for a user's reason
    (a refused key) leaves no log line, only the command's error."""
    stream = io.StringIO()
    log = LogView(stream, clock=lambda: 0.0)
    log.listen(RunStarted(run_id="r1", task="t"))
    log.listen(CallDone(run_id="r1", model="m", purpose="plan", node=None, request=None, response=None,
                        error="401: bad key"))
    assert stream.getvalue() == ""
    log.listen(RunDone(run_id="r1", status="failed", answer=None, error="bad key", elapsed_s=0.1, user_error=True))
    assert stream.getvalue() == ""


# --- orchestra show ----------------------------------------------------------------------------


def test_show_prints_a_workflows_inputs_as_json_and_one_request_in_the_singular(tmp_path: Path) -> None:
    """``show``: a boolean input reads as the workflow wrote it (``true``, not Python's ``True``) and a
    call of one request says ``1 request``."""
    model = FunctionModel(lambda request: "The answer is 1", name="m")
    path = tmp_path / "wf.yaml"
    path.write_text("name: brief\ninputs:\n  short: {type: boolean, default: true}\n"
                    "steps:\n  - id: answer\n    prompt: 'Answer (short: {{ inputs.short }})'\n")
    workflow = Workflow.load(path, pool=Pool(agents=[Agent(name="a", model=model)]))
    result = run_workflow(workflow, {}, orchestra=orchestra_for(workflow, store=tmp_path / "runs.db"))
    assert result.status == "done", result.error
    console = Console(record=True, width=200)
    show_run(console, RunStore(tmp_path / "runs.db"), result.run_id)
    shown = console.export_text()
    assert "inputs.short: true" in shown
    assert " · 1 request · " in shown and "1 requests" not in shown



# --- data-set workflows --------------------------------------------------------------------------


def data_set_workflow(tmp_path: Path, model: FunctionModel, *, inputs: str = "", prompt: str = "{{ inputs.question }}",
                      dataset: str = "{path: quiz.jsonl}") -> Workflow:
    """A one-step workflow over a two-item quiz (answers 2 and 4), run on ``model``."""
    (tmp_path / "quiz.jsonl").write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n'
                                         '{"id": "q2", "question": "What is 2 + 2?", "answer": "4"}\n')
    path = tmp_path / "wf.yaml"
    path.write_text(f"name: quiz\ninputs:\n  question: {{type: string, required: true}}\n{inputs}"
                    f"dataset: {dataset}\nsteps:\n  - id: answer\n    prompt: '{prompt}'\n")
    return Workflow.load(path, pool=Pool(agents=[Agent(name="a", model=model)]))


def test_a_data_set_workflow_that_declares_answer_format_gets_each_items(tmp_path: Path) -> None:
    """A workflow declaring ``answer_format`` is given each item's (a number's: ``The answer is N``), not its default."""
    model = FunctionModel(lambda request: "The answer is 2", name="m")
    workflow = data_set_workflow(tmp_path, model, inputs="  answer_format: {type: string, default: free form}\n",
                                 prompt="{{ inputs.question }} FORMAT {{ inputs.answer_format }}")
    report = asyncio.run(aevaluate_workflow(workflow, {}))
    assert report.items == 2 and report.correct == 1
    asked = [request.prompt_text() for request in model.requests if kind_of(request) == "expert"]
    assert asked and all('FORMAT End with "The answer is N" where N is the final number.' in prompt
                                   for prompt in asked)


def test_a_resume_goes_on_with_the_same_runs_after_the_data_sets_grader_changes(tmp_path: Path) -> None:
    """Setting the data set's ``grader:`` after an evaluation regrades its runs on resume (no call is made again)."""
    model = FunctionModel(lambda request: "The answer is 2", name="m")
    workflow = data_set_workflow(tmp_path, model)
    orc = orchestra_for(workflow, store=tmp_path / "runs.db")
    assert asyncio.run(aevaluate_workflow(workflow, {}, orchestra=orc)).correct == 1
    asked = len(model.requests)
    regraded = data_set_workflow(tmp_path, model, dataset="{path: quiz.jsonl, grader: numeric}")
    report = asyncio.run(aevaluate_workflow(regraded, {}, orchestra=orchestra_for(regraded, store=tmp_path / "runs.db"),
                                            resume=True))
    assert (report.items, report.correct, report.reused) == (2, 1, 2) and len(model.requests) == asked
