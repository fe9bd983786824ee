"""Mutation round on the scheduler, structured output, grading, aggregation, the terminal views, the
checkpoint thread, the HTTP transports and ``orchestra inspect``: each test kills a one-line mutant the
other tests let through."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from orchestra import Agent, Orchestra, Pool
from orchestra.checkpoints import Checkpointer
from orchestra.errors import StoreError
from orchestra.models import ChatRequest, ChatResult, FunctionModel


def test_a_stopped_checkpointer_starts_no_thread_for_a_later_commit(tmp_path: Path) -> None:
    """A commit after the store's checkpoints were stopped (a write as it closes) starts no thread
    that would connect to the file again (checkpoints.py:32, the ``_stopped`` check dropped)."""
    path = tmp_path / "runs.db"
    sqlite3.connect(path).close()
    checkpoints = Checkpointer(path, seconds=0.0)
    checkpoints.stop()
    checkpoints.committed()
    assert checkpoints._thread is None


def test_waiting_on_a_stopped_checkpointer_returns_at_once_rather_than_failing(tmp_path: Path) -> None:
    """``wait`` after ``stop`` has no checkpoint to wait for: it returns (checkpoints.py:43, without the
    ``_stopped`` check it waited out its timeout and raised StoreError)."""
    path = tmp_path / "runs.db"
    sqlite3.connect(path).close()
    checkpoints = Checkpointer(path, seconds=0.0)
    checkpoints.committed()
    checkpoints.stop(wait=True)
    checkpoints.wait(timeout=0.5)  # (the mutant: "no checkpoint of ... ended within 0.5 s")
    idle = Checkpointer(path)
    idle.stop()
    idle.wait(timeout=0.5)


def test_commits_while_the_thread_rests_between_checkpoints_wait_for_its_next_turn(tmp_path: Path) -> None:
    """At most one checkpoint a ``seconds``: commits that come while the thread rests start none until
    then (checkpoints.py:98, a rest of 0 made a checkpoint, and its sync, of every commit); the error of
    a wait that saw none says its seconds as a person writes them (checkpoints.py:44, ``{timeout}``)."""
    path = tmp_path / "runs.db"
    sqlite3.connect(path).close()
    checkpoints = Checkpointer(path, seconds=3600.0)
    checkpoints.committed()
    checkpoints.wait()  # the first checkpoint, at once
    begun = checkpoints.begun
    for _ in range(5):
        checkpoints.committed()
    with pytest.raises(StoreError, match="no checkpoint of .* ended within 2 s$"):
        checkpoints.wait(timeout=2.0)  # (said as "2 s", not "2.0 s")  # (the thread rests for an hour: no checkpoint comes)
    assert checkpoints.begun == begun
    checkpoints.stop(wait=True)


def test_closing_does_not_wait_for_a_writer_that_holds_the_store(tmp_path: Path) -> None:
    """The last copy of the WAL at close is made only if no other connection is busy with it: a
    writer holding the store leaves the WAL as it is at once (checkpoints.py:68, a busy timeout of 30
    s kept the closing process waiting for the other one's transaction)."""
    path = tmp_path / "runs.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    checkpoints = Checkpointer(path, seconds=3600.0)
    checkpoints.committed()
    checkpoints.wait()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (2)")
    started = time.monotonic()
    checkpoints.finish()
    assert time.monotonic() - started < 10  # (at once; the mutant waits out 30 s)
    writer.execute("COMMIT")
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    writer.close()
    db.close()


def _two_experts(tmp_path: Path) -> Orchestra:
    from helpers import kind_of

    def reply(request: ChatRequest) -> object:
        return {"keywords": ["math"]} if kind_of(request) == "keywords" else "The answer is 4"

    models = {name: FunctionModel(reply, name=name) for name in "abk"}
    pool = Pool(agents=[Agent(name=name, model=models[name]) for name in "ab"], planner=models["k"])
    return Orchestra(pool, k=2, plan=False, store=tmp_path / "runs.db")


def test_show_says_no_stopped_early_of_a_node_whose_whole_team_answered(tmp_path: Path) -> None:
    """A node whose experts were all asked and then aggregated was not stopped early: ``show`` names its
    aggregator as it is and says nothing of calls saved (inspect.py:69, every node with expert outputs
    read as stopped early: "so 0 calls (the aggregation) was not made"); its calls are numbered from 1."""
    from rich.console import Console

    from orchestra.inspect import run_report, show_run
    from orchestra.store import RunStore

    result = _two_experts(tmp_path).run("What is 2 + 2?")
    node = result.plan.nodes[0]
    assert result.status == "done" and node.saved_calls == 0 and node.aggregator
    console = Console(record=True, width=300)
    show_run(console, RunStore(tmp_path / "runs.db"), result.run_id)
    shown = console.export_text()
    assert "stopped early" not in shown and "(not needed)" not in shown
    assert "call 1 · " in shown and "call 0 · " not in shown  # (inspect.py:136: counted from 1)
    assert "failed)" not in shown  # (inspect.py:157: no "(0 failed)" where none failed)
    [row] = run_report(RunStore(tmp_path / "runs.db"), result.run_id)["nodes"]
    assert (row["not_asked"], row["saved_calls"]) == ([], 0)


def test_a_ref_one_past_the_end_of_a_list_is_named_not_an_index_error() -> None:
    """``#/prefixItems/1`` of a list of one points nowhere: the schema's problem says so (structured.py:94,
    ``<=`` read one past the end and raised IndexError out of ``schema_problem``)."""
    from orchestra.models.structured import schema_problem

    schema = {"type": "array", "prefixItems": [{"type": "string"}], "items": {"$ref": "#/prefixItems/1"}}
    assert schema_problem(schema) == "$.items.$ref must point inside the schema (#/$defs/Name), not '#/prefixItems/1'"
    assert schema_problem({**schema, "items": {"$ref": "#/prefixItems/0"}}) is None


def test_a_call_cancelled_before_it_was_sent_shows_what_it_cost_not_unknown() -> None:
    """Only a request cut off in flight billed what is not known; a call cancelled otherwise shows its
    tokens and cost (inspect.py:89, ``or`` for ``and`` said "unknown" of every cancelled call), and one
    whose earlier attempt counted prompt tokens alone shows them (inspect.py:91, without its
    ``prompt_tokens`` it read as if nothing were known)."""
    from orchestra.inspect import _spent
    from orchestra.money import usd_exact

    queued = {"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.5, "requests": 1,
              "error": "CallCancelled: cancelled by the user before an answer"}
    assert _spent(queued) == f"3+4 tokens · {usd_exact(0.5)}"
    cut = {**queued, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
           "error": "CallCancelled: cancelled by the user with its request in flight"}
    assert _spent(cut) == "tokens and cost unknown (cut off in flight)"
    # an attempt before it was answered, its prompt alone counted (a free model: no cost, no tokens out)
    retried = {**cut, "prompt_tokens": 5}
    assert _spent(retried) == f"5+0 tokens · {usd_exact(0)}, and the cut-off request's unknown"


def test_calls_resolved_beyond_those_queued_leave_none_queued_not_fewer() -> None:
    """Calls the cache answered as they were queued (or counted twice) never make a model's queue
    negative in the live view (view.py:191, without ``max(0, ...)`` the batch panel showed -2 queued)."""
    from orchestra.events import CallsQueued, CallsResolved
    from orchestra.view import RunState

    state = RunState()
    state.handle(CallsQueued(model="m", count=1, run_id="r", purpose="expert"))
    state.handle(CallsResolved(model="m", count=3, run_id="r", source="cache"))
    assert (state.models["m"].queued, state.cache_hits) == (0, 3)


def test_a_run_that_ends_before_any_answer_for_no_fault_of_the_user_still_writes_its_lines() -> None:
    """The log holds its lines until an answer comes; a run that ends first for a reason that is not
    the user's to fix writes them (and its end) rather than dropping them (view.py:449, the held lines
    were dropped for any run that ended before an answer)."""
    import io

    from orchestra.events import RunDone, RunStarted
    from orchestra.view import LogView

    stream = io.StringIO()
    view = LogView(stream, clock=lambda: 0.0)
    view.listen(RunStarted(run_id="r1", task="What is 2 + 2?"))
    assert stream.getvalue() == ""  # (held)
    view.listen(RunDone(run_id="r1", status="failed", answer=None, error="the server broke", elapsed_s=1.0))
    assert stream.getvalue() == "[   0.0s] run r1: What is 2 + 2?\n[   0.0s] run r1 failed in 1.0 s\n"
    told = io.StringIO()
    refused = LogView(told, clock=lambda: 0.0)
    refused.listen(RunStarted(run_id="r2", task="t"))
    refused.listen(RunDone(run_id="r2", status="failed", answer=None, error="bad key", elapsed_s=1.0, user_error=True))
    assert told.getvalue() == ""  # (the one error line is all the user reads)


def test_a_large_multiple_of_a_tenth_is_a_multiple_despite_binary_floats() -> None:
    """``multipleOf`` is judged on the numbers as written: 98765432.1 is a multiple of 0.1 (an absolute
    tolerance of 1e-9 refused it: 987654320.9999999), and past 5e8 a tolerance relative to the quotient
    let every value through (3000000001 read as a multiple of 2)."""
    from orchestra.models.structured import StructuredOutputError, check_schema

    for value, step in ((98765432.1, 0.1), (0.3, 0.1), (-0.6, 0.2), (1e300, 0.1), (3000000002, 2), (4.0, 2)):
        check_schema(value, {"type": "number", "multipleOf": step})
    for value, step in ((3.15, 0.1), (3000000001, 2), (7000000001, 10), (1000000000.5, 1), (3000000001.0, 2)):
        with pytest.raises(StructuredOutputError, match=f"not a multiple of {step}"):
            check_schema(value, {"type": "number", "multipleOf": step})


def test_a_value_that_fits_no_branch_of_one_of_says_why_the_first_refused_it() -> None:
    """A value fitting none of ``oneOf`` is told why the first branch refused it; one fitting two is told
    only that (structured.py:329, the reason went with the wrong count: none said nothing, two said a
    reason nothing had)."""
    from orchestra.models.structured import StructuredOutputError, check_schema

    schema = {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]}
    with pytest.raises(StructuredOutputError) as none:
        check_schema(True, schema)
    assert str(none.value) == "$: fits 0 of oneOf, not exactly one (first: $: expected string, got bool)"
    with pytest.raises(StructuredOutputError) as two:
        check_schema(3, schema)
    assert str(two.value) == "$: fits 2 of oneOf, not exactly one"


