"""Token prices in USD per million tokens, and the cost of a completion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestra.errors import ConfigError
from orchestra.models.types import Usage, estimate_tokens
from orchestra.numbers import Amount


class Price(BaseModel):
    """USD per million input (prompt) and output (completion) tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # (a misspelt price was a free model)

    input: Amount = Field(default=0.0, ge=0, allow_inf_nan=False)
    output: Amount = Field(default=0.0, ge=0, allow_inf_nan=False)

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        """The USD cost of the given token counts."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000

    def usage(self, prompt_tokens: int, completion_tokens: int) -> Usage:
        """A ``Usage`` with its cost filled in."""
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     cost_usd=self.cost(prompt_tokens, completion_tokens), requests=0)

    @property
    def blended(self) -> float:
        """One number per model for cost-aware recruiting: the mean of input and output prices."""
        return (self.input + self.output) / 2


FREE = Price()

#: Public list prices (USD / 1M tokens). Match is by exact name, then by the longest known prefix,
#: so dated snapshots ("gpt-4o-mini-2024-07-18") find their family. Override per model with
#: ``prices=`` on the model or ``prices:`` in a pool file.
PRICES: dict[str, Price] = {
    "gpt-4o": Price(input=2.50, output=10.00),
    "gpt-4o-mini": Price(input=0.15, output=0.60),
    "gpt-4.1": Price(input=2.00, output=8.00),
    "gpt-4.1-mini": Price(input=0.40, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, output=0.40),
    "gpt-5": Price(input=1.25, output=10.00),
    "gpt-5-mini": Price(input=0.25, output=2.00),
    "gpt-5-nano": Price(input=0.05, output=0.40),
    "o3-mini": Price(input=1.10, output=4.40),
    "o4-mini": Price(input=1.10, output=4.40),
    "claude-3-5-haiku": Price(input=0.80, output=4.00),
    "claude-3-5-sonnet": Price(input=3.00, output=15.00),
    "claude-3-7-sonnet": Price(input=3.00, output=15.00),
    "claude-haiku-4-5": Price(input=1.00, output=5.00),
    "claude-sonnet-4": Price(input=3.00, output=15.00),
    "claude-opus-4": Price(input=15.00, output=75.00),
}


def price_for(model: str, table: Mapping[str, Price] = PRICES) -> Price:
    """The price of ``model`` from ``table``: exact name, else the longest matching prefix, else free."""
    if model in table:
        return table[model]
    matches = [name for name in table if model.startswith(name)]
    return table[max(matches, key=len)] if matches else FREE


def coerce_price(value: Price | Mapping[str, float] | tuple[float, float] | None, model: str) -> Price:
    """Accept a ``Price``, ``{"input": .., "output": ..}`` or ``(input, output)``; None means the table.
    Anything else, or prices that do not hold, is a one-line ``ConfigError`` (``prices=1`` was a
    TypeError, ``(1, 2, 3)`` taken as ``(1, 2)``)."""
    if value is None:
        return price_for(model)
    if isinstance(value, Price):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        fields: Any = {"input": value[0], "output": value[1]}
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise ConfigError(f"prices must be (input, output) in USD per million tokens, {{'input': ..., 'output': ...}} "
                          f"or a Price, not {type(value).__name__} {value!r:.40}")
    try:
        return Price.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ConfigError(f"prices: {where + ': ' if where else ''}{first['msg']}") from None


def reported_usage(price: Price, prompt_tokens: Any, completion_tokens: Any, text: str) -> Usage:
    """Usage from a provider's counts, estimating completion tokens when the server gave none (or
    a count that is not one)."""
    completion = token_count(completion_tokens)
    return price.usage(token_count(prompt_tokens) or 0, estimate_tokens(text) if completion is None else completion)


#: the most tokens a server's count of one call may be: no model reads or writes a billion in one call
#: (2**63 in one count overflowed the store's sums: every run of the store became unlistable)
MAX_TOKEN_COUNT = 10 ** 9


def token_count(value: Any) -> int | None:
    """A server's token count: a whole number from 0 to ``MAX_TOKEN_COUNT`` (written as text too);
    anything else (a negative count, a word, true, 1e30) is None, as if the server had given none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii() and len(value.strip()) < 20:
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_TOKEN_COUNT else None
