"""Unit tests of orchestra.pipeline.aggregation's vote, ranking and cut."""

from __future__ import annotations

from orchestra.grading import AutoGrader
from orchestra.pipeline.aggregation import Response, cut_for_aggregator, ranked, strategy, vote


def test_a_text_of_exactly_the_limit_is_shown_whole() -> None:
    assert cut_for_aggregator("abcd", 4) == "abcd"
    assert cut_for_aggregator("abcde", 4).startswith("abcd [... cut")


def test_ranked_puts_the_heaviest_first_and_keeps_order_among_equals() -> None:
    a, b, c = Response("a", "x", 1.0), Response("b", "y", 3.0), Response("c", "z", 1.0)
    assert [r.agent for r in ranked([a, b, c])] == ["b", "a", "c"]


def test_responses_without_an_answer_do_not_vote() -> None:
    result = vote([Response("a", ""), Response("b", "   "), Response("c", "The answer is 5")], AutoGrader())
    assert (result.answer, result.tally) == ("5", {"5": 1})


def test_a_tie_goes_to_the_heavier_supporters_before_the_first_given() -> None:
    result = vote([Response("a", "The answer is 5", 1.0), Response("b", "The answer is 7", 3.0)], AutoGrader())
    assert result.answer == "7"


def test_a_tie_of_equal_weight_goes_to_the_answer_given_first() -> None:
    result = vote([Response("a", "The answer is 5"), Response("b", "The answer is 7")], AutoGrader())
    assert result.answer == "5"


def test_the_winning_text_is_its_strongest_supporters() -> None:
    result = vote([Response("a", "Answer: 5", 0.5, data="weak"), Response("b", "The answer is 7", 1.0),
                   Response("c", "The answer is 5", 2.0, data="strong")], AutoGrader())
    assert (result.answer, result.text, result.data) == ("5", "The answer is 5", "strong")


def test_with_no_answer_to_vote_on_the_strongest_text_wins_without_its_reasoning() -> None:
    result = vote([Response("a", "<think>hmm</think>", 2.0), Response("b", "", 1.0)], AutoGrader())
    assert (result.answer, result.text) == (None, "")


def test_one_answer_needs_no_aggregator() -> None:
    assert strategy("synthesize", 1).name == "none" and strategy("synthesize", 2).name == "synthesize"
