"""A run store locked by another process mid-run: the journal's write blocks the event loop for its busy
timeout, and an answer that arrived meanwhile is read, not sent again (paid twice) as timed out."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from orchestra.errors import StoreError
from orchestra.execute import CallEntry, Executor, RunLedger
from orchestra.models import ChatRequest, OpenAICompatible
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, LoopbackServer, Reply, openai_reply

WAIT_S = 30  # a bound no test reaches: what it waits for comes long before


@pytest.mark.skipif(sys.version_info < (3, 11), reason="limits fall back to asyncio.wait_for before 3.11")
def test_an_answer_that_came_while_the_store_was_locked_is_not_sent_again(
        tmp_path: Path, loopback: Callable[[Any], LoopbackServer]) -> None:
    """Two runs' calls in one batch; another connection holds the store's write lock. The first answer's
    commit waits out the busy timeout (the loop runs nothing meanwhile) and fails: its run gets the
    store's error. The second answer came during that wait, its attempt's time limit passed unread: it is
    read once the loop runs again and committed once the lock is gone, one request, not a retry of it."""
    arrived, stalling, replied = threading.Event(), threading.Event(), threading.Event()
    bodies: Counter[str] = Counter()

    async def handler(request: LoopbackRequest) -> Reply:
        bodies[request.body.decode()] += 1
        wait = asyncio.get_running_loop().run_in_executor
        if "second" in request.prompt:  # answered while the journal's write waits
            arrived.set()
            await wait(None, stalling.wait, WAIT_S)
            replied.set()
        else:  # the first is answered once the second is here (a loaded machine sent it after the first's answer)
            await wait(None, arrived.wait, WAIT_S)
        return openai_reply("The answer is 2")

    server = loopback(handler)
    model = OpenAICompatible(model="m1", base_url=server.url + "/v1", api_key_env=None, max_concurrency=4,
                             timeout=5, max_attempts=3)
    path = tmp_path / "runs.db"
    store = RunStore(path)
    store.begin_runs([("ra", "t", {}), ("rb", "t", {})])
    store._db.execute("PRAGMA busy_timeout=8000")  # (the 30 s a store waits for another writer, made short)
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    writes: list[list[str]] = []
    record_all = store.record_all

    def journal(entries: Iterable[CallEntry]) -> None:
        entries = list(entries)
        writes.append([entry[0] for entry in entries])
        if len(writes) > 1:
            record_all(entries)
            return
        stalling.set()  # the server answers the second call now; its answer waits unread in the socket
        assert replied.wait(WAIT_S)
        try:
            record_all(entries)  # blocks the loop for the busy timeout, then fails: the lock is held
        finally:
            locker.execute("ROLLBACK")  # the other process lets go
            locker.close()

    store.record_all = journal  # type: ignore[method-assign]
    executor = Executor()
    first, second = RunLedger.create("ra", journal=store), RunLedger.create("rb", journal=store)

    async def main() -> list[list[Any]]:
        try:
            return list(await asyncio.gather(
                executor.run_task(executor.call(first, [(model, ChatRequest.user("first: 1 + 1?"))], purpose="expert")),
                executor.run_task(executor.call(second, [(model, ChatRequest.user("second: 1 + 1?"))],
                                                purpose="expert"))))
        finally:
            await model.aclose()

    [[locked], [answered]] = asyncio.run(main())
    assert isinstance(locked, StoreError) and "database is locked" in str(locked)
    assert not isinstance(answered, Exception) and answered.text == "The answer is 2"
    assert writes == [["ra"], ["rb"]]
    assert sorted(json.loads(body)["messages"][-1]["content"][:6] for body in bodies) == ["first:", "second"]
    assert list(bodies.values()) == [1, 1]  # each body once: the second's answer was not asked for again
    [row] = store.calls("rb")
    assert (row["status"], row["requests"]) == ("ok", 1)
    assert store.calls("ra") == []  # (its answer could not be written: its run stops on the store's error)
    assert (first.calls, second.calls, second.failed_calls) == (1, 1, 0)
