"""Where session 41's mutation round left a one-line mutant alive: a JSON schema's type check, the
context's limit, a data set's admission after hopeless runs, a chat task's planning carried into its
resume, the server budget's admission by a request's size, what a cancelled or refused call counts
(its cache miss too), a model's own answer limit, where a nested setting given at the top belongs, and a
workflow's inputs given as a mapping that is no dict.

Only model answers are scripted; budgets, servers and stores are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from helpers import scripted_pool

from orchestra import Orchestra
from orchestra.budget import Budget, BudgetTracker, RunAdmission, Spent, task_budget
from orchestra.core import check_context
from orchestra.errors import BudgetExceeded, ConfigError, UnknownSetting
from orchestra.execute import Executor, RunLedger, _answer_limit
from orchestra.models import ChatRequest, FunctionModel, OpenAICompatible, Usage
from orchestra.models.http import Endpoint
from orchestra.models.pricing import FREE
from orchestra.models.structured import StructuredOutputError, check_schema
from orchestra.openai_wire import Completion
from orchestra.prompts import MAX_CONTEXT_CHARS
from orchestra.result import RunResult, RunUsage
from orchestra.serve import SIZE_STEP, Server, _kind, app
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, chat_handler
from orchestra.workflow import Workflow

# --- models/structured.py ----------------------------------------------------------------------


def test_a_boolean_is_no_number_in_a_schema() -> None:
    """JSON's true is no number, as it is no integer (Python's bool is an int): an answer of
    ``{"score": true}`` passed a schema asking for a number."""
    schema = {"type": "object", "properties": {"score": {"type": "number"}}}
    check_schema({"score": 0.5}, schema)
    check_schema({"score": 3}, schema)
    for flag in (True, False):
        with pytest.raises(StructuredOutputError, match=r"\$.score: expected number, got bool"):
            check_schema({"score": flag}, schema)
    check_schema({"score": True}, {"type": "object", "properties": {"score": {"type": ["number", "boolean"]}}})


# --- core.py: the context's limit ----------------------------------------------------------------


def test_a_context_of_exactly_the_limit_is_taken_and_one_character_more_refused() -> None:
    """``at most 500,000 fit``: a context of 500,000 characters fits, as a replan hint of exactly the
    room the conversation leaves does."""
    check_context("x" * MAX_CONTEXT_CHARS)
    with pytest.raises(ConfigError, match=r"^the context is 500,001 characters; at most 500,000 fit Orchestra's "
                                          r"prompts: shorten it$"):
        check_context("x" * (MAX_CONTEXT_CHARS + 1))
    check_context("h" * 36, "the hint", limit=36)
    with pytest.raises(ConfigError, match=r"^the hint is 37 characters; at most 36 fit"):
        check_context("h" * 37, "the hint", limit=36)


# --- budget.py: a data set's admission ---------------------------------------------------------


def test_a_run_that_fits_after_two_hopeless_ones_lets_runs_start_again() -> None:
    """Two runs stopped by a call over the limit on its own, none done, stop the runs not started;
    a run that was in flight then ending on its own shows the limit holds a run: runs start again
    (the refusal stayed, and every item after it was refused unstarted)."""
    admission = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=60, max_cost_usd=None), None))
    for run_id in ("long-1", "long-2"):
        run = BudgetTracker(Budget(), run_id, parent=admission.shared)
        with pytest.raises(BudgetExceeded):
            run.admit(ChatRequest.user("hi", max_tokens=64), FREE)  # its worst case alone is over the limit
        admission.ended(run, on_its_own=False)
    refused = admission.refusal(0)
    assert refused is not None and "one call of a run needs more than all of it" in str(refused)
    done = BudgetTracker(Budget(), "short-1", parent=admission.shared)
    done.settle(done.admit(ChatRequest.user("hi", max_tokens=1), FREE), Usage(prompt_tokens=10, requests=1))
    admission.ended(done, on_its_own=True)
    assert admission.refusal(0) is None and admission.admits(0)


def test_what_a_task_spent_planning_counts_its_tokens_against_its_resume_too() -> None:
    """A chat task's planning is recorded with its run (``Spent.of`` its budget) and counted again
    when the run is resumed: its tokens too, under a token limit (the calls alone were carried over,
    and a resume had the planning's tokens to spend once more)."""
    limit = Budget(max_calls=None, max_tokens=1_000, max_cost_usd=None)
    planning = task_budget(limit)
    for _ in range(2):  # two planner calls of 300 tokens
        planning.settle(planning.admit(ChatRequest.user("plan", max_tokens=10), FREE),
                        Usage(prompt_tokens=250, completion_tokens=50, requests=1))
    spent = Spent.of(planning)
    assert (spent.calls, spent.usage.prompt_tokens, spent.usage.completion_tokens, spent.usage.requests) == (
        2, 500, 100, 2)
    resumed = task_budget(limit, Spent.model_validate_json(spent.model_dump_json()))  # (as the store keeps it)
    assert (resumed.calls, resumed.prompt_tokens + resumed.completion_tokens) == (2, 600)
    run = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=None), "r", parent=resumed)
    with pytest.raises(BudgetExceeded, match="this task's budget max_tokens=1000"):
        run.admit(ChatRequest.user("hi", max_tokens=500), FREE)  # 600 spent: no room for 500 more
    run.settle(run.admit(ChatRequest.user("hi", max_tokens=300), FREE), Usage(prompt_tokens=10, requests=1))


