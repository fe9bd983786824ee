"""Data sets streamed through a bounded window: ``arun_iter``, ``arun_many`` on it, ``eval --output``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from helpers import kind_of, scripted_pool

from orchestra import Budget, Orchestra, Pool
from orchestra.budget import BudgetTracker
from orchestra.core import Instance
from orchestra.datasets import load_dataset
from orchestra.errors import ConfigError
from orchestra.evaluate import aevaluate
from orchestra.models import ChatRequest
from orchestra.result import RunResult
from orchestra.store import RunStore

GUARD_S = 10  # a deadlock guard, not a timing


def counted(n: int, read: list[int]) -> Iterator[str]:
    """``n`` questions; ``read[0]`` counts how many were taken."""
    for i in range(n):
        read[0] += 1
        yield f"question {i}"


@pytest.mark.parametrize("rare_filter", [True, False])
def test_the_window_bounds_the_runs_held_and_every_result_comes_once(rare_filter: bool) -> None:
    pool, _ = scripted_pool(3)
    orc = Orchestra(pool, k=2, store=False)
    read = [0]
    held: list[int] = []

    async def main() -> list[tuple[int, RunResult]]:
        seen: list[tuple[int, RunResult]] = []
        async for index, result in orc.arun_iter(counted(25, read), window=4, rare_filter=rare_filter):
            held.append(read[0] - len(seen))  # read and not yet handed over, this one included
            seen.append((index, result))
        return seen

    seen = asyncio.run(main())
    assert sorted(index for index, _ in seen) == list(range(25))
    assert all(result.task == f"question {index}" and result.status == "done" for index, result in seen)
    assert max(held) == 4  # the window is used, never exceeded


def test_arun_many_keeps_task_order_through_a_small_window() -> None:
    def expert(name: str, request: ChatRequest) -> str:  # the answer names the question
        return f"{request.prompt_text().split('question ')[1].split()[0]}: The answer is 1"

    pool, _ = scripted_pool(3, expert=expert)
    orc = Orchestra(pool, k=1, mode="topk", aggregate="none", store=False)
    results = orc.run_many([f"question {i}" for i in range(9)], window=2)
    assert [r.task for r in results] == [f"question {i}" for i in range(9)]
    assert [r.answer.split(":")[0] for r in results] == [str(i) for i in range(9)]  # type: ignore[union-attr]


def test_stopping_early_cancels_the_runs_in_flight_and_records_them(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def expert(name: str, request: ChatRequest) -> str:
        if "question 0" not in request.prompt_text():  # every other question waits until the end
            await asyncio.wait_for(release.wait(), GUARD_S)
        return "The answer is 1"

    pool, _ = scripted_pool(3, expert=expert)
    orc = Orchestra(pool, k=2, store=tmp_path / "runs.db")
    read = [0]

    async def main() -> RunResult:
        async with aclosing(orc.arun_iter(counted(10, read), window=3)) as stream:
            async for _, result in stream:
                return result
        raise AssertionError("no result")

    first = asyncio.run(main())
    assert first.task == "question 0" and first.status == "done"
    assert read[0] == 3  # nothing read past the window
    assert orc.store is not None
    statuses = {record.task: record.status for record in orc.store.runs()}
    assert statuses == {"question 0": "done", "question 1": "cancelled", "question 2": "cancelled"}


def test_an_async_input_may_wait_for_results_before_giving_more_tasks() -> None:
    pool, _ = scripted_pool(3)
    orc = Orchestra(pool, k=2, store=False)
    answered: asyncio.Queue[int] = asyncio.Queue()

    async def follow_ups() -> AsyncIterator[str | Instance]:  # each task after the first waits for an answer
        yield "question 0"
        for i in range(1, 4):
            await answered.get()
            yield Instance(f"question {i}", meta={"round": i})

    async def main() -> list[int]:
        order = []
        async for index, _ in orc.arun_iter(follow_ups(), window=8):  # rare filter on: chunks must not wait
            order.append(index)
            answered.put_nowait(index)
        return order

    assert asyncio.run(asyncio.wait_for(main(), GUARD_S)) == [0, 1, 2, 3]


def test_bad_input_is_refused_with_a_clear_error() -> None:
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, k=1, store=False)

    async def consume(tasks: object, **options: object) -> None:
        async for _ in orc.arun_iter(tasks, **options):  # type: ignore[arg-type]
            pass

    with pytest.raises(TypeError, match="not one string"):
        asyncio.run(consume("question"))
    with pytest.raises(TypeError, match="task 1 is a int"):
        asyncio.run(consume(["question", 7]))
    with pytest.raises(ValueError, match=r"^window must be a whole number of at least 1 \(or None for no bound\), not 0$"):
        asyncio.run(consume(["question"], window=0))
    with pytest.raises(ValueError, match=r"not '3'$"):  # (it was "'<' not supported between 'str' and 'int'")
        orc.run_many(["question"], window="3")


def test_eval_streams_answers_to_a_jsonl_file_and_a_failed_item_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} - {i} + 1?", "answer": "1"}) + "\n"
                            for i in range(6)))

    def expert(name: str, request: ChatRequest) -> str:
        if "What is 4 - 4" in request.prompt_text():
            raise RuntimeError("the expert crashed")
        return "The answer is 1"

    pool, models = scripted_pool(2, expert=expert)
    orc = Orchestra(pool, k=2, mode="topk", store=False)
    output = tmp_path / "answers.jsonl"
    report = asyncio.run(aevaluate(orc, load_dataset(data), output=output))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == [f"q{i}" for i in range(6)]
    assert {row["id"]: row["status"] for row in rows}["q4"] == "failed"
    assert sum(row["correct"] for row in rows) == report.correct == 5
    assert report.answers == [] and report.items == 6 and report.failed == 1
    assert report.first_failure is not None and report.first_failure.startswith("item q4 (failed): ")
    assert sum(kind_of(r) == "expert" for m in models.values() for r in m.requests) == 12


@pytest.mark.parametrize("rare_filter", [True, False])
def test_a_shared_budget_smaller_than_the_data_set_finishes_the_runs_it_can_pay_for(rare_filter: bool) -> None:
    from orchestra.budget import Budget, BudgetTracker

    pool, models = scripted_pool(4)
    orc = Orchestra(pool, store=False)  # a run: 5 keyword samples, 3 experts, 1 synthesis

    async def main(**limits: float | None) -> tuple[list[RunResult], BudgetTracker]:
        shared = BudgetTracker(Budget(**{"max_calls": None, "max_tokens": None, "max_cost_usd": None, **limits}), None)
        results = [result async for _, result in orc.arun_iter(
            [f"question {i:02d}" for i in range(30)], shared_budget=shared, rare_filter=rare_filter)]
        return results, shared

    def sent() -> int:
        return sum(len(model.requests) for model in models.values())

    # started all at once, the 30 runs' 150 keyword samples spent the budget and none finished;
    # started while the budget can be expected to finish them, 11 finish (99 calls) and the others
    # are not started (their first call is refused unsent), so no call is spent on a run cut short
    results, shared = asyncio.run(main(max_calls=100))
    statuses = [r.status for r in results]
    assert statuses.count("done") == 11 and statuses.count("budget_exceeded") == 19
    assert sent() == 99  # counted where they arrive
    stopped = next(r for r in results if r.status == "budget_exceeded")
    assert stopped.usage.calls == 0 and str(stopped.error).endswith(
        "has no room for another run (99 calls so far, and a run takes up to 9 calls, so it was not started)")
    assert str(shared.exceeded).startswith("the data set's budget max_calls=100 has no room for another run")
    # tokens too (nothing is known of them before a run ends: the first runs alone), each run's
    # last call needing its worst case (prompt + max_tokens) left
    per_run = results[0].usage.prompt_tokens + results[0].usage.completion_tokens
    before = sent()
    results, shared = asyncio.run(main(max_tokens=12 * per_run))
    finished = [r for r in results if r.status == "done"]
    assert 8 <= len(finished) <= 12 and sent() - before == 9 * len(finished)  # no run cut short
    # a first run the budget cuts short (its synthesis's worst case no longer fits) shows that the
    # next would be cut too: none is started (each sent its keyword samples and stopped there)
    before = sent()
    results, shared = asyncio.run(main(max_tokens=per_run + 600))
    assert [r.usage.calls for r in results] == [5] + [0] * 29 and sent() - before == 5
    assert str(results[1].error).endswith("so far, and a call may need 1,107 tokens at worst, so it was not started)")


def test_runs_start_while_a_shared_budget_can_be_expected_to_finish_them() -> None:
    from orchestra.budget import Budget, BudgetTracker, RunAdmission
    from orchestra.errors import BudgetExceeded
    from orchestra.models import Usage
    from orchestra.models.pricing import FREE

    def spent(tracker: BudgetTracker, calls: int, tokens: int, max_tokens: int = 1) -> None:
        for _ in range(calls):
            tracker.settle(tracker.admit(ChatRequest.user("hi", max_tokens=max_tokens), FREE),
                           Usage(prompt_tokens=tokens // calls, requests=1))

    shared = BudgetTracker(Budget(max_calls=19, max_tokens=None, max_cost_usd=None), None)
    spent(BudgetTracker(Budget(), "earlier", parent=shared), 2, 20)  # before these runs (another evaluation's)
    admission = RunAdmission(shared)
    assert admission.admits(0) and not admission.admits(1)  # nothing known: one at a time
    first = BudgetTracker(Budget(), "r1", parent=shared)
    spent(first, 3, 30)
    admission.ended(first, on_its_own=True)  # a finished run teaches what a run spends: 3 calls
    assert admission.admits(3) and not admission.admits(4)  # 2 + 3 + 9 + 3 <= 19 < 2 + 3 + 12 + 3
    spent(BudgetTracker(Budget(), "r2", parent=shared), 12, 120)  # in flight, spending more than expected
    assert not admission.admits(1)  # it counts as what it spent: 2 + 3 + 12 + 3 > 19 (as expected: 2 + 3 + 3 + 3)
    assert "a run takes up to 3 calls" in str(admission.refusal(1))
    cut = BudgetTracker(Budget(), "r3", parent=shared)
    spent(cut, 1, 10)
    admission.ended(cut, on_its_own=False)  # a run cancelled counts as spent, not as what a run costs
    assert list(admission._largest) == [None]

    # a run a budget cut short: the call it was refused is one a run may make, and needs room
    def cut_run(admission: RunAdmission) -> BudgetTracker:
        run = BudgetTracker(Budget(), "c1", parent=admission.shared)
        spent(run, 2, 40, max_tokens=5)
        with pytest.raises(BudgetExceeded):
            run.admit(ChatRequest.user("hi", max_tokens=28), FREE)  # 40 + 33 + 28 > 100
        return run

    cancelled = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=100, max_cost_usd=None), None))
    cancelled.ended(cut_run(cancelled), on_its_own=False)  # (cancelled after the refusal: it shows nothing)
    assert cancelled.refusal(0) is None
    short = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=100, max_cost_usd=None), None))
    short.ended(cut_run(short), on_its_own=False, cut=True)
    refused = short.refusal(0)  # 40 so far, and 61 for that call: no room
    assert str(refused).endswith("(40 tokens so far, and a call may need 61 tokens at worst, so it was not started)")
    assert short._largest == {}

    # runs of different costs: the costliest is what a run may take (the average, 4, started a run
    # that then cost 5 and was cut off with its calls spent)
    varied = RunAdmission(BudgetTracker(Budget(max_calls=30, max_tokens=None, max_cost_usd=None), None))
    for calls in (3, 5):
        run = BudgetTracker(Budget(), f"v{calls}", parent=varied.shared)
        spent(run, calls, 10 * calls)
        varied.ended(run, on_its_own=True)
    assert varied.admits(3) and not varied.admits(4)  # 8 + 15 + 5 <= 30 < 8 + 20 + 5 (by the average: 8 + 16 + 4)
    assert "a run takes up to 5 calls" in str(varied.refusal(4))

    tokens = BudgetTracker(Budget(max_calls=None, max_tokens=450, max_cost_usd=None), None)
    learning = RunAdmission(tokens)
    resumed = BudgetTracker(Budget(), "r4", parent=tokens)
    resumed.count(Usage(prompt_tokens=60, requests=1))  # paid before this resume: not this budget's, but its cost
    spent(resumed, 1, 40, max_tokens=50)  # the call reserved its worst case: about 51 tokens
    learning.ended(resumed, on_its_own=True)  # a run costs 100 tokens; 40 of them spent here
    # 40 + 200 in flight + 100 + ~51 for the last call's worst case <= 450 < 40 + 300 + 100 + ~51
    assert learning.admits(2) and not learning.admits(3)

    hopeless = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=30, max_cost_usd=None), None))

    def over(admission: RunAdmission, run_id: str) -> None:  # a run stopped by a call over the limit on its own
        run = BudgetTracker(Budget(), run_id, parent=admission.shared)
        with pytest.raises(BudgetExceeded):
            run.admit(ChatRequest.user("hi", max_tokens=64), FREE)  # its worst case alone is over the limit
        admission.ended(run, on_its_own=False)

    over(hopeless, "r5")
    assert hopeless.refusal(0) is None  # one may be the data set's one long item: the next run starts
    over(hopeless, "r5b")
    refused = hopeless.refusal(0)  # two, none done: the next run is not started, it would stop at the same call
    assert refused is not None and "one call of a run needs more than all of it" in str(refused)
    closed = BudgetTracker(Budget(), "r6", parent=hopeless.shared)
    closed.close(refused)
    with pytest.raises(BudgetExceeded, match="needs more than all of it"):
        closed.admit(ChatRequest.user("hi", max_tokens=1), FREE)
    assert closed.exceeded is refused
    fitted = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=60, max_cost_usd=None), None))
    over(fitted, "r7")
    done = BudgetTracker(Budget(), "r8", parent=fitted.shared)
    spent(done, 1, 10)
    fitted.ended(done, on_its_own=True)  # a run fitted: the limit holds runs, the long items alone fail
    over(fitted, "r9")
    over(fitted, "r10")
    assert fitted.refusal(0) is None


def _held_pool() -> tuple[Pool, asyncio.Event]:
    """A scripted pool whose calls for every question but "question 0" wait until the event is set."""
    pool, models = scripted_pool(4)
    released = asyncio.Event()
    for name in ("m0", "m1", "m2", "m3"):
        answer = models[name].fn

        async def held(request: ChatRequest, answer: Any = answer) -> object:
            if "question 0" not in request.prompt_text():
                await released.wait()  # every run but the first stays in flight
            return answer(request)

        models[name].fn = held
    return pool, released


def test_runs_stopped_by_leaving_the_loop_early_are_recorded_and_resume_at_once(tmp_path: Path) -> None:
    """A run made for a chunk not yet begun (waiting for a free slot) was reported to ``on_stopped``
    as cancelled but never stored (its resume: no such run), and a stopped run resumed right after
    the loop was refused as "already running here" until a later turn of the event loop."""
    pool, released = _held_pool()
    orc = Orchestra(pool, store=tmp_path / "runs.db")

    async def main() -> tuple[list[str], list[str]]:
        stopped: list[RunResult] = []
        async with aclosing(orc.arun_iter([f"question {i}" for i in range(8)], window=4,
                                          on_stopped=lambda index, result: stopped.append(result))) as results:
            async for _, result in results:
                assert (result.task, result.status) == ("question 0", "done")
                for _ in range(10):  # (the feeder takes the freed slot: question 4 made, waiting for the next)
                    await asyncio.sleep(0)
                break
        released.set()
        resumed = [await orc.aresume(result.run_id) for result in stopped]  # at once, each
        await orc.aclose()
        return sorted(result.task for result in stopped), [result.status for result in resumed]

    tasks, statuses = asyncio.run(main())
    assert tasks == ["question 1", "question 2", "question 3", "question 4"] and set(statuses) == {"done"}


def test_an_on_stopped_that_raises_is_warned_about_and_every_stopped_run_is_recorded(tmp_path: Path) -> None:
    """The first stopped run's ``on_stopped`` raising ended the loop that records them: the runs after
    it stayed ``running`` in the store for good, and the callback never heard of them."""
    import sqlite3

    pool, released = _held_pool()
    orc = Orchestra(pool, store=tmp_path / "runs.db")
    told: list[int] = []

    def on_stopped(index: int, result: RunResult) -> None:
        told.append(index)
        raise ValueError("the callback broke")

    async def main() -> None:
        with pytest.warns(RuntimeWarning, match=r"on_stopped failed \(ValueError: the callback broke\); every "
                                                "stopped run is recorded as cancelled all the same"):
            async with aclosing(orc.arun_iter([f"question {i}" for i in range(4)], window=4,
                                              on_stopped=on_stopped)) as results:
                async for _ in results:
                    break
        released.set()
        await orc.aclose()

    asyncio.run(main())
    with sqlite3.connect(tmp_path / "runs.db") as db:
        statuses = dict(db.execute("SELECT task, status FROM runs").fetchall())
    assert statuses == {"question 0": "done", **{f"question {i}": "cancelled" for i in (1, 2, 3)}}
    assert sorted(told) == [1, 2, 3]


@pytest.mark.parametrize(("bad", "error", "says"), [
    (None, TypeError, "task 3 is a NoneType, not a str or an Instance"),
    ("  ", ConfigError, "task 3: the task is empty"),
    (Instance(""), ConfigError, "task 3: the task is empty")])
def test_a_list_with_a_bad_task_later_on_is_refused_before_any_run(tmp_path: Path, bad: object, error: type,
                                                                     says: str) -> None:
    """``arun_iter(["a", "b", "c", None])`` ran a, b and c, then raised, leaving them in the store as
    cancelled runs; a list is known in full, so it is checked first, as ``arun_many`` checks it."""
    pool, models = scripted_pool(4)
    orc = Orchestra(pool, store=tmp_path / "runs.db")

    async def main() -> None:
        async with aclosing(orc.arun_iter(["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?", bad])) as results:
            async for _ in results:
                pass

    with pytest.raises(error) as refused:
        asyncio.run(main())
    assert str(refused.value) == says
    assert not orc.store.runs() and all(not model.requests for model in models.values())  # type: ignore[union-attr]


def test_a_run_id_given_to_a_data_sets_task_is_checked_as_arun_checks_it(tmp_path: Path) -> None:
    """Through ``Instance(options={"run_id": ...})`` two tasks ran at once under one id (one record,
    counting half the requests), and a stored run's id took another task's calls and answer."""
    from orchestra.errors import ConfigError

    pool, models = scripted_pool(4)
    orc = Orchestra(pool, store=tmp_path / "runs.db")
    twice = [Instance("What is 3 + 1?", options={"run_id": "same-1"}) for _ in range(2)]
    with pytest.raises(ConfigError, match="run id same-1 is given to two of the tasks"):
        orc.run_many(twice)
    assert all(not model.requests for model in models.values())
    # one after the other (window 1), the second finds the first's record, as a second arun does
    assert [r.status for r in orc.run_many(twice, window=1)] == ["done", "done"]
    assert sum(len(model.requests) for model in models.values()) == 9  # (one run's calls: the second replays them)
    for model in models.values():
        model.requests.clear()
    orc.run("What is 3 + 1?", run_id="kept-1", plan=False)
    sent = sum(len(model.requests) for model in models.values())
    with pytest.raises(ConfigError, match="run kept-1 answers another task"):
        orc.run_many([Instance("A different task?", options={"run_id": "kept-1"})])
    with pytest.raises(ConfigError, match="run_id"):
        orc.run_many([Instance("What is 4 + 1?", options={"run_id": "bad id\nwith a line break"})])
    assert sum(len(model.requests) for model in models.values()) == sent
    assert RunStore(tmp_path / "runs.db").run("kept-1").task == "What is 3 + 1?"


def _refused_beside(orc: Orchestra, first: Any, reached: Any, gate: Any, *, sent: Any = lambda: 0) -> int:
    """Start ``first`` (a thread running a run on ``orc``); once it has ``reached`` the point it waits at,
    a run in this thread is refused; then ``gate`` lets the first go on. Returns ``sent()`` as the
    second run began."""
    from orchestra.errors import ConfigError

    first.start()
    assert reached.wait(10)
    before = sent()
    try:
        with pytest.raises(ConfigError, match="this Orchestra is running runs in another event loop"):
            orc.run("question 2", plan=False)
    finally:
        gate.set()
        first.join(10)
    return before


def test_one_orchestra_in_two_threads_at_once_is_refused_before_any_call(tmp_path: Path) -> None:
    """The second thread's run sent its keyword calls, then failed with an internal error about
    tasks the executor manages."""
    import threading


    pool, models = scripted_pool(2)
    entered, gate = threading.Event(), threading.Event()
    answer = models["m0"].fn

    def slow(request: ChatRequest) -> object:
        entered.set()
        gate.wait(10)  # (blocks the first thread's event loop, as a long call would)
        return answer(request)

    models["m0"].fn = models["m1"].fn = slow
    orc = Orchestra(pool, store=tmp_path / "runs.db", k=1)
    first = threading.Thread(target=lambda: orc.run("question 1", plan=False))
    sent = _refused_beside(orc, first, entered, gate, sent=lambda: sum(len(m.requests) for m in models.values()))
    assert sum(len(model.requests) for model in models.values()) == sent


def test_two_threads_beginning_runs_at_once_on_one_orchestra_the_second_is_refused(tmp_path: Path) -> None:
    """Both threads passed the check while the first wrote its run's beginning (SQLite lets go of the
    GIL), then both runs failed with an internal error, or the process hung (found by a trial)."""
    import threading


    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, store=tmp_path / "runs.db", k=1)
    assert orc.store is not None
    writing, gate = threading.Event(), threading.Event()
    begin_runs = orc.store.begin_runs

    def held_begin(*args: object, **kwargs: object) -> None:
        if not writing.is_set():  # the first thread's beginning: held while the second one begins
            writing.set()
            gate.wait(10)
        begin_runs(*args, **kwargs)

    orc.store.begin_runs = held_begin  # type: ignore[method-assign]
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(orc.run("question 1", plan=False).status))
    _refused_beside(orc, first, writing, gate)
    assert results == ["done"] and [run.task for run in orc.store.runs()] == ["question 1"]
    assert orc.run("question 3", plan=False).status == "done"  # (its loop has ended: another may go)


def test_a_run_whose_beginning_failed_leaves_no_claim_on_its_event_loop(tmp_path: Path) -> None:
    """A store error while a run began left it claimed: with its loop still open (a server, a notebook),
    every other thread's run was refused for ever, though nothing ran (found by a review)."""
    import threading

    from orchestra.errors import StoreError

    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, store=tmp_path / "runs.db", k=1)
    assert orc.store is not None
    earlier_usage = orc.store.earlier_usage
    failures = [StoreError("cannot read the run store: database is locked")]

    def flaky(run_ids: Any) -> Any:
        if failures:
            raise failures.pop()
        return earlier_usage(run_ids)

    orc.store.earlier_usage = flaky  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()  # (a loop that stays open, in its own thread)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(StoreError):
            asyncio.run_coroutine_threadsafe(orc.arun("question 1", plan=False), loop).result(30)
        assert orc.run("question 2", plan=False).status == "done"  # (another thread: refused before)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_heartbeat_ends_with_the_last_run_and_async_listeners_are_refused(tmp_path: Path) -> None:
    """A loop closed without aclose destroyed the heartbeat task pending ("Task was destroyed but it
    is pending!"), and an async listener was called, never awaited, once per event."""
    from orchestra.errors import ConfigError

    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, store=tmp_path / "runs.db")

    async def main() -> None:
        await orc.arun("question 1", plan=False)
        await asyncio.sleep(0)
        assert orc._heartbeat is not None and orc._heartbeat.done()

    asyncio.run(main())

    async def listen(event: object) -> None:
        return None

    with pytest.raises(ConfigError, match="an event listener must be a plain function, not an async one"):
        orc.events.subscribe(listen)


