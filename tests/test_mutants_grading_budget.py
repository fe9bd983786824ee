"""Behaviour of grading, evaluation reports, dollar amounts, budgets and profiling that a mutation
run found unpinned.

Each test pins one behaviour a user depends on; only model answers are scripted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import scripted_pool
from pydantic import ValidationError

from orchestra.budget import Budget, BudgetTracker, Reservation
from orchestra.datasets import Dataset, Item
from orchestra.errors import BudgetExceeded, ConfigError
from orchestra.evaluate import Tally, _answers_line, check_output, loads_since
from orchestra.grading import (
    AutoGrader,
    ExactMatchGrader,
    MultipleChoiceGrader,
    NumericGrader,
    answer_format,
    check_grader,
    get_grader,
)
from orchestra.models import ChatRequest, ChatResult, Usage
from orchestra.models.pricing import FREE, Price
from orchestra.money import dollars, usd, usd_exact
from orchestra.profile import global_competence
from orchestra.profiling import AggregationResult, build_profiles, mean_tokens
from orchestra.result import NodeTrace, PlanTrace, RunResult, RunUsage

# --- grading -------------------------------------------------------------------------------------


def test_a_multiple_choice_reference_letter_in_lower_case_is_its_letter() -> None:
    """A data set that writes its answers "b" grades "The answer is (B)" right."""
    item = Item(id="1", question="q", answer="b", choices=["x", "y"])
    assert MultipleChoiceGrader().grade("The answer is (B)", item)


def test_a_multiple_choice_reference_given_as_text_matches_its_choice_in_any_case() -> None:
    """A reference written "green" names the choice "Green"."""
    item = Item(id="1", question="q", answer="green", choices=["Red", "Green"])
    assert MultipleChoiceGrader().grade("The answer is (B)", item)
    assert not MultipleChoiceGrader().grade("The answer is (A)", item)


def test_a_lower_case_option_letter_in_markdown_is_read_as_that_option() -> None:
    """"The answer is **b**" chooses option B (the bold marks around a lone letter are no part of it)."""
    item = Item(id="1", question="q", answer="B", choices=["x", "y"])
    assert MultipleChoiceGrader().extract("The answer is **b**") == "B"
    assert MultipleChoiceGrader().grade("The answer is **b**", item)


def test_an_exact_answer_in_a_box_is_read_from_the_box() -> None:
    """"\\boxed{Paris}" on the last line answers Paris, not "boxedparis"."""
    assert ExactMatchGrader().grade("It is the capital.\nSo the city is \\boxed{Paris}",
                                    Item(id="1", question="q", answer="Paris"))


def test_an_answer_spoken_of_as_an_answer_after_the_real_one_is_not_the_answer() -> None:
    """"an answer is hard" after "The answer is Paris." does not replace Paris."""
    assert ExactMatchGrader().grade("The answer is Paris. Choosing an answer is hard.",
                                    Item(id="1", question="q", answer="Paris"))


def test_a_unicode_minus_in_an_answer_clause_with_words_after_it_is_a_minus() -> None:
    """"The answer is \u22125 degrees" is -5, not 5."""
    assert NumericGrader().grade("The answer is \u22125 degrees.", Item(id="1", question="q", answer="-5"))
    assert not NumericGrader().grade("The answer is \u22125 degrees.", Item(id="1", question="q", answer="5"))


def test_the_letters_grader_is_refused_for_an_answer_that_is_no_option_letter() -> None:
    """``--grader mc`` on a numeric data set is refused before any call, not graded all wrong."""
    with pytest.raises(ConfigError, match="the mc grader cannot grade item 1 of data.jsonl: its answer '7' is not"):
        check_grader(MultipleChoiceGrader(), [Item(id="1", question="q", answer="7")], "data.jsonl")


@pytest.mark.parametrize("answer", ["2.5", "-3", "1/2", "1,000"])
def test_answer_format_asks_for_a_number_for_every_numeric_reference(answer: str) -> None:
    """Decimals, negatives, fractions and thousands are numbers: the expert is asked for "The answer is N"."""
    assert answer_format(Item(id="n", question="?", answer=answer)) == (
        'End with "The answer is N" where N is the final number.')


def test_a_vote_reads_an_initial_before_a_hyphenated_or_apostrophed_name_as_a_name() -> None:
    """"The answer is J. O'Neill, the playwright." is a name in a vote (no item), not option J."""
    assert AutoGrader().extract("The answer is J. O'Neill, the playwright.") == "j oneill playwright"


# --- evaluation reports ----------------------------------------------------------------------------


def _run(run_id: str, status: str = "done", answer: str | None = "The answer is 1", *, cost: float = 0.25,
         failed_calls: int = 0) -> RunResult:
    return RunResult(run_id=run_id, task="t", status=status, answer=answer,  # type: ignore[arg-type]
                     plan=PlanTrace(nodes=[NodeTrace(id="answer", instruction="t")]),
                     usage=RunUsage(calls=2, requests=2, prompt_tokens=10, completion_tokens=5, cost_usd=cost,
                                    failed_calls=failed_calls))


def test_an_interrupted_evaluations_accuracy_is_over_its_finished_items_and_its_cost_counts_every_run() -> None:
    """Runs cut off by Ctrl-C are not items (accuracy 1.0 of 1), but what they spent is in the totals."""
    tally = Tally(get_grader("auto"))
    tally.add(0, Item(id="q0", question="q", answer="1"), _run("r0"))
    tally.stopped_run(1, _run("r1", "cancelled", None, cost=0.5))
    report = tally.report("vote", elapsed_s=0.0, model_loads={})
    assert (report.items, report.correct, report.accuracy, report.cut_off) == (1, 1, 1.0, 1)
    assert (report.calls, report.cost_usd, report.cost_per_correct_usd) == (4, 0.75, 0.75)


def test_a_report_gives_the_exit_code_of_its_first_failed_item() -> None:
    """An evaluation whose first unfinished item was stopped by its budget exits 3, as that run would."""
    tally = Tally(get_grader("auto"))
    tally.add(0, Item(id="q0", question="q", answer="1"), _run("r0", "budget_exceeded", None))
    tally.add(1, Item(id="q1", question="q", answer="1"), _run("r1", "failed", None))
    report = tally.report("vote", elapsed_s=0.0, model_loads={})
    assert (report.failed, report.failure_exit) == (2, 3)
    assert report.first_failure == "item q0 (budget_exceeded): no error recorded"


def test_a_report_counts_the_calls_that_failed_after_their_retries() -> None:
    """Failed calls of every run add up in the report."""
    tally = Tally(get_grader("auto"))
    for index in range(2):
        tally.add(index, Item(id=f"q{index}", question="q", answer="1"), _run(f"r{index}", failed_calls=index + 1))
    assert tally.report("vote", elapsed_s=0.0, model_loads={}).failed_calls == 3


def test_an_answers_file_whose_first_row_is_too_long_to_read_whole_may_be_replaced(tmp_path: Path) -> None:
    """An earlier answers file with a first answer over a MiB is still recognised as one (its row is cut)."""
    output = tmp_path / "answers.jsonl"
    row = {"id": "q0", "category": None, "answer": "x" * (1 << 20), "correct": False, "status": "done", "run_id": "r"}
    output.write_text(json.dumps(row) + "\n")
    check_output(output, "the answers", "an earlier answers file", _answers_line, {}, flag="--output")


def test_a_jsonl_data_set_is_not_taken_for_an_earlier_answers_file(tmp_path: Path) -> None:
    """``--output other_data.jsonl`` is refused: a row with an id but no answer fields is no answers row."""
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "q0", "question": "2+2?", "answer": "4"}\n')
    with pytest.raises(ConfigError, match="exists and is not an earlier answers file"):
        check_output(other, "the answers", "an earlier answers file", _answers_line, {}, flag="--output")


def test_model_loads_are_counted_since_the_evaluation_began() -> None:
    """A model loaded once before and twice during an evaluation reports 2 loads, not 3."""
    from types import SimpleNamespace

    orchestra = SimpleNamespace(executor=SimpleNamespace(stats=SimpleNamespace(loads={"m": 3, "n": 1})))
    assert loads_since(orchestra, {"m": 1, "n": 1}) == {"m": 2}  # type: ignore[arg-type]


# --- dollar amounts --------------------------------------------------------------------------------


def test_dollars_show_four_decimals_or_every_digit_of_a_smaller_amount() -> None:
    """A cent-sized cost reads to four decimals; one under a ten-thousandth shows its digits, never "$0.0000"."""
    assert (usd(0), usd(1.5), usd(0.00051234)) == ("$0.0000", "$1.5000", "$0.0005")
    assert usd(0.00000001234) == "$0.0000000123"


def test_what_is_left_of_sums_that_cancel_reads_as_nothing() -> None:
    """A reservation given back leaves float residue (6.8e-21, -0.0): a budget message read "$0. held
    for 1 calls in flight" and "$-0.0000"."""
    assert [usd(6.8e-21), usd(-3e-20), usd_exact(-3e-20), usd_exact(-0.0)] == ["$0.0000"] * 4
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.001), "r")
    free = tracker.admit(ChatRequest.user("hi", max_tokens=10), FREE)
    tracker._reserved_cost = 6.8e-21  # (what settling priced calls left)
    with pytest.raises(BudgetExceeded, match=r"\$0\.00000 held for 1 call in flight"):  # (as many digits as $0.00351)
        tracker.admit(ChatRequest.user("hi", max_tokens=5000), Price(input=0.3, output=0.7))
    tracker.settle(free, None)