# --- serve.py: a server budget's admission by a request's size ---------------------------------


def _server(budget: Budget) -> Server:
    pool, _ = scripted_pool(2)
    return app(pool, store=False, budget=budget).state.server


def test_a_request_is_admitted_as_the_smallest_measured_size_at_least_its_own() -> None:
    """Runs measured at two sizes: a request of the smaller one's size is expected to cost what a
    run of that size took, not the larger one's (it waited for room that run never needed)."""
    server = _server(Budget(max_calls=None, max_tokens=100_000, max_cost_usd=None))
    server._sizes["m"] = {12, 20}
    assert server._measured_kind("m", 12) == "m ~12"
    assert server._measured_kind("m", 11) == "m ~12"
    assert server._measured_kind("m", 13) == "m ~20"
    assert server._measured_kind("m", 20) == "m ~20"
    # a budget of calls alone: the size is no measure
    calls = _server(Budget(max_calls=100, max_tokens=None, max_cost_usd=None))
    calls._sizes["m"] = {12, 20}
    assert calls._measured_kind("m", 13) == "m ~0"
    # a budget of dollars alone: the size is one (a longer request's calls cost more)
    dollars = _server(Budget(max_calls=None, max_tokens=None, max_cost_usd=1.0))
    dollars._sizes["m"] = {12, 20}
    assert dollars._measured_kind("m", 13) == "m ~20"


def test_a_request_longer_than_any_measured_is_expected_to_cost_more_in_each_call() -> None:
    """A request longer than any measured is expected to take the longest measured run, plus in each
    of its calls the characters its messages may have grown by (4 a token), at that run's price."""
    server = _server(Budget(max_calls=None, max_tokens=100_000, max_cost_usd=None))
    admission = server.admission
    assert admission is not None
    admission.count((9, 1_000, 0.01), (9, 1_000, 0.01), kind="m ~8")
    admission.count((9, 3_000, 0.03), (9, 3_000, 0.03), kind="m ~12")
    server._sizes["m"] = {8, 12}  # (from the longest measured, not the shortest)
    assert server._measured_kind("m", 20) == "m ~20"
    grown = (SIZE_STEP ** 21 - SIZE_STEP ** 12) / 4  # (tokens more in each call: up to 1.25**21 characters)
    calls, tokens, cost = admission._largest["m ~20"]
    assert (calls, tokens) == (9, pytest.approx(3_000 + 9 * grown))
    assert cost == pytest.approx(0.03 * tokens / 3_000)


def test_a_requests_size_counts_its_earlier_turns_and_system_messages() -> None:
    """Every expert and the aggregator read the conversation before the last message as well: a
    request whose last message is "hi" after 2,000 characters of earlier turns is no short one."""
    like, short = _kind(Completion(model="orchestra", task="hi"))
    same, long = _kind(Completion(model="orchestra", task="hi", context="earlier turn " * 150))
    assert like == same and long > short + 10



def test_requests_that_differ_only_in_their_seed_cost_alike() -> None:
    """A seed changes no cost: requests of one model and settings but their seeds are one kind (taken
    apart, each was a kind never measured and ran alone); another k is another kind."""
    def kind(**settings: Any) -> str:
        return _kind(Completion(model="orchestra", task="What is 2 + 2?", settings=settings))[0]

    assert kind(k=2, seed=1) == kind(k=2, seed=7) == kind(k=2)
    assert kind(k=3, seed=1) != kind(k=2, seed=1)
    assert kind(k=2) != _kind(Completion(model="vote", task="What is 2 + 2?", settings={"k": 2}))[0]

