"""Number types of settings and pool and workflow files: a number given as true or false is refused.

pydantic reads ``true`` as 1 for an ``int`` and 1.0 for a ``float``, so ``recruit: {k: true}`` or
``--set budget.max_cost_usd=yes`` (YAML's yes, on, true) quietly became one expert or one dollar.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _not_a_switch(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"give a number, not {str(value).lower()}")
    return value


Count = Annotated[int, BeforeValidator(_not_a_switch)]
"""A whole number setting (true/false refused)."""

Amount = Annotated[float, BeforeValidator(_not_a_switch)]
"""A number setting (true/false refused)."""