def test_amounts_set_against_a_limit_read_to_the_millionth() -> None:
    """``usd_exact`` keeps the digits that decide whether a limit is met (and at least four decimals)."""
    assert (usd_exact(1.5), usd_exact(0.001053), usd_exact(0.000012345)) == ("$1.5000", "$0.001053", "$0.000012345")


def test_a_sum_of_prices_is_rounded_to_the_picodollar_only() -> None:
    """Float noise is dropped, a cheap model's millionths of a dollar are not."""
    assert (dollars(0.1 + 0.2), dollars(0.00000012)) == (0.3, 0.00000012)


# --- budgets ---------------------------------------------------------------------------------------

#: a dollar a thousand tokens: a call's worst case (400 characters, 100 of answer) is 232 tokens, $0.232
PRICE = Price(input=1000, output=1000)


def _request(**options: object) -> ChatRequest:
    return ChatRequest.user("x" * 400, **options)


def test_a_cost_limit_of_zero_is_refused() -> None:
    """``max_cost_usd=0`` would refuse every call: it is refused when set (``None`` lifts the limit)."""
    with pytest.raises(ValidationError, match="greater than 0"):
        Budget(max_cost_usd=0)


def test_max_calls_admits_that_many_calls_and_refuses_the_next() -> None:
    """``max_calls=2``: two calls are sent, the third is refused, and the budget says it is reached."""
    tracker = BudgetTracker(Budget(max_calls=2, max_tokens=None, max_cost_usd=None), "r")
    for _ in range(2):
        assert tracker.reached() is None
        tracker.settle(tracker.admit(_request(), PRICE), Usage(prompt_tokens=1, requests=1))
    with pytest.raises(BudgetExceeded, match="max_calls"):
        tracker.admit(_request(), PRICE)
    reached = tracker.reached()
    assert reached is not None and reached.limit == "max_calls"


