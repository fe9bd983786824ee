"""Cancellation, held calls and resumes in the executor: every request an endpoint got is counted and
recorded once, no budget reservation outlives its call, and nothing waits for ever. (Found by a
review; each test failed before its fix.) Ordering comes from events, never from sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYWORDS_MARK

from orchestra import Agent, Orchestra, Pool
from orchestra.budget import Budget, BudgetTracker
from orchestra.errors import BadResponse, RunHeld
from orchestra.execute import Executor, RunLedger
from orchestra.models import ChatRequest, ChatResult, FunctionModel
from orchestra.models.pricing import FREE
from orchestra.store import RunStore

UNLIMITED: dict[str, Any] = {"max_calls": None, "max_cost_usd": None, "max_tokens": None}
#: a wait that only a hang reaches (the tests pass in well under a second)
HANG = 60


def ask(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest.user(text, **fields)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run, a turn at a time, until ``condition`` holds."""
    for _ in range(200_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def cancel_batches(executor: Executor) -> None:
    """Cancel the executor's batches in flight (what Ctrl-C's drain and ``stop_in_flight`` do)."""
    for task in list(executor._in_flight):
        task.cancel()


def journaled(tmp_path: Path) -> tuple[Executor, RunStore, RunLedger]:
    """An executor, a store and a run ``r`` begun in it, with its ledger."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r", "task", {})
    return Executor(), store, RunLedger.create("r", Budget(), journal=store)


def same_request_twice(executor: Executor, ledger: RunLedger, model: FunctionModel) -> asyncio.Future[Any]:
    """One request object sent twice to ``model`` in one call (a batch of two)."""
    request = ask("same", temperature=1.0)
    return asyncio.ensure_future(executor.run_task(executor.call(ledger, [(model, request), (model, request)],
                                                                 purpose="expert")))


def journal(store: RunStore, run_id: str) -> list[tuple[str, str]]:
    return [(call["request"]["messages"][-1]["content"], call["status"]) for call in store.calls(run_id)]


def test_an_answer_queued_when_its_batch_is_cancelled_is_delivered_counted_and_recorded(tmp_path: Path) -> None:
    """A remote batch cancelled in the turn an answer came back: that answer (billed) is not lost."""
    async def main() -> None:
        executor, store, ledger = journaled(tmp_path)
        release = asyncio.Event()

        async def answer(request: ChatRequest) -> str:
            if request.prompt_text() == "A":
                await release.wait()
                asyncio.get_running_loop().call_soon(cancel_batches, executor)  # (before the batch takes it)
                return "answer A"
            await asyncio.Event().wait()  # B is still in flight when the batch is cancelled
            return "never"

        model = FunctionModel(answer, name="m")
        task = asyncio.ensure_future(executor.run_task(executor.call(ledger, [(model, ask("A")), (model, ask("B"))],
                                                                     purpose="expert")))
        await until(lambda: len(model.requests) == 2)
        release.set()
        outcomes = await asyncio.wait_for(task, HANG)
        assert getattr(outcomes[0], "text", None) == "answer A"
        assert "in flight" in str(outcomes[1])
        assert (ledger.budget.calls, ledger.budget.requests) == (2, 2)
        assert journal(store, "r") == [("A", "ok"), ("B", "error")]
        store.close()

    asyncio.run(main())


@pytest.mark.parametrize("unwinding", [0, 1, 3])
def test_a_request_cut_off_whose_cancellation_takes_turns_to_unwind_is_counted_and_recorded(
        tmp_path: Path, unwinding: int) -> None:
    """A batch cut off (the run cancelled, then ``stop_in_flight``) while its request is at the endpoint,
    whose client needs loop turns to unwind (httpx's own transport closing its connection): the batch
    ended first and released the call's reservation, and the request, reported after, was not counted."""
    async def main() -> None:
        executor, store, ledger = journaled(tmp_path)

        async def slow(request: ChatRequest) -> str:
            try:
                await asyncio.Event().wait()
            finally:
                for _ in range(unwinding):
                    await asyncio.sleep(0)
            return "never"

        model = FunctionModel(slow, name="m")
        task = asyncio.ensure_future(executor.run_task(executor.call(ledger, [(model, ask("A"))], purpose="expert")))
        await until(lambda: bool(model.requests))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(executor.stop_in_flight(), HANG)
        assert (ledger.budget.calls, ledger.budget.requests) == (1, 1)
        assert journal(store, "r") == [("A", "error")] and ledger.budget.committed() == (1, 0, 0.0)
        store.close()

    asyncio.run(main())


def test_one_request_sent_twice_and_cut_off_is_counted_twice(tmp_path: Path) -> None:
    """The same request object twice in a batch, both cut off in flight: both reached the endpoint."""
    async def main() -> None:
        executor, store, ledger = journaled(tmp_path)

        async def never(request: ChatRequest) -> str:
            await asyncio.Event().wait()
            return "never"

        model = FunctionModel(never, name="m")
        task = same_request_twice(executor, ledger, model)
        await until(lambda: len(model.requests) == 2)
        cancel_batches(executor)
        outcomes = await asyncio.wait_for(task, HANG)
        assert all("in flight" in str(outcome) for outcome in outcomes), outcomes
        assert (ledger.budget.calls, ledger.budget.requests) == (2, 2)
        assert [seq for seq in (call["seq"] for call in store.calls("r"))] == [0, 1]
        store.close()

    asyncio.run(main())


def test_calls_never_sent_give_their_reservations_back_when_their_batch_is_cancelled() -> None:
    """A batch sent one request at a time (an endpoint's limit), cancelled: the others held nothing after."""
    class OneAtATime(FunctionModel):
        @property
        def fan_out(self) -> int:
            return 1

    async def main() -> None:
        async def never(request: ChatRequest) -> str:
            await asyncio.Event().wait()
            return "never"

        model = OneAtATime(never, name="m")
        shared = BudgetTracker(Budget(max_calls=100, max_cost_usd=None, max_tokens=100_000), None)
        ledger = RunLedger.create("r", Budget(), shared_budget=shared)
        executor = Executor()
        task = asyncio.ensure_future(executor.run_task(executor.call(
            ledger, [(model, ask(f"q{i}")) for i in range(3)], purpose="expert")))
        await until(lambda: len(model.requests) == 1)
        assert shared.committed()[0] == 3
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(executor.stop_in_flight(), HANG)
        assert shared.committed() == (1, 0, 0.0)  # the request that was sent: counted, nothing held
        assert ledger.budget.committed() == (1, 0, 0.0)

    asyncio.run(main())


def test_the_groups_of_a_cancelled_wave_give_their_reservations_back() -> None:
    """A heavy wave cancelled while its first engine runs: the group never started holds nothing after."""
    async def main() -> None:
        async def never(request: ChatRequest) -> str:
            await asyncio.Event().wait()
            return "never"

        first = FunctionModel(never, name="A", heavy=True)
        second = FunctionModel(lambda request: "b", name="B", heavy=True)
        shared = BudgetTracker(Budget(max_calls=100, max_cost_usd=None, max_tokens=100_000), None)
        ledger = RunLedger.create("r", Budget(), shared_budget=shared)
        executor = Executor(max_resident_models=1)
        task = asyncio.ensure_future(executor.run_task(executor.call(
            ledger, [(first, ask("hi")), (second, ask("hi"))], purpose="expert")))
        await until(lambda: len(first.requests) + len(second.requests) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(executor.stop_in_flight(), HANG)
        assert ledger.budget.committed() == (1, 0, 0.0)
        assert shared.committed() == (1, 0, 0.0)

    asyncio.run(main())


def test_a_call_held_on_a_shared_budget_is_asked_again_when_another_executor_releases_the_room() -> None:
    """Two executors share a budget: a call held for room another's call holds goes once that ends."""
    async def main() -> None:
        shared = BudgetTracker(Budget(max_calls=None, max_cost_usd=None, max_tokens=2000), None)
        release = asyncio.Event()

        async def slow(request: ChatRequest) -> str:
            await release.wait()
            return "slow answer"

        holder, waiter = Executor(), Executor()
        slow_model, fast_model = FunctionModel(slow, name="slow"), FunctionModel(lambda r: "fast", name="fast")
        held_ledger = RunLedger.create("x", Budget(**UNLIMITED), shared_budget=shared)
        holding_ledger = RunLedger.create("y", Budget(**UNLIMITED), shared_budget=shared)
        holding = asyncio.ensure_future(holder.run_task(holder.call(holding_ledger, [(slow_model, ask("hello"))],
                                                                    purpose="expert")))
        await until(lambda: len(slow_model.requests) == 1)
        held = asyncio.ensure_future(waiter.run_task(waiter.call(held_ledger, [(fast_model, ask("hello"))],
                                                                 purpose="expert")))
        await until(lambda: bool(waiter._held))
        release.set()
        assert [r.text for r in await asyncio.wait_for(holding, HANG)] == ["slow answer"]  # type: ignore[union-attr]
        assert [r.text for r in await asyncio.wait_for(held, HANG)] == ["fast"]  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_light_call_held_while_a_wave_runs_does_not_block_the_next_wave() -> None:
    """A light call held for room while an engine's wave runs, the next wave's engine call queued and
    reserved: it is refused once the wave ends (the next wave waits for its task), not held for ever."""
    async def main() -> None:
        probe = BudgetTracker(Budget(**{**UNLIMITED, "max_tokens": 10**6}), "probe")
        worst = probe.admit(ask("h1", max_tokens=100), FREE).tokens
        limit = 2 * worst + 2 + 2 * 20  # two worst cases (and two short answers) fit; three do not
        first_wave = asyncio.Event()
        warm = asyncio.Event()

        async def slow(request: ChatRequest) -> str:
            await first_wave.wait()
            return "word " * 60

        async def warmup_answer(request: ChatRequest) -> str:
            await warm.wait()
            return "first"

        first = FunctionModel(slow, name="A", heavy=True)
        second = FunctionModel(lambda request: "word " * 20, name="B", heavy=True)
        light = FunctionModel(lambda request: "light answer", name="L")
        warmup = FunctionModel(warmup_answer, name="W")
        ledger = RunLedger.create("r", Budget(**{**UNLIMITED, "max_tokens": limit}))
        executor = Executor(max_resident_models=2)

        async def later(model: FunctionModel, text: str) -> list[Any]:
            await asyncio.sleep(0)  # (queued after the first engine call: its wave does not wait for this task)
            await executor.call(ledger, [(warmup, ask("w" + text, max_tokens=1))], purpose="expert")
            return await executor.call(ledger, [(model, ask(text, max_tokens=100))], purpose="expert")

        tasks = [executor.spawn(executor.call(ledger, [(first, ask("h1", max_tokens=100))], purpose="expert")),
                 executor.spawn(later(second, "h2")), executor.spawn(later(light, "l3"))]
        await until(lambda: len(first.requests) == 1 and len(warmup.requests) == 2)
        warm.set()  # the warm-up answers come while the first wave runs: B is queued, L is held
        await until(lambda: bool(executor._held) and bool(executor._heavy))
        first_wave.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), HANG)
        assert [type(out[0]).__name__ for out in outcomes] == ["ChatResult", "ChatResult", "BudgetExceeded"]
        assert ledger.budget.exceeded is outcomes[2][0]  # (its run ends budget_exceeded, not failed)

    asyncio.run(main())


async def stopped_with_keywords_in_flight(model: FunctionModel, store: RunStore,
                                          seen: dict[str, int]) -> tuple[Orchestra, list[str]]:
    """An Orchestra whose run ``r1`` on ``model`` was cancelled once its 5 keyword requests were in
    flight (``seen`` counts them), and the kinds of the ``calls_queued`` events it emits."""
    queued: list[str] = []
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model), Agent(name="duo", model=model)]), store=store,
                    plan=False, k=1,
                    on_event=lambda event: queued.append(event.kind) if event.kind == "calls_queued" else None)
    task = asyncio.ensure_future(orc.arun("How fast is light?", run_id="r1"))
    await until(lambda: seen["keywords"] == 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return orc, queued


def test_a_resume_counts_an_answer_recorded_before_it_began_once(tmp_path: Path) -> None:
    """A run stopped with its keyword batch in flight; one answer is recorded before the resume
    begins, the others after: the resumed run's usage is what the store and the endpoint saw."""
    async def main() -> None:
        first, rest = asyncio.Event(), asyncio.Event()
        seen = {"keywords": 0}

        async def answer(request: ChatRequest) -> Any:
            if KEYWORDS_MARK in request.prompt_text():
                seen["keywords"] += 1
                await (first.wait() if seen["keywords"] == 1 else rest.wait())
                return {"keywords": ["physics"]}
            return "The answer is 7"

        model = FunctionModel(answer, name="m")
        store = RunStore(tmp_path / "runs.db")
        orc, queued = await stopped_with_keywords_in_flight(model, store, seen)
        first.set()
        await until(lambda: [status for _, status in journal(store, "r1")] == ["ok"])
        before = len(queued)
        resumed = asyncio.ensure_future(orc.aresume("r1"))
        await until(lambda: len(queued) > before)  # the resumed run queued its keyword calls: they wait
        for _ in range(5):
            await asyncio.sleep(0)
        rest.set()
        result = await asyncio.wait_for(resumed, HANG)
        totals = store.run_totals("r1")
        assert len(model.requests) == totals["requests"] == 6
        assert (result.usage.calls, result.usage.requests, result.usage.prompt_tokens) == (
            totals["calls"], totals["requests"], totals["prompt_tokens"])
        await orc.aclose()

    asyncio.run(main())


def test_a_resume_counts_the_failed_requests_of_its_stopped_run_that_end_after_it_began(tmp_path: Path) -> None:
    """A run stopped with its keyword batch in flight; the resume in the same process waits for those
    requests, which then fail, and sends them again: its usage counts both (it reported 5 requests
    where the endpoint got 10 and the store said 10: the failures were recorded after it began)."""
    async def main() -> None:
        release = asyncio.Event()
        seen = {"keywords": 0}

        async def answer(request: ChatRequest) -> Any:
            if KEYWORDS_MARK in request.prompt_text():
                seen["keywords"] += 1
                if seen["keywords"] <= 5:  # the stopped run's: they fail once the resume waits for them
                    await release.wait()
                    raise BadResponse("the endpoint dropped it")
                return {"keywords": ["physics"]}
            return "The answer is 7"

        model = FunctionModel(answer, name="m")
        store = RunStore(tmp_path / "runs.db")
        orc, queued = await stopped_with_keywords_in_flight(model, store, seen)
        before = len(queued)
        resumed = asyncio.ensure_future(orc.aresume("r1"))
        await until(lambda: len(queued) > before)  # the resumed run queued its keyword calls: they wait
        release.set()
        result = await asyncio.wait_for(resumed, HANG)
        totals = store.run_totals("r1")
        assert result.status == "done" and len(model.requests) == totals["requests"] == 11
        assert (result.usage.calls, result.usage.requests) == (totals["calls"], totals["requests"]) == (6, 11)
        await orc.aclose()

    asyncio.run(main())


def test_stopping_a_stream_keeps_a_run_that_had_ended_as_it_ended(tmp_path: Path) -> None:
    """``arun_iter`` closed in the turn another run ended: that run is kept done, not made cancelled."""
    async def main() -> None:
        release = asyncio.Event()

        async def answer(request: ChatRequest) -> Any:
            if KEYWORDS_MARK in request.prompt_text():
                return {"keywords": ["physics"]}
            if "task B" in request.prompt_text():
                await release.wait()
            return "The answer is 7"

        store = RunStore(tmp_path / "runs.db")
        orc = Orchestra(Pool(agents=[Agent(name="solo", model=FunctionModel(answer, name="m"))]), store=store,
                        plan=False, k=1)
        stopped: list[tuple[int, str]] = []
        async with aclosing(orc.arun_iter(["task A", "task B"], rare_filter=False,
                                          on_stopped=lambda i, r: stopped.append((i, r.status)))) as results:
            async for _ in results:
                release.set()
                await until(lambda: any(run.future.done() for run in orc._going.values()))
                break  # (B's run has ended; the stream has not taken it yet)
        assert stopped == [(1, "done")]  # (handed over as it ended, not as cancelled)
        assert sorted((record.task, record.status) for record in store.runs()) == [("task A", "done"),
                                                                                   ("task B", "done")]
        await orc.aclose()

    asyncio.run(main())


def test_a_stream_under_a_shared_budget_ends_when_a_costly_run_ends_while_it_waits_for_a_slot() -> None:
    """``arun_iter`` with a shared budget and the rare-expert filter: a run that ends costlier than
    the others while the next chunk waits for a window slot does not leave the stream waiting for ever."""
    async def main() -> None:
        costly_done = asyncio.Event()

        async def answer(request: ChatRequest) -> Any:
            prompt = request.prompt_text()
            if KEYWORDS_MARK in prompt:
                return {"keywords": ["physics"]}
            if "task 1" in prompt:
                await costly_done.wait()
                return "x " * 5000  # ~3,100 tokens; the others ~600
            return "The answer is 7"

        orc = Orchestra(Pool(agents=[Agent(name="solo", model=FunctionModel(answer, name="m"))]), store=False,
                        plan=False, k=1)
        shared = BudgetTracker(Budget(max_calls=None, max_cost_usd=None, max_tokens=6000), None)
        got: list[tuple[int, str]] = []
        turns: asyncio.Queue[None] = asyncio.Queue()  # the consumer takes a result per turn given

        async def consume() -> None:
            async for index, result in orc.arun_iter([f"task {i}" for i in range(8)], window=4, shared_budget=shared):
                got.append((index, result.status))
                await turns.get()  # a consumer that takes its time (grading, say)

        async def settle() -> None:
            for _ in range(50):
                await asyncio.sleep(0)

        consumer = asyncio.ensure_future(consume())
        await until(lambda: len(got) == 1)
        turns.put_nowait(None)
        await until(lambda: len(got) == 2)
        await settle()  # the window is full: the feeder, a chunk begun, waits for a slot
        costly_done.set()  # the costly run ends meanwhile: the budget has no room for more beside it
        await settle()
        for _ in range(8):
            turns.put_nowait(None)
        await asyncio.wait_for(consumer, HANG)
        assert sorted(index for index, _ in got) == list(range(8))

    asyncio.run(main())


@pytest.mark.parametrize("limit", [1000, 1500])
def test_an_engines_calls_wait_for_room_under_a_token_budget_as_an_endpoints_do(limit: int) -> None:
    """Keyword samples to an in-process engine, a budget that fits two at once: the others wait for
    room, and the run ends as it does on an endpoint (it failed, with a budget error and exit 1)."""
    def answer(request: ChatRequest) -> Any:
        return {"keywords": ["history"]} if KEYWORDS_MARK in request.prompt_text() else "The answer is 42"

    outcomes = []
    for heavy in (False, True):
        model = FunctionModel(answer, name="engine", heavy=heavy)
        pool = Pool(agents=[Agent(name="a", model=model, max_tokens=50), Agent(name="b", model=model, max_tokens=50)],
                    planner=model)
        result = Orchestra(pool, store=False, k=2, budget=Budget(max_tokens=limit)).run("What is 6*7?", plan=False)
        outcomes.append((result.status, result.usage.calls, len(model.requests)))
    assert outcomes[0] == outcomes[1] == ("done", 8, 8)


def test_an_engines_call_that_cannot_fit_stops_its_run_at_the_budget() -> None:
    """Under a budget too small for the keyword samples, a run on an engine ends budget_exceeded (exit 3)."""
    model = FunctionModel(lambda request: {"keywords": ["history"]}, name="engine", heavy=True)
    pool = Pool(agents=[Agent(name="a", model=model, max_tokens=50), Agent(name="b", model=model, max_tokens=50)],
                planner=model)
    result = Orchestra(pool, store=False, k=1, budget=Budget(max_tokens=700)).run("What is 6*7?", plan=False)
    assert (result.status, result.exit_code) == ("budget_exceeded", 3)


def test_a_duplicate_request_cut_off_after_its_run_stopped_is_counted(tmp_path: Path) -> None:
    """The same request twice, the run cancelled, the first answered, then the batch stopped: the
    second, cut off, is counted and recorded (it was taken for the answered first one)."""
    async def main() -> None:
        executor, store, ledger = journaled(tmp_path)
        first = asyncio.Event()
        asked = {"n": 0}

        async def answer(request: ChatRequest) -> str:
            asked["n"] += 1
            if asked["n"] == 1:
                await first.wait()
                return "first answer"
            await asyncio.Event().wait()
            return "never"

        model = FunctionModel(answer, name="m")
        task = same_request_twice(executor, ledger, model)
        await until(lambda: len(model.requests) == 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        first.set()
        await until(lambda: [status for _, status in journal(store, "r")] == ["ok"])
        await asyncio.wait_for(executor.stop_in_flight(), HANG)
        assert (ledger.budget.calls, ledger.budget.requests) == (2, 2)
        assert ledger.budget.committed()[0] == 2  # (nothing held)
        assert [(call["seq"], call["status"]) for call in store.calls("r")] == [(0, "ok"), (1, "error")]
        store.close()

    asyncio.run(main())


@pytest.mark.parametrize("own_limit", [256, 4096])
def test_an_engines_calls_give_back_what_a_shared_budget_held_for_them(own_limit: int) -> None:
    """An engine with its own answer limit under a shared budget: the run's budget reserved the
    engine's limit and the shared one 1,024, so each call left the difference held (after 4 short
    calls every later one was refused), or released more than it held."""
    async def main() -> None:
        engine = FunctionModel(lambda request: "short answer", name="engine", heavy=True)
        engine.default_max_tokens = own_limit  # type: ignore[attr-defined]
        shared = BudgetTracker(Budget(max_calls=None, max_cost_usd=None, max_tokens=5000), None)
        executor = Executor()
        for i in range(8):
            ledger = RunLedger.create(f"r{i}", Budget(**UNLIMITED), shared_budget=shared)
            outcome = await executor.run_task(executor.call(ledger, [(engine, ask(f"q{i}"))], purpose="expert"))
            assert getattr(outcome[0], "text", None) == "short answer", outcome
            assert shared.committed()[0] == i + 1 and shared._reserved_tokens == 0

    asyncio.run(main())


class _Miscounting:
    """A model of one's own (the Model protocol) that answers too few requests, or one twice."""

    name = "miscounting"

    def __init__(self, indexes: list[int]) -> None:
        self.indexes = indexes

    async def complete(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return []

    async def complete_each(self, requests: list[ChatRequest]) -> Any:
        for index in self.indexes:
            yield index, ChatResult(text="The answer is 1")


@pytest.mark.parametrize("indexes, says", [
    ([], "miscounting answered 0 of the 1 requests of its batch"),  # (its call waited for ever)
    ([5], "miscounting answered request 5 of a batch of 1, one it had answered already or never got"),
])
def test_a_model_that_answers_too_few_requests_or_a_wrong_one_fails_its_calls(indexes: list[int], says: str) -> None:
    planner = FunctionModel(lambda request: {"keywords": ["x"]}, name="planner")
    pool = Pool(agents=[Agent(name="a", model=_Miscounting(indexes))], planner=planner)
    result = asyncio.run(asyncio.wait_for(Orchestra(pool, k=1, store=False).arun("What is 6*7?", plan=False), 60))
    assert result.status == "failed" and result.error == f"answer: every expert failed; first error: {says}"


def test_data_set_runs_stopped_with_requests_in_flight_keep_their_leases_until_those_end(tmp_path: Path) -> None:
    """Stopping ``arun_iter`` with requests in flight gave its runs' leases up at once: a resume in another
    process was let in and sent those requests again (paid twice)."""
    async def main() -> None:
        release, asked = asyncio.Event(), []

        async def answer(request: ChatRequest) -> Any:
            if KEYWORDS_MARK in request.prompt_text():
                return {"keywords": ["physics"]}
            asked.append(request)
            await release.wait()
            return "The answer is 7"

        store = RunStore(tmp_path / "runs.db")
        orc = Orchestra(Pool(agents=[Agent(name="solo", model=FunctionModel(answer, name="m"))]), store=store,
                        plan=False, k=1)

        async def consume() -> None:
            async for _ in orc.arun_iter(["task A", "task B"], rare_filter=False):
                pass

        going = asyncio.ensure_future(consume())
        await until(lambda: len(asked) == 2)
        going.cancel()
        with pytest.raises(asyncio.CancelledError):
            await going
        other = RunStore(tmp_path / "runs.db")  # (another owner: as another process's store)
        ids = [record.id for record in other.runs()]
        assert len(ids) == 2 and {record.status for record in other.runs()} == {"cancelled"}
        for run_id in ids:
            with pytest.raises(RunHeld, match="whose requests for it are still in flight"):
                other.check_free([run_id])
        release.set()

        def free() -> bool:
            try:
                other.check_free(ids)
            except RunHeld:
                return False
            return True

        await until(free)  # their answers came and were recorded: the runs are free to resume
        assert all(call["status"] == "ok" for run_id in ids for call in store.calls(run_id))
        await orc.aclose()

    asyncio.run(main())
