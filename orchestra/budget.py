"""Budgets: per-run limits on calls, tokens and cost, checked before every dispatch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from orchestra.errors import BudgetExceeded
from orchestra.models import ChatRequest, Usage
from orchestra.models.openai import estimate_tokens
from orchestra.models.pricing import Price


class Budget(BaseModel):
    """Per-run limits; ``None`` lifts one. On by default so a runaway plan cannot burn money."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_calls: int | None = Field(default=500, ge=1)
    max_cost_usd: float | None = Field(default=1.0, gt=0)
    max_tokens: int | None = Field(default=1_000_000, ge=1)

    def merged(self, **overrides: float | int | None) -> Budget:
        """A validated copy with the given limits changed; ``None`` lifts a limit."""
        return Budget.model_validate({**self.model_dump(), **overrides})


_FLAGS = {"max_calls": "--max-calls", "max_cost_usd": "--max-cost", "max_tokens": "--max-tokens"}


class BudgetTracker:
    """Counts one run's spending and admits or refuses each call before it is sent.

    A call's worst-case cost (its prompt plus ``max_tokens`` at its model's price) is reserved
    while it is in flight, so concurrent calls cannot overshoot ``max_cost_usd`` together.
    """

    def __init__(self, budget: Budget, run_id: str, *, spent: Usage | None = None, calls: int = 0) -> None:
        self.budget = budget
        self.run_id = run_id
        self.calls = calls
        self.usage = spent or Usage()
        self._reserved_calls = 0
        self._reserved = Usage()
        self.exceeded: BudgetExceeded | None = None

    def admit(self, request: ChatRequest, price: Price) -> Usage:
        """Reserve one call's worst case (its prompt plus ``max_tokens`` at its price) and return the
        reservation; raise ``BudgetExceeded`` if it does not fit."""
        budget = self.budget
        if budget.max_calls is not None and self.calls + self._reserved_calls + 1 > budget.max_calls:
            self._refuse("max_calls", budget.max_calls, f"{self.calls} calls made")
        worst = price.usage(estimate_tokens(request.prompt_text()), request.max_tokens or 1024)
        committed = self.usage + self._reserved
        if budget.max_tokens is not None and committed.total_tokens + worst.total_tokens > budget.max_tokens:
            self._refuse("max_tokens", budget.max_tokens, f"{self.usage.total_tokens} tokens used")
        if budget.max_cost_usd is not None and committed.cost_usd + worst.cost_usd > budget.max_cost_usd:
            self._refuse("max_cost_usd", budget.max_cost_usd, f"${self.usage.cost_usd:.4f} spent")
        self._reserved_calls += 1
        self._reserved = self._reserved + worst
        return worst

    def settle(self, reserved: Usage, usage: Usage | None) -> None:
        """Release a reservation and count what the call really spent (None: it was not made)."""
        self._reserved_calls -= 1
        self._reserved = Usage(prompt_tokens=self._reserved.prompt_tokens - reserved.prompt_tokens,
                               completion_tokens=self._reserved.completion_tokens - reserved.completion_tokens,
                               cost_usd=self._reserved.cost_usd - reserved.cost_usd)
        if usage is not None:
            self.calls += 1
            self.usage = self.usage + usage

    def count(self, usage: Usage) -> None:
        """Count a call answered from the store on resume: it was paid for before."""
        self.calls += 1
        self.usage = self.usage + usage

    def _refuse(self, limit: str, value: float, state: str) -> None:
        self.exceeded = BudgetExceeded(
            f"budget {limit}={value:g} reached ({state}); raise it with {_FLAGS[limit]} "
            f"(or budget.{limit} in the workflow) and run `orchestra resume {self.run_id}` to finish",
            limit=limit)
        raise self.exceeded
