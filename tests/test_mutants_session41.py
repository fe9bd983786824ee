"""Where session 41's mutation round left a one-line mutant alive: a JSON schema's type check, the
server budget's admission by a request's size, ...

Only model answers are scripted; budgets, servers and stores are the real ones.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import scripted_pool

from orchestra.budget import Budget
from orchestra.models.structured import StructuredOutputError, check_schema
from orchestra.openai_wire import Completion
from orchestra.result import RunResult, RunUsage
from orchestra.serve import SIZE_STEP, _kind, app

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


# --- serve.py: a server budget's admission by a request's size ---------------------------------


def _server(budget: Budget):  # type: ignore[no-untyped-def]
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
    server.admission.count((9, 3_000, 0.03), (9, 3_000, 0.03), kind="m ~12")
    server._sizes["m"] = {12}
    assert server._measured_kind("m", 20) == "m ~20"
    grown = (SIZE_STEP ** 21 - SIZE_STEP ** 12) / 4  # (tokens more in each call: up to 1.25**21 characters)
    calls, tokens, cost = server.admission._largest["m ~20"]
    assert (calls, tokens) == (9, pytest.approx(3_000 + 9 * grown))
    assert cost == pytest.approx(0.03 * tokens / 3_000)


def test_a_requests_size_counts_its_earlier_turns_and_system_messages() -> None:
    """Every expert and the aggregator read the conversation before the last message as well: a
    request whose last message is "hi" after 2,000 characters of earlier turns is no short one."""
    like, short = _kind(Completion(model="orchestra", task="hi"))
    same, long = _kind(Completion(model="orchestra", task="hi", context="earlier turn " * 150))
    assert like == same and long > short + 10


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
