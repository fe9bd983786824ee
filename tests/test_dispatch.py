"""Dispatch: remote calls go out as soon as they are queued; heavy engines run in planned load-once waves.

No test here measures time: overlap is shown by calls that could only have been answered if
another call was in flight at the same moment (a barrier would deadlock them, and a deadlock
guard turns that into a wrong answer), and load planning by counted loads.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

from helpers import kind_of

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.errors import BudgetExceeded
from orchestra.events import CallsQueued, Event, ModelLoaded
from orchestra.execute import Executor, RunLedger
from orchestra.models import ChatRequest, FunctionModel, OpenAICompatible
from orchestra.settings import Settings
from orchestra.testing import LoopbackRequest, chat_handler

GUARD_S = 10  # a deadlock guard, not a timing: correct dispatch never waits for it


def ask(text: str) -> ChatRequest:
    return ChatRequest.user(text)


async def first_text(executor: Executor, ledger: RunLedger, model: Any, text: str, **options: Any) -> str:
    [outcome] = await executor.call(ledger, [(model, ask(text))], purpose="expert", **options)
    assert not isinstance(outcome, Exception), outcome
    return outcome.text


# --- remote calls: no barrier ----------------------------------------------------------------------


def test_a_remote_call_goes_out_while_another_runs_heavy_batch_is_in_flight(loopback) -> None:
    order: list[str] = []
    heavy_started = threading.Event()  # the server answers the second remote call only after it
    answered = asyncio.Event()  # the heavy batch ends only once that call is answered

    async def remote_answer(request: LoopbackRequest) -> str:
        if "quick 1" in request.prompt:
            await asyncio.get_running_loop().run_in_executor(None, heavy_started.wait, GUARD_S)
        return "quick"

    server = loopback(chat_handler(remote_answer))
    remote = OpenAICompatible(model="remote", base_url=server.url + "/v1", max_concurrency=4)

    async def engine(request: ChatRequest) -> str:
        order.append("heavy batch started")
        heavy_started.set()
        try:  # a barrier holds the remote call until this batch ends: each waits for the other
            await asyncio.wait_for(answered.wait(), GUARD_S)
        except TimeoutError:
            order.append("timed out")
        order.append("heavy batch done")
        return "thought"

    heavy = FunctionModel(engine, name="engine", heavy=True)
    executor = Executor()

    async def remote_run() -> None:
        ledger = RunLedger.create("remote")
        for i in range(2):  # the second call is queued once the heavy wave is under way
            await first_text(executor, ledger, remote, f"quick {i}")
            order.append(f"remote {i} answered")
        answered.set()

    async def main() -> list[str]:
        heavy_text = executor.run_task(first_text(executor, RunLedger.create("heavy"), heavy, "think"))
        return list(await asyncio.gather(heavy_text, executor.run_task(remote_run())))

    assert asyncio.run(main())[0] == "thought"
    assert "timed out" not in order
    assert order.index("heavy batch started") < order.index("remote 1 answered") < order.index("heavy batch done")
    assert len(server.requests) == 2 and heavy.loads == 1


def test_a_remote_call_goes_out_while_another_runs_slow_remote_call_is_in_flight(loopback) -> None:
    second_arrived = asyncio.Event()  # lives in the server's loop

    async def answer(request: LoopbackRequest) -> str:
        if "slow" in request.prompt:  # answered only once the other run's second call reached the server
            try:
                await asyncio.wait_for(second_arrived.wait(), GUARD_S)
                return "overlapped"
            except TimeoutError:
                return "serialized"
        if "quick 1" in request.prompt:
            second_arrived.set()
        return "quick"

    server = loopback(chat_handler(answer))
    slow = OpenAICompatible(model="slow", base_url=server.url + "/v1", max_concurrency=2)
    quick = OpenAICompatible(model="quick", base_url=server.url + "/v1", max_concurrency=2)
    executor = Executor()

    async def quick_run() -> list[str]:
        ledger = RunLedger.create("quick")
        return [await first_text(executor, ledger, quick, f"quick {i}") for i in range(2)]

    async def main() -> list[Any]:
        return list(await asyncio.gather(executor.run_task(first_text(executor, RunLedger.create("slow"), slow, "slow")),
                                         executor.run_task(quick_run())))

    slow_text, quick_texts = asyncio.run(main())
    assert slow_text == "overlapped" and quick_texts == ["quick", "quick"]
    assert len(server.requests) == 3


def test_calls_queued_in_one_tick_share_a_batch_and_later_ones_do_not_wait_for_it() -> None:
    release = asyncio.Event()

    async def answer(request: ChatRequest) -> str:
        if request.prompt_text() == "held":
            await asyncio.wait_for(release.wait(), GUARD_S)
        return request.prompt_text()

    model = FunctionModel(answer, name="remote")
    executor = Executor()

    async def late() -> str:
        await first_text(executor, RunLedger.create("late"), model, "first")  # answered in the first batch
        text = await first_text(executor, RunLedger.create("late"), model, "second")  # while "held" still waits
        release.set()
        return text

    async def main() -> list[Any]:
        return list(await asyncio.gather(executor.run_task(first_text(executor, RunLedger.create("a"), model, "held")),
                                         executor.run_task(late())))

    assert asyncio.run(main()) == ["held", "second"]
    assert model.batches == [2, 1]  # "held" and "first" queued in one tick: one batch; "second" its own


# --- heavy engines: load once, look ahead ----------------------------------------------------------


def engines(n: int, **options: Any) -> list[FunctionModel]:
    return [FunctionModel(lambda r, i=i: f"h{i}: The answer is 1", name=f"h{i}", heavy=True, **options)
            for i in range(n)]


def test_a_model_announced_as_next_runs_last_in_its_wave_and_is_not_reloaded() -> None:
    def scenario(then: bool) -> list[str]:
        h0, _, _ = models = engines(3)
        executor = Executor()
        loads: list[str] = []
        executor.events.subscribe(lambda e: loads.append(e.model) if isinstance(e, ModelLoaded) else None)

        async def node() -> str:  # experts on h0 h1 h2, then an aggregation on h0
            ledger = RunLedger.create("r")
            calls = [(m, ask(m.name)) for m in models]
            await executor.call(ledger, calls, purpose="expert", then=[h0] if then else [])
            return await first_text(executor, ledger, h0, "aggregate")

        asyncio.run(executor.run_task(node()))
        assert [m.batches for m in models] == [[1, 1], [1], [1]]
        return loads

    assert scenario(then=False) == ["h0", "h1", "h2", "h0"]  # queue order: h0 is evicted before it is needed
    assert scenario(then=True) == ["h1", "h2", "h0"]  # h0 last: still resident for the aggregation


def test_work_queued_while_its_models_group_waits_in_the_wave_joins_that_group() -> None:
    h0, h1, h2 = models = engines(3)
    executor = Executor()
    loads: list[str] = []
    executor.events.subscribe(lambda e: loads.append(e.model) if isinstance(e, ModelLoaded) else None)

    async def early() -> str:  # answered by h1 alone, then wants h0 while the wave is still running
        ledger = RunLedger.create("early")
        await first_text(executor, ledger, h1, "first")
        return await first_text(executor, ledger, h0, "next")

    async def late() -> None:
        await executor.call(RunLedger.create("late"), [(m, ask(m.name)) for m in (h1, h0, h2)], purpose="expert")

    async def main() -> None:
        await asyncio.gather(executor.run_task(late()), executor.run_task(early()))

    asyncio.run(main())
    # queue order is h1 h0 h2; once h1 has answered "early", it queues work for h0, whose group has not
    # started: the work joins it (it went to the next wave, and h0 answered two batches of one)
    assert loads == ["h1", "h0", "h2"]
    assert [m.batches for m in models] == [[2], [2], [1]]


def test_work_queued_for_models_whose_groups_wait_in_the_wave_loads_none_of_them_twice() -> None:
    """One slot; run B asks h1 and h2, run A asks h0 and then h1 and h2: A's second calls came while h1's
    and h2's groups had not started, were kept for the next wave, and h1 loaded twice."""
    h0, h1, h2 = models = engines(3)
    executor = Executor(max_resident_models=1)
    loads: list[str] = []
    executor.events.subscribe(lambda e: loads.append(e.model) if isinstance(e, ModelLoaded) else None)

    async def a() -> None:
        ledger = RunLedger.create("a")
        await first_text(executor, ledger, h0, "a0")
        await executor.call(ledger, [(h1, ask("a1")), (h2, ask("a2"))], purpose="expert")

    async def b() -> None:
        await executor.call(RunLedger.create("b"), [(h1, ask("b1")), (h2, ask("b2"))], purpose="expert")

    async def main() -> None:
        await asyncio.gather(executor.run_task(a()), executor.run_task(b()))

    asyncio.run(main())
    assert sorted(loads) == ["h0", "h1", "h2"] and [m.batches for m in models] == [[1], [2], [2]]