def test_a_call_whose_worst_cost_is_exactly_what_is_left_is_admitted() -> None:
    """A cost limit is a most, not a less-than: $0.232 at worst fits a limit of $0.232."""
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.232), "r")
    assert tracker.admit(_request(max_tokens=100), PRICE) == Reservation(232, pytest.approx(0.232))


def test_a_settled_call_releases_its_reserved_cost() -> None:
    """After a call, only what it cost is committed, not its worst case, so the next call fits."""
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.3), "r")
    reserved = tracker.admit(_request(max_tokens=100), PRICE)
    tracker.settle(reserved, Usage(prompt_tokens=30, completion_tokens=20, cost_usd=0.05, requests=1))
    assert tracker.committed() == pytest.approx((1, 50, 0.05))
    tracker.admit(_request(max_tokens=100), PRICE)  # 0.05 + 0.232 <= 0.3


def test_a_request_without_max_tokens_reserves_1024_tokens_of_answer() -> None:
    """A call that sets no answer length is reserved as if it may write 1024 tokens."""
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=10_000, max_cost_usd=None), "r")
    assert tracker.admit(_request(), Price()).tokens == 132 + 1024


def test_a_call_that_would_fit_an_empty_budget_is_not_hopeless() -> None:
    """A call refused for what was spent, which alone is within the limit, is not over the limit on its own
    (a data set's other runs still start)."""
    tokens = BudgetTracker(Budget(max_calls=None, max_tokens=232, max_cost_usd=None), "r")
    tokens.settle(tokens.admit(ChatRequest.user("hi", max_tokens=1), PRICE), Usage(prompt_tokens=5, requests=1))
    with pytest.raises(BudgetExceeded) as refused:
        tokens.admit(_request(max_tokens=100), PRICE)  # 5 + 232 > 232, but 232 fits on its own
    assert (refused.value.limit, refused.value.hopeless, refused.value.held) == ("max_tokens", False, False)
    cost = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.3), "r")
    cost.settle(cost.admit(_request(max_tokens=100), PRICE), Usage(prompt_tokens=100, cost_usd=0.1, requests=1))
    with pytest.raises(BudgetExceeded) as refused:
        cost.admit(_request(max_tokens=100), PRICE)
    assert (refused.value.limit, refused.value.hopeless, refused.value.held) == ("max_cost_usd", False, False)


