"""RunStore.begin_runs over more runs than one statement's parameters hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestra.errors import RunHeld
from orchestra.store import RunStore


@pytest.mark.parametrize("held", [0, 499, 500, 999, 1000])
def test_a_run_held_elsewhere_is_refused_wherever_it_falls_in_a_large_group(tmp_path: Path, held: int) -> None:
    path = tmp_path / "runs.db"
    other = RunStore(path)  # another store object: another owner tag, this live process, a fresh lease
    other.begin_run(f"r{held}", "task", {})
    store = RunStore(path)
    with pytest.raises(RunHeld):
        store.begin_runs([(f"r{i}", "task", {}) for i in range(1001)])
    store.close()
    other.close()


def test_events_held_in_a_new_event_loop_are_written_at_its_next_turn_after_a_loop_that_ended_unflushed(
        tmp_path: Path) -> None:
    import asyncio
    import sqlite3

    from orchestra.events import NodeReady

    path = tmp_path / "runs.db"
    store = RunStore(path)
    store.begin_run("r", "task", {})
    ended = asyncio.new_event_loop()  # a loop that ended with the store's flush still scheduled on it
    asyncio.events._set_running_loop(ended)
    try:
        store.listen(NodeReady(run_id="r", node="a"))
    finally:
        asyncio.events._set_running_loop(None)
        ended.close()

    def logged() -> int:
        db = sqlite3.connect(path)  # (not the store's own reads: they write what is held first)
        try:
            return db.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            db.close()

    async def main() -> int:
        store.listen(NodeReady(run_id="r", node="b"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return logged()

    assert asyncio.run(main()) == 2
    store.close()


def test_a_read_only_store_holds_events_without_trying_to_write_them(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import warnings

    from orchestra.events import NodeReady

    path = tmp_path / "runs.db"
    writer = RunStore(path)
    writer.begin_run("r", "task", {})
    writer.close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))  # (root writes all)
    reader = RunStore(path)
    assert reader.read_only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "events could not be written to the run store": nothing may be tried
        reader.listen(NodeReady(run_id="r", node="a"))
        reader.flush()
        assert [run.id for run in reader.runs()] == ["r"]
        reader.close()
