"""A sweep's points share their answers to the same requests (``orchestra.sharing``): each asked once,
counted apart by the runs that reuse them, by their budgets as if sent, and in each point's cost."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import KEYWORDS_MARK

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.cli import print_report
from orchestra.datasets import Dataset
from orchestra.evaluate import aevaluate
from orchestra.frontier import asweep
from orchestra.models import ChatRequest, FunctionModel
from orchestra.money import usd_exact
from orchestra.store import RunStore

ITEMS = Dataset.from_items([{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": "2"} for i in range(3)])


def priced_pool(asked: Counter[tuple[str, int | None]]) -> Pool:
    """Three experts and a keyword model, all priced; ``asked`` counts each keyword request."""
    def keywords(request: ChatRequest) -> Any:
        if KEYWORDS_MARK in request.prompt_text():
            asked[(request.prompt_text(), request.seed)] += 1
            return {"keywords": ["algebra"]}
        return "The answer is 2"

    planner = FunctionModel(keywords, name="kw", prices=(40.0, 80.0))
    experts = [FunctionModel(lambda request, i=i: f"expert {i}: The answer is 2", name=f"m{i}",
                             prices=(0.1 * (i + 1), 0.2)) for i in range(3)]
    return Pool(agents=[Agent(name=f"a{i}", model=m) for i, m in enumerate(experts)], planner=planner)


def test_a_sweep_asks_each_sample_once_and_its_runs_count_the_ones_they_reused_apart(tmp_path: Path, capsys: Any,
                                                                                     monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    asked: Counter[tuple[str, int | None]] = Counter()
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(priced_pool(asked), store=store, k=3)
    points = {p.method: p for p in asyncio.run(asweep(orc, ITEMS, methods=["symbolic-moe", "vote"], lambdas=()))}
    assert len(asked) == 3 * 5 and set(asked.values()) == {1}
    first, vote = points["symbolic-moe"], points["vote"]
    # (vote recruits as symbolic-moe does: its samples and its experts' calls, 5 + 3 an item, were asked there)
    assert (first.reused_calls, vote.reused_calls, vote.calls) == (0, 24, 0) and vote.reused_usd > 0
    assert vote.cost_usd == round(vote.spent_usd + vote.reused_usd, 12)
    for record in store.runs():
        result = store.result(record.id)
        assert result is not None
        totals = store.run_totals(record.id)  # (what was sent: the store and the run agree)
        assert (result.usage.calls, result.usage.cost_usd) == (totals["calls"], totals["cost_usd"])
        assert result.usage.reused_calls in (0, 8)
    plain = asyncio.run(aevaluate(Orchestra(priced_pool(Counter()), store=False, k=3), ITEMS, method="vote"))
    assert plain.cost_usd == vote.cost_usd and plain.calls == vote.calls + vote.reused_calls
    # its evaluation resumed (as a Ctrl-C'd sweep advises): the runs are counted as recorded, and the report
    # says which samples another point paid for (its cost read 50 times lower than the point's, with no word)
    resumed = asyncio.run(aevaluate(orc, ITEMS, method="vote", resume=True))
    assert resumed.reused == 3 and (resumed.reused_calls, resumed.reused_usd) == (24, vote.reused_usd)
    assert resumed.cost_usd == vote.spent_usd
    assert sum(asked.values()) == 15  # (nothing sent again)
    print_report(resumed, "vote", False)
    shown = " ".join(capsys.readouterr().out.split())
    assert f"calls from another point of a sweep │ 24 calls ({usd_exact(vote.reused_usd)}, paid there)" in shown


def test_a_points_budget_counts_the_samples_it_reused_as_if_it_had_sent_them() -> None:
    """The reused samples were free to a point's budget: under a data-set budget of 7 calls a point whose
    method needs 8 calls an item finished, where its plain evaluation stops."""
    budget = Budget(max_calls=7)
    orc = Orchestra(priced_pool(Counter()), store=False, k=3)
    points = {p.method: p for p in asyncio.run(asweep(orc, Dataset.from_items(ITEMS.items[:1]),
                                                      methods=["symbolic-moe", "vote"], lambdas=(), budget=budget))}
    plain = asyncio.run(aevaluate(Orchestra(priced_pool(Counter()), store=False, k=3),
                                  Dataset.from_items(ITEMS.items[:1]), method="vote", budget=budget))
    vote = points["vote"]
    assert plain.failed == vote.failed == 1 and vote.reused_calls > 5  # (its samples, and its team's calls)
    assert (vote.calls + vote.reused_calls, vote.cost_usd) == (plain.calls, plain.cost_usd)
