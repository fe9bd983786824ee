"""Behaviour of the run store and the executor that a mutation run found unpinned: the journal's
upserts and totals, how runs are listed when they end badly, and the executor's accounting.

Each test names the behaviour it pins; all use a real SQLite store and scripted models only.
"""

from __future__ import annotations

import asyncio
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import Slots, scripted_pool
from pydantic import BaseModel

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.errors import (
    BadResponse,
    BudgetExceeded,
    CallCancelled,
    ConfigError,
    EngineLost,
    RunNotFound,
    StoreError,
)
from orchestra.events import (
    BatchFinished,
    BatchStarted,
    CallDone,
    CallRetried,
    CallsQueued,
    CallsResolved,
    Event,
    ModelLoaded,
    NodeFailed,
    NodeReady,
    NodeSkipped,
    PlanReady,
    UsageUpdated,
)
from orchestra.execute import BatchRecord, Executor, Outcome, RunLedger
from orchestra.models import ChatRequest, ChatResult, FunctionModel, Usage
from orchestra.store import ABANDONED, SCHEMA_VERSION, RunStore


def answer(text: str, *, prompt: int = 10, completion: int = 5, requests: int = 1, cost: float = 0.0) -> ChatResult:
    return ChatResult(text=text, model="m", usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                                         cost_usd=cost, requests=requests))


def billed_error(message: str, *, prompt: int, completion: int, requests: int) -> BadResponse:
    error = BadResponse(message)
    error.usage = Usage(prompt_tokens=prompt, completion_tokens=completion, requests=requests)  # type: ignore[attr-defined]
    return error


def journal(store: RunStore, run_id: str, outcome: ChatResult | Exception, *, key: str = "k1", seq: int = 0,
            source: str = "model", request: ChatRequest | None = None) -> None:
    store.record(run_id, key, seq, "m", request or ChatRequest.user("question"), outcome, purpose="expert",
                 node="a", source=source)


# --- the journal: upserts, replay and totals ---------------------------------------------------------


def test_a_late_error_for_a_call_never_replaces_its_recorded_answer(tmp_path: Path) -> None:
    """Once a call is recorded ``ok``, a later error for the same (run, key, seq) (a copy of it cut
    off in flight) leaves the answer in place, so a resume still replays it instead of re-sending."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    journal(store, "r1", answer("kept"))
    journal(store, "r1", billed_error("cut off", prompt=3, completion=0, requests=1))
    [row] = store.calls("r1")
    assert (row["status"], row["response"]["text"], row["error"]) == ("ok", "kept", None)
    resumed = RunStore(tmp_path / "runs.db")  # another process: the run is not fresh there
    replayed = resumed.replay("r1", "k1", 0, ChatRequest.user("question"))
    assert replayed is not None and replayed.text == "kept"


def test_an_answer_after_failed_attempts_adds_up_every_attempts_tokens_and_requests(tmp_path: Path) -> None:
    """A success that replaces an error for the same call adds the failed attempts' prompt and
    completion tokens and requests to its own (the endpoint received them all); replay and
    ``run_totals`` report the sum."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    journal(store, "r1", billed_error("first try failed", prompt=7, completion=2, requests=2))
    journal(store, "r1", answer("second try", prompt=10, completion=5, requests=1))
    totals = store.run_totals("r1")
    assert (totals["calls"], totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (1, 3, 17, 7)
    result = RunStore(tmp_path / "runs.db").replay("r1", "k1", 0, ChatRequest.user("question"))
    assert result is not None and result.text == "second try"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.requests) == (17, 7, 3)


def test_an_error_that_carries_no_usage_records_no_request(tmp_path: Path) -> None:
    """An error with no ``usage`` (nothing says the endpoint got it) counts as a failed call with
    zero requests and tokens, not as one request."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    journal(store, "r1", BadResponse("never sent"))
    [row] = store.calls("r1")
    assert (row["status"], row["requests"], row["prompt_tokens"]) == ("error", 0, 0)
    assert store.run_totals("r1")["requests"] == 0 and store.run_totals("r1")["calls"] == 1


def test_a_call_answered_from_the_cache_is_journaled_at_no_cost(tmp_path: Path) -> None:
    """A call recorded with source ``cache`` keeps the answer but none of the original call's
    requests, tokens or cost, and a resume replays it."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    journal(store, "r1", answer("from cache", prompt=40, completion=9, requests=2, cost=0.5), source="cache")
    [row] = store.calls("r1")
    assert (row["source"], row["response"]["text"]) == ("cache", "from cache")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (0, 0, 0, 0.0)
    result = RunStore(tmp_path / "runs.db").replay("r1", "k1", 0, ChatRequest.user("question"))
    assert result is not None and result.text == "from cache"
    totals = store.run_totals("r1")
    assert (totals["calls"], totals["requests"], totals["prompt_tokens"]) == (0, 0, 0)


