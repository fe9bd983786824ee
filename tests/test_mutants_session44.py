"""Mutation round on the frontier's dominance, the lexical matcher's word-start kinship and profiling's
warnings: each test kills a one-line mutant the other tests let through."""

from __future__ import annotations

import warnings

import pytest

from orchestra.datasets import Item
from orchestra.errors import BudgetExceeded, ProfilingIncomplete
from orchestra.events import EventBus
from orchestra.frontier import SweepPoint, mark_frontier
from orchestra.grading import get_grader
from orchestra.matching import LexicalMatcher
from orchestra.models import ChatResult
from orchestra.profiling import ALIKE_MIN_ITEMS, ALIKE_MIN_WRONG, _Counter, _stop_if_failed, answered_alike
from orchestra.sharing import SharedAnswers


def _point(method: str, accuracy: float, cost: float) -> SweepPoint:
    return SweepPoint(method=method, cost_lambda=None, accuracy=accuracy, cost_usd=cost, cost_per_item_usd=cost / 10,
                      cost_per_correct_usd=None, calls=10, saved_calls=0, items=10, failed=0)


def test_a_point_as_cheap_and_more_accurate_pushes_another_off_the_frontier() -> None:
    """Same cost, higher accuracy: the other point is beaten on one and matched on the other (frontier.py:91,
    ``<=`` read as ``<`` kept both on the frontier)."""
    points = [_point("worse", 0.5, 0.01), _point("better", 0.8, 0.01), _point("dear", 0.9, 0.1)]
    mark_frontier(points)
    assert [p.on_frontier for p in points] == [False, True, True]


@pytest.mark.parametrize(("keyword", "skill"), [("art", "arts"), ("poetry", "poem")])
def test_a_keyword_and_a_skill_that_share_only_their_first_three_letters_are_kin(keyword: str, skill: str) -> None:
    """Word starts are three letters (matching.py:111): "art" and "arts", "poetry" and "poem" share "art" and
    "poe", not four letters."""
    found = LexicalMatcher().nearest(keyword, [skill, "law", "chemistry"])
    assert found is not None and found.skill == skill


def _alike_answers(wrong: int) -> tuple[dict[str, dict[str, ChatResult | Exception]], list[Item]]:
    items = [Item(id=f"q{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(ALIKE_MIN_ITEMS)]
    texts = [f"The answer is {int(item.answer) + (1 if index < wrong else 0)}" for index, item in enumerate(items)]
    answers: dict[str, dict[str, ChatResult | Exception]] = {
        name: {item.id: ChatResult(text=text) for item, text in zip(items, texts)} for name in ("alpha", "beta")}
    return answers, items


def test_two_agents_alike_on_every_item_and_wrong_on_exactly_the_fewest_items_are_named() -> None:
    """Wrong on exactly ``ALIKE_MIN_WRONG`` items is enough (profiling.py:246, ``>=`` read as ``>`` named none)."""
    answers, items = _alike_answers(ALIKE_MIN_WRONG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = answered_alike(answers, items, get_grader("numeric"))
    assert pairs == [("alpha", "beta", ALIKE_MIN_ITEMS)]
    assert any("alpha and beta answered all 20 items alike" in str(w.message) for w in caught)
    fewer, items = _alike_answers(ALIKE_MIN_WRONG - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert answered_alike(fewer, items, get_grader("numeric")) == []


def test_a_stage_with_failed_calls_and_calls_left_unsent_says_both() -> None:
    """Two calls failed and one was left unsent by the budget: the stop says "3 of its calls failed, 1 of them
    left unsent by its budget", not that the budget left all 3 unsent (profiling.py:278)."""
    counter = _Counter(EventBus(), "r", None)
    counter.begin("answers", 3)
    failed: list[tuple[str, Exception]] = [
        ("agent a on item q0", ConnectionError("endpoint down")),
        ("agent a on item q1", ConnectionError("endpoint down")),
        ("agent b on item q0", BudgetExceeded(limit="max_calls", value=2, spent="2 calls", run_id="r")),
    ]
    with pytest.raises(ProfilingIncomplete) as raised:
        _stop_if_failed(failed, counter)
    counter.close()
    message = str(raised.value)
    assert "3 of its calls failed, 1 of them left unsent by its budget" in message, message
    assert "its budget left" not in message, message
    only_budget = [failed[2]]
    with pytest.raises(ProfilingIncomplete) as raised:
        _stop_if_failed(only_budget, _Counter(EventBus(), "r", None))
    assert "its budget left 1 of its calls unsent" in str(raised.value)



def test_the_nth_identical_request_takes_the_nth_answer_an_earlier_point_got() -> None:
    """An agent drawn twice sends one request twice (seq 0 and 1): a later point takes both answers, not the first
    twice, and a third identical request, which no point made, is asked (sharing.py:41 keyed by key alone)."""
    shared = SharedAnswers()
    first = shared.view()
    first.put("k", 0, ChatResult(text="The answer is 3"))
    first.put("k", 1, ChatResult(text="The answer is 4"))
    later = shared.view()
    answers = [later.get("k", seq) for seq in (0, 1)]
    assert [answer.text if answer else None for answer in answers] == ["The answer is 3", "The answer is 4"]
    assert later.get("k", 2) is None


def test_a_stage_s_progress_counts_no_call_its_budget_refused() -> None:
    """After a budget stop `profile`'s bar read `keywords 15/15` where 7 calls had been sent: a refused
    call's ``CallsResolved`` (source "budget") was counted as done."""
    from orchestra.events import CallsResolved, UsageUpdated

    events, seen = EventBus(), []
    counter = _Counter(events, "profile-run", lambda stage, done, total: seen.append((stage, done, total)))
    counter.begin("keywords", 5)
    events.emit(UsageUpdated(run_id="profile-run", calls=1, requests=1, prompt_tokens=1, completion_tokens=1,
                             cost_usd=0.0))
    events.emit(CallsResolved(model="m", count=2, run_id="profile-run", source="store"))  # reused: done
    events.emit(CallsResolved(model="m", count=1, run_id="profile-run", source="budget"))  # refused: not done
    events.emit(CallsResolved(model="m", count=1, run_id="another-run", source="cache"))  # another run's
    counter.close()
    assert seen == [("keywords", 0, 5), ("keywords", 1, 5), ("keywords", 3, 5)]