def test_a_call_that_would_not_fit_even_once_the_calls_in_flight_end_is_not_held() -> None:
    """Waiting for the calls in flight only helps a call that fits what was spent: one that does not
    is refused, not held (its caller would wait for room that never comes)."""
    tokens = BudgetTracker(Budget(max_calls=None, max_tokens=400, max_cost_usd=None), "r")
    tokens.settle(tokens.admit(_request(max_tokens=100), PRICE), Usage(prompt_tokens=200, requests=1))
    tokens.admit(ChatRequest.user("hi", max_tokens=10), PRICE)  # in flight
    with pytest.raises(BudgetExceeded) as refused:
        tokens.admit(_request(max_tokens=100), PRICE)  # 200 + 232 > 400 whatever the one in flight does
    assert (refused.value.limit, refused.value.held) == ("max_tokens", False)
    cost = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.4), "r")
    cost.settle(cost.admit(_request(max_tokens=100), PRICE), Usage(prompt_tokens=200, cost_usd=0.2, requests=1))
    cost.admit(ChatRequest.user("hi", max_tokens=10), PRICE)
    with pytest.raises(BudgetExceeded) as refused:
        cost.admit(_request(max_tokens=100), PRICE)  # $0.2 + $0.232 > $0.4
    assert (refused.value.limit, refused.value.held) == ("max_cost_usd", False)


def test_spending_outside_a_call_is_counted_by_the_shared_budget_too() -> None:
    """The embedding matcher's requests a run pays are a data set's (or a server's) spending as well."""
    shared = BudgetTracker(Budget(), None)
    run = BudgetTracker(Budget(), "r", parent=shared)
    run.spend(Usage(prompt_tokens=7, cost_usd=0.01, requests=2))
    assert (shared.requests, shared.prompt_tokens, shared.cost_usd, shared.calls) == (2, 7, 0.01, 0)


def test_a_runs_spent_cost_reads_without_float_noise() -> None:
    """Calls of $0.1 and $0.2 spent $0.3, not $0.30000000000000004."""
    tracker = BudgetTracker(Budget(), "r")
    for cost in (0.1, 0.2):
        tracker.settle(tracker.admit(_request(max_tokens=1), Price()), Usage(cost_usd=cost, requests=1))
    assert tracker.usage.cost_usd == 0.3


def test_one_call_made_is_said_in_the_singular() -> None:
    """The refusal after one call reads "1 call made"."""
    tracker = BudgetTracker(Budget(max_calls=1, max_tokens=None, max_cost_usd=None), "r")
    tracker.settle(tracker.admit(_request(), PRICE), Usage(requests=1))
    with pytest.raises(BudgetExceeded, match="1 call made"):
        tracker.admit(_request(), PRICE)


def test_what_a_resumed_run_spent_before_counts_but_not_as_spending_now() -> None:
    """``count`` adds what was paid before and its calls; ``committed`` (what is spent now) leaves it out."""
    tracker = BudgetTracker(Budget(), "r")
    tracker.count(Usage(prompt_tokens=10, cost_usd=0.02, requests=3), calls=2)
    assert (tracker.calls, tracker.requests, tracker.cost_usd) == (2, 3, 0.02)
    assert tracker.committed() == (0, 0, 0.0)  # (paid before the resume: not this budget's now)