def test_an_answer_cut_at_exactly_its_max_tokens_is_cut_by_its_limit_not_a_full_context() -> None:
    """An answer that wrote all the tokens its request allowed and said "length" stopped at its token
    limit: raising max_tokens helps, so it is no full context window (scheduler.py:755, ``<=`` read an
    answer cut at exactly its limit as one cut by a full context, and the advice went wrong)."""
    from helpers import scripted_pool

    from orchestra.models.types import Usage
    from orchestra.settings import AnswerOptions

    def expert(name: str, request: ChatRequest) -> ChatResult:
        written = request.max_tokens if request.max_tokens is not None else 0
        return ChatResult(text="The answer is half a sen", model=name, finish_reason="length",
                          usage=Usage(requests=1, completion_tokens=written))

    pool, _ = scripted_pool(1, expert=expert)
    result = Orchestra(pool, k=1, aggregate="none", store=False).run("one step", answer=AnswerOptions(max_tokens=7))
    assert result.status == "done", result.error
    assert result.answer_cut and not result.context_full


def test_a_json_answer_field_that_is_a_boolean_is_graded_as_the_whole_object() -> None:
    """``{"answer": true}`` names no text to grade: the object is read whole, as one line, not as "True"
    (grading.py:46, a bool taken for a number read it as the word)."""
    from orchestra.grading import answer_text

    assert answer_text('{"answer": true}') == '{"answer": true}'
    assert answer_text('{"answer": 42}') == "42"