def test_the_rare_expert_filter_recruits_half_a_window_at_a_time() -> None:
    """Tasks are recruited together a chunk of half the window at a time, so one chunk's runs work
    while the next is recruited: each chunk's keyword samples (5 per task) are one batch."""
    pool, models = scripted_pool(4)
    orc = Orchestra(pool, store=False)

    async def main() -> list[RunResult]:
        return [result async for _, result in orc.arun_iter([f"question {i}" for i in range(8)], window=4,
                                                             rare_filter=True)]

    assert [result.status for result in asyncio.run(main())] == ["done"] * 8
    assert models["planner"].batches == [10, 10, 10, 10]  # 4 chunks of 2 tasks


def test_a_repair_a_run_had_no_room_for_is_not_taken_for_a_call_every_run_makes() -> None:
    """A structured answer's repair refused by one item's budget was marked hopeless and kept as a
    call a run may need: the data set's other items, which need no repair, were not started."""
    from orchestra.budget import Budget, BudgetTracker, RunAdmission
    from orchestra.errors import BudgetExceeded
    from orchestra.models import ChatRequest
    from orchestra.models.pricing import FREE

    admission = RunAdmission(BudgetTracker(Budget(max_calls=None, max_tokens=2_000, max_cost_usd=None), None))
    run = BudgetTracker(Budget(max_calls=None, max_tokens=1_000, max_cost_usd=None), "r1", parent=admission.shared)
    held = run.admit(ChatRequest.user("hi", max_tokens=100), FREE)
    with pytest.raises(BudgetExceeded) as refused:
        run.admit(ChatRequest.user("a long repair " * 400, max_tokens=900), FREE, within=True)
    assert not refused.value.held and not refused.value.hopeless and run.exceeded is not None
    run.settle(held, None)
    admission.ended(run, on_its_own=False, cut=True)
    assert admission.refusal(0) is None  # the next item starts


