"""Calls, requests, tokens and budgets: what Orchestra reports must equal what the endpoints saw."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYWORDS_MARK, kind_of, scripted_pool
from loopback_llm import write_pool
from test_cli import cli

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.errors import BudgetExceeded
from orchestra.execute import Executor, RunLedger
from orchestra.matching import EmbeddingMatcher
from orchestra.models import ChatRequest, FunctionModel, OpenAICompatible
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, Reply, chat_handler, error_reply, openai_reply


class BilledServer:
    """A scripted endpoint that keeps its own books: requests seen and tokens billed, per kind."""

    def __init__(self, *, failing_model: str | None = None) -> None:
        self.failing_model = failing_model  # every expert request to it fails with HTTP 500
        self.seen: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.lock = threading.Lock()
        self.inner = chat_handler(self.answer)

    def answer(self, request: LoopbackRequest) -> str | Reply:
        payload = request.json() or {}
        kind = "keywords" if KEYWORDS_MARK in request.prompt else "expert"
        if "responses from several experts" in request.prompt:
            kind = "aggregate"
        with self.lock:
            self.seen[kind] += 1
            self.seen[payload.get("model", "?")] += 1
            count = self.seen[kind]
            schema_refused = self.seen["json_schema refused"]
            if payload.get("response_format", {}).get("type") == "json_schema" and not schema_refused:
                self.seen["json_schema refused"] += 1
                return error_reply(400, "response_format json_schema is not supported")
        if kind == "keywords":
            if count == 2:
                return error_reply(503, "overloaded")  # retried
            if count == 3:
                return "I would say chemistry, mostly."  # no JSON: repaired
            return json.dumps({"keywords": ["chemistry"]})
        if kind == "expert" and payload.get("model") == self.failing_model:
            return error_reply(500, "expert crashed")
        return "The answer is 7"

    async def __call__(self, request: LoopbackRequest) -> Reply:
        reply = await self.inner(request)
        usage = (reply.body or {}).get("usage") if isinstance(reply.body, dict) else None
        if usage:
            with self.lock:
                self.prompt_tokens += usage["prompt_tokens"]
                self.completion_tokens += usage["completion_tokens"]
        return reply


def _totals(data: dict[str, Any]) -> tuple[int, int, int, int, int]:
    return data["calls"], data["failed_calls"], data["requests"], data["prompt_tokens"], data["completion_tokens"]


def test_calls_and_requests_agree_with_what_the_endpoint_counted(loopback, tmp_path: Path) -> None:
    billed = BilledServer(failing_model="gamma")
    server = loopback(billed)
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "3", "--json")
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)["usage"]
    # 5 keyword samples + 3 experts + 1 aggregation; requests add a format fallback, a retry,
    # a repair and the failing expert's second attempt
    assert usage["calls"] == 9
    assert usage["requests"] == len(server.requests) == 9 + 4
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (billed.prompt_tokens, billed.completion_tokens)
    assert usage["failed_calls"] == 1

    run_id = json.loads(done.stdout)["run_id"]
    shown = json.loads(cli("show", run_id, "--json").stdout)
    assert _totals(shown["totals"]) == _totals(usage)
    stored_calls = shown["calls"]
    assert sum(c["requests"] for c in stored_calls) == len(server.requests)
    failed = [c for c in stored_calls if c["status"] == "error"]
    assert [c["requests"] for c in failed] == [2]  # the failing expert was tried twice (max_attempts: 2)
    listed = json.loads(cli("runs", "--json").stdout)[0]
    assert _totals(listed) == _totals(usage) and listed["run_id"] == listed["id"] == run_id
    text = cli("show", run_id).stdout  # the failed call as `ask` counts it (`show`, `runs` left it out)
    assert f"calls 9 (1 failed) · requests {len(server.requests)} ·" in text
    row = next(line for line in cli("runs").stdout.splitlines() if run_id in line)
    assert f" 9 (1 failed) │ {len(server.requests)} " in row, row


class TemplateServer:
    """An endpoint as llama-cpp-python's server bills: its chat template's tokens on top of each
    prompt's text, and no ``json_schema`` mode (the JSON instructions go into the prompt)."""

    TEMPLATE = 24

    def __init__(self, *, repairs: bool = False) -> None:
        self.repairs = repairs  # a keyword answer is not JSON until it is asked to repair it
        self.billed = 0
        self.lock = threading.Lock()
        self.inner = chat_handler(self.answer)

    def answer(self, request: LoopbackRequest) -> str | Reply:
        if (request.json() or {}).get("response_format", {}).get("type") == "json_schema":
            return error_reply(400, "response_format json_schema is not supported")
        if KEYWORDS_MARK in request.prompt:
            if self.repairs and "That answer is not valid" not in request.prompt:
                return "Chemistry, I would say."
            return json.dumps({"keywords": ["chemistry"]})
        return "The answer is 7, as the reasoning above shows in some detail."

    async def __call__(self, request: LoopbackRequest) -> Reply:
        reply = await self.inner(request)
        usage = (reply.body or {}).get("usage") if isinstance(reply.body, dict) else None
        if usage:
            usage["prompt_tokens"] += self.TEMPLATE
            with self.lock:
                self.billed += usage["prompt_tokens"] + usage["completion_tokens"]
        return reply


@pytest.mark.parametrize("repairs", [False, True])
@pytest.mark.parametrize("limit", [300, 600, 900, 1200, 1500, 2500, 5000])
def test_a_token_budget_is_not_overshot_by_a_server_that_adds_a_template(loopback, limit: int, repairs: bool) -> None:
    """A budget reserved each call's prompt at 4 characters a token of the request as written: the
    JSON instructions a server without json_schema gets, and its chat template's tokens, were
    billed beyond it (llama.cpp's server: 966 tokens under --max-tokens 700); and a structured
    answer's repair, a request with a longer prompt, was sent inside its call's reservation."""
    billed = TemplateServer(repairs=repairs)
    server = loopback(billed)
    models = [OpenAICompatible(model=name, base_url=server.url + "/v1", max_attempts=1) for name in "abc"]
    pool = Pool(agents=[Agent(name=f"agent-{m.model}", model=m, max_tokens=40) for m in models], planner=models[0])
    orc = Orchestra(pool, store=False, budget=Budget(max_tokens=limit, max_calls=None, max_cost_usd=None))
    result = orc.run("What is the pH of pure water?", plan=False)
    assert billed.billed <= limit, (billed.billed, result.status)
    assert result.usage.prompt_tokens + result.usage.completion_tokens == billed.billed
    if limit == 5000:  # room for every call and repair
        assert result.status == "done" and result.usage.requests == (14 if repairs else 9) + 1, result.error