def test_a_call_counted_as_its_run_resumed_is_sent_again_without_a_call_of_the_limit() -> None:
    """A call that failed before a resume was counted then: sent again it needs no room under max_calls
    and is not counted again; the shared budget, which bounds what runs spend now, counts it."""
    shared = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=None), None)
    tracker = BudgetTracker(Budget(max_calls=1, max_tokens=None, max_cost_usd=None), "r", parent=shared)
    tracker.count(Usage(requests=1), calls=1)
    with pytest.raises(BudgetExceeded):
        tracker.admit(_request(), PRICE)  # a new call: 1 made of 1
    reserved = tracker.admit(_request(), PRICE, counted=True)
    assert tracker.committed()[0] == 0  # (no call in flight added)
    tracker.settle(reserved, Usage(requests=1), counted=True)
    assert (tracker.calls, tracker.requests, shared.calls, shared.requests) == (1, 2, 1, 1)
    assert tracker._reserved_calls == 0 == shared._reserved_calls


def test_calls_that_add_up_to_a_cost_limit_exactly_are_admitted() -> None:
    """Three calls of $0.10 under max_cost_usd=0.3: 0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats,
    and the third was refused ("$0.2000 spent, the next call may cost $0.1000")."""
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=0.3), "r")
    price = Price(input=0.0, output=100.0)  # $0.10 for the 1,000 tokens of answer each may write
    for _ in range(3):
        tracker.settle(tracker.admit(ChatRequest.user("q", max_tokens=1000), price),
                       Usage(completion_tokens=1000, cost_usd=0.1, requests=1))
    assert tracker.calls == 3 and tracker.reached() is not None  # (and the limit is reached, not passed)


def test_a_run_that_exactly_fills_a_shared_budget_is_started() -> None:
    """A shared budget of 4 calls, a run costing 2 finished: the next run, whose 2 calls use up the
    rest exactly, is started."""
    from orchestra.budget import RunAdmission

    shared = BudgetTracker(Budget(max_calls=4, max_tokens=None, max_cost_usd=None), None)
    admission = RunAdmission(shared)
    first = BudgetTracker(Budget(), "r1", parent=shared)
    for _ in range(2):
        first.settle(first.admit(_request(max_tokens=1), Price()), Usage(prompt_tokens=1, requests=1))
    admission.ended(first, on_its_own=True)
    assert admission.refusal(0) is None and admission.admits(1) is False  # 2 + 2 + 2 > 4


# --- profiling -------------------------------------------------------------------------------------


def test_a_profile_scores_each_keyword_up_when_right_and_down_when_wrong() -> None:
    """Accuracy is over the data set's items; a wrong answer takes one off each of the item's skills;
    global competence weighs the sum of every skill's score; ``aggregation_items=0`` runs no benchmark."""
    pool, _ = scripted_pool(3, expert=lambda name, request: "The answer is 4" if name == "m0" else "The answer is 5",
                            keywords=["algebra", "geometry"])
    items = [{"id": "a", "question": "2+2?", "answer": "4"}, {"id": "b", "question": "1+3?", "answer": "4"}]
    report = build_profiles(pool, Dataset.from_items(items), aggregation_items=0)
    right, wrong = {"algebra": 2, "geometry": 2}, {"algebra": -2, "geometry": -2}
    assert {name: (p.accuracy, p.skills) for name, p in report.profiles.items()} == {
        "agent0": (1.0, right), "agent1": (0.0, wrong), "agent2": (0.0, wrong)}
    assert report.profiles["agent0"].competence == pytest.approx(global_competence({"a": 4, "b": -4, "c": -4})["a"])
    assert report.aggregation_items == 0 and report.profiles["agent0"].aggregation_score is None


def test_an_aggregation_score_counts_each_keyword_once_per_item_with_agresti_coulls_error() -> None:
    """A keyword an item names twice counts that item once; the error is sqrt(q(1-q)/(n+4)), q = (correct+2)/(n+4)."""
    result = AggregationResult.from_grades([True, True, False], [["x", "x"], ["x", "y"], ["y"]])
    assert (result.score, result.items) == (pytest.approx(2 / 3), 3)
    assert result.stderr == pytest.approx((4 / 7 * 3 / 7 / 7) ** 0.5)
    assert result.skills == {"x": (2, 2), "y": (1, 2)}


def test_mean_tokens_are_over_the_answered_calls_to_a_tenth() -> None:
    """A failed call is left out; the means keep one decimal."""
    answered = [ChatResult(text="a", usage=Usage(prompt_tokens=10, completion_tokens=3)),
                ChatResult(text="b", usage=Usage(prompt_tokens=11, completion_tokens=4)), ValueError("down")]
    assert mean_tokens(answered) == (10.5, 3.5)
    assert mean_tokens([ValueError("down")]) is None
