"""The run store's checkpoints, made from a thread of their own so commits never wait for them."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from urllib.request import pathname2url

from orchestra.errors import StoreError

#: seconds between the checkpoint thread's checkpoints (while commits come)
CHECKPOINT_SECONDS = 1.0


class Checkpointer:
    """Copies a store's WAL into its file from a thread with a connection of its own, at most once a
    ``CHECKPOINT_SECONDS`` while commits come: the copy and the sync a checkpoint ends with (most of
    what a commit cost) no longer hold up the event loop. A passive checkpoint never waits for
    readers or writers; one that fails (a full disk, say) leaves the pages in the WAL for the next."""

    def __init__(self, path: Path, seconds: float = CHECKPOINT_SECONDS) -> None:
        self.path, self.seconds = path, seconds
        self.begun = self.done = 0  #: checkpoints begun and ended so far
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._finished = threading.Condition()
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        """A transaction was committed: a checkpoint is due (the first one starts the thread)."""
        if self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._run, name=f"orchestra checkpoints {self.path.name}",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def wait(self, timeout: float = 60.0) -> None:
        """Block until a checkpoint that began after this call has ended (for tests and tools)."""
        with self._finished:
            target = self.begun + 1  # one running now may have begun before the pages to copy
            self._wake.set()
            if not self._finished.wait_for(lambda: self.done >= target or self._stopped.is_set(), timeout):
                raise StoreError(f"no checkpoint of {self.path} ended within {timeout:g} s")

    def stop(self, wait: bool = False) -> None:
        """End the thread (``wait``: until its checkpoint in progress, if any, has ended)."""
        self._stopped.set()
        self._wake.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self) -> None:
        """End the thread, then copy what is left of the WAL into the file and cut the WAL to nothing,
        if no other connection is busy with it (so the file alone holds every commit made here). A
        Ctrl-C meanwhile (at exit, after the one that stopped the run) leaves the WAL as it is: SQLite
        reads the commits from there."""
        try:
            self._finish()
        except KeyboardInterrupt:
            pass

    def _finish(self) -> None:
        self.stop(wait=True)
        if self._thread is None or not self.path.exists():
            return  # nothing committed here, or the file is gone (connecting would make an empty one)
        try:
            db = sqlite3.connect(self._uri(), uri=True, timeout=0, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                db.close()
        except sqlite3.DatabaseError:
            pass  # busy or gone: the WAL keeps the pages, and SQLite reads them from there

    def _uri(self) -> str:
        """The store's file, opened only if it is there: connecting by its path made an empty one where
        the file had been removed (under a run, or between the check and the connection)."""
        return f"file:{pathname2url(str(self.path))}?mode=rw"

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._uri(), uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError:
            return  # the writers' own checkpoints (the store's CHECKPOINT_BYTES) take over
        try:
            while self._wake.wait() and not self._stopped.is_set():
                self._wake.clear()
                with self._finished:
                    self.begun += 1
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.DatabaseError:
                    pass
                with self._finished:
                    self.done += 1
                    self._finished.notify_all()
                self._stopped.wait(self.seconds)
        finally:
            db.close()
            with self._finished:
                self._finished.notify_all()