class HeldExpert:
    """An Orchestra of two agents on one model (one agent is recruited without keyword calls) whose
    expert's request is held at a loopback server until released."""

    def __init__(self, loopback: Any, tmp_path: Path) -> None:
        self.at_server, self.release = threading.Event(), threading.Event()
        self.server = loopback(chat_handler(self.answer))
        model = OpenAICompatible(model="m", base_url=self.server.url + "/v1")
        self.orc = Orchestra(Pool(agents=[Agent(name="a", model=model), Agent(name="b", model=model)],
                                  planner=model), store=tmp_path / "runs.db", k=1)

    def answer(self, request: LoopbackRequest) -> str:
        if KEYWORDS_MARK in request.prompt:
            return '{"keywords": ["physics"]}'
        self.at_server.set()
        self.release.wait(10)
        return "About 300,000 km per second."

    async def cancelled_at_the_server(self, run_id: str, *, streamed: bool = False) -> str:
        """Start a run (``streamed``: the one task of ``arun_iter``) and cancel it once its expert's
        request is at the server; its id."""
        if streamed:
            iterator = self.orc.arun_iter(["How fast is light?"])
            run: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
        else:
            run = asyncio.ensure_future(self.orc.arun("How fast is light?", plan=False, run_id=run_id))
        assert await asyncio.to_thread(self.at_server.wait, 10)
        run.cancel()
        with suppress(asyncio.CancelledError):
            await run
        if streamed:
            await iterator.aclose()  # (stopping early stops the runs in flight)
        assert self.orc.store is not None
        return self.orc.store.runs()[0].id


def test_an_answer_that_comes_after_its_run_was_cancelled_is_counted_in_its_record(loopback, tmp_path: Path) -> None:
    """A run cancelled while its expert's request was at the server: the request is not cut off (the
    batch is the executor's), its answer comes later and is stored; the run's record counts it too."""
    held = HeldExpert(loopback, tmp_path)
    orc = held.orc

    async def main() -> tuple[int, int]:
        await held.cancelled_at_the_server("late-1")
        before = orc.ended("late-1")
        held.release.set()
        await asyncio.gather(*list(orc.executor._in_flight), return_exceptions=True)  # the late answer is in
        after = orc.ended("late-1")
        assert before is not None and after is not None and after.status == "cancelled"
        return before.usage.requests, after.usage.requests

    assert asyncio.run(main()) == (5, 6) and len(held.server.requests) == 6  # (it stayed 5: the keyword calls)
    totals = RunStore(tmp_path / "runs.db").run_totals("late-1")
    assert (totals["calls"], totals["requests"]) == (6, 6)


def test_a_cancelled_arun_tells_its_listeners_how_it_ended(loopback, tmp_path: Path) -> None:
    """The caller's cancel ended the run's future first, and RunDone was never emitted: a service
    tracking runs by their events never learned this one ended."""
    from orchestra.events import RunDone

    held = HeldExpert(loopback, tmp_path)
    done: list[RunDone] = []
    held.orc.events.subscribe(lambda event: done.append(event) if isinstance(event, RunDone) else None)
    asyncio.run(held.cancelled_at_the_server("told-1"))
    held.release.set()
    assert [(event.run_id, event.status) for event in done] == [("told-1", "cancelled")]


def test_orchestras_sharing_one_store_object_never_run_one_run_twice(loopback, tmp_path: Path) -> None:
    """The store's owner tag is per store object: a second Orchestra on the same object resumed a
    run the first was running, and the expert's request was sent twice."""
    from orchestra.errors import RunHeld

    held = HeldExpert(loopback, tmp_path)
    other = Orchestra(held.orc.pool, store=held.orc.store, k=1)

    async def main() -> Any:
        run = asyncio.ensure_future(held.orc.arun("How fast is light?", plan=False, run_id="shared-1"))
        assert await asyncio.to_thread(held.at_server.wait, 10)
        with pytest.raises(RunHeld, match="still running in this process, in another Orchestra on the same store"):
            await other.aresume("shared-1")
        held.release.set()
        return await run

    result = asyncio.run(main())
    assert result.status == "done" and result.usage.requests == len(held.server.requests) == 6


def test_closing_an_orchestra_under_a_run_leaves_it_to_finish_and_sends_nothing_again(loopback,
                                                                                      tmp_path: Path) -> None:
    """``aclose`` closed the connections under a run still going: its request in flight was cut,
    and the retry sent it again on a new connection (paid twice). Now the run is left to finish
    on its connection (another part of the program awaits it)."""
    held = HeldExpert(loopback, tmp_path)

    async def main() -> Any:
        run = asyncio.ensure_future(held.orc.arun("How fast is light?", plan=False, run_id="closed-1"))
        assert await asyncio.to_thread(held.at_server.wait, 10)
        await held.orc.aclose()
        held.release.set()
        result = await run
        await held.orc.aclose()  # (with nothing going, it closes)
        return result

    result = asyncio.run(main())
    assert result.status == "done" and result.usage.requests == len(held.server.requests) == 6


@pytest.mark.parametrize("streamed", [False, True])
def test_a_run_resumed_while_its_cancelled_request_is_in_flight_waits_for_that_answer(loopback, tmp_path: Path,
                                                                                      streamed: bool) -> None:
    """Resumed at once in the same Orchestra, a cancelled run (an ``arun``, or one of ``arun_iter``
    stopped early) sent its in-flight expert call again (paid twice, and counted once); the resume
    now waits for that request's answer and replays it."""
    from orchestra.events import CallsQueued

    held = HeldExpert(loopback, tmp_path)
    orc, server = held.orc, held.server
    queued: list[CallsQueued] = []
    orc.events.subscribe(lambda event: queued.append(event) if isinstance(event, CallsQueued) else None)

    async def main() -> tuple[int, Any]:
        run_id = await held.cancelled_at_the_server("late-2", streamed=streamed)
        queued.clear()
        resumed = asyncio.ensure_future(orc.aresume(run_id))
        while not any(event.purpose == "expert" for event in queued):  # the resume has asked for the expert
            await asyncio.sleep(0)
        await orc.executor._until_settled()  # ... and waits: for the request in flight, not a new one
        sent = len(server.requests)
        held.release.set()
        return sent, await resumed

    sent, result = asyncio.run(main())
    assert sent == 6 and len(server.requests) == 6  # 5 keyword samples and one expert request, each sent once
    assert result.status == "done" and result.answer == "About 300,000 km per second."
    # (a data set's run keeps the experts its chunk recruited: only the expert's call is replayed)
    assert result.usage.requests == 6 and result.usage.replayed_calls == (1 if streamed else 6)
    totals = RunStore(tmp_path / "runs.db").run_totals(result.run_id)
    assert (totals["calls"], totals["requests"]) == (6, 6)
    assert result.usage.calls == 6  # (the call it waited for is one of its calls, as its record says)