def test_an_answer_that_ends_in_an_initial_and_one_name_is_read_whole() -> None:
    """"The answer is J. Rowling": the stop after the initial goes on to the name, the last word of
    the reply (grading.py:99, ``< 1`` looked for a second word after it: IndexError)."""
    from orchestra.grading import ExactMatchGrader

    assert ExactMatchGrader().extract("The answer is J. Rowling") == "j rowling"


def test_a_reference_that_is_a_choices_one_letter_text_is_that_choices_letter() -> None:
    """Choices e, f, g and the answer "f": the answer is the second choice, B, not the letter F (which is
    no letter of three choices) (grading.py:227, any letter A-J was taken as the letter itself)."""
    from orchestra.datasets import Item
    from orchestra.grading import MultipleChoiceGrader

    item = Item(id="1", question="Which?", answer="f", choices=("e", "f", "g"))
    assert MultipleChoiceGrader.reference(item) == "B"
    assert MultipleChoiceGrader().grade("The answer is (B)", item)


def test_a_negative_mixed_number_is_negative_in_its_fraction_too() -> None:
    """"-3 1/2" is -7/2, not -5/2 (grading.py:367, the fraction's sign not following the whole number's)."""
    from fractions import Fraction

    from orchestra.grading import normalize_number

    assert normalize_number("-3 1/2") == Fraction(-7, 2)
    assert normalize_number("3 and 1/2") == Fraction(7, 2)