def test_eviction_spares_the_resident_model_a_later_phase_needs() -> None:
    h0, h1, h2, h3 = engines(4)
    executor = Executor(max_resident_models=2)

    async def main() -> None:
        ledger = RunLedger.create("r")
        await first_text(executor, ledger, h0, "warm h0")
        await first_text(executor, ledger, h1, "warm h1")  # resident: h0 (least recently used), h1
        await executor.call(ledger, [(h2, ask("a")), (h3, ask("b"))], purpose="expert", then=[h0])
        await first_text(executor, ledger, h0, "aggregate")

    asyncio.run(executor.run_task(main()))
    assert h0.loads == 1 and h0.unloads == 0  # h1, then h2, made room; h0 stayed for the aggregation
    assert executor.stats.unloads == {"h1": 1, "h2": 1}


def test_a_cancelled_heavy_call_loads_nothing_and_gives_its_budget_back() -> None:
    gate = asyncio.Event()

    async def slow_engine(request: ChatRequest) -> str:
        await asyncio.wait_for(gate.wait(), GUARD_S)
        return "done"

    first = FunctionModel(slow_engine, name="first", heavy=True)
    second = FunctionModel(lambda r: "never", name="second", heavy=True)
    executor = Executor()
    ledger = RunLedger.create("r", Budget(max_calls=2, max_cost_usd=None, max_tokens=None))

    async def main() -> str:
        running = asyncio.ensure_future(executor.run_task(first_text(executor, RunLedger.create("other"), first, "x")))
        waiting = asyncio.ensure_future(executor.run_task(first_text(executor, ledger, second, "y")))
        while not first.batches:  # a yield, not a wait: until the wave is generating on "first"
            await asyncio.sleep(0)
        waiting.cancel()  # "second" is still queued in the wave
        with suppress(asyncio.CancelledError):
            await waiting
        gate.set()
        text = await running
        # the cancelled call's reservation is back: two more calls fit max_calls=2
        again = [await executor.run_task(first_text(executor, ledger, first, f"again {i}")) for i in range(2)]
        [refused] = await executor.run_task(executor.call(ledger, [(first, ask("over"))], purpose="expert"))
        assert isinstance(refused, BudgetExceeded)
        return text + " " + " ".join(again)

    assert asyncio.run(main()) == "done done done"
    assert second.loads == 0 and second.batches == []


