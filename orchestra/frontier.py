"""The accuracy/cost frontier: every method and a range of cost preferences on one data set.

``asweep`` evaluates each method of ``orchestra.evaluate.METHODS`` once and the ``calibrated``
router once per cost preference λ, all on the same items with the same Orchestra (so the same
pool, profiles and settings), and marks the points no other point beats on both accuracy and
cost. ``frontier_html`` draws them as a self-contained page (an SVG chart and the table), so a
user can pick a point.
"""

from __future__ import annotations

import asyncio
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from orchestra.core import Orchestra
from orchestra.datasets import Dataset
from orchestra.evaluate import METHODS, EvalReport, aevaluate, cost_cap, k_variant
from orchestra.money import dollars, usd_exact
from orchestra.sharing import SharedAnswers, sharing

LAMBDAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The calibrated router's cost preferences a sweep tries by default."""


@dataclass
class SweepPoint:
    """One method (or one λ of the calibrated router) on the data set."""

    method: str
    cost_lambda: float | None
    accuracy: float
    cost_usd: float
    cost_per_item_usd: float
    cost_per_correct_usd: float | None
    calls: int
    saved_calls: int
    items: int
    failed: int
    requests: int = 0
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    on_frontier: bool = False
    budget_exceeded: str | None = None
    """The data set's budget that stopped this method's evaluation, if one did."""
    failure_exit: int = 0
    """The exit code of its first unfinished item (2 a user error, 3 a budget, else 1)."""
    interrupted: bool = False
    """Its evaluation was cut off (Ctrl-C): what its finished items scored and what it spent, not a point
    of the frontier."""
    failed_calls: int = 0
    """Calls that failed after their retries: the point's accuracy is not the method's own."""
    failed_by_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Of ``failed_calls``, per model: ``{"calls": N, "first_error": "..."}``."""
    reused_calls: int = 0
    """Calls an earlier point of the sweep made with the same requests (each item's keyword samples, the
    calls of a team it chose too): taken from it, not sent again, so not among ``calls`` and ``requests``."""
    reused_usd: float = 0.0
    """What those calls cost where they were made: part of ``cost_usd``, which is what the method costs
    on its own, not of ``spent_usd``."""
    spent_usd: float = 0.0
    """What this point's requests cost (``cost_usd`` less ``reused_usd``): the sweep's spending is their sum."""

    @classmethod
    def of(cls, report: EvalReport, method: str, cost_lambda: float | None) -> SweepPoint:
        """A point from an evaluation report (its cost with the calls it reused)."""
        cost = dollars(report.cost_usd + report.reused_usd)
        return cls(method=method, cost_lambda=cost_lambda, accuracy=report.accuracy, cost_usd=cost,
                   cost_per_item_usd=dollars(cost / report.items) if report.items else 0.0,
                   cost_per_correct_usd=dollars(cost / report.correct) if report.correct else None,
                   calls=report.calls, saved_calls=report.saved_calls, items=report.items, failed=report.failed,
                   requests=report.requests, per_category=report.per_category,
                   budget_exceeded=report.budget_exceeded, failure_exit=report.failure_exit,
                   failed_calls=report.failed_calls, failed_by_model=report.failed_by_model,
                   reused_calls=report.reused_calls, reused_usd=report.reused_usd, spent_usd=report.cost_usd)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


def mark_frontier(points: Sequence[SweepPoint]) -> None:
    """Set ``on_frontier`` on the points that no other point beats on both accuracy and cost
    (at least as good on both, better on one). A method whose evaluation did not finish (a budget
    stopped it) has neither its accuracy nor its cost: it is left out, and beats nothing."""
    whole = [point for point in points if not point.failed and not point.interrupted]
    for point in points:
        point.on_frontier = point in whole and not any(
            other.accuracy >= point.accuracy and other.cost_usd <= point.cost_usd
            and (other.accuracy > point.accuracy or other.cost_usd < point.cost_usd) for other in whole)


def sweep_size(lambdas: Sequence[float] = LAMBDAS, methods: Sequence[str] | None = None) -> int:
    """How many points a sweep evaluates: each method once, the calibrated router once per λ."""
    return len(_methods(methods)) + len(lambdas)


def _methods(methods: Sequence[str] | None) -> list[str]:
    return list(methods) if methods else [m for m in METHODS if m != "calibrated"]


async def asweep(orchestra: Orchestra, dataset: Dataset, *, lambdas: Sequence[float] = LAMBDAS,
                 methods: Sequence[str] | None = None, limit: int | None = None,
                 on_cancel: Callable[[list[SweepPoint]], None] | None = None,
                 **overrides: Any) -> list[SweepPoint]:
    """Evaluate every method, and the calibrated router at each λ, on ``dataset``; frontier marked.

    No request is asked twice: a point takes the answers an earlier point got to the same requests
    (``orchestra.sharing``: each item's keyword samples, the calls of a team both chose), and counts
    what they cost there in its own ``cost_usd``.

    ``overrides`` (``k``, ``aggregate``... as for ``aevaluate``) apply to every method. ``on_cancel``
    is given the points evaluated in full so far (frontier marked among them), then the one cut off
    (``interrupted``: what it had spent, which no other point counts), when the sweep is cancelled
    (Ctrl-C), before the cancellation goes on.
    """
    points: list[SweepPoint] = []
    cut: list[tuple[EvalReport, str, float | None]] = []
    shared = SharedAnswers()  # each request asked by the first point that makes it

    async def point(name: str | None, at: float | None, **options: Any) -> SweepPoint:
        token = sharing.set(shared.view())  # (the point's runs take it as they begin: they run in this context)
        try:
            report = await aevaluate(orchestra, dataset, limit=limit,
                                     on_cancel=lambda report: cut.append((report, name or report.method, at)),
                                     **options)
        finally:
            sharing.reset(token)
        return SweepPoint.of(report, name or report.method, at)

    try:
        for method in _methods(methods):
            # a method whose preset fixes k (single: one expert) keeps it; the others take a given k
            given = {key: value for key, value in overrides.items() if not (key == "k" and METHODS[method][2])}
            points.append(await point(None, None, method=method, **given))  # (named as its eval names it: ", k=2")
        recruit = dict(overrides.pop("recruit", None) or {})
        for cost_lambda in lambdas:
            options = {"recruit": {**recruit, "cost_lambda": cost_lambda}, **overrides}
            given = {key: value for key, value in options.items() if value is not None}
            settings = orchestra.run_settings({**given, "mode": "calibrated"})
            name = f"calibrated λ={cost_lambda:g}{k_variant(settings)}{cost_cap(settings)}"
            points.append(await point(name, cost_lambda, method="calibrated", **options))
    except asyncio.CancelledError:
        if on_cancel is not None:
            mark_frontier(points)
            if cut:  # (its calls were billed: 32 of a sweep's 200 requests were in no point)
                report, method, at = cut[0]
                points.append(replace(SweepPoint.of(report, method, at), interrupted=True))
            on_cancel(points)
        raise
    mark_frontier(points)
    return points


def calls_shown(point: SweepPoint) -> str:
    """A point's calls, with how many failed (``12 (3 failed)``)."""
    return f"{point.calls} ({point.failed_calls} failed)" if point.failed_calls else str(point.calls)


def failed_calls_warning(points: Sequence[SweepPoint]) -> str | None:
    """The line saying which points lost calls after their retries, and to which models; None if none."""
    hit = [point for point in points if point.failed_calls]
    if not hit:
        return None
    by_model: dict[str, int] = {}
    for point in hit:
        for model, failed in point.failed_by_model.items():
            by_model[model] = by_model.get(model, 0) + failed["calls"]
    calls = sum(point.failed_calls for point in hit)
    points_text = ", ".join(f"{point.method} {point.failed_calls}" for point in hit)
    models = ", ".join(f"{model} {count}" for model, count in by_model.items())
    return (f"{calls} call{'s' if calls != 1 else ''} failed after their retries in {len(hit)} of {len(points)} "
            f"points ({points_text}; by model: {models}): their accuracy is not the methods' own; fix those "
            "endpoints and sweep again")


def frontier_html(points: Sequence[SweepPoint], title: str) -> str:
    """A self-contained HTML page: accuracy against cost per item (log scale), the frontier drawn
    through its points, and the table."""
    width, height, pad = 760, 420, 60
    costs = [p.cost_per_item_usd for p in points if p.cost_per_item_usd > 0]
    low, high = (min(costs), max(costs)) if costs else (1e-6, 1e-5)
    if high <= low:
        low, high = low / 2, high * 2
    log_low, log_high = math.log10(low) - 0.1, math.log10(high) + 0.1
    acc_low = max(0.0, min(p.accuracy for p in points) - 0.05) if points else 0.0

    def x(cost: float) -> float:
        value = math.log10(cost) if cost > 0 else log_low
        return pad + (value - log_low) / (log_high - log_low) * (width - 2 * pad)

    def y(accuracy: float) -> float:
        return height - pad - (accuracy - acc_low) / (1 - acc_low or 1) * (height - 2 * pad)

    frontier = sorted((p for p in points if p.on_frontier), key=lambda p: p.cost_per_item_usd)
    line = " ".join(f"{x(p.cost_per_item_usd):.1f},{y(p.accuracy):.1f}" for p in frontier)
    marks = []
    for p in points:
        colour = "#c0392b" if p.on_frontier else "#7f8c8d"
        label = html.escape(p.method)
        marks.append(f'<circle cx="{x(p.cost_per_item_usd):.1f}" cy="{y(p.accuracy):.1f}" r="5" fill="{colour}">'
                     f"<title>{label}: accuracy {p.accuracy:.3f}, {usd_exact(p.cost_per_item_usd)} per item"
                     "</title></circle>"
                     f'<text x="{x(p.cost_per_item_usd) + 7:.1f}" y="{y(p.accuracy) - 6:.1f}" font-size="11">'
                     f"{label}</text>")
    ticks = []
    for power in range(math.floor(log_low), math.ceil(log_high) + 1):
        if log_low <= power <= log_high:
            ticks.append(f'<text x="{x(10 ** power):.1f}" y="{height - pad + 18}" font-size="11" '
                         f'text-anchor="middle">${10 ** power:g}</text>')
    for step in range(6):
        accuracy = acc_low + (1 - acc_low) * step / 5
        ticks.append(f'<text x="{pad - 8}" y="{y(accuracy) + 4:.1f}" font-size="11" text-anchor="end">'
                     f"{accuracy:.2f}</text>")
    shared = sum(p.reused_calls for p in points)
    reused = (f" Each point's cost is what its method costs on its own: no request was asked twice in the sweep "
              f"({shared} calls taken from the point that made them, not sent again, their cost counted in each "
              f"point's); the sweep spent {usd_exact(sum(p.spent_usd for p in points))}.") if shared else ""
    rows = []
    for p in points:
        per_correct = "-" if p.cost_per_correct_usd is None else usd_exact(p.cost_per_correct_usd)
        row = ' class="frontier"' if p.on_frontier else ""
        rows.append(f"<tr{row}><td>{html.escape(p.method)}</td><td>{p.accuracy:.3f}</td><td>{usd_exact(p.cost_usd)}</td>"
                    f"<td>{usd_exact(p.cost_per_item_usd)}</td><td>{per_correct}</td><td>{calls_shown(p)}</td>"
                    f"<td>{p.saved_calls}</td><td>{'yes' if p.on_frontier else ''}</td></tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}} td:first-child{{text-align:left}}
tr.frontier{{font-weight:bold}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Accuracy against cost per item (log scale). Red points are on the frontier: no other point is
both more accurate and cheaper.{reused}</p>
<svg width="{width}" height="{height}" role="img" aria-label="accuracy against cost">
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>
<text x="{width / 2}" y="{height - 15}" text-anchor="middle" font-size="12">cost per item (USD)</text>
<text x="15" y="{height / 2}" font-size="12" transform="rotate(-90 15 {height / 2})"
 text-anchor="middle">accuracy</text>
{''.join(ticks)}
<polyline points="{line}" fill="none" stroke="#c0392b" stroke-width="2"/>
{''.join(marks)}
</svg>
<table><tr><th>method</th><th>accuracy</th><th>cost</th><th>per item</th><th>per correct</th><th>calls</th>
<th>saved calls</th><th>frontier</th></tr>{''.join(rows)}</table>
</body></html>
"""