def test_a_resumed_run_counts_what_its_models_answered_before_but_not_its_cache_hits(tmp_path: Path) -> None:
    """``run_totals`` and ``earlier_usage`` of a run begun before: the requests and tokens of every
    call a model was sent (failed ones and the embedding matcher's included); as calls, the model
    calls (failed ones too) but not the embedding rows; calls answered from
    the cache count for nothing."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    journal(store, "r1", answer("paid", prompt=10, completion=5, requests=1), key="a")
    journal(store, "r1", billed_error("failed", prompt=4, completion=1, requests=2), key="b")
    journal(store, "r1", answer("cached", prompt=99, completion=99, requests=1), key="c", source="cache")
    store.record_embeddings("r1", model="embedder", node="a", usage=Usage(prompt_tokens=3, requests=1),
                            keywords=["x"])
    totals = store.run_totals("r1")  # the embedding requests are requests, not calls
    assert (totals["calls"], totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (2, 4, 17, 6)
    assert store.earlier_usage(["r1"]) == {}  # begun here afresh: nothing before
    earlier = RunStore(tmp_path / "runs.db").earlier_usage(["r1"])
    assert earlier == {"r1": (Usage(prompt_tokens=17, completion_tokens=6, cost_usd=0.0, requests=4), 2,
                              frozenset({("b", 0)}), frozenset(),  # (as run_totals counts calls; the failed one named)
                              (("b", 0, "m", "failed", "expert"),))}  # (with its model, error and purpose)


def test_earlier_usage_of_many_runs_misses_none_of_them(tmp_path: Path) -> None:
    """Runs are looked up in chunks (SQLite's parameter limit): every run of a large resumed data
    set is counted, those at the chunks' edges included."""
    store = RunStore(tmp_path / "runs.db")
    ids = [f"r{i:04}" for i in range(1001)]
    store.begin_runs([(run_id, "t", {}) for run_id in ids])
    request = ChatRequest.user("question")
    store.record_all([(run_id, "k", 0, "m", request, answer("a", requests=1), "expert", None, "model")
                      for run_id in ids])
    earlier = RunStore(tmp_path / "runs.db").earlier_usage(ids)
    assert sorted(earlier) == ids
    assert all(usage.requests == 1 and calls == 1 and not failed and not unsent and not failures
               for usage, calls, failed, unsent, failures in earlier.values())


class Reading(BaseModel):
    value: int


def test_a_replayed_structured_answer_is_parsed_again_into_its_model(tmp_path: Path) -> None:
    """A structured call's answer is stored as JSON; replayed, its ``parsed`` value is the request's
    pydantic model again (not the stored dict), and a plain request's parsed value stays None."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    structured = ChatRequest.user("how many?", output=Reading)
    journal(store, "r1", answer('{"value": 3}').model_copy(update={"parsed": Reading(value=3)}), request=structured)
    journal(store, "r1", answer('{"value": 4}'), key="plain")
    again = RunStore(tmp_path / "runs.db")
    replayed = again.replay("r1", "k1", 0, structured)
    assert replayed is not None and replayed.parsed == Reading(value=3) and isinstance(replayed.parsed, Reading)
    plain = again.replay("r1", "plain", 0, ChatRequest.user("question"))
    assert plain is not None and plain.text == '{"value": 4}' and plain.parsed is None


# --- runs: lookup and how they end ---------------------------------------------------------------------


def test_a_run_id_prefix_matching_two_runs_is_refused_as_ambiguous(tmp_path: Path) -> None:
    """``run(prefix)`` resolves a unique prefix and refuses one that two runs share (it never picks one)."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_runs([("abc-1", "t", {}), ("abc-2", "t", {}), ("xyz-1", "t", {})])
    assert store.run("xyz").id == "xyz-1"
    with pytest.raises(StoreError, match="ambiguous"):
        store.run("abc")
    # a prefix is taken as it is: SQL's wildcards match only themselves, case counts, and nothing is no prefix
    for not_a_prefix in ("%", "_yz", "x_z", "XYZ", "", "xyz-1 "):
        with pytest.raises(RunNotFound):
            store.run(not_a_prefix)


def test_the_sync_api_raises_its_own_error_alone(tmp_path: Path) -> None:
    """``run_sync`` ran the coroutine inside its ``except RuntimeError`` (no running loop): every
    error of a sync call came chained to that RuntimeError in its traceback."""
    pool, _ = scripted_pool(2)
    with pytest.raises(RunNotFound) as missing:
        Orchestra(pool, store=tmp_path / "runs.db").resume("nope")
    assert missing.value.__context__ is None


def test_a_run_id_continues_its_own_task_and_one_run_at_a_time(tmp_path: Path) -> None:
    """``run_id`` of another task, or of a run still going here, merged two runs into one record
    (one task, the other's calls and answer); both are refused before anything is sent or stored."""
    pool, models = scripted_pool(2)
    orc = Orchestra(pool, k=1, store=tmp_path / "runs.db")
    first = orc.run("What is 1 + 1?", plan=False)

    def sent() -> int:
        return sum(len(model.requests) for model in models.values())

    before = sent()
    with pytest.raises(ConfigError, match=rf"run {first.run_id} answers another task \('What is 1 \+ 1\?'\); leave "
                                          "out run_id for a new run"):
        orc.run("Name the largest planet.", plan=False, run_id=first.run_id)
    record = RunStore(tmp_path / "runs.db").run(first.run_id)
    assert sent() == before and record.task == "What is 1 + 1?" and record.resumes == 0
    assert orc.run("What is 1 + 1?", plan=False, run_id=first.run_id).status == "done"  # its own task goes on

    async def twice() -> list[Any]:
        return await asyncio.gather(*(orc.arun("What is 2 + 2?", run_id="twin", plan=False) for _ in range(2)),
                                    return_exceptions=True)

    done, refused = asyncio.run(twice())
    assert done.status == "done" and isinstance(refused, ConfigError)
    assert str(refused) == "run twin is already running here; wait for it to end, or leave out run_id for a new run"
    assert orc.run("What is 2 + 2?", run_id="twin", plan=False).status == "done"  # once it has ended

    async def resumed_while_running() -> tuple[Any, Any]:
        gate = asyncio.Event()

        async def held(request: Any) -> str:
            await gate.wait()
            return "The answer is 4"

        slow = Orchestra(Pool(agents=[Agent(name="a", model=FunctionModel(held, name="slow"))]), k=1,
                         store=tmp_path / "slow.db")
        running = asyncio.ensure_future(slow.arun("What is 2 + 2?", run_id="held", plan=False))
        while slow.ended("held") is None and not slow._going:
            await asyncio.sleep(0)
        refused = await asyncio.gather(slow.aresume("held"), return_exceptions=True)
        gate.set()
        return await running, refused[0]

    done, refused = asyncio.run(resumed_while_running())  # (it said "leave out run_id", which resume does not take)
    assert done.status == "done" and str(refused) == "run held is already running here; wait for it to end"
    # an id no one could type into `orchestra resume`, or read whole in `orchestra runs`: refused, nothing sent
    before = sent()
    for hostile in ("a\nb", "\x1b[31mred", "../../etc", "x" * 129, "", 5, b"abc"):  # (5: a TypeError from the store)
        with pytest.raises(ConfigError, match="is not a run id: use 1 to 128 letters, digits and"):
            orc.run("What is 3 + 3?", plan=False, run_id=hostile)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="run_id must be a run's id \\(text\\), not int"):
        orc.resume(5)  # type: ignore[arg-type]
    assert sent() == before and orc.run("What is 3 + 3?", plan=False, run_id="Q1.b_2:c-3").status == "done"