def test_calls_whose_tasks_stopped_before_their_turn_are_never_sent(loopback) -> None:
    """A batch waits on its endpoint's limit: calls whose tasks stop meanwhile (a loop left early, a
    run cancelled) are dropped when their turn comes, not sent, and give their budget back."""
    first_in, release = threading.Event(), threading.Event()

    def answer(request: Any) -> str:
        if "call 0" in request.prompt:
            first_in.set()
            release.wait(GUARD_S)
        return "ok"

    server = loopback(chat_handler(answer))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", max_concurrency=1)
    executor = Executor()
    ledger = RunLedger.create("r", Budget(max_calls=3, max_cost_usd=None, max_tokens=None))

    async def main() -> list[str]:
        tasks = [asyncio.ensure_future(executor.run_task(first_text(executor, ledger, model, f"call {i}")))
                 for i in range(3)]
        assert await asyncio.to_thread(first_in.wait, GUARD_S)  # call 0 is at the server; 1 and 2 wait their turn
        for task in tasks[1:]:
            task.cancel()
        release.set()
        texts = [await tasks[0]]
        for task in tasks[1:]:
            with suppress(asyncio.CancelledError):
                await task
        # the two calls never sent hold no budget: two more fit max_calls=3
        texts += [await executor.run_task(first_text(executor, ledger, model, f"again {i}")) for i in range(2)]
        return texts

    assert asyncio.run(main()) == ["ok"] * 3
    assert [r.prompt for r in server.requests] == ["call 0", "again 0", "again 1"]  # (1 and 2 were sent as well)
    assert ledger.budget.calls == 3


