"""Answer forms the graders misread, from a review: boxed answers with no item to grade against (a
vote, a confident team's agreement), equations and LaTeX fractions in numeric answers, choices named
by a number inside another's, and boxed option letters.

Each test pins one case a user's grades or votes depend on; only the answers are written out.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import scripted_pool

from orchestra import Orchestra
from orchestra.datasets import Dataset, Item
from orchestra.evaluate import aevaluate
from orchestra.grading import (
    AutoGrader,
    ExactMatchGrader,
    MultipleChoiceGrader,
    NumericGrader,
    choices_of,
    normalize_text,
)
from orchestra.pipeline.aggregation import Response, Vote, vote

# --- answers read with no item ---------------------------------------------------------------------


@pytest.mark.parametrize(("one", "other"), [("\\boxed{-3}", "\\boxed{3}"), ("\\boxed{1.2}", "\\boxed{12}"),
                                            ("\\boxed{1/2}", "\\boxed{12}"), ("The answer is \\boxed{-3}", "\\boxed{3}")])
def test_with_no_item_boxed_numbers_that_differ_are_different_answers(one: str, other: str) -> None:
    """A boxed answer with no answer clause was read as text without its punctuation: -3 was 3, 1.2 was 12."""
    auto = AutoGrader()
    assert auto.pick(None, one) is auto.numeric and auto.extract(one) != auto.extract(other)


def test_with_no_item_a_boxed_letter_is_the_option_stated_in_words() -> None:
    """``\\boxed{B}`` and "The answer is (B)" are one answer (they were "b" and "B")."""
    assert AutoGrader().extract("Therefore \\boxed{B}") == AutoGrader().extract("The answer is (B)") == "B"


def test_a_vote_counts_boxed_numbers_by_their_value() -> None:
    """1.2 and 12 were one answer of two votes, tying the 7 that two experts gave."""
    result = vote([Response("a", "Working... so \\boxed{1.2}"), Response("b", "Hence \\boxed{12}"),
                   Response("c", "The answer is 7"), Response("d", "The answer is 7")])
    assert (result.answer, result.tally) == ("7", {"6/5": 1, "12": 1, "7": 2})


def test_exact_match_keeps_a_numbers_sign_point_and_fraction_bar() -> None:
    """"-3" is not "3", "1.2" is not "12" nor "1/2"; other punctuation goes as before (a word's hyphen too:
    "e-mail" is "email", while the minus of "x-1" and "a-b" stays)."""
    assert [normalize_text(text) for text in ("-3", "1.2", "1/2", "(-3)", "The Big, Red Dog!", "well-known", "e-mail",
                                              "a-b", "x-1")] == [
        "-3", "1.2", "1/2", "-3", "big red dog", "wellknown", "email", "a-b", "x-1"]
    assert not ExactMatchGrader().grade("The answer is -3", Item(id="1", question="q", answer="3 "))
    assert ExactMatchGrader().grade("So \\boxed{\\text{Paris}}", Item(id="1", question="q", answer="Paris"))


# --- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reference"), [
    ("The answer is 5 - 3 = 2", "2"), ("The answer is 3 \u00d7 4 = 12", "12"), ("The answer is 2^3 = 8", "8"),
])
def test_an_answer_clause_that_opens_with_an_equation_answers_what_it_comes_to(text: str, reference: str) -> None:
    """"The answer is 5 - 3 = 2" answers 2: its first number, 5, was read."""
    assert NumericGrader().grade(text, Item(id="1", question="q", answer=reference))


def test_an_equation_after_words_in_the_answer_clause_does_not_replace_its_first_number() -> None:
    """"The answer is 12 (since 7 + 5 = 12)" and "5, where x = 3" still answer by the number they open with."""
    assert NumericGrader().extract("The answer is 5, where x = 3") == "5"
    assert NumericGrader().extract("The answer is 3 (because 1 + 1 = 2)") == "3"


@pytest.mark.parametrize(("text", "reference"), [("The answer is 6 = 2 * 3", "6"),
                                                 ("The answer is 12 = 3 \\times 4.", "12"),
                                                 ("The answer is 1,000 = 10^3", "1000"), ("The answer is 8 = 2^3", "8")])
def test_an_answer_followed_by_its_working_is_the_answer(text: str, reference: str) -> None:
    """Only a number alone after the last "=" is what an equation comes to: "6 = 2 * 3" read 2."""
    assert NumericGrader().extract(text) == reference


@pytest.mark.timeout(120)  # (a pattern that backtracks takes hours here: only a hang reaches this)
def test_a_long_sum_in_an_answer_clause_is_read_at_once() -> None:
    """The equation a clause opens with is found in one pass: a sum of 24 terms with no "=" took seconds
    (each space could go to the operator or to the term), one of 60 would take days."""
    assert NumericGrader().extract("The answer is " + "1 + " * 60 + "x") == "1"


@pytest.mark.parametrize(("text", "reference"), [("\\boxed{\\frac12}", "0.5"), ("\\boxed{\\tfrac{3}{4}}", "0.75")])
def test_a_braceless_or_text_style_latex_fraction_is_read_as_a_fraction(text: str, reference: str) -> None:
    """``\\frac12`` is a half (it was read as 12) and ``\\tfrac{3}{4}`` three quarters (it was read as 4)."""
    assert AutoGrader().grade(text, Item(id="1", question="q", answer=reference))


# --- multiple choice --------------------------------------------------------------------------------

NUMBERS = Item(id="n", question="How many?", answer="B", choices=("4", "14", "24", "34"))


def test_a_choice_named_by_its_number_is_not_a_choice_whose_number_is_inside_it() -> None:
    """"The answer is 14." of choices 4, 14, 24, 34 chooses B: the "4" inside "14" read as A, graded right on A."""
    assert AutoGrader().grade("The answer is 14.", NUMBERS)
    assert not AutoGrader().grade("The answer is 14.", NUMBERS.model_copy(update={"answer": "A"}))


def test_a_choice_named_by_its_number_with_no_answer_clause_is_that_choice() -> None:
    """"So the total is 24." chooses C, not A."""
    assert MultipleChoiceGrader().extract("So the total is 24.", NUMBERS) == "C"


def test_a_longer_choice_that_holds_a_shorter_one_is_the_longer() -> None:
    """"New York" names New York, not York."""
    cities = Item(id="c", question="Which city?", answer="A", choices=("New York", "York"))
    assert MultipleChoiceGrader().extract("The answer is New York.", cities) == "A"


@pytest.mark.parametrize("text", ["Therefore \\boxed{B}.", "$\\boxed{\\text{B}}$"])
def test_a_boxed_option_letter_is_the_chosen_option(text: str) -> None:
    """Reasoning and maths models box their letter: it was not read, and the answer graded wrong."""
    assert AutoGrader().grade(text, NUMBERS)


def test_a_boxed_option_letter_is_read_before_a_letter_in_the_explanation_after_it() -> None:
    """"\\boxed{C}. Because A is wrong." chooses C, not the A of the explanation."""
    assert MultipleChoiceGrader().extract("\\boxed{C}. Because A is wrong.", NUMBERS) == "C"


@pytest.mark.parametrize(("text", "letter"), [("The answer is green, not A.", "B"),
                                               ("The answer is yellow, not blue.", "D")])
def test_an_answer_clause_that_opens_with_a_choices_text_chooses_it(text: str, letter: str) -> None:
    """The choice the clause opens with is the answer, not a letter or a choice it rules out after it."""
    colours = Item(id="c", question="Which colour?", answer=letter, choices=("red", "green", "blue", "yellow"))
    assert MultipleChoiceGrader().grade(text, colours)


def test_an_answer_clause_that_opens_with_a_sum_is_read_by_its_option_letter() -> None:
    """"2 + 2 = 4, i.e. (D)" does not choose the choice "2" it opens with."""
    small = Item(id="s", question="2 + 2?", answer="D", choices=("1", "2", "3", "4"))
    assert MultipleChoiceGrader().extract("The answer is 2 + 2 = 4, i.e. (D)", small) == "D"
    even = Item(id="e", question="2 + 2?", answer="B", choices=("2", "4", "6", "8"))
    assert MultipleChoiceGrader().extract("The answer is 2 + 2 = 4", even) == "B"  # (with no letter: it read A)


# --- a clause that rules an answer out, and numbers in words --------------------------------------------------


@pytest.mark.parametrize("text", ["The answer is not 42.", "The answer isn't 42.", "The answer is not 42; 43, I think."])
def test_a_clause_that_only_rules_a_number_out_answers_nothing(text: str) -> None:
    """"The answer is not 42." was graded right for 42 (the clause's first number), and its fallback, the
    text's last number, would be 42 as well."""
    forty_two = Item(id="q", question="?", answer="42")
    assert NumericGrader().extract(text) is None and not AutoGrader().grade(text, forty_two)


@pytest.mark.parametrize(("text", "number"), [("The answer is not 42, but 43.", "43"),
                                              ("The answer is not 42 but rather 44", "44"),
                                              ("The answer is \\boxed{7}. The answer is not 8.", "7")])
def test_a_clause_that_rules_a_number_out_answers_what_it_says_instead(text: str, number: str) -> None:
    """What follows "but", "rather", "instead" or "it is" is the answer, and a vote reads it so too."""
    assert NumericGrader().extract(text) == number and AutoGrader().extract(text) == number


def test_a_clause_that_rules_a_letter_out_chooses_none_or_the_one_it_says_instead() -> None:
    letters = Item(id="q", question="?", answer="B", choices=("x", "y", "z"))
    assert MultipleChoiceGrader().extract("The answer is not B.", letters) is None
    assert MultipleChoiceGrader().extract("The answer is not B, it is C.", letters) == "C"


@pytest.mark.parametrize(("text", "number"), [("The answer is 1 million.", "1000000"),
                                              ("The answer is 1.5 billion dollars", "1500000000"),
                                              ("So about 3 thousand people came.", "3000"),
                                              ("The answer is 2 millionaires", "2")])
def test_a_number_followed_by_a_scale_word_is_read_at_its_scale(text: str, number: str) -> None:
    """"1 million" was read as 1."""
    assert NumericGrader().extract(text) == number


@pytest.mark.parametrize("answer, reference", [
    ("The answer is x+1", "x-1"), ("The answer is \\boxed{x+1}", "x-1"), ("The answer is y = 2x + 3", "y = 2x - 3"),
    ("The answer is n>3", "n<3"), ("The answer is a*b", "a/b"), ("The answer is 103.", "10^3"),
    ("The answer is 210", "2^10"), ("The answer is 1230.", "12:30"), ("The answer is -x", "x"),
    ("The answer is (x+1)^2", "x+1^2"), ("The answer is \\sqrt{2}", "2"), ("The answer is 2^10", "2"),
    ("The answer is 1 000", "1"), ("The answer is √2", "2"), ("The answer is 2√3", "2"), ("The answer is 2\\pi", "2"),
    ("The answer is 3\\sqrt{2}", "3"), ("The answer is 2×10^3", "2"), ("The answer is 2 \\cdot 10^3", "2"),
    ("The answer is 3 000.5", "3"),
])
def test_an_expressions_operators_make_it_another_answer(answer: str, reference: str) -> None:
    """Every operator was dropped as punctuation ("x+1" graded right for "x-1", "n>3" one answer with "n<3" in a
    vote), a number under a root or in a power read as itself, and "1 000" as 1."""
    assert not AutoGrader().grade(answer, Item(id="1", question="q", answer=reference))


@pytest.mark.parametrize("answer, reference", [
    ("The answer is x - 1.", "x-1"), ("The answer is y=2x+3", "y = 2x + 3"), ("The answer is (x+1)(x-1)", "(x + 1)(x - 1)"),
    ("The answer is 1 000 000", "1000000"), ("The answer is **Paris**.", "Paris"), ("The answer is 10^3", "10^3"),
    ("The answer is 12:30.", "12:30"), ("The answer is -x", "-x"), ("The answer is: x ≤ 3", "x≤3"),
    ("The answer is e-mail.", "email"), ("The answer is 3 000.5", "3000.5"), ("The answer is 5 cm", "5"),
])
def test_an_expression_written_with_other_spacing_is_the_same_answer(answer: str, reference: str) -> None:
    assert AutoGrader().grade(answer, Item(id="1", question="q", answer=reference))


def test_a_vote_tells_expressions_apart_by_their_operators() -> None:
    result = vote([Response("a", "The answer is 5"), Response("b", "The answer is x+1"),
                   Response("c", "The answer is x-1")])
    # three answers of one vote each, not two ("x+1" and "x-1" were one answer, 2 votes to 1)
    assert sorted(result.tally.values()) == [1, 1, 1] and result.answer == "5"


@pytest.mark.parametrize(("one", "other"), [("1 000", "1000"), ("0.5", "1/2"), ("B", "The answer is B"),
                                            ("(B)", "B."), ("$1,000", "The answer is 1000.")])
def test_a_vote_counts_equal_bare_answers_as_one(one: str, other: str) -> None:
    """An answer alone on its last line, with no "the answer is", was read as text: "1 000" and "1000", "0.5"
    and "1/2", "B" and "The answer is B" were two answers, each outvoted by a third given twice."""
    result = vote([Response("a", one), Response("b", other), Response("c", "7"), Response("d", "The answer is 7")])
    assert sorted(result.tally.values()) == [2, 2]


def test_a_bare_lower_case_letter_and_a_bare_sentence_stay_words() -> None:
    auto = AutoGrader()
    assert auto.pick(None, "b") is auto.exact and auto.pick(None, "42\n\nHope this helps") is auto.exact


@pytest.mark.parametrize("answer", ["The answer is 4x", "The answer is 3i", "x = 2n", "The answer is 5k"])
def test_a_coefficient_is_no_number_stated(answer: str) -> None:
    """"4x" was graded right against 4 ("5k", which may mean 5,000, too)."""
    assert not NumericGrader().grade(answer, Item(id="1", question="q", answer=answer[-2]))


def test_a_number_with_a_unit_is_still_the_number() -> None:
    assert NumericGrader().grade("The answer is 5kg", Item(id="1", question="q", answer="5"))


CAPITAL = "What is the capital of England?\n(A) Paris\n(B) London\n(C) Rome"


def test_a_vote_reads_a_choice_named_by_its_text_as_its_letter_where_the_task_lists_choices() -> None:
    """"London." and "(B)" were two answers (the vote had no item): Paris won a three-way tie."""
    responses = [Response("a", "The answer is Paris."), Response("b", "The answer is London."),
                 Response("c", "The answer is (B).")]
    picked = Vote.pick(responses, AutoGrader(), CAPITAL)
    assert picked[0] == "The answer is London." and vote(responses, item=choices_of(CAPITAL)).tally == {"A": 1, "B": 2}


@pytest.mark.parametrize("task", ["What is the capital of England?", "Pick one:\n(B) London\n(C) Rome",
                                  "(A) Paris\n(C) Rome\n(B) London", "Compare (A) Paris and (B) London."])
def test_only_lettered_lines_from_a_in_order_are_choices(task: str) -> None:
    assert choices_of(task) is None


def test_choices_are_the_lines_text() -> None:
    item = choices_of(CAPITAL)
    assert item is not None and item.choices == ("Paris", "London", "Rome")


def test_an_evaluations_vote_counts_a_choice_by_its_text(tmp_path: Path) -> None:
    """Two of three experts chose B, one naming it by its text: accuracy was 0 (Paris won the tie)."""
    replies = {"m0": "The answer is Paris.", "m1": "The answer is London.", "m2": "The answer is (B)."}
    pool, _ = scripted_pool(3, expert=lambda name, request: replies[name])
    data = Dataset.from_items([{"id": "q", "question": "What is the capital of England?", "answer": "B",
                                "choices": ["Paris", "London", "Rome"]}])
    report = asyncio.run(aevaluate(Orchestra(pool, k=3, store=False), data, method="moa", aggregate="vote"))
    assert report.correct == 1


@pytest.mark.parametrize(("reference", "answer", "right"), [
    ("2,3", "The answer is 23", False), ("(1,2)", "The answer is 12", False),  # (any comma was a thousands one)
    ("2, 3", "The answer is 2,3", True), ("(1,2)", "The answer is (1, 2)", True),
    ("1000", "The answer is 1,000", True), ("12345.5", "The answer is 12,345.50", True),
    ("4", "The answer is 4, 5", False), ("4", "The answer is 4 and 5", False),  # (no one answer)
    ("4", "The answer is 4, because 2 + 2 = 4", True), ("2", "The answer is 2 and 2", True),
    ("1", "The answer is 1 / 2", False), ("1/2", "The answer is 1 / 2", True),
    ("6.02e23", "The answer is 6.02 × 10^23", True), ("1000", "The answer is 1.0 \\times 10^{3}", True),
    ("2", "The answer is 2 x 10^5", False), ("200000", "The answer is 2 x 10^5.", True),
    ("3", "The answer is 3 hundred", False), ("300", "The answer is 3 hundred", True),
    ("90°", "The answer is 90^\\circ", True), ("2", "The answer is 2½", False),
    ("東京", "東京。", True),
])
def test_lists_powers_of_ten_scales_and_degrees_are_read_as_written(reference: str, answer: str, right: bool) -> None:
    assert AutoGrader().grade(answer, Item(id="1", question="q", answer=reference)) is right


@pytest.mark.parametrize(("answer", "right"), [("Vitamin C is the answer.", "B"), ("I'd pick Vitamin C.", "B"),
                                               ("I'd go with Vitamin C (B).", "B"), ("It is Vitamin D, so C.", "C")])
def test_a_letter_inside_a_choices_text_is_not_that_option(answer: str, right: str) -> None:
    """"Vitamin C" was option C (Vitamin D): graded wrong against B and right against C."""
    item = Item(id="1", question="q", answer=right, choices=("Vitamin A", "Vitamin C", "Vitamin D"))
    assert AutoGrader().grade(answer, item) and MultipleChoiceGrader().extract(answer, item) == right


@pytest.mark.parametrize(("answer", "reference", "choices"), [
    ("A wrong answer is 4.", "4", None), ("Their answer is 4, which is wrong; I cannot tell.", "4", None),
    ("A wrong answer is (B).", "B", ("x", "y", "z")), ("Its answer is B", "B", ("x", "y", "z")),
    ("A wrong answer is London.", "london", None)])
def test_a_reply_that_only_states_a_wrong_answer_is_not_credited_with_it(answer: str, reference: str,
                                                                          choices: tuple[str, ...] | None) -> None:
    """The clause was skipped, then the last number, letter or line read was the wrong answer's."""
    assert not AutoGrader().grade(answer, Item(id="1", question="q", answer=reference, choices=choices))


def test_the_reply_s_own_answer_after_a_wrong_one_is_read() -> None:
    assert AutoGrader().grade("Their answer is 4. I get 5.", Item(id="1", question="q", answer="5"))
    assert AutoGrader().grade("A wrong answer is London.\nParis", Item(id="1", question="q", answer="paris"))


@pytest.mark.parametrize("answer", ["The answer is 1 × 10^5000", "about 1e5000 atoms", "roughly 1e50000000 atoms.",
                                    "The answer is 2 x 10^{100000000}", "The answer is " + "9" * 5000])
def test_a_number_too_big_to_be_an_answer_is_none_at_once(answer: str) -> None:
    """1e50000000 took 88 s of CPU, then raised (no integer of over 4,300 digits is written)."""
    assert NumericGrader().extract(answer) is None


@pytest.mark.parametrize(("answer", "reference"), [("Their answer is 5, but the right one is 7.", "7"),
                                                   ("Your answer is 40, but the correct total is 42.", "42"),
                                                   ("The answer is 3 and 1 / 2", "7/2")])
def test_what_a_reply_says_instead_of_a_wrong_answer_is_read(answer: str, reference: str) -> None:
    assert NumericGrader().grade(answer, Item(id="1", question="q", answer=reference))


def test_the_article_of_a_wrong_answer_is_no_option() -> None:
    """"A wrong answer is (B)." was read as option A once the clause was left out."""
    item = Item(id="1", question="q", answer="A", choices=("x", "y", "z", "w"))
    assert MultipleChoiceGrader().extract("A wrong answer is (B).", item) is None
    assert NumericGrader().extract("Its value lies between 1 and 3/2.") == "3/2"  # (a range, not 1 and 3/2)


@pytest.mark.parametrize(("answer", "reference"), [
    ("2,3", "3"), ("(1, 2)", "2"), ("4, 5", "5"), ("4 and 5", "5"), ("3–5", "5"), ("3 to 5", "5"),
    ("between 4 and 5", "5"), ("4 or 5", "5"), ("Not 42.", "42"), ("It isn't 42.", "42")])
def test_a_bare_reply_of_two_numbers_or_a_denial_is_no_one_answer(answer: str, reference: str) -> None:
    """Only a clause ("The answer is 4 or 5") was read so: a bare reply was read by its last number."""
    assert not AutoGrader().grade(answer, Item(id="1", question="q", answer=reference))


@pytest.mark.parametrize(("answer", "reference"), [
    ("Not 42, but 43.", "43"), ("2 × 10⁵", "200000"), ("6.02×10²³", "6.02e23"), ("3 1/2", "3.5"),
    ("The answer is 10^6", "1000000"), ("x = 10^-3", "0.001"), ("I think 4.\n5", "5")])
def test_superscript_powers_powers_of_ten_and_mixed_numbers_are_read(answer: str, reference: str) -> None:
    """"2 × 10⁵" was 10, "3 1/2" a half, "10^6" no number."""
    assert AutoGrader().grade(answer, Item(id="1", question="q", answer=reference))


def test_a_power_of_another_base_is_still_no_number_stated() -> None:
    assert NumericGrader().extract("The answer is 2^10") is None


@pytest.mark.parametrize(("answer", "value"), [("The answer is - 5", "-5"), ("The answer is $- 3", "-3"),
                                               ("The answer is 10 - 5 = 5", "5")])
def test_a_sign_set_apart_at_the_start_of_the_answer_is_its_sign(answer: str, value: str) -> None:
    """"The answer is - 5" was graded right for 5."""
    assert NumericGrader().extract(answer) == value