def test_a_done_run_whose_result_cannot_be_written_is_marked_failed_not_done(tmp_path: Path) -> None:
    """``finish_run`` on a full disk: the run is still marked ended with its status alone, and a
    ``done`` run whose answer was lost is marked ``failed`` (on disk too), so it can be resumed."""
    pool, _ = scripted_pool(2)
    store = RunStore(tmp_path / "runs.db")
    done = Orchestra(pool, k=1, store=store).run("What is 1 + 1?", plan=False)
    assert done.status == "done"
    ended = done.model_copy(update={"run_id": "r-full", "answer": "x" * 200_000})  # needs new pages
    store.begin_run("r-full", "t", {})
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StoreError, match="full"):
        store.finish_run(ended)
    assert store.run("r-full").status == "failed"
    with sqlite3.connect(tmp_path / "runs.db") as reader:
        assert reader.execute("SELECT status, owner FROM runs WHERE id='r-full'").fetchone() == ("failed", None)


def test_an_abandoned_run_with_a_damaged_configuration_still_says_it_is_damaged(tmp_path: Path) -> None:
    """A running run nobody holds is listed as failed; when its configuration is damaged the
    record's error names that damage rather than being replaced by the generic abandoned note."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    store._execute("UPDATE runs SET config='{not json', owner=NULL, updated=0 WHERE id='r1'")
    record = store.run("r1")
    assert record.status == "failed" and record.config == {}
    assert "damaged" in (record.error or "") and record.error != ABANDONED


def test_the_process_that_holds_a_run_can_take_it_up_again(tmp_path: Path) -> None:
    """``begin_run`` on a run this store object itself still holds as running (its end was never
    written) takes it up again as a resume; only another live process's hold refuses it."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    store.begin_run("r1", "t", {"again": True})
    record = store.run("r1")
    assert (record.status, record.resumes, record.config) == ("running", 1, {"again": True})


def test_a_heartbeat_renews_the_lease_of_its_own_runs_only(tmp_path: Path) -> None:
    """``heartbeat`` refreshes the runs this store object holds (a lapsed lease is held again) and
    leaves other processes' runs alone (their lapsed leases stay lapsed)."""
    path = tmp_path / "runs.db"
    mine, theirs = RunStore(path), RunStore(path)
    mine.begin_run("mine", "t", {})
    theirs.begin_run("theirs", "t", {})
    mine._execute("UPDATE runs SET updated=0")  # both leases lapsed
    assert [mine.run(r).status for r in ("mine", "theirs")] == ["failed", "failed"]
    mine.heartbeat()
    assert [mine.run(r).status for r in ("mine", "theirs")] == ["running", "failed"]


def test_a_run_whose_end_cannot_be_written_at_all_is_still_listed_as_ended_here(tmp_path: Path) -> None:
    """When not even a run's status can be written (another connection holds the write lock), the
    store that saw it end lists it as ended (a ``done`` run as failed, its answer lost) instead of
    still running, and ``finish_run`` raises."""
    pool, _ = scripted_pool(2)
    store = RunStore(tmp_path / "runs.db")
    done = Orchestra(pool, k=1, store=store).run("What is 1 + 1?", plan=False)
    store.begin_run("r-locked", "t", {})
    store._db.execute("PRAGMA busy_timeout=0")  # (fail at once instead of waiting for the lock)
    locker = sqlite3.connect(tmp_path / "runs.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            store.finish_run(done.model_copy(update={"run_id": "r-locked"}))
        record = store.run("r-locked")  # (reading works while the lock is held)
        assert (record.status, record.error) == ("failed", ABANDONED)
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_a_node_resumed_after_failing_starts_afresh_and_a_replan_updates_its_step(tmp_path: Path) -> None:
    """Node rows are read from the event log: a node that failed and is ready again is listed as
    recruiting without its old error, and a later plan's instruction and dependencies replace the
    earlier plan's for a node it keeps."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    plan = ({"id": "a", "instruction": "do a", "depends_on": []}, {"id": "b", "instruction": "do b", "depends_on": []})
    store.listen(PlanReady(run_id="r1", nodes=plan, attempts=1))
    store.listen(NodeFailed(run_id="r1", node="a", error="budget spent"))
    assert [(n["node_id"], n["status"], n["error"]) for n in store.nodes("r1")] == [
        ("a", "failed", "budget spent"), ("b", "pending", None)]
    store.listen(NodeReady(run_id="r1", node="a"))
    store.listen(PlanReady(run_id="r1", nodes=(plan[0], {"id": "b", "instruction": "do b better",
                                                          "depends_on": ["a"]}), attempts=2))
    rows = store.nodes("r1")
    assert [(n["node_id"], n["status"], n["error"]) for n in rows] == [("a", "recruiting", None), ("b", "pending", None)]
    assert (rows[1]["instruction"], rows[1]["depends_on"]) == ("do b better", ["a"])


def test_runs_are_found_by_their_meta_and_every_run_when_none_is_given(tmp_path: Path) -> None:
    """``runs_with_meta`` filters on the run spec's meta, oldest first; with no meta it lists every
    run; a record's ``item`` is read from the spec's meta, or from a record of version 0.1 (meta
    at the top of its configuration)."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_runs([("r1", "t", {"spec": {"meta": {"kind": "eval", "item": "q1"}}}),
                      ("r2", "t", {"spec": {"meta": {"kind": "chat"}}}),
                      ("r3", "t", {"meta": {"kind": "eval", "item": "q3"}})])
    assert [r.id for r in store.runs_with_meta(kind="eval")] == ["r1"]
    assert [r.id for r in store.runs_with_meta()] == ["r1", "r2", "r3"]
    assert [store.run(r).item for r in ("r1", "r2", "r3")] == ["q1", None, "q3"]


