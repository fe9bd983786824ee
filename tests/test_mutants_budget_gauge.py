"""Behaviour a mutation round found untested: the prompt gauge's learning, budget refusals at their
boundaries, a held repair passed on to a shared budget, a served stream that diverged, a backend's
own parsed value, and signed whole numbers given as text."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from orchestra.budget import Budget, BudgetTracker, Reservation, RunAdmission
from orchestra.errors import BudgetExceeded
from orchestra.models import ChatRequest, ChatResult, Usage
from orchestra.models.base import ModelBase
from orchestra.models.pricing import Price
from orchestra.models.prompt_gauge import PromptGauge
from orchestra.serve import Feed


def user(text: str, **options: object) -> ChatRequest:
    return ChatRequest.user(text, **options)


# --- the prompt gauge ------------------------------------------------------------------------

def test_a_short_prompts_bill_teaches_a_template_not_a_rate() -> None:
    gauge = PromptGauge()
    gauge.billed(user("hi"), 100)  # 1 unit billed 100: its template is 99
    assert gauge.worst(user("x" * 400)) == 100 + 99  # a token a unit still, not two


def test_the_estimate_fits_a_fixed_part_and_a_rate_to_bills_of_several_lengths() -> None:
    gauge = PromptGauge()
    gauge.billed(user("x" * 400), 200)  # 100 units
    gauge.billed(user("x" * 800), 400)  # 200 units: 2 a unit and no template at all
    assert gauge.estimate(user("x" * 1200)) == 600


def test_the_estimate_from_bills_of_one_length_takes_half_a_template_at_most() -> None:
    gauge = PromptGauge()
    gauge.billed(user("x" * 400), 220)  # 100 units: 16 of template (half the least), 2.04 a unit
    assert gauge.estimate(user("x" * 1200)) == 16 + 612


def test_an_empty_prompt_is_estimated_at_one_token() -> None:
    assert PromptGauge().estimate(user("")) == 1


def test_the_gauge_learns_every_early_bill_then_one_in_sixteen() -> None:
    gauge = PromptGauge()
    for _ in range(31):
        gauge.billed(user("x" * 400), 132)  # 100 units at a token a unit and a template of 32
    assert gauge.worst(user("x" * 400)) == 132
    gauge.billed(user("x" * 400), 182)  # the 32nd: learned
    assert gauge.worst(user("x" * 400)) == 182
    gauge.billed(user("x" * 400), 300)  # the 33rd: not
    assert gauge.worst(user("x" * 400)) == 182
    for _ in range(14):
        gauge.billed(user("x" * 400), 100)
    gauge.billed(user("x" * 400), 250)  # the 48th: learned
    assert gauge.worst(user("x" * 400)) == 250


# --- budgets ---------------------------------------------------------------------------------

def test_a_call_that_fits_once_the_one_in_flight_ends_is_held_not_hopeless() -> None:
    tracker = BudgetTracker(Budget(max_tokens=232, max_cost_usd=None, max_calls=None), "r")
    request = user("x" * 400, max_tokens=100)  # 100 units + 32 of template + 100 of answer: exactly the limit
    assert tracker.admit(request, Price()) == Reservation(232, 0.0)
    with pytest.raises(BudgetExceeded) as refused:
        tracker.admit(request, Price())
    assert (refused.value.held, refused.value.hopeless) == (True, False)


def test_the_largest_reservation_is_kept_for_free_models_too() -> None:
    tracker = BudgetTracker(Budget(max_tokens=10_000, max_cost_usd=None, max_calls=None), "r")
    tracker.admit(user("x" * 400, max_tokens=100), Price())
    assert tracker.largest == Reservation(232, 0.0)  # (what a data set's last run must keep room for)


def test_a_held_repair_passes_what_its_call_holds_on_to_the_shared_budget() -> None:
    # (without it, every call that needed a repair left its first request's worst case held in the
    # data set's or the server's budget for good)
    shared = BudgetTracker(Budget(max_tokens=10_000, max_cost_usd=None, max_calls=None), None)
    run = BudgetTracker(Budget(max_tokens=10_000, max_cost_usd=None, max_calls=None), "r", parent=shared)
    reserved = run.admit(user("x" * 400, max_tokens=100), Price())
    assert shared.committed() == (1, 232, 0.0)  # (a call in flight holds its worst case)
    held = run.hold(reserved, Reservation(50, 0.0))
    assert shared.committed() == run.committed() == (1, 50, 0.0)
    run.settle(held, Usage(prompt_tokens=30, completion_tokens=20, requests=1))
    assert shared.committed() == run.committed() == (1, 50, 0.0)  # spent; nothing held any more


# --- a served stream -------------------------------------------------------------------------

def test_a_served_stream_stays_stopped_once_a_retry_wrote_otherwise() -> None:
    async def feed() -> tuple[list[tuple[str, object]], bool]:
        stream = Feed(False)
        stream.text("The answer")
        stream.text("Another")  # a retry that wrote otherwise
        stream.text("The answer is 4")  # (and one more, back on the first text: too late to go on)
        sent = []
        while not stream.items.empty():
            sent.append(stream.items.get_nowait())
        return sent, stream.rewritten("The answer is 4")

    assert asyncio.run(feed()) == ([("text", "The answer")], True)


# --- a backend's own parsed value ------------------------------------------------------------

class _ToolCaller(ModelBase):
    """A backend that parses its answers itself (a forced tool call), as one outside the package may."""

    name = "tools"
    is_test_double = True

    def __init__(self) -> None:
        self.sent = 0

    async def _generate(self, request: ChatRequest) -> ChatResult:
        self.sent += 1
        return ChatResult(text="(tool call)", parsed={"city": "Paris"}, usage=Usage(requests=1))


def test_a_parsed_value_the_backend_gave_is_kept_without_a_repair() -> None:
    model = _ToolCaller()
    request = user("Where?", output={"type": "object", "properties": {"city": {"type": "string"}}})
    result = asyncio.run(model.complete_one(request))
    assert (result.parsed, model.sent) == ({"city": "Paris"}, 1)


# --- whole numbers ---------------------------------------------------------------------------

def test_a_signed_whole_number_given_as_text_is_read_as_one() -> None:
    assert Budget.model_validate({"max_calls": "+7"}).max_calls == 7
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Budget.model_validate({"max_calls": "-7"})


def test_a_run_over_its_own_budget_names_that_budget_not_the_data_sets() -> None:
    """A data set's budget of tokens, each run's of $1, one call of $50: the runs not started were
    refused as "the data set's budget max_cost_usd=1", a limit the data set's budget does not have."""
    shared = BudgetTracker(Budget(max_calls=None, max_cost_usd=None, max_tokens=100_000), None)
    admission = RunAdmission(shared)
    for run_id in ("r1", "r2"):  # (two such runs, none done: the limit, not one item, is at fault)
        run = BudgetTracker(Budget(max_cost_usd=1.0), run_id, parent=shared)
        with pytest.raises(BudgetExceeded) as refused:
            run.admit(ChatRequest.user("What is 2 + 2?", max_tokens=64), Price(input=200_000, output=200_000))
        assert refused.value.hopeless
        admission.ended(run, on_its_own=False, cut=True)
    stop = admission.refusal(0)
    assert stop is not None and str(stop).startswith("each run's budget max_cost_usd=1 is less than the next call")


def test_a_run_of_one_call_is_one_call_in_the_refusal() -> None:
    """The refusal read "a run takes up to 1 calls"."""
    shared = BudgetTracker(Budget(max_calls=1, max_cost_usd=None, max_tokens=None), None)
    admission = RunAdmission(shared)
    run = BudgetTracker(Budget(**{"max_calls": None, "max_cost_usd": None, "max_tokens": None}), "r1", parent=shared)
    run.settle(run.admit(ChatRequest.user("q?"), Price()), Usage(requests=1))
    admission.ended(run, on_its_own=True)
    stop = admission.refusal(0)
    assert stop is not None and "1 call so far, and a run takes up to 1 call, so it was not started" in str(stop)