def _ended(result: RunResult) -> asyncio.Task[RunResult]:
    """A request's run task that has ended with ``result``."""
    async def finish() -> asyncio.Task[RunResult]:
        async def run() -> RunResult:
            return result
        task = asyncio.ensure_future(run())
        await task
        return task
    return asyncio.run(finish())


def test_a_run_cut_short_is_no_measure_of_its_requests_size() -> None:
    """A run a budget cut short shows nothing of what a run takes, at its size too: taken as measured,
    a shorter request than it was admitted as that size, for which nothing is known."""
    server = _server(Budget(max_calls=None, max_tokens=100_000, max_cost_usd=None))
    usage = RunUsage(calls=3, requests=3, prompt_tokens=300, completion_tokens=30)
    for status in ("budget_exceeded", "cancelled"):
        server.live["m ~20"] += 1
        server._run_ended("m ~20", _ended(RunResult(run_id="r", task="t", status=status, usage=usage)))
        assert "m" not in server._sizes and server._measured_kind("m", 15) == "m ~15"
    server.live["m ~20"] += 1
    server._run_ended("m ~20", _ended(RunResult(run_id="r", task="t", status="done", answer="a", usage=usage)))
    assert server._sizes == {"m": {20}} and server._measured_kind("m", 15) == "m ~20"
    assert not server.live


# --- execute.py: what a cancelled call that sent nothing counts --------------------------------


def test_a_cancelled_call_that_waited_for_its_endpoints_slot_counts_nothing(loopback) -> None:
    """Two models on an endpoint that takes one request at a time, the first's request held at the
    server: a batch of the second model's calls, a cancelled run's first, then a running one's. The
    cancelled run's call, which got the slot when the held request ended, is not sent; having sent
    nothing, it counts nothing, not even as a failed call (only a call that sent requests before it
    stopped is billed); the running one's call is sent after it."""
    at_server, release = threading.Event(), threading.Event()

    def answer(request: LoopbackRequest) -> str:
        if "light" in request.prompt:
            at_server.set()
            release.wait(10)
        return "An answer."

    server = loopback(chat_handler(answer))
    endpoint = Endpoint(server.url + "/v1", max_concurrency=1)
    first, second = (OpenAICompatible(model=name, endpoint=endpoint) for name in ("a", "b"))
    unlimited = Budget(max_calls=None, max_tokens=None, max_cost_usd=None)
    kept, cancelled = RunLedger.create("r1", unlimited), RunLedger.create("r2", unlimited)
    executor = Executor()

    def call(ledger: RunLedger, model: OpenAICompatible, prompt: str) -> asyncio.Future[list[Any]]:
        return asyncio.ensure_future(executor.run_task(executor.call(ledger, [(model, ChatRequest.user(prompt))],
                                                                     purpose="expert")))

    async def main() -> None:
        held = call(kept, first, "How fast is light?")
        assert await asyncio.to_thread(at_server.wait, 10)  # it holds the endpoint's one slot
        stopped = call(cancelled, second, "How fast is sound?")  # (one batch of model b: this one first)
        going = call(kept, second, "How far is the moon?")
        slot = (await endpoint._state()).semaphore
        for _ in range(10_000):  # (the batch is under way: its first request waits for the slot)
            if slot._waiters:
                break
            await asyncio.sleep(0)
        assert slot._waiters, "model b's first request never came to wait for the endpoint's slot"
        stopped.cancel()
        with suppress(asyncio.CancelledError):
            await stopped
        release.set()
        assert [result.text for result in (*await held, *await going)] == ["An answer.", "An answer."]
        await asyncio.gather(*executor.in_flight_for("r2"), return_exceptions=True)

    asyncio.run(main())
    assert [request.prompt for request in server.requests] == ["How fast is light?", "How far is the moon?"]
    assert (kept.budget.calls, kept.budget.requests, kept.failed_calls) == (2, 2, 0)
    assert (cancelled.budget.calls, cancelled.budget.requests, cancelled.failed_calls) == (0, 0, 0)
    assert (cancelled.budget._reserved_calls, cancelled.budget._reserved_tokens) == (0, 0)