def test_an_event_held_for_the_next_turn_is_seen_by_a_read_in_the_same_turn(tmp_path: Path) -> None:
    """Events are held until the loop's next turn, but a read of the store writes them first: a
    node's row reflects an event listened to just before, without yielding to the loop."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    plan = ({"id": "a", "instruction": "do a", "depends_on": []},)

    async def same_turn() -> list[tuple[str, str]]:
        store.listen(PlanReady(run_id="r1", nodes=plan, attempts=1))
        store.listen(NodeSkipped(run_id="r1", node="a", reason="not needed"))
        return [(n["node_id"], n["status"]) for n in store.nodes("r1")]

    assert asyncio.run(same_turn()) == [("a", "skipped")]


def test_a_store_of_schema_2_is_upgraded_and_takes_new_runs(tmp_path: Path) -> None:
    """A store written by schema 2 (runs had no ``owner``) is upgraded when opened: its calls keep
    what they recorded, and new runs can be begun, held and listed."""
    path = tmp_path / "runs.db"
    old = RunStore(path)
    old.begin_run("old", "t", {})
    journal(old, "old", answer("a", requests=5))
    old.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE runs DROP COLUMN owner")
        db.execute("PRAGMA user_version=2")
    store = RunStore(path)
    assert store.run_totals("old")["requests"] == 5
    store.begin_run("new", "t", {})
    assert [(r.id, r.status) for r in store.runs()] == [("new", "running"), ("old", "failed")]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_that_cannot_be_written_warns_about_its_events_once(tmp_path: Path) -> None:
    """While the store cannot be written (another connection holds the write lock), each failed
    write of held events is dropped with one ``RuntimeWarning`` for the store's life, not one per write."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    store._db.execute("PRAGMA busy_timeout=0")  # (fail at once instead of waiting for the lock)
    locker = sqlite3.connect(tmp_path / "runs.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for node in ("a", "b", "c"):
                store.listen(NodeSkipped(run_id="r1", node=node, reason="x"))  # no loop: written at once
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1 and messages[0].startswith("events could not be written to the run store")


# --- the executor: what a batch reports, the cache and the journal -----------------------------------


def run_calls(executor: Executor, *jobs: tuple[RunLedger, list[tuple[Any, ChatRequest]]]) -> list[list[Outcome]]:
    """Each job's calls from its own managed task, all queued in one tick; their outcomes."""

    async def main() -> list[list[Outcome]]:
        return list(await asyncio.gather(*(executor.run_task(executor.call(ledger, calls, purpose="expert"))
                                           for ledger, calls in jobs)))

    return asyncio.run(main())


def test_a_shared_batch_reports_its_failures_and_each_runs_share_of_it() -> None:
    """Calls of two runs queued in one tick go as one batch: ``BatchStarted`` names both runs,
    ``BatchFinished`` counts the failed call, each run's batch record says how many of the batch's
    calls were its own, and ``CallDone`` carries the error (no response) for the failed call."""
    model = FunctionModel(lambda r: BadResponse("no good") if "bad" in r.prompt_text() else "fine", name="m")
    executor = Executor()
    events: list[Event] = []
    executor.events.subscribe(events.append)
    one, two = RunLedger.create("r1"), RunLedger.create("r2")
    first, second = run_calls(executor, (one, [(model, ChatRequest.user("ok 1")), (model, ChatRequest.user("bad 2"))]),
                              (two, [(model, ChatRequest.user("ok 3"))]))
    assert model.batches == [3]
    assert isinstance(first[1], BadResponse) and [o.text for o in (first[0], second[0])] == ["fine", "fine"]  # type: ignore[union-attr]
    [started] = [e for e in events if isinstance(e, BatchStarted)]
    [finished] = [e for e in events if isinstance(e, BatchFinished)]
    assert started.runs == ("r1", "r2") and (finished.size, finished.failed) == (3, 1)
    assert one.batches == [BatchRecord(model="m", size=3, calls=2, wave=1, purpose="expert")]
    assert two.batches == [BatchRecord(model="m", size=3, calls=1, wave=1, purpose="expert")]
    assert (one.failed_calls, two.failed_calls) == (1, 0)
    done = {e.request.prompt_text(): e for e in events if isinstance(e, CallDone)}
    assert (done["bad 2"].response, done["bad 2"].run_id) == (None, "r1") and "no good" in (done["bad 2"].error or "")
    assert (done["ok 3"].response, done["ok 3"].error, done["ok 3"].run_id) == ("fine", None, "r2")


def test_a_cache_hit_is_journaled_as_from_the_cache_and_a_miss_is_reported(tmp_path: Path) -> None:
    """With the cache on, a miss is counted on the ledger and in ``UsageUpdated``; a later run's
    identical call is answered from the cache, announced as such, and journaled with source
    ``cache`` (so it costs its run nothing and a resume replays it)."""
    store = RunStore(tmp_path / "runs.db")
    model = FunctionModel(lambda r: "the answer", name="m")
    executor = Executor()
    events: list[Event] = []
    executor.events.subscribe(events.append)
    store.begin_runs([("r1", "t", {}), ("r2", "t", {})])
    first = RunLedger.create("r1", journal=store, cache=store.cache())
    run_calls(executor, (first, [(model, ChatRequest.user("question"))]))
    assert first.cache_misses == 1 and first.answered["cache"] == 0
    assert [e.cache_misses for e in events if isinstance(e, UsageUpdated) and e.run_id == "r1"][-1] == 1
    second = RunLedger.create("r2", journal=store, cache=store.cache())
    [[outcome]] = run_calls(executor, (second, [(model, ChatRequest.user("question"))]))
    assert outcome.text == "the answer" and len(model.requests) == 1  # type: ignore[union-attr]
    assert second.answered["cache"] == 1 and second.cache_misses == 0
    assert [(e.source, e.run_id) for e in events if isinstance(e, CallsResolved)] == [("cache", "r2")]
    [row] = store.calls("r2")
    assert (row["source"], row["status"], row["response"]["text"]) == ("cache", "ok", "the answer")
    assert store.run_totals("r2")["calls"] == 0 and store.run_totals("r1")["calls"] == 1
    failing = FunctionModel(lambda r: BadResponse("down"), name="failing")
    third = RunLedger.create("r3", cache=store.cache())
    [[error]] = run_calls(executor, (third, [(failing, ChatRequest.user("question"))]))
    assert isinstance(error, BadResponse)  # an error is never offered to the cache (so it is no cache error)
    assert (third.failed_calls, third.cache_errors) == (1, 0)
    assert store._db.execute("SELECT count(*) FROM cache").fetchone()[0] == 1


def test_a_call_held_for_budget_room_is_one_cache_miss(tmp_path: Path) -> None:
    """A call that waited for room in its budget was looked up in the cache each time room freed and
    counted a miss each time: 3 misses for 2 calls in the run's usage and the live view."""
    model = FunctionModel(lambda r: "the answer", name="m")
    executor = Executor()
    cache = RunStore(tmp_path / "runs.db").cache()
    ledger = RunLedger.create("r1", Budget(max_calls=None, max_tokens=150, max_cost_usd=None), cache=cache)
    first, second = run_calls(executor, (ledger, [(model, ChatRequest.user("question one", max_tokens=100))]),
                              (ledger, [(model, ChatRequest.user("question two", max_tokens=100))]))
    assert [o.text for o in (first[0], second[0])] == ["the answer", "the answer"]  # type: ignore[union-attr]
    assert model.batches == [1, 1]  # the second waited for the first's room
    assert ledger.cache_misses == 2 and ledger.answered["cache"] == 0


def test_a_resumed_run_announces_each_replayed_call(tmp_path: Path) -> None:
    """On resume, a call answered from the journal is not sent again; it is counted as replayed
    and announced with a ``CallsResolved`` event whose source is ``store``."""
    store = RunStore(tmp_path / "runs.db")
    model = FunctionModel(lambda r: "recorded", name="m")
    store.begin_run("r1", "t", {})
    run_calls(Executor(), (RunLedger.create("r1", journal=store), [(model, ChatRequest.user("question"))]))
    again = RunStore(tmp_path / "runs.db")  # another process resumes it
    again.begin_run("r1", "t", {}, force=True)  # (the first one stopped without ending it)
    executor = Executor()
    resolved: list[Event] = []
    executor.events.subscribe(lambda e: resolved.append(e) if isinstance(e, CallsResolved) else None)
    ledger = RunLedger.create("r1", journal=again)
    [[outcome]] = run_calls(executor, (ledger, [(model, ChatRequest.user("question"))]))
    assert outcome.text == "recorded" and len(model.requests) == 1  # type: ignore[union-attr]
    assert ledger.answered["store"] == 1
    assert [(e.source, e.run_id, e.model, e.count) for e in resolved] == [("store", "r1", "m", 1)]


def test_executor_call_from_unmanaged_code_is_refused() -> None:
    """``Executor.call`` from a coroutine the executor does not manage raises at once (its wave
    accounting could never see the caller), naming ``run_task`` as the way to call it."""
    executor = Executor()
    model = FunctionModel(lambda r: "x", name="m")

    async def unmanaged() -> None:
        await executor.call(RunLedger.create("r"), [(model, ChatRequest.user("q"))], purpose="expert")

    with pytest.raises(RuntimeError, match="run_task"):
        asyncio.run(unmanaged())
    assert model.requests == []


def test_a_call_whose_task_is_cancelled_before_dispatch_is_never_sent_or_counted() -> None:
    """A call queued by a task that is cancelled in the same tick (before the executor dispatches)
    is dropped: no request reaches the model and its run counts nothing."""
    executor = Executor()
    model = FunctionModel(lambda r: "x", name="m")
    ledger = RunLedger.create("r")

    async def main() -> None:
        task = executor.spawn(executor.call(ledger, [(model, ChatRequest.user("q"))], purpose="expert"))
        await asyncio.sleep(0)  # the task runs once: its call is queued, the dispatch is due next
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await executor.run_task(asyncio.sleep(0))  # the executor runs on afterwards

    asyncio.run(main())
    assert model.requests == [] and model.batches == []
    assert (ledger.usage.requests, ledger.budget.calls, ledger.failed_calls) == (0, 0, 0)


GUARD_S = 10  # a deadlock guard, not a timing: correct dispatch never waits for it


def test_a_call_the_budget_could_take_only_after_a_queued_heavy_wave_is_refused_not_held() -> None:
    """With ``max_calls=1`` and a heavy call admitted but its wave not started, a remote call from
    another task would fit only once that heavy call ends; since the wave waits for that task,
    the call is refused with ``BudgetExceeded`` at once (not held, which would deadlock), and the
    heavy call still runs."""
    engine = FunctionModel(lambda r: "heavy", name="engine", heavy=True)
    remote = FunctionModel(lambda r: "light", name="remote")
    executor = Executor()
    ledger = RunLedger.create("r", Budget(max_calls=1, max_tokens=None, max_cost_usd=None))

    async def main() -> list[list[Outcome]]:
        return list(await asyncio.gather(
            executor.run_task(executor.call(ledger, [(engine, ChatRequest.user("h"))], purpose="expert")),
            executor.run_task(executor.call(ledger, [(remote, ChatRequest.user("l"))], purpose="expert"))))

    [heavy], [light] = asyncio.run(asyncio.wait_for(main(), GUARD_S))
    assert heavy.text == "heavy" and isinstance(light, BudgetExceeded)  # type: ignore[union-attr]
    assert remote.requests == [] and ledger.budget.calls == 1


class CutAfterFirst(FunctionModel):
    """A model whose batch answers its first request, then ends cancelled (as a batch cut off by the
    loop ending does) with the others unanswered."""

    async def complete_each(self, requests):  # type: ignore[no-untyped-def,override]
        async for outcome in super().complete_each(requests[:1]):
            yield outcome
        raise asyncio.CancelledError


def test_a_batch_cancelled_after_some_answers_fails_only_its_unanswered_calls() -> None:
    """When a batch's task ends cancelled part-way, the calls it answered keep their answers and
    only the unanswered ones fail (with ``CallCancelled``), each counted once as failed."""
    model = CutAfterFirst(lambda r: "fine", name="cut")
    executor = Executor()
    ledger = RunLedger.create("r")
    [[first, second]] = run_calls(executor, (ledger, [(model, ChatRequest.user("a")), (model, ChatRequest.user("b"))]))
    assert first.text == "fine"  # type: ignore[union-attr]
    assert isinstance(second, CallCancelled) and "cancelled before its request was sent" in str(second)
    assert ledger.failed_calls == 1


class LostOnce(FunctionModel):
    """An engine whose process dies in its first batch after one answer (it is then no longer
    loaded, as a Ray actor's engine is); loaded afresh, it answers."""

    died = False

    async def complete_each(self, requests):  # type: ignore[no-untyped-def,override]
        if self.died:
            async for outcome in super().complete_each(requests):
                yield outcome
            return
        async for outcome in super().complete_each(requests[:1]):
            yield outcome
        self.died, self._loaded = True, False
        raise EngineLost(f"the engine of {self.name} died while generating a batch")


def test_an_engine_lost_mid_batch_is_loaded_afresh_and_gets_its_unanswered_calls_once_more() -> None:
    """A heavy engine lost mid-batch is no longer counted as resident: it is loaded again and only
    the calls it had not answered are sent once more (a ``CallRetried`` says so, and the lost
    batch's ``BatchFinished`` counts them as failed there); none of the calls fails."""
    engine = LostOnce(lambda r: f"answer to {r.prompt_text()}", name="engine", heavy=True)
    executor = Executor()
    retried: list[Event] = []
    finished: list[BatchFinished] = []
    executor.events.subscribe(lambda e: retried.append(e) if isinstance(e, CallRetried)
                              else finished.append(e) if isinstance(e, BatchFinished) else None)
    ledger = RunLedger.create("r")
    [outcomes] = run_calls(executor, (ledger, [(engine, ChatRequest.user(q)) for q in ("a", "b", "c")]))
    assert [(e.size, e.failed) for e in finished] == [(3, 2), (2, 0)]  # the lost batch says what it lost
    assert [o.text for o in outcomes] == ["answer to a", "answer to b", "answer to c"]  # type: ignore[union-attr]
    assert engine.batches == [1, 2]  # (one answered before it died, then the other two)
    assert engine.loads == 2 and executor.stats.loads["engine"] == 2
    assert [(e.model, e.attempt) for e in retried] == [("engine", 2)]  # type: ignore[attr-defined]
    assert "loading it afresh for 2 call(s)" in retried[0].reason  # type: ignore[attr-defined]
    assert ledger.failed_calls == 0 and executor.resident == ["engine"]


def test_an_engine_lost_twice_while_loading_fails_its_calls_with_no_request_sent() -> None:
    """An engine whose process dies while loading is loaded once more; dying again, its calls fail
    with an error saying so, counted as failed calls made with no request sent (as a remote call that
    never reached its server is: they were failed calls but not calls, `5 calls (2 failed)` for five
    that answered, and the run's record had neither), and their budget reservations are released."""

    def die() -> None:
        raise EngineLost("the engine of fragile died while loading it")

    engine = FunctionModel(lambda r: "never", name="fragile", heavy=True, on_load=die)
    executor = Executor()
    ledger = RunLedger.create("r", Budget(max_calls=5, max_tokens=None, max_cost_usd=None))
    [outcomes] = run_calls(executor, (ledger, [(engine, ChatRequest.user(q)) for q in ("a", "b")]))
    assert all(isinstance(o, EngineLost) and "again on a fresh start; not retried further" in str(o) for o in outcomes)
    assert engine.requests == [] and executor.resident == []
    assert (ledger.failed_calls, ledger.budget.calls, ledger.usage.requests) == (2, 2, 0)
    assert ledger.budget._reserved_calls == 0


def test_a_heavy_wave_waits_for_a_task_left_waiting_only_on_a_remote_call_sent_before_it() -> None:
    """A task that asked an engine and a remote model together, and whose engine call is answered,
    waits on the remote call alone; a heavy call queued meanwhile by another task does not start a
    wave until that remote call is answered, so the first task's next engine call joins the same
    batch (a task waiting only on remote calls sent before the queued heavy call holds the wave)."""
    executor = Executor()
    answered_a, queued_d = asyncio.Event(), asyncio.Event()
    executor.events.subscribe(lambda e: answered_a.set() if isinstance(e, CallDone) and e.request.prompt_text() == "a"
                              else queued_d.set() if isinstance(e, CallsQueued) and e.run_id == "second" else None)
    engine = FunctionModel(lambda r: f"engine: {r.prompt_text()}", name="engine", heavy=True)
    started: list[asyncio.Future[Any]] = []

    async def second() -> str:
        return await first_text(executor, RunLedger.create("second"), engine, "d")

    async def remote_answer(request: ChatRequest) -> str:
        await answered_a.wait()  # the first task now waits on this call alone
        started.append(asyncio.ensure_future(executor.run_task(second())))
        await queued_d.wait()
        for _ in range(5):  # turns of the loop in which a wave could start, if anything let it
            await asyncio.sleep(0)
        return "remote"

    remote = FunctionModel(remote_answer, name="remote")

    async def first() -> str:
        ledger = RunLedger.create("first")
        await executor.call(ledger, [(engine, ChatRequest.user("a")), (remote, ChatRequest.user("b"))], purpose="expert")
        return await first_text(executor, ledger, engine, "c")

    async def main() -> list[str]:
        text = await asyncio.wait_for(executor.run_task(first()), GUARD_S)
        return [text, await asyncio.wait_for(started[0], GUARD_S)]

    assert asyncio.run(main()) == ["engine: c", "engine: d"]
    assert engine.batches == [1, 2] and engine.loads == 1  # "c" and "d" went in one batch


async def first_text(executor: Executor, ledger: RunLedger, model: Any, text: str) -> str:
    [outcome] = await executor.call(ledger, [(model, ChatRequest.user(text))], purpose="expert")
    assert not isinstance(outcome, Exception), outcome
    return outcome.text


def test_stopping_in_flight_work_spares_a_batch_another_run_still_waits_for() -> None:
    """``stop_in_flight`` after one run is cancelled cuts off only batches no run waits for: a batch
    shared with a run still going is left to finish, and that run gets its answer."""
    gate = asyncio.Event()

    async def slow(request: ChatRequest) -> str:
        await asyncio.wait_for(gate.wait(), GUARD_S)
        return f"answer to {request.prompt_text()}"

    model = FunctionModel(slow, name="m")
    executor = Executor()
    going = RunLedger.create("going")

    async def main() -> list[Outcome]:
        cancelled = asyncio.ensure_future(executor.run_task(first_text(executor, RunLedger.create("gone"), model, "a")))
        kept = asyncio.ensure_future(executor.run_task(
            executor.call(going, [(model, ChatRequest.user("b"))], purpose="expert")))
        while len(model.requests) < 2:  # a yield, not a wait: until both requests of the one batch are out
            await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await executor.stop_in_flight()
        gate.set()
        return await kept

    [outcome] = asyncio.run(main())
    assert model.batches == [2] and outcome.text == "answer to b"  # type: ignore[union-attr]
    assert going.failed_calls == 0


def test_with_a_placement_a_resident_engines_group_holds_its_slot() -> None:
    """With a placement, a wave's group on an engine already resident runs in the slot it holds:
    another engine that does not fit beside it waits for that group to end, then takes the slot
    (the resident one is unloaded), and every call is answered."""
    warm, cold = (FunctionModel(lambda r, n=n: f"{n}: {r.prompt_text()}", name=n, heavy=True) for n in ("warm", "cold"))
    executor = Executor(placement=Slots(1))

    async def main() -> list[Outcome]:
        ledger = RunLedger.create("r")
        await first_text(executor, ledger, warm, "first")  # "warm" is resident, in the only slot
        return await executor.call(ledger, [(warm, ChatRequest.user("x")), (cold, ChatRequest.user("y"))],
                                   purpose="expert")

    outcomes = asyncio.run(executor.run_task(main()))
    assert [getattr(o, "text", o) for o in outcomes] == ["warm: x", "cold: y"]
    assert (warm.loads, warm.unloads, cold.loads) == (1, 1, 1) and executor.resident == ["cold"]


def test_a_managed_task_failing_after_its_run_ended_is_reported_to_the_loop() -> None:
    """Tasks share their run's future: the first error ends the run; a later task's error cannot
    be given to it, so it goes to the loop's exception handler, named as such (not a crash of
    the executor's own callback)."""
    executor = Executor()
    reported: list[dict[str, Any]] = []

    async def fails(message: str) -> None:
        raise ValueError(message)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        owner: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        tasks = [executor.spawn(fails(m), owner=owner) for m in ("first", "second")]
        with pytest.raises(ValueError, match="first"):
            await owner
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # (the done callbacks run a turn after the tasks end)

    asyncio.run(main())
    assert [(c["message"], str(c["exception"])) for c in reported] == [
        ("a managed task failed after its run ended", "second")]


def test_a_heavy_wave_waits_while_a_managed_task_is_still_running() -> None:
    """A heavy wave starts only once every managed task waits on a call: a task still working (it
    has not yet asked the engine) holds the wave, so its call joins the other task's in one batch."""
    engine = FunctionModel(lambda r: f"engine: {r.prompt_text()}", name="engine", heavy=True)
    executor = Executor()
    ledger = RunLedger.create("r")

    async def busy_first() -> str:
        for _ in range(3):  # work between calls: turns of the loop in which it runs, not waiting on a call
            await asyncio.sleep(0)
        return await first_text(executor, ledger, engine, "b")

    async def main() -> list[str]:
        return list(await asyncio.gather(executor.run_task(first_text(executor, ledger, engine, "a")),
                                         executor.run_task(busy_first())))

    assert asyncio.run(main()) == ["engine: a", "engine: b"]
    assert engine.batches == [2] and engine.loads == 1


def test_a_look_ahead_stops_counting_once_the_task_that_announced_it_is_answered() -> None:
    """``then=`` defers the announced engine to the end of its wave only while the announcing task
    waits: once answered, it no longer counts, so a later wave runs that engine in queue order."""
    h0, h1, h2, h3 = (FunctionModel(lambda r, n=n: f"{n}: {r.prompt_text()}", name=n, heavy=True)
                      for n in ("h0", "h1", "h2", "h3"))
    executor = Executor()
    loads: list[str] = []
    executor.events.subscribe(lambda e: loads.append(e.model) if isinstance(e, ModelLoaded) else None)

    async def main() -> None:
        ledger = RunLedger.create("r")
        await executor.call(ledger, [(h1, ChatRequest.user("e1")), (h2, ChatRequest.user("e2"))], purpose="expert",
                            then=[h0])
        await first_text(executor, ledger, h0, "aggregate")
        await first_text(executor, ledger, h3, "evicts h0")
        await executor.call(ledger, [(h0, ChatRequest.user("x")), (h1, ChatRequest.user("y"))], purpose="expert")

    asyncio.run(executor.run_task(main()))
    assert loads == ["h1", "h2", "h0", "h3", "h0", "h1"]  # the last wave in queue order: h0, then h1


def test_the_nodes_a_killed_run_was_working_on_failed_with_it(tmp_path: Path) -> None:
    """A run whose process was killed is listed as failed; the nodes its events left at work are
    failed too, with its error (show listed a failed run's node as running)."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    plan = ({"id": "a", "instruction": "do a", "depends_on": []}, {"id": "b", "instruction": "do b", "depends_on": []},
            {"id": "c", "instruction": "do c", "depends_on": ["a"]})
    for event in (PlanReady(run_id="r1", nodes=plan, attempts=1), NodeReady(run_id="r1", node="a"),
                  NodeReady(run_id="r1", node="b"), NodeSkipped(run_id="r1", node="b", reason="not needed")):
        store.listen(event)
    assert [(n["node_id"], n["status"]) for n in store.nodes("r1")] == [("a", "recruiting"), ("b", "skipped"),
                                                                         ("c", "pending")]  # (running: as it is)
    with sqlite3.connect(tmp_path / "runs.db") as db:  # its process is gone: nobody holds it
        db.execute("UPDATE runs SET owner = NULL")
    assert [(n["node_id"], n["status"], n["error"]) for n in RunStore(tmp_path / "runs.db").nodes("r1")] == [
        ("a", "failed", ABANDONED), ("b", "skipped", "not needed"), ("c", "pending", None)]


def test_a_python_runs_node_settings_are_recorded_and_a_final_it_cannot_record_is_asked_for(tmp_path: Path) -> None:
    """A run given node_settings in Python was resumed as if it had none: every node recruited afresh at the run's
    k, the schema gone, its answered calls sent again; one given `final` answered without it, `done`."""
    from orchestra.models import FunctionModel
    from orchestra.pipeline.scheduler import NodeSettings

    sent: list[tuple[str, bool]] = []

    def expert(request: Any) -> Any:
        sent.append((request.messages[0].content, request.wants_json))
        return {"city": "Oslo"} if request.wants_json else "Oslo."

    model = FunctionModel(expert, name="E")
    keywords = FunctionModel(lambda request: {"keywords": ["geography"]}, name="P")
    pool = Pool(agents=[Agent(name=f"a{i}", model=model, persona=f"You are p{i}.", skills=["geography"])
                        for i in range(3)], planner=keywords)
    plan = {"subtasks": [{"id": "a", "instruction": "Name the largest city of Norway."},
                         {"id": "b", "instruction": "Name its river.", "depends_on": ["a"]}]}
    chosen = {"a": NodeSettings(agent="a0", output={"type": "object"}), "b": NodeSettings(k=1, agent="a2")}
    orc = Orchestra(pool, k=3, store=tmp_path / "runs.db")
    stopped = orc.run("Norway", plan=plan, node_settings=chosen, budget=Budget(max_calls=1))
    assert stopped.status == "budget_exceeded" and sent == [("You are p0.", True)]
    resumed = orc.resume(stopped.run_id, budget={"max_calls": 10})
    assert resumed.status == "done" and [node.experts for node in resumed.plan.nodes] == [["a0"], ["a2"]]
    assert sent == [("You are p0.", True), ("You are p2.", False)]  # a's answer replayed; b on its own agent
    assert not keywords.requests  # (nothing recruited afresh)
    finished = orc.run("Norway", plan=plan, final=lambda outputs: "FINAL", budget=Budget(max_calls=1))
    with pytest.raises(ConfigError, match=rf"run {finished.run_id} was given final in Python, which its record cannot "
                                          rf"hold; finish it with orc.arun\(task, run_id='{finished.run_id}', \.\.\.\)"):
        orc.resume(finished.run_id, budget={"max_calls": 10})


def test_a_matcher_given_as_a_dict_is_read_as_its_spec_and_anything_else_is_refused_at_once() -> None:
    """`Orchestra(matcher={...})` kept the dict as the matcher: each run failed after its keyword calls, with
    "unexpected AttributeError: 'dict' object has no attribute 'match'"."""
    from orchestra.models import FunctionModel

    pool = Pool(agents=[Agent(name="a", model=FunctionModel(lambda request: "x", name="m"))])
    assert Orchestra(pool, store=False, matcher={"type": "lexical", "min_similarity": 0.5}).settings.matcher.min_similarity == 0.5
    with pytest.raises(ConfigError, match="matcher.type: Input should be 'lexical' or 'embedding'"):
        Orchestra(pool, store=False, matcher={"type": "nope"})
    with pytest.raises(ConfigError, match=r"^matcher: .*embedding"):  # (an error of the whole read "matcher.:")
        Orchestra(pool, store=False, matcher={"type": "embedding"})
    with pytest.raises(ConfigError, match="matcher must be a MatcherSpec, its fields as a dict, or an object with a "
                                          "match method, not int"):
        Orchestra(pool, store=False, matcher=5)  # type: ignore[arg-type]