def test_steady_remote_traffic_does_not_starve_a_heavy_wave() -> None:
    engine = FunctionModel(lambda r: "heavy", name="engine", heavy=True)
    remote = FunctionModel(lambda r: "light", name="remote")
    executor = Executor()
    heavy_done = asyncio.Event()
    rounds = 0

    async def chatter() -> None:  # a remote call waiting at every moment, until the heavy call is answered
        nonlocal rounds
        ledger = RunLedger.create("chatter")
        while not heavy_done.is_set() and rounds < 1000:
            rounds += 1
            await first_text(executor, ledger, remote, f"ping {rounds}")

    async def heavy_run() -> str:
        text = await first_text(executor, RunLedger.create("heavy"), engine, "think")
        heavy_done.set()
        return text

    async def main() -> list[Any]:
        return list(await asyncio.gather(executor.run_task(heavy_run()), executor.run_task(chatter())))

    assert asyncio.run(main())[0] == "heavy"
    assert rounds < 10  # the wave waited only for the remote call queued before it, not for later ones


def test_a_mixed_pool_sends_remote_calls_at_once_and_loads_each_engine_once() -> None:
    """Remote keyword model and judge, in-process experts. Keyword answers come one question at a
    time, each only after the previous question's expert calls were queued: an engine wave that
    started as soon as every task waited would load the engines once per question."""
    queued: list[asyncio.Event] = []  # queued[q]: question q may have its keywords

    def on_event(event: Event) -> None:
        if isinstance(event, CallsQueued) and event.purpose == "expert" and event.model == "h0":
            next(e for e in queued if not e.is_set()).set()

    async def remote_answer(request: ChatRequest) -> Any:
        if kind_of(request) != "keywords":
            return "judge: The answer is 1"
        question = int(re.search(r"question (\d+)", request.prompt_text()).group(1))  # type: ignore[union-attr]
        await asyncio.wait_for(queued[question].wait(), GUARD_S)
        return {"keywords": ["general"]}

    heavy = engines(3)
    remote = FunctionModel(remote_answer, name="remote")
    pool = Pool(agents=[*(Agent(name=m.name, model=m) for m in heavy), Agent(name="judge", model=remote)],
                planner=remote, aggregator="judge", settings=Settings(fast_path=False, plan_check=False))
    orc = Orchestra(pool, k=4, mode="topk", store=False, on_event=on_event)

    async def main() -> list[Any]:
        queued.extend(asyncio.Event() for _ in range(6))
        queued[0].set()
        return await orc.arun_many([f"question {i}" for i in range(5)], rare_filter=False)

    results = asyncio.run(main())
    assert all(r.status == "done" for r in results), [r.error for r in results]
    assert all(r.node("answer").aggregator == "judge" for r in results)
    assert sum(e.is_set() for e in queued) == 6  # every question's expert calls were queued
    assert dict(orc.executor.stats.loads) == {"h0": 1, "h1": 1, "h2": 1}
    assert [m.batches for m in heavy] == [[5], [5], [5]]  # one wave: every question's call to each engine
    assert len(remote.batches) > 3  # keywords, the judge's expert calls and aggregations went out as they came


def test_the_batching_workload_loads_each_heavy_model_exactly_once() -> None:
    """bench/batching.py's workload: the aggregator's model also serves expert calls."""
    path = Path(__file__).resolve().parents[1] / "bench" / "batching.py"
    spec = importlib.util.spec_from_file_location("bench_batching", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pool = bench.make_pool(16, {"load_s": 0.0, "per_request": 0.0, "per_batch": 0.0}, 0)
    orc = Orchestra(pool, k=3, mode="symbolic-moe", store=False, seed=0,
                    budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))
    results = orc.run_many([f"question {i}" for i in range(100)])
    assert all(r.status == "done" for r in results)
    aggregator = orc.stages.staffing.aggregator.model.name
    used = {pool[o.agent].model.name for r in results for o in r.node("answer").expert_outputs}
    assert aggregator in used  # the case that needs look-ahead
    assert dict(orc.executor.stats.loads) == {name: 1 for name in used}