def test_a_call_the_budget_refuses_is_a_cache_miss(tmp_path: Path) -> None:
    """A call looked up in the response cache and not found there is a miss, whether it is then sent or
    refused by its budget (a refused call's miss went uncounted: the run's usage said 0 misses)."""
    model = FunctionModel(lambda r: "the answer", name="m")
    executor = Executor()
    ledger = RunLedger.create("r1", Budget(max_calls=None, max_tokens=50, max_cost_usd=None),
                              cache=RunStore(tmp_path / "runs.db").cache())

    async def main() -> list[Any]:
        return await executor.run_task(executor.call(ledger, [(model, ChatRequest.user("question", max_tokens=100))],
                                                     purpose="expert"))

    [outcome] = asyncio.run(main())
    assert isinstance(outcome, BudgetExceeded) and not model.requests
    assert ledger.cache_misses == 1 and ledger.answered["cache"] == 0


def test_a_models_own_answer_limit_is_a_whole_number_its_engine_or_extra_body_sets() -> None:
    """What a request that sets no max_tokens is reserved at: an engine's default first, then the
    endpoint's ``max_completion_tokens``, then its ``max_tokens``; ``true`` is no number of tokens
    (Python's bool is an int: it read as a limit of one token, and the call was reserved at that)."""
    def endpoint(**extra: Any) -> OpenAICompatible:
        return OpenAICompatible(model="m", base_url="http://127.0.0.1:18300/v1", api_key_env=None, extra_body=extra)

    assert _answer_limit(endpoint()) is None
    assert _answer_limit(endpoint(max_tokens=900)) == 900
    assert _answer_limit(endpoint(max_completion_tokens=300, max_tokens=900)) == 300
    assert _answer_limit(endpoint(max_tokens=True)) is None
    assert _answer_limit(endpoint(max_completion_tokens=True, max_tokens=700)) == 700
    assert _answer_limit(endpoint(max_tokens="500")) is None
    engine = SimpleNamespace(default_max_tokens=256, extra_body={"max_tokens": 900})
    assert _answer_limit(engine) == 256


# --- settings.py / core.py: where a nested setting given at the top belongs --------------------


def test_a_nested_setting_given_as_a_python_keyword_names_its_groups_before_a_near_name() -> None:
    """``max_tokens=`` is a keywords or a budget setting; it was "did you mean 'planner_max_tokens'?",
    the planner's answer limit, a setting it is not (the fuzzy match won over where it belongs)."""
    pool, _ = scripted_pool(2)
    with pytest.raises(UnknownSetting) as refused:
        Orchestra(pool, store=False, max_tokens=5000)
    assert str(refused.value) == ("unknown setting 'max_tokens'; it is a keywords or budget setting: "
                                  "keywords={'max_tokens': ...} or budget={'max_tokens': ...}")
    with pytest.raises(UnknownSetting, match=r"^unknown setting 'max_tokns'; did you mean 'planner_max_tokens'\?$"):
        Orchestra(pool, store=False, max_tokns=5000)  # (in no group: the near name is all there is)


# --- workflow.py: its inputs -------------------------------------------------------------------


def test_workflow_inputs_may_be_any_mapping(tmp_path: Path) -> None:
    """``inputs=`` is a mapping of names to values: a read-only one (``MappingProxyType``, a config
    library's) is taken as a dict is; what is not a mapping is refused in one line."""
    path = tmp_path / "wf.yaml"
    path.write_text("name: demo\npool:\n  models:\n    m: {type: openai, model: x, base_url: "
                    "\"http://127.0.0.1:18300/v1\", api_key_env: null}\n  agents:\n    - {name: writer, model: m}\n"
                    "inputs:\n  topic: {type: string, required: true}\n  words: {type: integer, default: 50}\n"
                    "steps:\n  - id: draft\n    agent: writer\n    prompt: \"Write {{ inputs.words }} words on "
                    "{{ inputs.topic }}.\"\n")
    flow = Workflow.load(path)
    given = MappingProxyType({"topic": "tides", "words": "20"})
    assert flow.resolve_inputs(given) == {"topic": "tides", "words": 20}
    with pytest.raises(ConfigError, match=r"^inputs must be a mapping of input names to values .+, not list$"):
        flow.resolve_inputs([("topic", "tides")])  # type: ignore[arg-type]
