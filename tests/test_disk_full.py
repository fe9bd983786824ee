"""A full disk: the run stops with one line, is listed as failed, and a resume once space returns
re-sends nothing that was committed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers import scripted_pool

from orchestra import Orchestra
from orchestra.events import CallDone, Event
from orchestra.hints import advise_store
from orchestra.models import ChatRequest
from orchestra.store import ABANDONED, RunStore


def fill_disk_after(store: RunStore, calls: int):
    """A listener that makes the store's file unable to grow after ``calls`` answered calls."""
    seen = {"calls": 0}

    def listen(event: Event) -> None:
        if isinstance(event, CallDone):
            seen["calls"] += 1
            if seen["calls"] == calls:
                pages = store._db.execute("PRAGMA page_count").fetchone()[0]
                store._db.execute(f"PRAGMA max_page_count={pages}")
    return listen


def free_space(store: RunStore) -> None:
    store._db.execute("PRAGMA max_page_count=1073741823")


def test_a_full_disk_stops_the_run_in_one_line_and_a_resume_resends_nothing_committed(tmp_path: Path) -> None:
    pool, models = scripted_pool(3)
    store = RunStore(tmp_path / "runs.db")
    task = "Which long question fills the disk? " * 40  # big requests: every journal row needs new pages
    orc = Orchestra(pool, store=store, k=2, on_event=fill_disk_after(store, 3))
    advise_store(tmp_path / "runs.db")  # (as `--store FILE` does: it said "resume run ID", the file unsaid)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            stopped = orc.run(task, plan=False)
    finally:
        advise_store(None)
    assert not [w for w in warned if "was not recorded" in str(w.message)]  # the result says it, once
    assert stopped.status == "failed" and stopped.exit_code == 2
    assert "database or disk is full" in stopped.error and stopped.error.endswith(
        f"; the calls answered before are saved: once it can be written, `orchestra resume {stopped.run_id} "
        f"--store {tmp_path / 'runs.db'}` finishes it")
    assert "\n" not in stopped.error
    # the models answered: the calls whose answers the store could not keep are not theirs to count
    assert (stopped.usage.failed_calls, stopped.usage.failed_by_model) == (0, {})
    # the end could not be written, yet this store lists the run as failed, not running
    assert store.run(stopped.run_id).status == "failed"
    free_space(store)
    # the first batch (5 keyword calls) was committed together before any of it was used; the disk
    # filled while it was being used
    committed = [c["purpose"] for c in store.calls(stopped.run_id) if c["status"] == "ok"]
    assert committed == ["keywords"] * 5
    sent_before = {name: len(model.requests) for name, model in models.items()}
    resumed = Orchestra(pool, store=store, k=2).resume(stopped.run_id)
    assert resumed.status == "done", resumed.error
    assert resumed.usage.replayed_calls == 5  # the calls committed before the disk filled
    sent = sum(len(model.requests) - sent_before[name] for name, model in models.items())
    assert sent == resumed.usage.calls - 5  # and only the others were sent again
    assert store.run(stopped.run_id).status == "done"


def test_a_run_left_running_by_a_dead_process_is_listed_as_failed(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "task", {})
    assert store.run("r1").status == "running"  # this process holds it
    store._execute("UPDATE runs SET owner=? WHERE id='r1'", ("somehost pid 999999999:ab",))
    assert store.run("r1").status == "running"  # another host's process: its fresh lease holds it
    store._execute("UPDATE runs SET updated=0 WHERE id='r1'")
    record = store.run("r1")
    assert (record.status, record.error) == ("failed", ABANDONED)
    assert [r.status for r in store.runs()] == ["failed"]


def test_a_store_removed_under_a_running_run_stops_it_saying_so(tmp_path: Path) -> None:
    """SQLite writes on to a file that is gone from its folder: the run recorded every call into it,
    ended done, exit 0, and nothing of it was left (a data set's 30 runs lost without a word)."""
    path = tmp_path / "runs.db"

    def expert(name: str, request: ChatRequest) -> str:
        for sidecar in ("", "-wal", "-shm"):
            Path(f"{path}{sidecar}").unlink(missing_ok=True)
        return f"{name}: The answer is 1"

    pool, _ = scripted_pool(2, expert=expert)
    orc = Orchestra(pool, k=2, store=path)
    result = orc.run("What is 1 + 0?", plan=False)
    orc.close()
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith(
        f"cannot write the run store {path}: the file was removed (or another put in its place) while this process "
        "had it open; what it recorded since went with the file; nothing can resume it: run it again")
    assert (result.usage.failed_calls, result.usage.failed_by_model) == (0, {})  # (no model failed)
    assert not path.exists()


def test_a_store_opened_by_a_relative_path_is_written_after_the_process_changes_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that the file is still the one opened read the relative path again, from the new folder
    (a notebook's %cd): every later run stopped as if the store had been removed."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    pool, _ = scripted_pool(1)
    orc = Orchestra(pool, k=1, store="runs.db")
    first = orc.run("What is 1 + 0?", plan=False)
    monkeypatch.chdir(tmp_path / "b")
    second = orc.run("What is 1 + 0?", plan=False)
    orc.close()
    assert (first.status, second.status) == ("done", "done"), second.error
    assert {run.id for run in RunStore(tmp_path / "a" / "runs.db").runs()} == {first.run_id, second.run_id}
    assert not (tmp_path / "b" / "runs.db").exists()


def test_once_a_store_is_found_removed_no_call_of_its_runs_is_sent(tmp_path: Path) -> None:
    """Each call's answer commits before it is used; a removed store can keep none, so after the first
    write finds it gone every later call fails at once, unsent (a data-set workflow went on paying for
    answers it threw away: 75 requests after the removal)."""
    import asyncio

    from orchestra.errors import StoreGone
    from orchestra.execute import Executor, RunLedger
    from orchestra.models import FunctionModel

    path = tmp_path / "runs.db"
    store = RunStore(path)
    store.begin_runs([("r1", "t", {}), ("r2", "t", {})])
    model = FunctionModel(lambda request: "The answer is 1", name="m")
    executor = Executor()

    async def ask(run_id: str, text: str) -> object:
        ledger = RunLedger.create(run_id, journal=store)
        [outcome] = await executor.run_task(executor.call(ledger, [(model, ChatRequest.user(text))], purpose="expert"))
        return outcome

    async def main() -> list[object]:
        first = await ask("r1", "before")
        for sidecar in ("", "-wal", "-shm"):
            Path(f"{path}{sidecar}").unlink(missing_ok=True)
        return [first, await ask("r1", "found gone"), await ask("r2", "after")]

    first, found, after = asyncio.run(main())
    store.close()
    assert getattr(first, "text", None) == "The answer is 1"
    assert isinstance(found, StoreGone) and isinstance(after, StoreGone)
    assert [r.prompt_text() for r in model.requests] == ["before", "found gone"]  # the third never sent


def test_the_checkpoint_thread_does_not_make_an_empty_store_where_the_file_was_removed(tmp_path: Path) -> None:
    """It connected by the path: where the file had been removed (under a run), that made a new, empty
    store file there, which a loaded machine's run then found in the removed one's place."""
    from orchestra.checkpoints import Checkpointer

    path = tmp_path / "a store #1.db"  # (characters a URI must escape)
    RunStore(path).close()
    path.unlink()
    checkpoints = Checkpointer(path)
    checkpoints.committed()  # (its thread connects now)
    checkpoints.stop(wait=True)
    checkpoints.finish()
    assert not path.exists()
