"""The checkpoint thread: woken by commits, joined by stop(wait=True), and close() cuts the WAL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from orchestra.checkpoints import Checkpointer
from orchestra.store import RunStore


def test_commits_alone_wake_the_checkpoint_thread(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    store = RunStore(path)
    size = path.stat().st_size
    for i in range(200):
        store.begin_run(f"r{i}", "x" * 4000, {})
    deadline = time.monotonic() + 10  # (no wait(): the commits themselves must bring a checkpoint)
    while path.stat().st_size - size < 200 * 4000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size - size > 200 * 4000
    store.close()


def test_stop_with_wait_returns_only_once_the_thread_has_ended(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    sqlite3.connect(path).close()
    for _ in range(20):
        checkpoints = Checkpointer(path, seconds=0.0)
        checkpoints.committed()
        checkpoints.stop(wait=True)
        assert checkpoints._thread is not None and not checkpoints._thread.is_alive()


def test_close_copies_the_wal_into_the_file_and_cuts_it_while_another_process_has_it_open(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    RunStore(path).close()
    holder = subprocess.Popen(  # another process with the store open: the closing connection is not the last one
        [sys.executable, "-c", "import sqlite3, sys, time\ndb = sqlite3.connect(sys.argv[1])\n"
         "db.execute('SELECT count(*) FROM runs').fetchall()\nprint('open', flush=True)\ntime.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        store = RunStore(path)
        for i in range(300):
            store.begin_run(f"r{i}", "x" * 2000, {})
        store.close()
        wal = path.with_name("runs.db-wal")
        assert not wal.exists() or wal.stat().st_size == 0  # (SQLite itself would leave it: not the last close)
        alone = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the file by itself, no WAL read
        assert alone.execute("SELECT count(*) FROM runs").fetchone()[0] == 300
        alone.close()
    finally:
        holder.kill()
        holder.wait()