def test_a_failed_run_still_shows_its_calls_and_requests(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: error_reply(500, "down")
                                   if KEYWORDS_MARK not in request.prompt else json.dumps({"keywords": ["x"]})))
    pool = write_pool(tmp_path, server.url, models=("alpha",), agents=("second",))
    done = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1", "--json")
    assert done.returncode == 1
    usage = json.loads(done.stdout)["usage"]
    assert usage["calls"] == 6 and usage["requests"] == len(server.requests) == 5 + 2
    listed = json.loads(cli("runs", "--json").stdout)[0]
    assert listed["status"] == "failed" and _totals(listed) == _totals(usage)


def test_eval_reports_the_requests_the_endpoint_received(loopback, tmp_path: Path) -> None:
    billed = BilledServer()
    server = loopback(billed)
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} + 7 - {i}?", "answer": "7"}) + "\n"
                            for i in range(3)))
    done = cli("eval", "--data", str(data), "--pool", str(pool), "--method", "symbolic-moe", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == len(server.requests)
    assert report["requests"] > report["calls"]  # the fallback, the retry and the repair are requests, not calls
    assert (report["prompt_tokens"], report["completion_tokens"]) == (billed.prompt_tokens, billed.completion_tokens)


def test_a_failed_repair_is_billed_and_stored(tmp_path: Path) -> None:
    def answer(request: ChatRequest) -> Any:
        return "never JSON" if request.wants_json else "The answer is 1"

    model = FunctionModel(answer, name="m")
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model)]), store=store, plan=False)
    result = orc.run("What is 1?")
    keyword_rows = [c for c in store.calls(result.run_id) if c["purpose"] == "keywords"]
    assert keyword_rows and all(c["status"] == "error" and c["requests"] == 2 for c in keyword_rows)
    assert all(c["prompt_tokens"] > 0 for c in keyword_rows)  # both attempts were billed
    assert result.usage.requests == len(model.requests) == store.run_totals(result.run_id)["requests"]
    assert result.usage.prompt_tokens == store.run_totals(result.run_id)["prompt_tokens"]


def test_embedding_requests_are_counted_and_each_text_is_fetched_once(loopback, tmp_path: Path) -> None:
    topics = ["algebra", "geometry", "history", "chemistry", "physics", "biology"]

    def embeddings(request: LoopbackRequest) -> Reply:
        inputs = request.json()["input"]
        vectors = [[float(text == topic) for topic in topics] + [0.1] for text in inputs]
        return Reply(body={"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)],
                           "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    server = loopback(embeddings)
    pool, models = scripted_pool(3, keywords=None)
    for agent, skills in zip(pool.agents, (topics[:2], topics[2:4], topics[4:])):
        agent.skills = tuple(skills)
    keyword_of = {f"Task about {t}": t for t in topics}
    models["planner"].fn = lambda request: {"keywords": [next(t for q, t in keyword_of.items()
                                                              if q in request.prompt_text())]}
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(pool, store=store, matcher=EmbeddingMatcher(model="mini", base_url=server.url + "/v1"))
    results = orc.run_many(list(keyword_of), k=1)
    texts = [text for request in server.requests for text in request.json()["input"]]
    assert len(texts) == len(set(texts))  # concurrent recruitments never fetch a text twice
    generations = sum(len(m.requests) for m in models.values())
    assert sum(r.usage.requests for r in results) == generations + len(server.requests)
    assert sum(r.usage.prompt_tokens for r in results) >= len(texts)
    stored = sum(store.run_totals(r.run_id)["requests"] for r in results)
    assert stored == generations + len(server.requests)
    assert [r.plan.nodes[0].experts for r in results] == [["agent0"], ["agent0"], ["agent1"], ["agent1"],
                                                         ["agent2"], ["agent2"]]


# --- budgets ------------------------------------------------------------------------------------


class FlakyStore(RunStore):
    """A real store whose replay fails for the first call it is asked about (a damaged page, say)."""

    failures = 1

    def replay(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise OSError("disk I/O error")
        return super().replay(*args, **kwargs)


def test_a_journal_failure_never_frees_budget_that_was_not_reserved(tmp_path: Path) -> None:
    model = FunctionModel(lambda request: "ok", name="m")
    ledger = RunLedger.create("r1", Budget(max_calls=2, max_cost_usd=None, max_tokens=None),
                              journal=FlakyStore(tmp_path / "runs.db"))
    executor = Executor()

    async def main() -> list[Any]:
        request = ChatRequest.user("hi")
        first = await executor.run_task(executor.call(ledger, [(model, request)] * 3, purpose="expert"))
        later = await executor.run_task(executor.call(ledger, [(model, request)], purpose="expert"))
        return first + later

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[0], OSError)
    # the failed call is a call of the run (with no request), as its record counts it: one more is
    # admitted, and the budget holds nothing it did not reserve (freed, it let a fifth call through)
    assert [type(o).__name__ for o in outcomes[1:]] == ["ChatResult", "BudgetExceeded", "BudgetExceeded"]
    assert len(model.requests) == 1 and ledger.budget.calls == 2 and ledger.failed_calls == 1
    assert ledger.budget._reserved_calls == 0


@pytest.mark.parametrize("limit", [700, 560])
def test_a_repair_is_reserved_beside_what_its_call_has_cost(loopback, limit: int) -> None:
    """A repair was admitted beside its call's whole worst case (440 tokens, though its first request
    had cost 46): under 700 it was refused and the run stopped with most of its budget left. It is
    a request of the call, not another call (max_calls=1), and the budget holds nothing after."""
    def handle(request: LoopbackRequest) -> Reply:
        if "not valid" in request.prompt:  # the repair
            return openai_reply('{"fact": "Light is fast."}', prompt_tokens=60)
        return openai_reply("Light is fast, I would say.", prompt_tokens=40)

    server = loopback(handle)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None)
    ledger = RunLedger.create("r1", Budget(max_calls=1, max_tokens=limit, max_cost_usd=None))
    executor = Executor()
    schema = {"type": "object", "properties": {"fact": {"type": "string"}}, "required": ["fact"]}
    request = ChatRequest.user("Give one fact about light.", output=schema, max_tokens=400)
    [outcome] = asyncio.run(executor.run_task(executor.call(ledger, [(model, request)], purpose="expert")))
    budget = ledger.budget
    if limit == 700:  # 46 spent + the repair's 554 at worst fit
        assert not isinstance(outcome, Exception) and outcome.parsed == {"fact": "Light is fast."}
        assert len(server.requests) == 2 and budget.calls == 1 and budget.requests == 2
    else:  # the repair has no room: the call stops there, its first request counted
        assert isinstance(outcome, BudgetExceeded) and not outcome.hopeless and len(server.requests) == 1
        assert "46 held for 1 call in flight, its invalid JSON's repair may take 554" in str(outcome)
        assert budget.prompt_tokens + budget.completion_tokens == 46
    assert (budget._reserved_calls, budget._reserved_tokens) == (0, 0)


def test_a_repair_is_reserved_at_the_models_own_answer_limit(loopback) -> None:
    """A repair of a request that sets no max_tokens was reserved at 1,024 answer tokens though the
    model answers up to its own limit (``extra_body`` max_tokens 4,000): the room it did not hold let
    other calls in, and a 6,000-token budget was overshot by a third."""
    def handle(request: LoopbackRequest) -> Reply:
        if "not valid" in request.prompt:  # the repair
            return openai_reply('{"fact": "Light is fast."}', prompt_tokens=60)
        return openai_reply("Light is fast, I would say.", prompt_tokens=40)

    server = loopback(handle)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None, extra_body={"max_tokens": 4000})
    ledger = RunLedger.create("r1", Budget(max_calls=None, max_tokens=4100, max_cost_usd=None))
    executor = Executor()
    schema = {"type": "object", "properties": {"fact": {"type": "string"}}, "required": ["fact"]}
    request = ChatRequest.user("Give one fact about light.", output=schema)  # (40 + 4,000 at worst: admitted)
    [outcome] = asyncio.run(executor.run_task(executor.call(ledger, [(model, request)], purpose="expert")))
    # 46 spent + the repair's 154 of prompt and 4,000 of answer at worst: no room (at 1,024 it was sent)
    assert isinstance(outcome, BudgetExceeded) and len(server.requests) == 1
    assert "its invalid JSON's repair may take 4154" in str(outcome)
    assert (ledger.budget._reserved_calls, ledger.budget._reserved_tokens) == (0, 0)