def test_a_run_is_admitted_by_what_its_last_call_holds_beyond_what_it_spends() -> None:
    """A data set of one-call items (each spent 75 tokens, reserving 121) under 300 tokens: the
    admission wanted a run's whole cost and then a call's whole worst case on top (196), so two of
    four items were not started with 158 tokens free. A run's last call holds only its worst case
    beyond what it spends (46)."""
    from orchestra.budget import Budget, BudgetTracker, RunAdmission
    from orchestra.models import ChatRequest, Usage
    from orchestra.models.pricing import FREE

    shared = BudgetTracker(Budget(max_calls=None, max_tokens=300, max_cost_usd=None), None)
    admission = RunAdmission(shared)
    request = ChatRequest.user("x" * 236, max_tokens=30)  # 59 units + 32 + 30: 121 at worst

    def one_run(name: str) -> None:
        run = BudgetTracker(Budget(), name, parent=shared)
        reserved = run.admit(request, FREE)
        assert reserved.tokens == 121
        run.settle(reserved, Usage(prompt_tokens=70, completion_tokens=5, requests=1))
        admission.ended(run, on_its_own=True)

    one_run("r1")
    one_run("r2")
    assert admission.refusal(0) is None  # 150 spent + 75 + 46 <= 300 (it was 150 + 75 + 121 > 300)
    one_run("r3")
    refused = admission.refusal(0)  # 225 + 75 + 46 > 300
    assert refused is not None and str(refused).endswith(
        "(225 tokens so far, and a run takes up to 75 tokens, and a call may hold 46 tokens more than it spends, "
        "so it was not started)")


def test_one_item_too_long_for_each_runs_budget_does_not_stop_the_items_after_it() -> None:
    """A data set (under a budget of its own) whose first item alone was over each run's token limit:
    every later item was refused unstarted ("one call of a run needs more than all of it"), though
    each fitted."""
    pool, models = scripted_pool(2)
    tasks = ["Why? " + "word " * 4000, "What is 3 * 7?", "What is 2 + 2?", "What is 5 - 1?"]

    def run(limit: int) -> list[RunResult]:
        orc = Orchestra(pool, k=2, aggregate="vote", budget=Budget(max_calls=None, max_tokens=limit, max_cost_usd=None))
        return orc.run_many(tasks, window=1, shared_budget=BudgetTracker(Budget(max_calls=1000), None))

    results = run(3000)
    assert [r.status for r in results] == ["budget_exceeded", "done", "done", "done"], [r.error for r in results]
    sent = sum(len(m.requests) for m in models.values())
    stopped = run(300)  # every item over the limit: two tell, the rest are not started
    assert [r.status for r in stopped] == ["budget_exceeded"] * 4
    assert ["needs more than all of it" in (r.error or "") for r in stopped] == [False, False, True, True]
    assert sum(len(m.requests) for m in models.values()) == sent
