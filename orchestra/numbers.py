"""Number types of settings and pool and workflow files: a number given as true or false is refused,
and a non-finite amount.

pydantic reads ``true`` as 1 for an ``int`` and 1.0 for a ``float``, so ``recruit: {k: true}`` or
``--set budget.max_cost_usd=yes`` (YAML's yes, on, true) quietly became one expert or one dollar.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AllowInfNan, BeforeValidator


def _not_a_switch(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"give a number, not {str(value).lower()}")
    return value


Count = Annotated[int, BeforeValidator(_not_a_switch)]
"""A whole number setting (true/false refused)."""

Amount = Annotated[float, BeforeValidator(_not_a_switch), AllowInfNan(False)]
"""A number setting (true/false refused, and so are NaN and infinity: ``--max-cost nan`` was said to
be not above 0, ``--cost-lambda inf`` was taken)."""