def cancel_on_first_request(ledger: RunLedger, executor: Executor, model: Any, request: ChatRequest,
                            target: dict[str, Any]) -> None:
    """Run one call as its own task, which the model's first request cancels (``target["cancel"]``,
    from the loop's thread, ``target["cancel_threadsafe"]`` from another; ``target["stopped"]`` is set
    once the call's task has stopped), and wait until the call's batch has ended."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        target["stopped"] = asyncio.Event()
        task = asyncio.ensure_future(executor.run_task(executor.call(ledger, [(model, request)], purpose="expert")))
        target["cancel"] = task.cancel
        target["cancel_threadsafe"] = lambda: loop.call_soon_threadsafe(task.cancel)
        with suppress(asyncio.CancelledError):
            await task
        target["stopped"].set()
        await asyncio.gather(*executor.in_flight_for(ledger.run_id), return_exceptions=True)

    asyncio.run(main())


def test_a_cancelled_calls_retry_is_not_sent(loopback) -> None:
    """A call whose run was cancelled while its request waited to go out again (a retry, or a free
    slot of its endpoint) was sent all the same: paid for nothing. Its first attempt still counts."""
    target: dict[str, Any] = {}

    def handle(request: LoopbackRequest) -> Reply:
        target["cancel_threadsafe"]()  # (queued on the client's loop before this answer is written)
        return error_reply(500, "busy", retry_after="0")

    server = loopback(handle)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None)
    ledger = RunLedger.create("r1", Budget(max_calls=None, max_tokens=None, max_cost_usd=None))
    cancel_on_first_request(ledger, Executor(), model, ChatRequest.user("hi"), target)
    assert len(server.requests) == 1
    assert (ledger.budget.calls, ledger.budget.requests, ledger.failed_calls) == (1, 1, 1)
    assert (ledger.budget._reserved_calls, ledger.budget._reserved_tokens) == (0, 0)


def test_a_cancelled_calls_repair_is_not_sent() -> None:
    """A structured call whose run was cancelled while its first answer came had its repair sent
    (every structured call in flight at a Ctrl-C, once more); its first request still counts."""
    target: dict[str, Any] = {}

    async def answer(request: ChatRequest) -> str:
        target["cancel"]()
        await target["stopped"].wait()  # (the answer comes once its call's task has stopped)
        return "Light is fast, I would say."  # (no JSON: a repair would follow)

    model = FunctionModel(answer, name="m")
    ledger = RunLedger.create("r1", Budget(max_calls=None, max_tokens=None, max_cost_usd=None))
    schema = {"type": "object", "properties": {"fact": {"type": "string"}}, "required": ["fact"]}
    cancel_on_first_request(ledger, Executor(), model, ChatRequest.user("A fact?", output=schema), target)
    assert len(model.requests) == 1
    assert (ledger.budget.calls, ledger.budget.requests, ledger.failed_calls) == (1, 1, 1)


def test_a_failed_call_counts_against_the_budget(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: error_reply(500, "down")))
    pool = write_pool(tmp_path, server.url, models=("alpha",), agents=("second",))
    done = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--k", "1", "--max-calls", "3", "--json")
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["usage"]["calls"] == 3
    assert len(server.requests) == 3 * 2  # three calls made, each tried twice, then the budget stopped the run


def test_a_workflow_budget_holds_over_a_whole_data_set(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: json.dumps({"keywords": ["arithmetic"]})
                                   if KEYWORDS_MARK in request.prompt else "The answer is 7"))
    write_pool(tmp_path, server.url)
    (tmp_path / "qa.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": f"What is {i} + 7 - {i}?", "answer": "7"}) + "\n" for i in range(8)))
    (tmp_path / "flow.yaml").write_text(
        "pool: pool.yaml\ninputs:\n  question: {type: string}\nbudget: {max_calls: 20}\n"
        "steps:\n  - id: answer\n    prompt: '{{ inputs.question }}'\n    recruit: {k: 3, skills: [arithmetic]}\n"
        "dataset: {path: qa.jsonl}\n")
    done = cli("run", str(tmp_path / "flow.yaml"), "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["calls"] == len(server.requests) <= 20
    assert report["failed"] > 0
    [line] = done.stderr.strip().splitlines()  # one line, with the command-line advice
    assert "raise budget.max_calls in the workflow (or --max-calls)" in line and "run it again with --resume" in line
    table = cli("run", str(tmp_path / "flow.yaml"), env={"COLUMNS": "200"})  # the table says how many finished
    accuracy = next(row for row in table.stdout.splitlines() if "accuracy" in row)
    finished = 8 - json.loads(cli("run", str(tmp_path / "flow.yaml"), "--json").stdout)["failed"]
    assert f"({finished} of 8 finished; the rest count as wrong)" in accuracy, table.stdout


def test_a_data_set_workflow_whose_items_fail_says_so_and_exits_with_the_first_ones_code(tmp_path: Path) -> None:
    write_pool(tmp_path, "http://127.0.0.1:9")  # nothing listens there
    (tmp_path / "qa.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 7 - {i}?", "answer": "7"}) + "\n" for i in range(2)))
    (tmp_path / "flow.yaml").write_text(
        "pool: pool.yaml\ninputs:\n  question: {type: string}\n"
        "steps:\n  - id: answer\n    prompt: '{{ inputs.question }}'\n    recruit: {k: 1, skills: [arithmetic]}\n"
        "dataset: {path: qa.jsonl}\n")
    done = cli("run", str(tmp_path / "flow.yaml"), "--json", timeout=120)
    assert done.returncode == 2, done.stderr  # it exited 0, the report alone saying "unfinished runs 2"
    assert json.loads(done.stdout)["failed"] == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: 2 of 2 run(s) did not finish; first: item q0 (failed): cannot reach http://127.0.0.1:9")
    assert line.endswith("; once that is fixed, the same command with --resume finishes the unfinished items, the "
                         "calls answered before reused")  # (it named the error alone)
    kept = cli("run", str(tmp_path / "flow.yaml"), "--no-store", timeout=120)
    assert kept.returncode == 2 and "--resume" not in kept.stderr, kept.stderr  # (nothing was kept to go on with)


def test_a_data_set_workflow_recruits_per_item_and_reports_every_answer(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: "The answer is 7"))
    write_pool(tmp_path, server.url)
    (tmp_path / "qa.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 7 - {i}?", "answer": "7" if i % 2 else "8",
                    "category": "odd" if i % 2 else "even"}) + "\n" for i in range(8)))
    (tmp_path / "flow.yaml").write_text(
        "pool: pool.yaml\ninputs:\n  question: {type: string}\n"
        "steps:\n  - id: answer\n    prompt: '{{ inputs.question }}'\n    recruit: {k: 1, mode: random}\n"
        "dataset: {path: qa.jsonl}\n")
    done = cli("run", str(tmp_path / "flow.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["per_category"] == {"even": {"items": 4, "accuracy": 0.0}, "odd": {"items": 4, "accuracy": 1.0}}
    assert [(a["id"], a["correct"]) for a in report["answers"]] == [(f"q{i}", bool(i % 2)) for i in range(8)]
    experts = {model for r in server.requests for model in [r.json()["model"]]}
    assert len(experts) > 1  # each item has its own recruiting seed
    listed = json.loads(cli("runs", "--json").stdout)
    assert sorted(row["item"] for row in listed) == [f"q{i}" for i in range(8)]
    table = cli("runs").stdout
    assert "item q0" in table and "item q7" in table

    # items without a category are listed apart, not as "all" (which read as every item, and took in a
    # category really named "all")
    with (tmp_path / "qa.jsonl").open("a") as data:
        data.write(json.dumps({"id": "q8", "question": "What is 7?", "answer": "7"}) + "\n")
        data.write(json.dumps({"id": "q9", "question": "What is 7?", "answer": "7", "category": "all"}) + "\n")
    more = json.loads(cli("run", str(tmp_path / "flow.yaml"), "--json").stdout)
    assert more["per_category"]["uncategorized"] == {"items": 1, "accuracy": 1.0}
    assert more["per_category"]["all"] == {"items": 1, "accuracy": 1.0} and more["items"] == 10


def test_a_run_resumed_on_another_endpoint_counts_what_both_endpoints_received(loopback, tmp_path: Path) -> None:
    """Calls recorded before the pool's endpoint moved are not asked again (their requests differ),
    but they were paid for: the resumed run's usage, its record and the servers agree."""
    first, second = loopback(BilledServer()), loopback(BilledServer())
    pool = write_pool(tmp_path, first.url)
    stopped = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "3",
                  "--max-calls", "7", "--json")
    assert stopped.returncode == 3, stopped.stderr
    run_id = json.loads(stopped.stdout)["run_id"]
    write_pool(tmp_path, second.url)  # the same pool, its endpoint moved
    resumed = cli("resume", run_id, "--max-calls", "50", "--json")
    assert resumed.returncode == 0, resumed.stderr
    usage = json.loads(resumed.stdout)["usage"]
    assert len(second.requests) > 0 and usage["requests"] == len(first.requests) + len(second.requests)
    shown = json.loads(cli("show", run_id, "--json").stdout)
    assert _totals(shown["totals"]) == _totals(usage)


