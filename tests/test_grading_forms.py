"""Answer forms the graders misread, from a review: equations and LaTeX fractions in numeric answers.

Each test pins one case a user's grades or votes depend on; only the answers are written out.
"""

from __future__ import annotations

import pytest

from orchestra.datasets import Item
from orchestra.grading import AutoGrader, NumericGrader

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


@pytest.mark.parametrize(("text", "reference"), [("\\boxed{\\frac12}", "0.5"), ("\\boxed{\\tfrac{3}{4}}", "0.75")])
def test_a_braceless_or_text_style_latex_fraction_is_read_as_a_fraction(text: str, reference: str) -> None:
    """``\\frac12`` is a half (it was read as 12) and ``\\tfrac{3}{4}`` three quarters (it was read as 4)."""
    assert AutoGrader().grade(text, Item(id="1", question="q", answer=reference))
