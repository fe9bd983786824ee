"""Mutation round on the sweep's shared answers (``orchestra.sharing``), the sweep's reports of
them, and ``-i`` number parsing: each test kills a one-line mutant the other tests let through."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import KEYWORDS_MARK

from orchestra import Agent, Orchestra, Pool
from orchestra.cli import print_sweep
from orchestra.datasets import Dataset
from orchestra.evaluate import aevaluate
from orchestra.events import CallsResolved, UsageUpdated
from orchestra.frontier import SweepPoint, frontier_html
from orchestra.models import ChatRequest, FunctionModel
from orchestra.money import dollars, usd_exact
from orchestra.sharing import SharedAnswers, sharing
from orchestra.store import RunStore
from orchestra.workflow import _typed

ITEMS = Dataset.from_items([{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": "2"} for i in range(3)])


def priced_pool() -> Pool:
    def keywords(request: ChatRequest) -> Any:
        if KEYWORDS_MARK in request.prompt_text():
            return {"keywords": ["algebra"]}
        return "The answer is 2"

    planner = FunctionModel(keywords, name="kw", prices=(40.0, 80.0))
    def expert(i: int) -> FunctionModel:
        return FunctionModel(lambda request: f"expert {i}: The answer is 2", name=f"m{i}", prices=(0.1 * (i + 1), 0.2))

    experts = [expert(i) for i in range(3)]
    return Pool(agents=[Agent(name=f"a{i}", model=m) for i, m in enumerate(experts)], planner=planner)


def test_shared_samples_are_kept_by_their_own_key_without_a_store_or_cache() -> None:
    """Without a store or cache the executor computed no key: every sample was kept under "", so a later
    point took the first item's first sample for every sample of every item."""
    shared = SharedAnswers()
    token = sharing.set(shared.view())
    try:
        asyncio.run(aevaluate(Orchestra(priced_pool(), store=False, k=3), ITEMS, method="symbolic-moe"))
    finally:
        sharing.reset(token)
    assert len(shared._answers) == 3 * (5 + 3 + 1) and all(key for key, _ in shared._answers)


def test_a_reused_sample_is_recorded_and_announced_as_shared_and_the_points_usage_leaves_it_out(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(priced_pool(), store=store, k=3)
    sources: Counter[str] = Counter()
    last: dict[str, UsageUpdated] = {}

    def listen(event: Any) -> None:
        if isinstance(event, CallsResolved):
            sources[event.source] += event.count
        elif isinstance(event, UsageUpdated):
            last[event.run_id] = event

    orc.events.subscribe(listen)
    shared, reports = SharedAnswers(), {}
    for k in (3, 2):  # (at k=2 its samples and first two experts were asked at k=3: its synthesis was not)
        token = sharing.set(shared.view())
        try:
            reports[k] = asyncio.run(aevaluate(orc, ITEMS, method="symbolic-moe", k=k))
        finally:
            sharing.reset(token)
    assert (reports[2].reused_calls, reports[2].calls) == (3 * (5 + 2), 3)
    assert sources["shared"] == 21 and sources["cache"] == 0
    with sqlite3.connect(tmp_path / "runs.db") as db:
        assert db.execute("SELECT count(*) FROM calls WHERE source = 'shared'").fetchone()[0] == 21
    for record in store.runs():
        result = store.result(record.id)
        assert result is not None and last[record.id].calls == result.usage.calls
        totals, usage = store.run_totals(record.id), result.usage  # (what was sent: the store and the run agree)
        assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (
            totals["requests"], totals["prompt_tokens"], totals["completion_tokens"])
        assert last[record.id].requests == usage.requests
    vote = SweepPoint.of(reports[2], "k=2", None)
    assert vote.reused_calls == 21 and vote.cost_usd == dollars(reports[2].cost_usd + reports[2].reused_usd)
    assert vote.cost_per_item_usd == dollars(vote.cost_usd / 3)
    assert vote.cost_per_correct_usd == dollars(vote.cost_usd / 3)


def point(method: str, cost: float, reused: int, reused_usd: float) -> SweepPoint:
    return SweepPoint(method=method, cost_lambda=None, accuracy=1.0, cost_usd=cost, cost_per_item_usd=cost,
                      cost_per_correct_usd=cost, calls=4, saved_calls=0, items=1, failed=0, requests=4,
                      reused_calls=reused, reused_usd=reused_usd, spent_usd=dollars(cost - reused_usd))


POINTS = [point("symbolic-moe", 0.5, 0, 0.0), point("vote", 0.75, 5, 0.25)]  # the sweep spent $1


def test_the_sweeps_page_and_table_say_what_the_sweep_spent_apart_from_the_points_costs(capsys: Any,
                                                                                      tmp_path: Path) -> None:
    page = frontier_html(POINTS, "t")
    assert "(5 calls taken from the point that made them" in page and f"the sweep spent {usd_exact(1.0)}." in page
    assert "no request was asked twice" not in frontier_html(POINTS[:1], "t")
    print_sweep(POINTS, ITEMS, 1, None, True)
    shown = json.loads(capsys.readouterr().out)
    assert (shown["spent_usd"], shown["reused_calls"]) == (1.0, 5)
    print_sweep(POINTS, ITEMS, 1, None, False)
    text = " ".join(capsys.readouterr().out.split())
    assert "5 of the points' calls were taken from the point that made them" in text
    assert f"the sweep spent {usd_exact(1.0)}" in text
    print_sweep(POINTS[:1], ITEMS, 1, None, False)
    assert "no request is asked twice" not in capsys.readouterr().out


def test_number_inputs_take_signs_spaces_and_a_trailing_point() -> None:
    assert _typed("+5", "integer") == 5 and _typed(" 7 ", "integer") == 7
    assert _typed("1.", "number") == 1.0 and _typed(" 2.5 ", "number") == 2.5
    assert _typed("NaN", "number") != _typed("NaN", "number")  # (a float nan: refused later as not finite)
    assert _typed("1_000", "integer") is None and _typed("１２", "integer") is None


def test_a_resumed_runs_earlier_keyword_failures_not_asked_again_count_among_its_keyword_failures() -> None:
    from orchestra.execute import KEYWORDS, RunLedger

    ledger = RunLedger.create("r", earlier_failures=(("k1", 0, "kw", "boom", KEYWORDS), ("k3", 0, "kw", "boom", KEYWORDS),
                                                     ("k2", 0, "m0", "bad", "expert")))
    ledger.count_failed("kw", RuntimeError("again"), KEYWORDS)  # (one of this invocation's)
    total, by_model, keywords = ledger.run_failures()
    assert (total, keywords) == (4, 3) and by_model == {"kw": (3, "boom"), "m0": (1, "bad")}
    assert ledger.run_failures(done=True)[::2] == (1, 1)


def test_a_runs_spent_text_names_the_cache_answers_only_where_there_were_some(tmp_path: Path) -> None:
    from orchestra.view import spent_text

    model = FunctionModel(lambda request: "The answer is 4", name="m", prices=(1.0, 2.0))
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)]), k=1, plan=False, mode="global", aggregate="none",
                    store=tmp_path / "runs.db", cache=True)
    first, again = orc.run("What is 2 + 2?"), orc.run("What is 2 + 2?")
    assert again.usage.cache_hits == 1 and first.usage.cache_hits == 0
    assert " · 1 answered from the cache · 0 requests" in spent_text(again)
    assert "cache" not in spent_text(first)