def test_a_resumed_runs_failed_calls_are_the_whole_runs(loopback, tmp_path: Path) -> None:
    """A call that failed before the resume and is not asked again (its endpoint moved) is paid for and
    recorded, but once the resume has finished the run it is no longer the run's: superseded, not a failed
    call, in the result, runs and show alike (they said 1 where the result said 0; then a finished run
    kept a failure its answer never lacked, and `--retry-failed` ran it again for ever)."""
    first, second = loopback(BilledServer(failing_model="gamma")), loopback(BilledServer())
    pool = write_pool(tmp_path, first.url)
    stopped = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "3",
                  "--max-calls", "7", "--json")
    assert stopped.returncode == 3 and json.loads(stopped.stdout)["usage"]["failed_calls"] == 1, stopped.stderr
    run_id = json.loads(stopped.stdout)["run_id"]
    write_pool(tmp_path, second.url)
    resumed = cli("resume", run_id, "--max-calls", "50", "--json")
    assert resumed.returncode == 0, resumed.stderr
    usage = json.loads(resumed.stdout)["usage"]
    shown = json.loads(cli("show", run_id, "--json").stdout)
    assert _totals(shown["totals"]) == _totals(usage)
    assert usage["failed_calls"] == shown["totals"]["failed_calls"] == 0 and usage["failed_by_model"] == {}
    [superseded] = [call for call in shown["calls"] if call["status"] == "superseded"]
    assert superseded["model"] == "gamma" and "HTTP 500" in superseded["error"]
    assert usage["requests"] == len(first.requests) + len(second.requests)  # (its request still counted)


