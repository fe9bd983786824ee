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


def _whole_number(value: Any) -> Any:
    """A whole number; a text YAML 1.1 did not read as one but that is one (``1e3``, ``1.5e3``: an
    exponent needs a dot and a sign there) is refused with the digits to write."""
    value = _not_a_switch(value)
    if isinstance(value, str) and not value.strip().lstrip("+-").replace("_", "").isdigit():
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return value
        if number.is_integer():
            raise ValueError(f"give a whole number; YAML reads {value} as text, not a number: write {int(number)}")
    return value


#: what to do of a whole number YAML 1.1 reads otherwise than its digits (``010`` is 8, ``12:30`` 750)
REREAD_ADVICE = "write the number meant in decimal digits, or quote it if it is text"


def decimal_value(written: str) -> int | None:
    """The whole number ``written`` is in decimal digits (``010`` is 10, where YAML 1.1 reads 8), or
    None where it is none (``12:30``, ``0x1f``)."""
    try:
        return int(written)
    except ValueError:
        return None


Count = Annotated[int, BeforeValidator(_whole_number)]
"""A whole number setting (true/false refused)."""

Amount = Annotated[float, BeforeValidator(_not_a_switch), AllowInfNan(False)]
"""A number setting (true/false refused, and so are NaN and infinity: ``--max-cost nan`` was said to
be not above 0, ``--cost-lambda inf`` was taken)."""
