"""Ray engines, hostile cases found by a user's trial: an error that does not survive Ray's pickling,
a batch cut off by a cancellation, and a cluster address other than the one Ray is joined to here."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from orchestra import Agent, Orchestra, Pool
from orchestra.models import ChatRequest, FunctionModel
from orchestra.models.placement import EngineResources

ONE_SLOT = EngineResources(num_cpus=0, custom={"slot": 1})


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, resources={"slot": 2}, include_dashboard=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()


def engine_pool(models: list[FunctionModel]) -> Pool:
    return Pool(agents=[Agent(name=f"agent-{m.name}", model=m) for m in models],
                planner=FunctionModel(lambda request: {"keywords": ["general"]}, name="keywords"))


def test_an_error_that_does_not_unpickle_fails_only_its_own_call_in_one_line() -> None:
    """One request's exception whose class takes two arguments (pickle rebuilds it with one) lost
    the whole batch: every call failed with Ray's many-line deserialisation traceback."""
    class EngineOOM(Exception):
        def __init__(self, device: str, needed: int) -> None:
            super().__init__(f"out of memory on {device}: needed {needed} GiB")

    def reply(request: ChatRequest) -> str:
        if "3 + 1" in request.prompt_text():
            raise EngineOOM("cuda:0", 3)
        return "picky: The answer is 4"

    model = FunctionModel(reply, name="picky", heavy=True, resources=ONE_SLOT)
    orc = Orchestra(engine_pool([model]), k=1, executor="ray", aggregate="vote", plan=False, store=False)
    try:
        results = orc.run_many(["What is 2 + 2?", "What is 3 + 1?", "What is 1 + 3?"])
    finally:
        orc.close()
    assert [r.status for r in results] == ["done", "failed", "done"], [r.error for r in results]
    assert "out of memory on cuda:0" in (results[1].error or "") and "\n" not in (results[1].error or "")


def test_a_batch_cut_off_by_a_cancellation_is_counted_and_journaled_as_locally(tmp_path: Path) -> None:
    """The local executor records each request in flight at a cancellation (CallCancelled, 1
    request); on Ray the actor had the requests, yet the run's record had no call at all."""
    started = tmp_path / "started"

    async def reply(request: ChatRequest) -> str:
        started.touch()
        await asyncio.sleep(30)
        return "sleepy: The answer is 4"

    model = FunctionModel(reply, name="sleepy", heavy=True, resources=ONE_SLOT)
    db = tmp_path / "runs.db"
    orc = Orchestra(engine_pool([model]), k=2, executor="ray", aggregate="vote", plan=False, store=db)

    async def main() -> None:
        task = asyncio.create_task(orc.arun("What is 2 + 2?"))
        for _ in range(600):
            if started.exists():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await orc.executor.stop_in_flight()

    try:
        asyncio.run(main())
    finally:
        orc.close()
    rows = sqlite3.connect(db).execute("select status, requests, error from calls where model = 'sleepy'").fetchall()
    assert len(rows) == 2 and all(status == "error" and requests == 1 and "in flight" in error
                                  for status, requests, error in rows), rows


def test_an_address_other_than_the_cluster_ray_is_joined_to_here_is_not_silently_ignored() -> None:
    """Ray already initialised in this process (a local instance) and an Orchestra told to use
    another cluster: its engines ran on the local instance without a word (``ray_address`` ignored)."""
    def reply(request: ChatRequest) -> str:
        return "where: The answer is 4 (" + ray.get_runtime_context().gcs_address + ")"

    model = FunctionModel(reply, name="where", heavy=True, resources=ONE_SLOT)
    orc = Orchestra(engine_pool([model]), k=1, executor="ray", ray_address="10.255.255.1:6379", aggregate="vote",
                    plan=False, store=False)
    try:
        result = orc.run("What is 2 + 2?")
    finally:
        orc.close()
    joined = ray.get_runtime_context().gcs_address
    assert result.status == "failed", f"ran on {joined}, not 10.255.255.1:6379: {result.answer}"
    assert "10.255.255.1:6379" in (result.error or "")


def test_a_load_error_that_does_not_unpickle_is_one_line_naming_it() -> None:
    """A load raising an error whose class pickle cannot rebuild (here the standard library's
    ``ContentTooShortError``, as a download of the weights may) failed its calls with Ray's
    `UnserializableException ... Failed to deserialize exception` and a many-line traceback."""
    def on_load() -> None:
        import urllib.error

        raise urllib.error.ContentTooShortError("the weights file ended after 12 of 24 GiB", b"")

    model = FunctionModel(lambda r: "x", name="loadboom", heavy=True, resources=ONE_SLOT, on_load=on_load)
    orc = Orchestra(engine_pool([model]), k=1, executor="ray", aggregate="vote", plan=False, store=False)
    try:
        result = orc.run("What is 2 + 2?")
    finally:
        orc.close()
    [output] = result.node("answer").expert_outputs
    error = output.error or ""
    assert result.status == "failed" and "the weights file ended after 12 of 24 GiB" in error
    assert "\n" not in error and "deserialize" not in error and "ray.exceptions" not in error, error