def test_show_never_cuts_a_calls_cost_on_a_narrow_terminal(tmp_path: Path) -> None:
    """At 80 columns the call's title was cut inside its cost (``$0.0000`` for $0.000068): a paid
    call read as free. The accounting opens the call's body now, which wraps."""
    from rich.console import Console

    from orchestra import Agent, Orchestra, Pool
    from orchestra.inspect import show_run
    from orchestra.models import FunctionModel
    from orchestra.store import RunStore

    model = FunctionModel(lambda request: "The answer is 4", name="a-model-with-a-rather-long-name",
                          prices=(0.15, 0.6))  # dollars per million tokens
    pool = Pool(agents=[Agent(name="solo-agent-with-a-long-name", model=model)])
    result = Orchestra(pool, k=1, plan=False, mode="global", aggregate="none",
                       store=tmp_path / "runs.db").run("What is 2 + 2?")
    cost = result.usage.cost_usd
    assert 0 < cost < 0.0001
    console = Console(record=True, width=80)
    show_run(console, RunStore(tmp_path / "runs.db"), result.run_id)
    shown = console.export_text()
    assert f"tokens · ${cost:.10f}".rstrip("0") in shown


def test_a_runs_cost_reads_alike_however_its_calls_costs_were_summed(tmp_path: Path) -> None:
    # (found by a trial: `ask --json` said 0.000795 and `show --json` 0.0007950000000000001, SQLite
    # summing the same costs in another order)
    models = [FunctionModel(lambda request, i=i: f"expert {i}: The answer is {'7' * (i + 1)}", name=f"m{i}",
                            prices=(0.1 * (i + 1), 0.37)) for i in range(3)]
    pool = Pool(agents=[Agent(name=f"a{i}", model=m) for i, m in enumerate(models)])
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(pool, store=store, k=3, mode="topk")
    results = [orc.run(f"What is {q} times {q}? " + "x" * q, plan=False) for q in range(12)]
    assert all(r.usage.cost_usd > 0 for r in results)
    assert [r.usage.cost_usd for r in results] == [store.run_totals(r.run_id)["cost_usd"] for r in results]
    assert [r.usage.cost_usd for r in results] == [round(r.usage.cost_usd, 12) for r in results]


def test_runs_lists_its_costs_to_the_same_decimals(tmp_path: Path) -> None:
    """`orchestra runs` showed `$0.0001` beside `$0.000065` (a trial): amounts of one column read as
    rounded differently; they are written to the decimals the most precise one needs."""
    store = RunStore(tmp_path / "runs.db")
    for price in (3.0, 1.5):  # (the runs cost about 0.00013 and 0.000065 dollars)
        model = FunctionModel(lambda request: "The answer is 7.", name="m", prices=(price, 0.0))
        Orchestra(Pool(agents=[Agent(name="a", model=model)]), store=store, k=1).run("What is 3 + 4?", plan=False)
    listed = json.loads(cli("runs", "--store", str(tmp_path / "runs.db"), "--json").stdout)
    costs = sorted(run["cost_usd"] for run in listed)
    assert costs[0] < 0.0001 <= costs[1], costs  # (where `usd` writes 6 and 4 decimals)
    shown = cli("runs", "--store", str(tmp_path / "runs.db"), env={"COLUMNS": "200"}).stdout
    written = [cell for cell in shown.split() if cell.startswith("$")]
    assert sorted(float(cell[1:]) for cell in written) == pytest.approx(costs), shown
    assert len({len(cell.partition(".")[2]) for cell in written}) == 1, written


def test_ask_show_and_runs_print_one_cost_for_a_run(loopback, tmp_path: Path) -> None:
    # (ask --json rounded to 8 places, show --json's totals were SQLite's sum, its calls each a
    # product of floats: 6.971e-05, 6.97125e-05, 4.6124999999999995e-06)
    def answer(request: LoopbackRequest) -> str:
        return json.dumps({"keywords": ["chemistry"]}) if KEYWORDS_MARK in request.prompt else "The answer is 7."

    server = loopback(chat_handler(answer))
    pool = write_pool(tmp_path, server.url)
    pool.write_text(pool.read_text().replace("    timeout: 10", "    timeout: 10\n    prices: [0.0123457, 0.3]"))
    done = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "3", "--json")
    assert done.returncode == 0, done.stderr
    asked = json.loads(done.stdout)
    shown = json.loads(cli("show", asked["run_id"], "--json").stdout)
    [listed] = json.loads(cli("runs", "--json").stdout)
    cost = asked["usage"]["cost_usd"]
    assert cost > 0 and cost == shown["totals"]["cost_usd"] == shown["result"]["usage"]["cost_usd"] == listed["cost_usd"]
    assert all(call["cost_usd"] == round(call["cost_usd"], 12) for call in shown["calls"])
    assert abs(sum(call["cost_usd"] for call in shown["calls"]) - cost) < 1e-11  # (each to the 10^-12 dollar)


class LongAnswerServer:
    """An endpoint whose experts write at length (about 2,400 tokens), cut at a request's ``max_tokens``
    as a real server cuts them; it keeps its own books of tokens billed and limits asked for."""

    def __init__(self) -> None:
        self.billed = 0
        self.limits: list[int | None] = []
        self.lock = threading.Lock()
        self.inner = chat_handler(self.answer)

    def answer(self, request: LoopbackRequest) -> str:
        with self.lock:
            self.limits.append((request.json() or {}).get("max_tokens"))
        if KEYWORDS_MARK in request.prompt:
            return json.dumps({"keywords": ["chemistry"]})
        return "The answer is 42. " + "word " * 2400

    async def __call__(self, request: LoopbackRequest) -> Reply:
        reply = await self.inner(request)
        usage = (reply.body or {}).get("usage") if isinstance(reply.body, dict) else None
        if usage:
            with self.lock:
                self.billed += usage["prompt_tokens"] + usage["completion_tokens"]
        return reply


@pytest.mark.parametrize("limit", [{"max_tokens": 5000}, {"max_cost_usd": 0.005}])
def test_a_limit_of_the_users_bounds_answers_that_set_no_max_tokens(loopback, tmp_path: Path,
                                                                     limit: dict[str, float]) -> None:
    """Expert requests without ``max_tokens``: under a token or cost limit the user set, each is sent
    the answer it was reserved for, so the limit holds (9,102 tokens under 5,000, the run `done`);
    under the default budget they are sent none (a long answer is not cut for a limit nobody set)."""
    billed = LongAnswerServer()
    server = loopback(billed)
    pool = write_pool(tmp_path, server.url)
    pool.write_text(pool.read_text().replace("    timeout: 10", "    timeout: 10\n    prices: [1, 1]"))  # $1 a million
    orc = Orchestra(pool, store=False, plan=False, k=3, aggregate="vote", mode="global")
    result = orc.run("What is 6*7?", budget=Budget(**limit))
    assert billed.billed == result.usage.prompt_tokens + result.usage.completion_tokens
    if "max_tokens" in limit:
        assert billed.billed <= limit["max_tokens"]
    else:
        assert result.usage.cost_usd <= limit["max_cost_usd"]
    experts = [n for n in billed.limits if n != 64]  # (keyword samples ask for 64)
    assert experts and experts == [1024] * len(experts)
    billed.limits.clear()
    orc.run("What is 6*7?")
    assert [n for n in billed.limits if n != 64] == [None] * 3