def test_a_mixed_number_over_zero_is_no_number_not_a_crash() -> None:
    """"3 1/0" is no number: None, not a ZeroDivisionError out of the grader (grading.py:365, the check
    of the fraction's denominator dropped)."""
    from orchestra.grading import normalize_number

    assert normalize_number("3 1/0") is None


def test_a_plan_line_waits_past_a_call_resolved_for_a_reason_that_is_not_a_replay() -> None:
    """Calls the budget refused while a run plans say nothing of where its plan came from, and break
    nothing (view.py:442, without the source check a "budget" or "shared" resolution was looked up among
    the replay sources: KeyError out of the listener)."""
    import io

    from orchestra.events import CallsResolved, PlanRequested
    from orchestra.view import LogView

    stream = io.StringIO()
    view = LogView(stream, clock=lambda: 0.0)
    view.listen(PlanRequested(run_id="r", attempt=1))
    view.listen(CallsResolved(model="m", count=1, run_id="r", source="budget"))
    assert "planning…" not in stream.getvalue()  # (still held: no answer yet)


def test_the_final_answer_in_a_json_schema_is_written_compact() -> None:
    """A run's answer asked for in a JSON schema (not only "json") is the parsed value, compact
    (aggregation.py:256, only ``output: json`` was dumped: a schema's answer kept the model's spacing)."""
    import asyncio

    from orchestra.pipeline.aggregation import FinalSynthesis
    from orchestra.settings import AnswerOptions

    model = FunctionModel(lambda request: '{"city": "Paris",  "population": 2100000}', name="m")

    async def call(calls: list) -> list:
        return [await m.complete_one(r) for m, r in calls]

    final = FinalSynthesis(Agent(name="agg", model=model))
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
    answer = asyncio.run(final.answer("t", [{"id": "a", "instruction": "i", "output": "o"}], call, seed=1,
                                      options=AnswerOptions(output=schema)))
    assert answer == '{"city":"Paris","population":2100000}'
