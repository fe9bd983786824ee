"""memory_budget_gb alone bounds the in-process engines kept loaded; with max_resident_models, both do.

Before, the budget did nothing unless max_resident_models was raised too (its default 1 bound first):
four 2 GiB engines under an 8.5 GiB budget were loaded one at a time, and a budget smaller than every
engine loaded each of them without a word.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

from helpers import kind_of

from orchestra import Agent, Orchestra, Pool
from orchestra.events import Event, ModelLoaded, ModelUnloaded
from orchestra.execute import Executor, RunLedger
from orchestra.models import ChatRequest, FunctionModel
from orchestra.settings import RunSpec, Settings
from orchestra.store import RunStore

GIB = 2**30


def engine_pool(n: int = 4, *, size: int = 2 * GIB) -> tuple[Pool, list[FunctionModel]]:
    """``n`` in-process engines of ``size`` bytes each, and a light keyword model."""
    engines = [FunctionModel(lambda r, i=i: f"e{i}: The answer is 1", name=f"e{i}", heavy=True, memory_bytes=size)
               for i in range(n)]
    keywords = FunctionModel(lambda r: {"keywords": ["math"]} if kind_of(r) == "keywords" else "x", name="kw")
    return Pool(agents=[Agent(name=f"a{i}", model=e) for i, e in enumerate(engines)], planner=keywords), engines


def most_resident(events: list[Event]) -> int:
    """The most engines loaded at once, from the load and unload events in order."""
    loaded = most = 0
    for event in events:
        loaded += isinstance(event, ModelLoaded) - isinstance(event, ModelUnloaded)
        most = max(most, loaded)
    return most


def run_items(size: int = 2 * GIB, **settings: Any) -> tuple[Orchestra, list[Event], list[FunctionModel]]:
    """Three items, each calling all four engines, on an Orchestra with ``settings``."""
    pool, engines = engine_pool(size=size)
    events: list[Event] = []
    orc = Orchestra(pool, k=4, mode="topk", aggregate="vote", store=False, on_event=events.append, **settings)
    results = orc.run_many([f"Q{i}: what is {i}+1?" for i in range(3)], plan=False)
    assert [r.status for r in results] == ["done"] * 3
    return orc, events, engines


def test_a_memory_budget_alone_keeps_as_many_engines_loaded_as_fit_it() -> None:
    orc, events, engines = run_items(memory_budget_gb=8.5)  # four of 2 GiB fit
    assert orc.executor.max_resident_models is None  # the budget alone bounds them
    assert not orc.executor.stats.unloads  # was: 3 unloads, one engine at a time
    assert dict(orc.executor.stats.loads) == {e.name: 1 for e in engines}
    assert all(e.loaded for e in engines) and most_resident(events) == 4
    orc.close()


def test_a_memory_budget_alone_unloads_what_does_not_fit() -> None:
    orc, events, engines = run_items(memory_budget_gb=4.5)  # two of 2 GiB fit, not three
    assert most_resident(events) == 2  # was: 1
    assert len(orc.executor.resident) == 2 and sum(e.loaded for e in engines) == 2
    orc.close()


def test_with_both_limits_both_bound_and_with_neither_one_engine_stays_loaded() -> None:
    orc, events, _ = run_items(memory_budget_gb=8.5, max_resident_models=2)
    assert most_resident(events) == 2  # the count bounds, though the budget holds four
    orc.close()
    orc, events, _ = run_items(memory_budget_gb=4.5, max_resident_models=4)
    assert most_resident(events) == 2  # the budget bounds, though the count allows four
    orc.close()
    orc, events, _ = run_items()
    assert orc.executor.max_resident_models == 1 and most_resident(events) == 1
    assert sum(orc.executor.stats.unloads.values()) >= 3
    orc.close()


def test_an_engine_larger_than_the_whole_budget_loads_alone_with_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orc, events, engines = run_items(memory_budget_gb=1)  # every engine takes 2 GiB
    told = [str(w.message) for w in caught if "memory budget" in str(w.message)]
    assert sorted(told) == [f"model e{i} takes 2 GiB, more than the whole memory budget (1 GiB, memory_budget_gb): "
                            "it is loaded alone" for i in range(4)]  # once per engine, though several waves load it
    assert most_resident(events) == 1 and sum(e.loaded for e in engines) == 1
    orc.close()


def test_an_engine_of_no_size_under_a_budget_alone_loads_alone_with_a_warning() -> None:
    # (a vLLM engine without memory_gb has memory_bytes 0: counted as nothing, every one stayed loaded)
    sized = FunctionModel(lambda r: "x", name="sized", heavy=True, memory_bytes=GIB)
    unsized = [FunctionModel(lambda r: "x", name=f"unsized{i}", heavy=True) for i in range(2)]
    executor = Executor(memory_budget_bytes=8 * GIB)
    seen: list[Event] = []
    executor.events.subscribe(seen.append)

    async def scenario() -> None:
        ledger = RunLedger.create("r")
        calls = [(m, ChatRequest.user(m.name)) for m in (sized, *unsized)]
        await executor.run_task(executor.call(ledger, calls, purpose="expert"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scenario())
    told = sorted(str(w.message) for w in caught if "memory" in str(w.message))
    assert told == [f"model unsized{i} has no memory size (memory_bytes 0; a pool's models take memory_gb), so the "
                    "memory budget (8 GiB) cannot count it: it is loaded alone; give its size, or max_resident_models"
                    for i in range(2)]  # the sized one fits the budget: not told of
    assert most_resident(seen) == 1 and len(executor.resident) == 1
    # with a count given, it bounds what the budget cannot measure (as before)
    both = Executor(max_resident_models=2, memory_budget_bytes=8 * GIB)
    assert both._room_for(unsized[0]) and both._size(unsized[0]) == 0


def test_an_executor_given_a_budget_alone_is_bounded_by_it() -> None:
    assert Executor().max_resident_models == 1
    assert Executor(memory_budget_bytes=8).max_resident_models is None
    assert Executor(max_resident_models=3, memory_budget_bytes=8).max_resident_models == 3


def test_max_resident_models_not_set_is_none_and_layers_like_any_setting() -> None:
    assert Settings().max_resident_models is None
    pool, _ = engine_pool()
    pool_set = Pool(agents=pool.agents, planner=pool.planner, settings=Settings(max_resident_models=1))
    # the pool's explicit 1 stays under a budget given later: both bound
    orc = Orchestra(pool_set, store=False, memory_budget_gb=8.5)
    assert orc.settings.max_resident_models == 1 and orc.executor.max_resident_models == 1
    orc.close()
    # a layer that does not name it leaves it; None clears the pool's
    assert Settings(max_resident_models=1).layered({"k": 2}).max_resident_models == 1
    orc = Orchestra(pool_set, store=False, memory_budget_gb=8.5, max_resident_models=None)
    assert orc.executor.max_resident_models is None
    orc.close()
    assert Settings().assigned(["max_resident_models=3"]).max_resident_models == 3


def test_a_recorded_run_reads_back_its_resident_limit_as_it_was(tmp_path: Path) -> None:
    pool, _ = engine_pool()
    store = RunStore(tmp_path / "runs.db")
    for given, expected in (({"max_resident_models": 1}, 1), ({}, None)):
        orc = Orchestra(pool, store=store, k=2, mode="topk", aggregate="vote", plan=False, memory_budget_gb=8.5,
                        **given)
        result = orc.run("What is 1+1?")
        orc.close()
        spec = RunSpec.from_record(store.run(result.run_id).config, "What is 1+1?")
        assert spec.settings.max_resident_models == expected
        again = Orchestra(pool, spec.settings, store=False)  # as a resume makes it (Orchestra.from_run)
        assert again.executor.max_resident_models == expected
        again.close()