def test_a_limit_set_to_the_default_value_is_the_users_limit_all_the_same(loopback, tmp_path: Path) -> None:
    """`--max-cost 1` (the default's value) was taken for no limit: expert requests went without max_tokens, a
    server writing long answers billed $2.40 against the $1, and `--max-cost 0.99` held. A limit set anywhere,
    whatever its value, caps answers; `budget.cap_answers=false` lets them run long under it."""
    billed = LongAnswerServer()
    server = loopback(billed)
    pool = write_pool(tmp_path, server.url)
    question = ("ask", "What is 6*7?", "--pool", str(pool), "--no-plan", "--no-store", "--k", "2", "--set",
                "aggregate=vote", "--set", "mode=global")
    for limit in (("--max-cost", "1"), ("--max-tokens", "1000000"), ("--set", "budget.max_cost_usd=1.0")):
        billed.limits.clear()
        assert cli(*question, *limit).returncode == 0
        assert [n for n in billed.limits if n != 64] == [1024, 1024], limit  # (keyword samples ask for 64)
    for free in ((), ("--max-cost", "1", "--set", "budget.cap_answers=false")):
        billed.limits.clear()
        assert cli(*question, *free).returncode == 0
        assert [n for n in billed.limits if n != 64] == [None, None], free


def test_a_budget_recorded_before_answers_were_capped_by_choice_resumes_as_its_run_ran() -> None:
    """A run recorded before `cap_answers` was resumes capping answers as it did then: where a token or cost
    limit other than the default values was in force (its record holds every limit, set or not)."""
    from orchestra.settings import RunSpec

    def resumed(budget: dict[str, Any]) -> Budget:
        return RunSpec.from_record({"spec": {"task": "t", "settings": {"budget": budget}}}, "t").settings.budget

    defaults = {"max_calls": 500, "max_cost_usd": 1.0, "max_tokens": 1_000_000}
    assert resumed(defaults).cap_answers is False
    assert resumed({**defaults, "max_cost_usd": 2.0}).cap_answers is True
    assert resumed({**defaults, "max_tokens": None, "max_cost_usd": None}).cap_answers is False
    assert resumed({**defaults, "cap_answers": True}).cap_answers is True  # recorded since: kept as it is
    assert Budget(max_calls=50).cap_answers is False and Budget(max_tokens=None, max_cost_usd=1.0).cap_answers is True


def test_an_agents_own_answer_limit_is_kept_under_a_users_budget_and_capped_answers_are_not_cached(
        loopback, tmp_path: Path) -> None:
    """An endpoint's ``extra_body`` max_tokens is its answer limit: a user's budget reserves it and
    sends it (it was replaced by 1,024); an answer cut at the budget's 1,024 is not cached for runs
    without that limit (the cache served the cut answer to them)."""
    billed = LongAnswerServer()
    server = loopback(billed)
    pool = write_pool(tmp_path, server.url)
    own = pool.read_text().replace("    timeout: 10", "    timeout: 10\n    extra_body: {max_tokens: 2000}")
    owned = tmp_path / "owned.yaml"
    owned.write_text(own)
    Orchestra(owned, store=False, plan=False, k=1, mode="global").run("What is 6*7?", budget=Budget(max_tokens=200_000))
    assert [n for n in billed.limits if n != 64] == [2000]
    billed.limits.clear()
    store = tmp_path / "runs.db"
    orc = Orchestra(pool, store=store, plan=False, k=1, mode="global", cache=True)
    capped = orc.run("What is 6*7?", budget=Budget(max_tokens=200_000))
    assert [n for n in billed.limits if n != 64] == [1024]
    billed.limits.clear()
    whole = orc.run("What is 6*7?")
    assert [n for n in billed.limits if n != 64] == [None]  # sent, not served the cut answer from the cache
    assert len(whole.answer) > len(capped.answer)


def test_failed_billed_attempts_of_a_call_the_cache_answers_on_resume_stay_in_the_stored_totals(
        tmp_path: Path) -> None:
    """A call that failed (billed) and was answered from the response cache on resume was relabelled
    a cache answer: `show` and `runs` dropped what its failed attempts had cost, the result did not."""
    from orchestra.settings import Settings

    good = [False]

    def reply(request: ChatRequest) -> object:
        if kind_of(request) == "keywords":
            return {"keywords": ["arithmetic"]} if good[0] else "no JSON here"  # (billed, then refused)
        if not good[0]:
            raise RuntimeError("expert endpoint down")
        return "The answer is 4"

    store = RunStore(tmp_path / "runs.db")
    model = FunctionModel(reply, name="m", prices=(1.0, 2.0))
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model), Agent(name="duo", model=model)],
                         settings=Settings(fast_path=False)), k=1, store=store, cache=True)
    first = orc.run("What is 2 + 2?", plan=False)
    before = store.run_totals(first.run_id)
    assert first.status != "done" and before["requests"] == first.usage.requests > 0
    good[0] = True
    orc.run("What is 2 + 2?", plan=False)  # another run of the task fills the cache
    resumed = orc.resume(first.run_id)
    assert resumed.status == "done" and resumed.usage.cache_hits > 0
    after = store.run_totals(first.run_id)
    assert (after["calls"], after["requests"], after["prompt_tokens"], after["completion_tokens"]) == (
        resumed.usage.calls, resumed.usage.requests, resumed.usage.prompt_tokens, resumed.usage.completion_tokens)
    assert after["requests"] == before["requests"] and after["cost_usd"] == before["cost_usd"] > 0
    # the calls that failed (sent, billed) count as the first attempt counted them, though the cache answered
    # them on resume (the resumed run counted none: fewer calls than its first attempt had made)
    assert after["calls"] == before["calls"] == first.usage.calls > 0
    earlier = RunStore(tmp_path / "runs.db").earlier_usage([first.run_id])[first.run_id]
    assert earlier.calls == after["calls"] and not earlier.failed  # (none failed now: a resume counts them once)


