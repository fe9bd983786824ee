"""Evaluation: the accuracy, cost and speed of a method on a labelled data set."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestra.core import Orchestra
from orchestra.datasets import Dataset, Item
from orchestra.errors import ConfigError
from orchestra.grading import Grader, answer_format
from orchestra.result import RunResult

#: method -> (recruiting mode, aggregation, k or None for the caller's k)
METHODS: dict[str, tuple[str, str, int | None]] = {
    "symbolic-moe": ("symbolic-moe", "synthesize", None),
    "vote": ("symbolic-moe", "vote", None),
    "moa": ("global", "synthesize", None),
    "random": ("random", "synthesize", None),
    "single": ("global", "none", 1),
}


@dataclass
class EvalReport:
    """What ``orchestra eval`` (and a data-set workflow) prints; ``answers`` holds every item's answer."""

    method: str
    items: int
    correct: int
    accuracy: float
    calls: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_per_correct_usd: float | None
    elapsed_s: float
    model_loads: dict[str, int]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: int = 0
    skill_extraction_failures: int = 0
    budget_exceeded: str | None = None
    """Why a shared budget stopped the data set early (None: it did not)."""
    answers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


def grade_runs(method: str, items: Sequence[Item], results: Sequence[RunResult], grader: Grader, *,
               elapsed_s: float, model_loads: dict[str, int], budget_exceeded: str | None = None) -> EvalReport:
    """Grade each run's answer against its item and total what the runs spent."""
    verdicts = [bool(r.answer) and grader.grade(r.answer or "", item) for r, item in zip(results, items)]
    correct = sum(verdicts)
    cost = sum(r.usage.cost_usd for r in results)
    per_category: dict[str, Counter[str]] = {}
    for item, ok in zip(items, verdicts):
        tally = per_category.setdefault(item.category or "all", Counter())
        tally["items"] += 1
        tally["correct"] += ok
    return EvalReport(
        method=method, items=len(items), correct=correct, accuracy=correct / len(items) if items else 0.0,
        calls=sum(r.usage.calls for r in results), requests=sum(r.usage.requests for r in results),
        prompt_tokens=sum(r.usage.prompt_tokens for r in results),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        cost_usd=cost, cost_per_correct_usd=cost / correct if correct else None, elapsed_s=elapsed_s,
        model_loads=model_loads,
        per_category={c: {"items": t["items"], "accuracy": t["correct"] / t["items"]} for c, t in per_category.items()},
        failed=sum(r.status != "done" for r in results),
        skill_extraction_failures=sum(r.usage.skill_extraction_failures for r in results),
        budget_exceeded=budget_exceeded,
        answers=[{"id": item.id, "category": item.category, "answer": r.answer, "correct": ok, "status": r.status,
                  "run_id": r.run_id} for item, r, ok in zip(items, results, verdicts)])


async def aevaluate(orchestra: Orchestra, dataset: Dataset, *, method: str | None = None, limit: int | None = None,
                    **overrides: Any) -> EvalReport:
    """Answer every item (all calls batched together) and grade the answers.

    ``method`` picks a preset (``METHODS``: its recruiting mode, aggregation and k) over the
    Orchestra's settings; ``overrides`` (any ``Settings`` field, e.g. ``mode``) win over both.
    """
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset_mode, preset_aggregate, fixed_k = METHODS[method] if method else (None, None, None)
    preset = {"mode": preset_mode, "aggregate": preset_aggregate, "k": fixed_k}
    given: dict[str, Any] = {k: v for k, v in preset.items() if v is not None}
    given.update((k, v) for k, v in overrides.items() if v is not None)  # a given flag wins over the preset
    settings = orchestra.run_settings(given)
    mode, aggregate = settings.mode, settings.aggregate
    name = method if method and (mode, aggregate) == (preset_mode, preset_aggregate) else next(
        (m for m, preset_of_m in METHODS.items() if preset_of_m == (mode, aggregate, None)),
        f"{mode} + {aggregate}")
    items = list(dataset.items[:limit] if limit else dataset.items)
    started = time.perf_counter()
    loads_before = dict(orchestra.executor.stats.loads)
    results = await orchestra.arun_many([item.prompt() for item in items],
                                        answer_formats=[answer_format(item) for item in items],
                                        meta={"kind": "eval", "method": name, "dataset": dataset.path},
                                        **given)
    elapsed = time.perf_counter() - started
    return grade_runs(name, items, results, orchestra.stages_for(settings).grader, elapsed_s=elapsed,
                      model_loads=loads_since(orchestra, loads_before))


def loads_since(orchestra: Orchestra, before: dict[str, int]) -> dict[str, int]:
    """Model loads by this Orchestra's executor since ``before`` (a copy of its load counts)."""
    return {name: count - before.get(name, 0) for name, count in orchestra.executor.stats.loads.items()
            if count - before.get(name, 0)}
