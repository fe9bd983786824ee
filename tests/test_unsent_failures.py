"""Calls that fail before any request reaches their model (an engine that cannot load, a Ray cluster
that cannot be joined): counted, recorded and reported alike everywhere."""

from __future__ import annotations

from pathlib import Path

from helpers import KEYWORDS_MARK
from test_cli import cli

from orchestra import Agent, Orchestra, Pool
from orchestra.errors import ClusterUnreachable
from orchestra.models import ChatRequest, FunctionModel
from orchestra.store import RunStore
from orchestra.testing.engines import SimulatedEngine


class _Unloadable(SimulatedEngine):
    """An engine whose load fails with ``error`` (weights missing, a cluster that cannot be joined)."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(name, load_s=0, per_request=0, per_batch=0)
        self.error = error

    async def load(self) -> float:
        raise self.error


def _pool(engine: SimulatedEngine) -> tuple[Pool, FunctionModel]:
    def answer(request: ChatRequest) -> object:
        return {"keywords": ["math"]} if KEYWORDS_MARK in request.prompt_text() else "The answer is 5"

    light = FunctionModel(answer, name="light")
    return Pool(agents=[Agent(name="engine", model=engine), Agent(name="remote", model=light)], planner=light), light


def test_an_engine_that_cannot_load_is_a_failed_call_of_the_run_and_of_its_record(tmp_path: Path) -> None:
    """Its calls counted among the run's failed calls but not its calls (`5 calls (2 failed)` for five
    keyword samples that answered and two expert calls that failed), and its record had neither."""
    path = tmp_path / "runs.db"
    pool, light = _pool(_Unloadable("bad", RuntimeError("weights missing")))
    orc = Orchestra(pool, k=2, mode="global", aggregate="vote", store=path)
    result = orc.run("What is 2 + 3?", plan=False)
    orc.close()
    assert result.status == "done" and result.answer == "The answer is 5"  # (on the other expert)
    sent = len(light.requests)  # every request that reached a model: the light one's (the engine's never loaded)
    usage = result.usage
    assert usage.failed_calls == 1 and usage.failed_by_model["bad"].calls == 1
    assert usage.calls == sent + 1 and usage.requests == sent  # the failed call is a call, with no request
    store = RunStore(path)
    totals = store.run_totals(result.run_id)
    failed = [row for row in store.calls(result.run_id) if row["status"] == "error"]
    store.close()
    assert (totals["calls"], totals["requests"], totals["failed_calls"]) == (usage.calls, sent, 1)
    assert [(row["model"], row["requests"]) for row in failed] == [("bad", 0)]
    assert "weights missing" in failed[0]["error"]
    listed = cli("runs", "--store", str(path))
    assert f"{usage.calls} (1 failed)" in listed.stdout, listed.stdout


def test_a_ray_cluster_that_cannot_be_joined_ends_the_run_though_other_experts_answer(tmp_path: Path) -> None:
    """As an endpoint that cannot be reached does: the run went on with its other experts, done, exit 0,
    and the address said only in `failed_by_model`."""
    refused = ClusterUnreachable("cannot join the Ray cluster at 127.0.0.1:9: nothing accepts connections there")
    pool, _ = _pool(_Unloadable("bad", refused))
    orc = Orchestra(pool, k=2, mode="global", aggregate="vote", store=False)
    result = orc.run("What is 2 + 3?", plan=False)
    orc.close()
    assert result.status == "failed" and "cannot join the Ray cluster at 127.0.0.1:9" in (result.error or "")


def test_a_call_that_fails_before_its_budget_admits_it_is_counted_as_its_record_counts_it(tmp_path: Path) -> None:
    """A cached answer that cannot be read fails its call before the budget admits it: the record counted
    it as a call, the run's result did not (`calls 0 (1 failed)` against `runs`' `1 (1 failed)`)."""
    import sqlite3

    path = tmp_path / "runs.db"

    def answer(request: ChatRequest) -> object:
        return {"keywords": ["math"]} if KEYWORDS_MARK in request.prompt_text() else "The answer is 5"

    def orchestra() -> Orchestra:
        first, second = FunctionModel(answer, name="a"), FunctionModel(answer, name="b")
        pool = Pool(agents=[Agent(name="ea", model=first), Agent(name="eb", model=second)], planner=first)
        return Orchestra(pool, k=2, mode="global", aggregate="vote", store=path, cache=True)

    orc = orchestra()
    orc.run("What is 2 + 3?", plan=False)
    orc.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE cache SET response='{\"text\": 5' WHERE model='a'")  # (cut short: not JSON)
    orc = orchestra()
    result = orc.run("What is 2 + 3?", plan=False)
    orc.close()
    store = RunStore(path)
    totals = store.run_totals(result.run_id)
    store.close()
    assert result.usage.failed_calls == 1
    assert (result.usage.calls, result.usage.requests) == (totals["calls"], totals["requests"]) == (1, 0)