@pytest.mark.parametrize("budget, status", [(Budget(max_calls=1), "done"), (Budget(max_tokens=1), "budget_exceeded")])
def test_a_call_that_failed_before_a_resume_counts_once_whether_it_is_sent_again_or_not(
        tmp_path: Path, budget: Budget, status: str) -> None:
    """A failed call counts in the stored totals; a resume that did not send it again (a budget stopped
    it) counted none; one that did counts it once (sent again, it takes no call of ``max_calls`` again)."""
    up = [False]

    def reply(request: ChatRequest) -> str:
        if not up[0]:
            raise RuntimeError("expert endpoint down")
        return "The answer is 4"

    store = RunStore(tmp_path / "runs.db")
    model = FunctionModel(reply, name="m", prices=(1.0, 2.0))
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model)]), k=1, store=store)
    first = orc.run("What is 2 + 2?", plan=False)
    assert (first.status, first.usage.calls, store.run_totals(first.run_id)["calls"]) == ("failed", 1, 1)
    up[0] = True
    resumed = orc.resume(first.run_id, budget=budget)
    totals = store.run_totals(first.run_id)
    assert (resumed.status, resumed.usage.calls, totals["calls"]) == (status, 1, 1)
    assert (resumed.usage.requests, totals["requests"], len(model.requests)) == ((2, 2, 2) if status == "done"
                                                                                 else (1, 1, 1))


def test_a_call_refused_unsent_then_answered_by_the_cache_on_resume_is_no_call(tmp_path: Path) -> None:
    """A call refused before any request (a remembered 404) is a call of the run and of its row; answered
    from the response cache on resume, its row became a cache answer the store no longer counted, while the
    resumed run still did (counted as it resumed)."""
    from orchestra.errors import RequestRejected

    down = [True]

    class Refusing(FunctionModel):
        async def complete_one(self, request: ChatRequest) -> Any:
            if down[0]:
                raise RequestRejected("refused before any request was sent")
            return await super().complete_one(request)

    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=Refusing(lambda r: "The answer is 4", name="m"))]), k=1,
                    store=store, cache=True)
    first = orc.run("What is 2 + 2?", plan=False)
    assert (first.usage.calls, first.usage.requests, store.run_totals(first.run_id)["calls"]) == (1, 0, 1)
    down[0] = False
    orc.run("What is 2 + 2?", plan=False)  # (another run fills the cache)
    resumed = orc.resume(first.run_id)
    assert (resumed.status, resumed.usage.cache_hits) == ("done", 1)
    assert resumed.usage.calls == store.run_totals(first.run_id)["calls"] == 0


def test_an_answer_with_a_lone_surrogate_is_recorded_and_used_not_a_failed_run(loopback, tmp_path: Path) -> None:
    """JSON's "\\ud83d" (a lone half of a surrogate pair) in an answer could be neither stored nor sent
    on: the paid call failed unrecorded and the run with it; a pair split apart is joined, a lone half
    becomes U+FFFD."""
    from orchestra.models import ChatResult

    def answer(request: LoopbackRequest) -> str:
        if KEYWORDS_MARK in request.prompt:
            return json.dumps({"keywords": ["chemistry"]})
        return "The answer is 7 \ud83d"  # (sent as the JSON escape it is)

    server = loopback(chat_handler(answer))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None)
    store = RunStore(tmp_path / "runs.db")
    result = Orchestra(Pool(agents=[Agent(name="solo", model=model)]), k=1, plan=False, store=store).run(
        "What is the pH of pure water?")
    assert result.status == "done" and result.answer == "The answer is 7 \ufffd"
    assert store.run_totals(result.run_id)["requests"] == len(server.requests) == 1  # (one agent: no keywords)
    assert ChatResult(text="\ud83d\ude00 and \ude00").text == "\U0001f600 and \ufffd"


def test_a_resumed_runs_failed_keyword_samples_are_the_whole_runs(tmp_path: Path) -> None:
    """A keyword sample that failed before the resume and was not asked again (its model's keys changed)
    counted among the resumed run's failed calls but not among its failed keyword samples: the eval warning
    then said none of them were keyword samples."""
    def answer(request: ChatRequest) -> Any:
        if KEYWORDS_MARK in request.prompt_text():
            if (request.seed or 0) % 5 == 0:  # one sample of the five
                raise RuntimeError("sample lost")
            return {"keywords": ["chemistry"]}
        return "The answer is 7"

    planner = FunctionModel(answer, name="kw")
    experts = [FunctionModel(lambda request, i=i: f"expert {i}: The answer is 7", name=f"m{i}") for i in range(3)]
    pool = Pool(agents=[Agent(name=f"a{i}", model=m) for i, m in enumerate(experts)], planner=planner)
    orc = Orchestra(pool, store=tmp_path / "runs.db", k=3, plan=False)
    first = orc.run("What is the pH of pure water?", budget=Budget(max_calls=6))
    assert first.status == "budget_exceeded" and first.usage.failed_keyword_calls == 1
    planner.extra_body = {"moved": True}  # its requests' keys change: the earlier samples are not asked again
    again = orc.resume(first.run_id, budget={"max_calls": 12})
    assert again.status == "budget_exceeded" and again.usage.failed_calls == 2, again.usage
    assert again.usage.failed_keyword_calls == 2, again.usage  # the earlier sample's and the one lost again now


def test_a_run_that_ended_as_its_stream_stopped_is_handed_over_and_graded() -> None:
    """Interrupted, an evaluation's report left out the runs that had ended but were not handed over yet
    (a trial counted 21 items and 707 requests where the store and the server had 24 runs done and 734):
    ``arun_iter`` gave them to no one."""
    from contextlib import aclosing

    from orchestra.datasets import Item
    from orchestra.evaluate import Tally
    from orchestra.grading import NumericGrader

    model = FunctionModel(lambda request: "The answer is 2", name="m")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)]), store=False, k=1, mode="global", aggregate="none")
    stopped: list[tuple[int, Any]] = []

    async def first_only() -> list[Any]:
        got = []
        async with aclosing(orc.arun_iter([f"What is {i} + {i}?" for i in range(4)], window=4,
                                          on_stopped=lambda index, result: stopped.append((index, result)))) as runs:
            async for item in runs:  # (the four end in one turn: one is handed over, and the caller stops)
                got.append(item)
                break
        return got

    got = asyncio.run(first_only())
    assert len(got) + len(stopped) == 4  # every task's run handed over or given to on_stopped
    ended = [(index, result) for index, result in stopped if result.status == "done"]
    assert ended, stopped
    tally = Tally(NumericGrader())
    tally.positions = [(index, Item(id=f"q{index}", question="?", answer="2")) for index in range(4)]
    tally.stopped_run(*ended[0])  # graded as it ended, not counted as cut off
    report = tally.report("m", elapsed_s=0.0, model_loads={})
    assert (report.items, report.correct, report.cut_off, report.calls) == (1, 1, 0, 1)
    tally.stopped_run(*next((index, result) for index, result in stopped if result.status == "cancelled"))
    assert tally.report("m", elapsed_s=0.0, model_loads={}).cut_off == 1
