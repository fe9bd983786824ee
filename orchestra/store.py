"""The run store: runs, calls and events in SQLite (WAL), plus the opt-in response cache.

Every call's outcome is committed before anything uses it, so a crash, a Ctrl-C or a spent budget
loses nothing: a resumed run replays what was recorded and sends only what was not. API keys
never reach the store: requests carry no credentials, and configs hold only variable names.

A run's nodes are not written apart: ``nodes`` reads them from its event log.

Events and the ends of a data set's runs are written in groups: held until the next
write or the event loop's next turn, then one transaction (statements of one kind in one
``executemany``). SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit survives a
crash of the process (not of the machine's power).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from orchestra.checkpoints import Checkpointer
from orchestra.errors import RunHeld, RunNotFound, StoreError, StoreGone, StoreUnusable, shown_id
from orchestra.events import (
    AggregationFellBack,
    CallDone,
    CallsQueued,
    Event,
    ExpertsRecruited,
    NodeAggregating,
    NodeDone,
    NodeFailed,
    NodeReady,
    NodeSkipped,
    PlanReady,
    UsageUpdated,
    fell_back,
)
from orchestra.money import dollars
from orchestra.resources import orchestra_home

if TYPE_CHECKING:  # (imported where used: `orchestra runs` lists a store without pydantic or asyncio)
    import asyncio

    from pydantic import BaseModel

    from orchestra.execute import CallEntry
    from orchestra.models import ChatRequest, ChatResult, Usage
    from orchestra.result import RunResult

APPLICATION_ID = 0x4F524348  # "ORCH"
SCHEMA_VERSION = 4
#: the oldest schema read as it is (a read-only store is not upgraded); 3 kept a nodes table, now unused
READABLE_SCHEMA = 3
#: A running run's process touches it this often; a run untouched for LEASE_SECONDS is no longer held.
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 30.0
#: WAL bytes after which a writer copies the WAL into the file itself (the checkpoint thread fell behind)
CHECKPOINT_BYTES = 160 * 2**20
#: bytes per database page of a new store
PAGE_SIZE = 16_384
#: Purpose of the rows that record the embedding matcher's requests (requests outside any call).
EMBEDDINGS = "embedding"
#: (Values are bound as str, int and float, and constants written into the statements: Python's
#: sqlite3 looks for an adapter, raising and catching an AttributeError, for each bytes or None.)
_LOG_EVENT = "INSERT INTO events (run_id, kind, at, data) VALUES (?, ?, ?, ?)"
#: A run is ended by its owner; one no owner holds, only while it reads as running (a store of before
#: owners) or, where this store ended it, with the status it ended with (a cancelled run's record,
#: counting an answer that came late). A run another process took over (its lease run out, or forced)
#: is no longer this one's to end, and neither is one that process has ended since (its record was
#: written over, even ended with the same status).
_OURS = "id=? AND (owner=? OR (owner IS NULL AND status IN ('running', ?)))"
_FINISH_RUN = f"UPDATE runs SET status=?, answer=?, error=?, result=?, updated=?, owner=NULL WHERE {_OURS}"
#: the same, its owner kept: a run stopped while its requests are still in flight here holds its lease
#: until they end (another process's resume sent them again, paid twice)
_FINISH_HELD = f"UPDATE runs SET status=?, answer=?, error=?, result=?, updated=? WHERE {_OURS}"
#: events the store does not log (each call's: calls live in their own table); ``subscribe(listen, ignore=...)``
QUIET_EVENTS = frozenset({UsageUpdated, CallsQueued, CallDone})
_ENDED_RUN = f"UPDATE runs SET status=?, owner=NULL WHERE {_OURS}"
_json = json.JSONEncoder(ensure_ascii=False).encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, config TEXT NOT NULL, answer TEXT, error TEXT, result TEXT,
    resumes INTEGER NOT NULL DEFAULT 0, owner TEXT);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    model TEXT NOT NULL, purpose TEXT, node TEXT, request TEXT NOT NULL, response TEXT,
    status TEXT NOT NULL, source TEXT NOT NULL, error TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
    cost_usd REAL, latency_s REAL, created REAL NOT NULL, requests INTEGER NOT NULL DEFAULT 1,
    UNIQUE (run_id, key, seq));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, run_id TEXT, kind TEXT NOT NULL, at REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);
"""


def default_store_path() -> Path:
    """``$ORCHESTRA_HOME/runs.db`` (``~/.orchestra/runs.db``)."""
    return orchestra_home() / "runs.db"


class Earlier(NamedTuple):
    """What a run begun before spent, counted into its resume (``RunStore.earlier_usage``)."""

    usage: Usage
    calls: int
    """Its calls a model was sent (failed ones included), as ``run_totals`` counts them."""
    failed: frozenset[tuple[str, int]]
    """The (key, seq) of those that failed: counted already, so not again if the resume sends them."""
    unsent: frozenset[tuple[str, int]] = frozenset()
    """Of ``failed``, those whose requests never reached the model (no request counted): one the response
    cache answers on resume is no call of the run any more (its row becomes a cache answer)."""
    failures: tuple[tuple[str, int, str, str, str], ...] = ()
    """``failed`` as (key, seq, model, error, purpose), oldest first: a resume that does not ask one again
    still counts it among the run's failed calls, as ``run_totals`` does."""


@dataclass(frozen=True)
class RunRecord:
    """A stored run's summary."""

    id: str
    task: str
    status: str
    created: float
    updated: float
    config: dict[str, Any]
    answer: str | None
    error: str | None
    resumes: int

    @property
    def item(self) -> str | None:
        """The data-set item this run answered, for runs of a data-set workflow."""
        return self._meta().get("item")

    @property
    def served(self) -> str | None:
        """The model a client asked for, for a run that ``orchestra serve`` made."""
        meta = self._meta()
        return meta["model"] if meta.get("kind") == "serve" and isinstance(meta.get("model"), str) else None

    def _meta(self) -> dict[str, Any]:
        spec = self.config.get("spec") or self.config  # a run spec, or a record of version 0.1
        meta = spec.get("meta") if isinstance(spec, dict) else None
        return meta if isinstance(meta, dict) else {}


def _switch_to_wal(db: sqlite3.Connection, attempts: int = 100) -> None:
    """``journal_mode=WAL``: SQLite refuses the switch at once (no busy wait) while another process
    is creating the same store, so it is retried a bounded number of times."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.02)


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` (device and inode), or None where there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


class _FileGone(sqlite3.OperationalError):
    """The store's file is not at its path any more (removed, or another put there): SQLite writes on
    to the file it opened, which nothing can read once this process ends."""


def _read_only_disk(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted read-only (so nobody can be writing it)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return False


#: why a run recorded as running is listed as failed
ABANDONED = ("stopped without recording how it ended (its process was killed, or the store could not be "
             "written); resume it to finish")


def _process(pid: int) -> tuple[str, str] | None:
    """Process ``pid``'s state and start time (clock ticks since boot) from ``/proc``: with its pid,
    the start time names one process, not one that got the pid later. None where it cannot be read
    (no such process, or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
        fields = text[text.rindex(")") + 2:].split()  # (the name in brackets may hold spaces)
        return fields[0], fields[19]  # (fields 3 and 22)
    except (OSError, ValueError, IndexError):
        return None


def _owner_process(owner: str) -> tuple[int, str] | None:
    """The pid and recorded start time ("" when not recorded) of an ``owner`` tag of this machine."""
    host, _, rest = owner.partition(" pid ")
    pid, _, tag = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return int(pid), tag.partition("@")[2]


def _alive(owner: str) -> bool:
    """Whether the process named by an ``owner`` tag may still run: one of this machine that has
    ended (a zombie too), or whose pid another process has taken since, is known to be gone."""
    known = _owner_process(owner)
    if known is None:
        return True  # another machine's process (or a tag not read): only its heartbeat can tell
    pid, started = known
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    seen = _process(pid)
    return seen is None or (seen[0] not in ("Z", "X") and (not started or seen[1] == started))


def _surely_running(owner: str) -> bool:
    """Whether ``owner`` is another process of this machine that is certainly still running: its pid
    and its start time (recorded in the tag) match a live process. (Then ``force`` cannot take its
    runs: two processes would send their calls twice.)"""
    known = _owner_process(owner)
    if known is None or not known[1] or known[0] == os.getpid():
        return False
    seen = _process(known[0])
    return seen is not None and seen[0] not in ("Z", "X") and seen[1] == known[1]


def _abandoned(row: dict[str, Any], now: float) -> bool:
    """Whether a run recorded as running is no longer held: its process is gone or its lease expired."""
    owner = row.get("owner")
    return not owner or not _alive(owner) or now - (row["updated"] or 0.0) >= LEASE_SECONDS


def _record(row: dict[str, Any], ended: dict[str, str] | None = None) -> RunRecord:
    """A run's row as a record; a damaged configuration is reported on the record, not raised, so one
    bad row never makes the other runs unlistable. A running run nobody holds any more (or one this
    process saw end but could not record, ``ended``) is listed as failed."""
    try:
        config = json.loads(row["config"])
        error = row["error"]
    except (TypeError, ValueError):
        config, error = {}, f"the stored configuration of this run is damaged; {row['error'] or ''}".rstrip("; ")
    status = str(row["status"])
    if status == "running" and (str(row["id"]) in (ended or {}) or _abandoned(row, time.time())):
        status, error = (ended or {}).get(str(row["id"]), "failed"), error or ABANDONED
    return RunRecord(id=str(row["id"]), task=str(row["task"]), status=status, created=row["created"] or 0.0,
                     updated=row["updated"] or 0.0, config=config if isinstance(config, dict) else {},
                     answer=row["answer"], error=error, resumes=row["resumes"] or 0)


def _record_call(outcome: str) -> str:
    """The statement that records a call's ``outcome`` (SQL of its response, status and error):
    a success replaces an earlier error for the same call, adding what the failed attempts cost."""
    return ("INSERT INTO calls (run_id, key, seq, model, purpose, node, request, response, status, error, source, "
            "prompt_tokens, completion_tokens, cost_usd, latency_s, created, requests) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, {outcome}, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(run_id, key, seq) DO UPDATE SET response=excluded.response, status=excluded.status, "
            "source=excluded.source, error=excluded.error, prompt_tokens=calls.prompt_tokens+excluded.prompt_tokens, "
            "completion_tokens=calls.completion_tokens+excluded.completion_tokens, "
            "cost_usd=calls.cost_usd+excluded.cost_usd, latency_s=excluded.latency_s, created=excluded.created, "
            "requests=calls.requests+excluded.requests "
            "WHERE calls.status != 'ok'")


#: the call rows whose requests reached a model: answered by it, or by the cache or the store after
#: attempts that failed (a cache answer relabels the row, whose failed attempts were billed)
_BILLED = "(source = 'model' OR requests > 0)"
#: a failed call a run that ended done since did not ask again: paid for, and no longer the run's
_SUPERSEDE = "UPDATE calls SET status='superseded' WHERE run_id=? AND key=? AND seq=? AND status='error'"
_RECORD_ANSWER = _record_call("?, 'ok', NULL")
_RECORD_FAILURE = _record_call("NULL, 'error', ?")


def _call_row(run_id: str, key: str, seq: int, model: str, request: ChatRequest | str,
              outcome: ChatResult | Exception, purpose: str, node: str | None, source: str,
              now: float) -> tuple[str, tuple[Any, ...]]:
    """The statement and values that record one call's outcome (an answer from the cache or the
    store cost nothing); ``request`` may come as the canonical JSON its key hashed."""
    canonical = request if isinstance(request, str) else _json(request.canonical())
    if isinstance(outcome, Exception):
        usage = getattr(outcome, "usage", None)
        spent = (usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) if usage else (0, 0, 0.0)
        error = f"{type(outcome).__name__}: {outcome}"
        return _RECORD_FAILURE, (run_id, key, seq, model, purpose, node, canonical, error, source, *spent,
                                 getattr(outcome, "latency_s", 0.0), now,
                                 usage.requests if usage else 0)
    if source == "model":
        usage = outcome.usage
        return _RECORD_ANSWER, (run_id, key, seq, model, purpose, node, canonical, _result_json(outcome), source,
                                usage.prompt_tokens, usage.completion_tokens, usage.cost_usd, outcome.latency_s, now,
                                usage.requests)
    return _RECORD_ANSWER, (run_id, key, seq, model, purpose, node, canonical, _result_json(outcome), source,
                            0, 0, 0.0, outcome.latency_s, now, 0)


def _config_json(config: dict[str, Any] | str) -> str:
    """A run's configuration as stored: given as JSON already, or as a JSON-ready dict."""
    return config if isinstance(config, str) else _json(config)


def _result_json(result: ChatResult) -> str:
    """A result as stored (UTF-8 JSON): its parsed value kept if JSON can hold it (a pydantic model
    as its fields), else left out."""
    try:
        return _model_json(result)
    except ValueError:  # pydantic's serialization error: a parsed value JSON cannot hold
        return _model_json(result.model_copy(update={"parsed": None}))


def _model_json(model: BaseModel) -> str:
    """``model.model_dump_json()`` without its keyword handling (a run stores a dozen per instance)."""
    return type(model).__pydantic_serializer__.to_json(model).decode()


def _event_json(event: Event) -> str:
    """``event.to_dict()`` as JSON (pydantic-core's encoder: a third of json's time)."""
    global _to_json
    if _to_json is None:  # (pydantic-core is loaded wherever events are made; ``orchestra runs`` does without)
        from pydantic_core import to_json

        _to_json = to_json
    return _to_json(event.to_dict(), fallback=str).decode()


_to_json: Callable[..., bytes] | None = None


class RunStore:
    """One SQLite file of runs. Safe to share between threads of a process and between processes.

    Args:
        path: the database file (default ``$ORCHESTRA_HOME/runs.db``, else ``~/.orchestra/runs.db``).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self._lock = threading.RLock()
        #: who holds the runs this store object begins: host, process and a random tag
        self.owner = (f"{socket.gethostname()} pid {os.getpid()}:{secrets.token_hex(4)}"
                      + (f"@{me[1]}" if (me := _process(os.getpid())) else ""))
        self._ended: dict[str, str] = {}  # runs that ended here but whose end could not be written
        #: event-log and node statements not written yet: they go with the next transaction, at the
        #: latest at the event loop's next turn (events come in bursts; one transaction per burst)
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._flush: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_warned = False
        #: runs this store began that had no record before: none of their calls can be replayed
        self._fresh: set[str] = set()
        #: runs this store object has ended (a late answer may record them again, see ``_OURS``)
        self._ended_here: set[str] = set()
        #: the runs going in this process through this store object, by id: the Orchestra running
        #: each (Orchestras sharing one store object share its owner tag, so the file cannot tell them apart)
        self.going: dict[str, object] = {}
        self._checkpoints: Checkpointer | None = None
        self._file: tuple[int, int] | None = None  # (set once the store is open and set up)
        #: set once a write found the file removed: every later write, and every call of its runs
        #: (``Executor``), refuses at once (a data set went on paying for answers it could not keep)
        self.gone: StoreGone | None = None
        if self.path.is_dir():  # (SQLite says "unable to open database file")
            raise StoreUnusable(self.path, f"cannot use {self.path} as the run store: it is a directory")
        existed = self.path.is_file()
        #: why this process cannot write the store ("" where it can): a file it cannot write, or one in a
        #: folder it cannot write, where SQLite cannot make the files its WAL needs beside it
        self.unwritable = "" if not existed else "it is read-only" if not os.access(self.path, os.W_OK) else (
            f"its folder {self.path.parent} cannot be written (SQLite keeps its -wal and -shm files beside it)"
            if self._folder_locked() else "")
        try:
            if not self.read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            self._open()
            #: the file opened (by its absolute path: a relative one names another file once the process
            #: changes its folder): a write finding another, or none, there refuses (see ``_FileGone``)
            self._where = self.path.absolute()
            self._file = _identity(self._where)
        except sqlite3.DatabaseError as error:
            if not existed:  # nothing there to move away: the place is the problem
                raise StoreUnusable(self.path, f"cannot create the run store {self.path} ({error})") from None
            raise StoreUnusable(self.path, f"{self.path} is not a usable Orchestra run store ({error})",
                                move_away="move it away") from None
        except OSError as error:  # a folder that cannot be made (a file is in the way, no permission)
            where = Path(error.filename or self.path.parent)
            if isinstance(error, (FileExistsError, NotADirectoryError)):  # the file in the way, not the folder
                blocker = next((p for p in (where, *where.parents) if p.exists()), where)
                why = f"{blocker} is a file, not a folder"
            else:
                why = f"{error.strerror or error}: {where}"
            raise StoreUnusable(self.path, f"cannot create the run store {self.path} ({why})") from None

    @property
    def read_only(self) -> bool:
        """Whether this process cannot write the store (``unwritable`` says why)."""
        return bool(self.unwritable)

    def _sidecars(self) -> dict[str, Path]:
        """The files SQLite keeps beside the store while it is in use: its WAL and shared memory."""
        return {suffix: self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm")}

    def _folder_locked(self) -> bool:
        """Whether the store's folder cannot be written and its WAL's files are not there to use, so
        SQLite, which makes them beside the store, could not open it even to read."""
        if os.access(self.path.parent, os.W_OK) and not _read_only_disk(self.path):
            return False
        return not all(p.exists() and os.access(p, os.W_OK) for p in self._sidecars().values())

    def _connect(self) -> sqlite3.Connection:
        """The connection: read-only for a file this process cannot write. Where SQLite cannot make the
        shared-memory file its WAL needs (a read-only disk, a folder this process cannot write), a store
        whose commits are all in the file is opened as immutable (nobody can be writing it in WAL mode:
        they would need that file); one with commits still in its WAL there cannot be read, and says so
        (both were "not a usable Orchestra run store (attempt to write a readonly database); move it
        away", of a good store)."""
        options: dict[str, Any] = {"timeout": 30, "check_same_thread": False, "isolation_level": None}
        if not self.read_only:
            return sqlite3.connect(str(self.path), **options)
        sidecar = self._sidecars()
        if sidecar["-shm"].exists() or (os.access(self.path.parent, os.W_OK) and not _read_only_disk(self.path)):
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, **options)
        if sidecar["-wal"].exists() and sidecar["-wal"].stat().st_size:
            where = "on a read-only disk" if _read_only_disk(self.path) else "in a folder this process cannot write"
            raise StoreUnusable(self.path, f"{self.path} is {where} with commits still in "
                                f"{sidecar['-wal'].name}, which SQLite cannot read there; copy both files to a "
                                "writable folder and open the copy")
        return sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, **options)

    def _open(self) -> None:
        """Check the file, then (and only then) set it up: nothing is written to a file of another
        program, of a newer Orchestra, or that is damaged."""
        db = self._db
        db.execute("PRAGMA busy_timeout=30000")  # this connection's setting; the file is untouched
        application_id, version, tables = self._header()
        if application_id == 0 and not tables and not self.read_only:
            self._create()
            application_id, version, tables = self._header()
        if application_id != APPLICATION_ID:
            raise StoreUnusable(self.path, f"{self.path} is a SQLite database of another program, not an "
                                "Orchestra run store")
        if version > SCHEMA_VERSION:
            raise StoreUnusable(self.path, f"{self.path} was written by a newer Orchestra (schema {version})",
                                move_away="upgrade Orchestra")
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StoreUnusable(self.path, f"{self.path} is damaged ({problems[0]})",
                                move_away="move it away (keep it for recovery)")
        if self.read_only:
            if version < READABLE_SCHEMA:
                raise StoreError(f"{self.path} is read-only and from an older Orchestra (schema {version}); "
                                 "make it writable once so it can be upgraded")
            return
        _switch_to_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        # checkpoints (the WAL copied into the file, then synced) are the checkpoint thread's, so a
        # commit never waits for one; a writer does one itself only if that thread falls 160 MB behind.
        # After one the WAL is cut back to 10 MB.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_BYTES // page_size}")
        db.execute(f"PRAGMA journal_size_limit={10 * 2**20}")
        self._checkpoints = Checkpointer(self.path.absolute())  # (its thread connects later: after a chdir too)
        # when this object goes (or the interpreter exits) without close(): the WAL copied in all the same
        self._finish_checkpoints = weakref.finalize(self, self._checkpoints.finish)
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _header(self) -> tuple[int, int, set[str]]:
        """The application id, schema version and table names, read in one snapshot."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                db.execute("COMMIT")
        return application_id, version, tables

    def _create(self) -> None:
        """Create the schema in a new, empty file; many processes may try at once, one does it."""
        # pages of 16 KiB: a commit writes a quarter of the WAL frames 4 KiB pages take (a fifth less
        # SQL time per instance of a data-set run); a no-op when another process made the file first
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        with self._transaction() as db:  # BEGIN IMMEDIATE: the others wait here, then find it made
            if db.execute("PRAGMA application_id").fetchone()[0] == 0 and not db.execute(
                    "SELECT count(*) FROM sqlite_master").fetchone()[0]:
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)

    def _migrate(self, version: int) -> None:
        """Bring a store written by an older Orchestra up to this schema."""
        with self._transaction() as db:
            if version < 2:  # requests per call (1 was all an old store could know)
                columns = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
                if "requests" not in columns:
                    db.execute("ALTER TABLE calls ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")
            if version < 3:  # the process that holds a running run
                if "owner" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                    db.execute("ALTER TABLE runs ADD COLUMN owner TEXT")
            if version < 4:  # calls are found by their unique index; nodes are read from the event log
                # (the nodes table is left alone: a process of the older version still running writes it)
                db.execute("DROP INDEX IF EXISTS calls_by_run")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Write what is held, then close the connection (the last one to close copies the WAL in)."""
        self.flush()
        if self._checkpoints is not None:
            self._finish_checkpoints()
        with self._lock:
            self._db.close()

    def flush(self) -> None:
        """Write the events held back (see ``listen``) now. A store that cannot be written warns
        once; the run's own writes report the error."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._pending or self.read_only:
            return
        try:
            with self._transaction():
                pass
        except sqlite3.DatabaseError as error:
            if not self._flush_warned:
                self._flush_warned = True
                warnings.warn(f"events could not be written to the run store {self.path}: {error}", RuntimeWarning,
                              stacklevel=2)

    class _Tx:
        """A write transaction that first writes the statements held for later (events, ends of
        runs, of any run), then its own. Its body failing for a reason of its own (``RunHeld``, an
        interrupt) undoes its own statements only: the held ones are still committed."""

        def __init__(self, store: RunStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            store = self.store
            store._lock.acquire()
            self.pending: _Statements = []
            try:
                if store.read_only:  # (SQLite's own words, "attempt to write a readonly database", said not why)
                    raise sqlite3.OperationalError(store.unwritable)
                store._db.execute("BEGIN IMMEDIATE")
                if store.gone is not None or (store._file is not None and _identity(store._where) != store._file):
                    # (a file removed under a running run lost every record it made, and the run ended done, exit 0)
                    raise _FileGone("the file was removed (or another put in its place) while this process had it "
                                    "open; what it recorded since went with the file")
                self.pending, store._pending = store._pending, []
                if self.pending:
                    _write(store._db, self.pending)
                    store._db.execute("SAVEPOINT body")
            except BaseException:
                if store._db.in_transaction:
                    store._db.execute("ROLLBACK")
                store._lock.release()
                store._lost(self.pending)
                raise
            return store._db

        def __exit__(self, kind: object, *rest: object) -> None:
            store = self.store
            db = store._db
            committed = False
            # (a body failing on its own, a refused begin_runs, dropped other runs' held events, and their
            # held ends became failed): its own statements undone, the held ones still committed
            keep_held = (kind is not None and db.in_transaction and bool(self.pending)
                         and not issubclass(kind, sqlite3.DatabaseError))  # type: ignore[arg-type]
            try:
                if kind is None or keep_held:
                    try:
                        if keep_held:
                            db.execute("ROLLBACK TO body")
                        db.execute("COMMIT")
                        committed = True
                        if store._checkpoints is not None:
                            store._checkpoints.committed()
                    except sqlite3.DatabaseError:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        if kind is None:
                            raise
                elif db.in_transaction:  # SQLite rolls a full disk's transaction back itself
                    db.execute("ROLLBACK")
            finally:
                store._lock.release()
                if not committed:
                    store._lost(self.pending)

    def _lost(self, pending: _Statements) -> None:
        """After a transaction that failed: the held statements it carried are gone, but a run whose
        end was among them is still marked as ended, with a status alone (which needs no new space;
        ``finish_run`` does the same), so it is listed as failed and can be resumed."""
        for sql, params in pending:
            if sql is _FINISH_RUN or sql is _FINISH_HELD:
                status, run_id = ("failed" if params[0] == "done" else params[0]), params[5]
                self._end_bare(run_id, status)

    def _end_bare(self, run_id: str, status: str) -> None:
        """Mark a run ended with a status alone; where even that cannot be written, this store lists
        it as ended (other processes do once its lease expires)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(_ENDED_RUN, (status, run_id, self.owner, "running"))
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError:
                self._ended[run_id] = status

    def _unwritable(self, why: object) -> StoreError:
        """The error of a write this store refused (``why``): a read-only one says what to do (it
        was SQLite's words alone, "attempt to write a readonly database")."""
        if isinstance(why, _FileGone):  # (a new error each time: one object raised again and again grows its traceback)
            self.gone = StoreGone(f"cannot write the run store {self.path}: {why}")
            return StoreGone(str(self.gone))
        refused = "read-only" in str(why) or "readonly" in str(why) or str(why) == self.unwritable
        advice = ("; choose a file you can write with --store (or store= in Python), or record nothing with "
                  "--no-store") if refused else (
            " (another program held it for 30 s: one with a transaction open on it, such as a sqlite3 shell or a "
            "backup; writes of other Orchestra processes take moments)") if "database is locked" in str(why) else ""
        return StoreError(f"cannot write the run store {self.path}: {why}{advice}")

    def _transaction(self) -> RunStore._Tx:
        return RunStore._Tx(self)

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._execute_all([(sql, params)])

    def _execute_all(self, statements: _Statements) -> None:
        """Run ``statements`` in one transaction (see ``_write``)."""
        try:
            with self._transaction() as db:
                _write(db, statements)
        except sqlite3.DatabaseError as error:
            raise self._unwritable(error) from None

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self._pending:
            self.flush()
        with self._lock:
            try:
                cursor = self._db.execute(sql, params)
                names = [c[0] for c in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
            except sqlite3.DatabaseError as error:
                raise StoreError(f"cannot read the run store {self.path}: {error}") from None

    # --- runs ------------------------------------------------------------------------------

    def begin_run(self, run_id: str, task: str, config: dict[str, Any] | str, *, force: bool = False) -> None:
        """Record a new run, or take a stored one over to resume it. ``config``: a JSON-ready dict, or its JSON.

        A run still held by another live process (touched within ``LEASE_SECONDS``) is refused,
        unless ``force``: two processes finishing one run would send its calls twice. ``force`` takes
        a run from a process that is gone or cannot be checked, not from one of this machine that
        certainly still runs (its pid and start time match).
        """
        self.begin_runs([(run_id, task, config)], force=force)

    def begin_runs(self, runs: Iterable[tuple[str, str, dict[str, Any] | str]], *, force: bool = False) -> None:
        """``begin_run`` for several runs (id, task, config) in one transaction: all or none."""
        now = time.time()
        rows = [(run_id, task, now, now, _config_json(config), self.owner) for run_id, task, config in runs]
        fresh: list[str] = []
        try:
            with self._transaction() as db:
                known: dict[str, tuple[Any, ...]] = {}
                for start in range(0, len(rows), 500):  # (SQLite takes at most 999 parameters a statement)
                    part = [row[0] for row in rows[start:start + 500]]
                    marks = ", ".join("?" * len(part))
                    known.update((found[0], found[1:]) for found in db.execute(
                        f"SELECT id, owner, updated, status FROM runs WHERE id IN ({marks})", part))
                for row in rows:
                    run_id = row[0]
                    held = known.get(run_id)
                    if held is None:
                        fresh.append(run_id)
                    else:
                        self._refuse_held(run_id, held, now, force=force)
                db.executemany(
                    "INSERT INTO runs (id, task, status, created, updated, config, owner) "
                    "VALUES (?, ?, 'running', ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status='running', "
                    "updated=excluded.updated, resumes=resumes+1, config=excluded.config, owner=excluded.owner, "
                    "answer=NULL, error=NULL, result=NULL", rows)  # (a resume killed showed the last attempt's end)
        except sqlite3.DatabaseError as error:
            raise self._unwritable(error) from None
        self._fresh.difference_update(row[0] for row in rows)
        self._ended_here.difference_update(row[0] for row in rows)
        self._fresh.update(fresh)

    def _refuse_held(self, run_id: str, held: tuple[Any, ...], now: float, *, force: bool = False) -> None:
        """Raise ``RunHeld`` if the run (its owner, updated and status: ``held``) is another live
        process's (see ``begin_run``)."""
        owner, updated, status = held
        if (status in ("running", "cancelled") and owner and owner != self.owner and now - updated < LEASE_SECONDS
                and (_surely_running(owner) if force else _alive(owner))):  # (a lease run out frees it either way)
            raise RunHeld(run_id, owner.rsplit(":", 1)[0], now - updated, running=force, draining=status != "running")

    def check_free(self, run_ids: Sequence[str]) -> None:
        """Refuse, as ``begin_runs`` would (``RunHeld``), runs another live process holds, and any
        run in a store that cannot be written, before anything is begun (an evaluation checks so
        before it writes its answers file)."""
        if self.read_only:
            raise self._unwritable(self.unwritable)
        now = time.time()
        for start in range(0, len(run_ids), 500):  # (SQLite takes at most 999 parameters a statement)
            part = list(run_ids[start:start + 500])
            for row in self._query(f"SELECT id, owner, updated, status FROM runs WHERE id IN "
                                   f"({', '.join('?' * len(part))})", tuple(part)):
                self._refuse_held(row["id"], (row["owner"], row["updated"], row["status"]), now)

    def heartbeat(self, held: Iterable[str] = ()) -> dict[str, str]:
        """Tell other processes this one still runs the runs it holds; of ``held`` (runs going here),
        those another process has taken over since (its lease ran out, or ``force``), with their
        owner now ("" where that process has ended the run already): this process is to stop them
        (its end would no longer be written)."""
        held = list(held)
        lost: dict[str, str] = {}
        try:
            with self._transaction() as db:
                db.execute("UPDATE runs SET updated=? WHERE owner=? AND status IN ('running', 'cancelled')",
                           (time.time(), self.owner))  # (a cancelled one it holds has requests in flight here)
                for start in range(0, len(held), 500):  # (SQLite takes at most 999 parameters a statement)
                    part = held[start:start + 500]
                    lost.update(db.execute(f"SELECT id, coalesce(owner, '') FROM runs WHERE id IN "
                                           f"({', '.join('?' * len(part))}) AND owner IS NOT ?", (*part, self.owner)))
        except sqlite3.DatabaseError as error:
            raise self._unwritable(error) from None
        return lost

    def update_configs(self, configs: Iterable[tuple[str, dict[str, Any] | str]]) -> None:
        """Replace several runs' stored configurations in one transaction."""
        now = time.time()
        rows = [(_config_json(config), now, run_id, self.owner) for run_id, config in configs]
        try:
            with self._transaction() as db:  # (not over the record of a run another process took over)
                db.executemany("UPDATE runs SET config=?, updated=? WHERE id=? AND (owner=? OR owner IS NULL)", rows)
        except sqlite3.DatabaseError as error:
            raise self._unwritable(error) from None

    def release(self, run_id: str) -> None:
        """Give up the lease of a run this process stopped once its requests in flight have ended
        (``finish_run(held=True)``): another process may resume it now."""
        try:
            with self._transaction() as db:
                db.execute("UPDATE runs SET owner=NULL WHERE id=? AND owner=? AND status != 'running'",
                           (run_id, self.owner))
        except sqlite3.DatabaseError as error:
            raise self._unwritable(error) from None

    def finish_run(self, result: RunResult, *, soon: bool = False, held: bool = False,
                   superseded: Sequence[tuple[str, int]] = ()) -> None:
        """Record how a run ended, with its full result. When the full result cannot be written (a
        full disk), the run is still marked as ended with a status alone, which needs no new space,
        so it is listed as failed and can be resumed; the error is raised either way.

        ``soon``: hold the record with the events, for the next write or the event loop's next turn
        (runs of a data set that end together are one transaction; a failure then warns, as events
        do, and the run is marked ended with its status alone). ``held``: its lease is kept (its
        requests still in flight here), until ``release``. ``superseded``: the (key, seq) of failed
        calls that are no longer the run's (see ``RunLedger.superseded``), marked so: their requests
        and cost still count, not as failed calls."""
        self._fresh.discard(result.run_id)
        again = result.status if result.run_id in self._ended_here else "running"
        self._ended_here.add(result.run_id)
        params = (result.status, result.answer, result.error, _model_json(result), time.time(), result.run_id,
                  self.owner, again)
        statements = [(_FINISH_HELD if held else _FINISH_RUN, params),
                      *((_SUPERSEDE, (result.run_id, key, seq)) for key, seq in superseded)]
        if soon:
            self._hold(statements)
            return
        try:
            self._execute_all(statements)
        except StoreError:
            status = "failed" if result.status == "done" else result.status  # its answer was not kept
            self._end_bare(result.run_id, status)
            raise

    def run(self, run_id: str) -> RunRecord:
        """A stored run; an unknown id (or a unique prefix) is resolved or refused clearly."""
        try:
            run_id.encode("utf-8")
        except UnicodeEncodeError as error:  # (a command line's bytes that are not UTF-8: SQLite could not take it)
            raise RunNotFound(run_id, self.path, why=f"the id is not valid Unicode: character {error.start + 1} is a "
                              "lone surrogate (bytes that are not UTF-8 in this locale)") from None
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows and run_id:  # a prefix, exactly (ids sort as UTF-8 bytes: those after it, up to it + U+10FFFF)
            rows = self._query("SELECT * FROM runs WHERE id >= ? AND id < ? ORDER BY created DESC",
                               (run_id, run_id + "\U0010ffff"))
            if len(rows) > 1:
                more = f", and {len(rows) - 5} more" if len(rows) > 5 else ""
                raise StoreError(f"run id {shown_id(run_id)} is ambiguous ({len(rows)} runs start with it: "
                                 f"{', '.join(row['id'] for row in rows[:5])}{more}); give more of it")
        if not rows:
            raise RunNotFound(run_id, self.path)
        return _record(rows[0], self._ended)

    def result(self, run_id: str) -> RunResult | None:
        """The stored result of a finished run."""
        rows = self._query("SELECT result FROM runs WHERE id = ?", (self.run(run_id).id,))
        if not rows or not rows[0]["result"]:
            return None
        try:
            from orchestra.result import RunResult

            return RunResult.model_validate_json(rows[0]["result"])
        except ValueError:
            raise StoreError(f"the stored result of run {run_id} in {self.path} is damaged") from None

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """The latest runs, newest first (runs begun together, as a data set's are: the last first)."""
        return [_record(row, self._ended) for row in self._query(
            "SELECT * FROM runs ORDER BY created DESC, rowid DESC LIMIT ?", (limit,))]

    def runs_with_meta(self, **meta: str) -> list[RunRecord]:
        """Runs whose ``meta`` has these values (e.g. ``kind="eval", dataset=...``), oldest first."""
        where = " AND ".join("json_extract(config, ?) = ?" for _ in meta)
        params = tuple(value for name, value in meta.items() for value in (f'$.spec.meta."{name}"', value))
        return [_record(row, self._ended) for row in self._query(
            f"SELECT * FROM runs WHERE {where or 'true'} ORDER BY created, rowid", params)]

    def earlier_usage(self, run_ids: Sequence[str]) -> dict[str, Earlier]:
        """What runs begun before spent (none for runs this store began afresh): the requests,
        tokens and cost of their recorded calls, failed ones and ones a resume will not ask again
        included (a request changed since, an endpoint moved), and how many calls they made, counted
        as ``run_totals`` counts them."""
        from orchestra.models.types import Usage

        earlier = [run_id for run_id in run_ids if run_id not in self._fresh]
        rows: list[dict[str, Any]] = []
        failed: dict[str, list[tuple[str, int, str, str, str]]] = {}
        unsent: dict[str, set[tuple[str, int]]] = {}
        for start in range(0, len(earlier), 500):  # (SQLite takes at most 999 parameters a statement)
            part = earlier[start:start + 500]
            runs = f"run_id IN ({', '.join('?' * len(part))}) AND {_BILLED}"
            rows += self._query(
                "SELECT run_id, sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(cost_usd) AS usd, "
                f"sum(requests) AS r, sum(purpose != ?) AS calls FROM calls WHERE {runs} GROUP BY run_id",
                (EMBEDDINGS, *part))
            for row in self._query(f"SELECT run_id, key, seq, requests, model, error, purpose FROM calls WHERE {runs} "
                                   "AND status = 'error' AND purpose != ? ORDER BY id", (*part, EMBEDDINGS)):
                failed.setdefault(row["run_id"], []).append((row["key"], row["seq"], row["model"],
                                                              (row["error"] or "").partition(": ")[2], row["purpose"]))
                if not row["requests"]:
                    unsent.setdefault(row["run_id"], set()).add((row["key"], row["seq"]))
        return {row["run_id"]: Earlier(Usage(prompt_tokens=row["p"] or 0, completion_tokens=row["c"] or 0,
                                             cost_usd=dollars(row["usd"] or 0.0), requests=row["r"] or 0),
                                       row["calls"] or 0, frozenset(f[:2] for f in failed.get(row["run_id"], ())),
                                       frozenset(unsent.get(row["run_id"], ())), tuple(failed.get(row["run_id"], ())))
                for row in rows}

    def run_totals(self, run_id: str) -> dict[str, Any]:
        """Calls (failed ones included, and counted as ``failed_calls``: those whose last outcome is
        an error), requests, tokens and cost the run's models were sent and billed.

        Calls answered from the cache cost nothing and are not counted (unless attempts that failed
        before were sent and billed); rows that record requests outside any call (the embedding
        matcher's) count as requests only.
        """
        rows = self._query(
            "SELECT coalesce(sum(purpose != ?), 0) AS calls, coalesce(sum(requests), 0) AS requests, "
            "coalesce(sum(prompt_tokens),0) AS prompt_tokens, coalesce(sum(completion_tokens),0) AS completion_tokens, "
            "coalesce(sum(cost_usd),0) AS cost_usd, "
            "coalesce(sum(purpose != ? AND status = 'error'), 0) AS failed_calls "
            f"FROM calls WHERE run_id = ? AND {_BILLED}", (EMBEDDINGS, EMBEDDINGS, run_id))
        return {**rows[0], "cost_usd": dollars(rows[0]["cost_usd"])}

    # --- the call journal ------------------------------------------------------------------

    def replay(self, run_id: str, key: str, seq: int, request: ChatRequest) -> ChatResult | None:
        """A completed call's recorded result (for resume). Where a model answered it, its usage is
        the row's: the answer's requests and tokens with its failed attempts' (a resumed run counted
        them as it began: ``earlier_usage``)."""
        if run_id in self._fresh:  # begun here with no record before: nothing to replay
            return None
        rows = self._query("SELECT response, source, prompt_tokens, completion_tokens, cost_usd, requests FROM calls "
                           "WHERE run_id=? AND key=? AND seq=? AND status='ok'", (run_id, key, seq))
        if not rows:
            return None
        row = rows[0]
        result = self._revive(row["response"], request)
        if row["source"] != "model":
            return result
        from orchestra.models.types import Usage

        usage = Usage(prompt_tokens=row["prompt_tokens"] or 0, completion_tokens=row["completion_tokens"] or 0,
                      cost_usd=row["cost_usd"] or 0.0, requests=row["requests"])
        return result.model_copy(update={"usage": usage})

    def record(self, run_id: str, key: str, seq: int, model: str, request: ChatRequest,
               outcome: ChatResult | Exception, *, purpose: str, node: str | None, source: str) -> None:
        """Commit one call's outcome with what it cost. A success replaces an earlier error for the same
        call, adding what the failed attempts cost (their requests reached the endpoint too)."""
        self.record_all([(run_id, key, seq, model, request, outcome, purpose, node, source)])

    def record_all(self, entries: Iterable[CallEntry]) -> None:
        """Commit calls' outcomes in one transaction (each: run id, key, seq, model, request,
        outcome, purpose, node, source); see ``record``."""
        now = time.time()
        self._execute_all([_call_row(*entry, now) for entry in entries])

    def record_embeddings(self, run_id: str, *, model: str, node: str | None, usage: Usage,
                          keywords: list[str]) -> None:
        """Record the embedding requests made while recruiting a node (requests outside any call)."""
        self._execute(
            "INSERT INTO calls (run_id, key, seq, model, purpose, node, request, response, status, source, error, "
            "prompt_tokens, completion_tokens, cost_usd, latency_s, created, requests) "
            "VALUES (?, ?, 0, ?, ?, ?, ?, NULL, 'ok', 'model', NULL, ?, ?, ?, 0.0, ?, ?)",
            (run_id, f"{EMBEDDINGS}:{uuid.uuid4().hex}", model, EMBEDDINGS, node, _json({"keywords": keywords}),
             usage.prompt_tokens, usage.completion_tokens, usage.cost_usd, time.time(), usage.requests))

    def calls(self, run_id: str) -> list[dict[str, Any]]:
        """Every recorded call of a run, in order, with request and response parsed."""
        record = self.run(run_id)
        rows = self._query("SELECT * FROM calls WHERE run_id = ? ORDER BY id", (record.id,))
        for row in rows:
            try:
                row["request"] = json.loads(row["request"])
                row["response"] = json.loads(row["response"]) if row["response"] else None
            except (TypeError, ValueError):
                raise StoreError(f"call {row['id']} of run {record.id} in {self.path} is damaged (its request or "
                                 "response is not JSON)") from None
            if row["cost_usd"] is not None:  # (tokens times a price per million: 4.6124999999999995e-06)
                row["cost_usd"] = dollars(row["cost_usd"])
        return rows

    @staticmethod
    def _revive(response: str, request: ChatRequest) -> ChatResult:
        from orchestra.models.structured import StructuredOutputError, parse_output
        from orchestra.models.types import ChatResult

        data = json.loads(response)
        parsed = data.pop("parsed", None)
        result = ChatResult.model_validate(data)
        if request.wants_json:
            try:
                parsed = parse_output(result.text, request)
            except StructuredOutputError:
                pass
        return result.model_copy(update={"parsed": parsed})

    # --- the response cache ----------------------------------------------------------------

    def cache_get(self, model: str, key: str, request: ChatRequest) -> ChatResult | None:
        """A cached result for this exact request to this model."""
        rows = self._query("SELECT response FROM cache WHERE key = ?", (key,))
        if not rows:
            return None
        self._execute("UPDATE cache SET hits = hits + 1 WHERE key = ?", (key,))
        return self._revive(rows[0]["response"], request)

    def cache_put(self, model: str, key: str, request: ChatRequest, result: ChatResult) -> None:
        """Cache a successful result (errors never reach here)."""
        self._execute("INSERT OR REPLACE INTO cache (key, model, response, created, hits) "
                      "VALUES (?, ?, ?, ?, 0)",
                      (key, model, _result_json(result), time.time()))

    def cache(self, *, namespace: str = "", reads: bool = True) -> StoreCache:
        """The cache as the executor wants it. ``namespace`` keeps a use's entries apart (a
        profile's answers are not the runs' cache); ``reads=False`` only records answers (for a
        later resume to read)."""
        return StoreCache(self, namespace=namespace, reads=reads)

    # --- events and nodes ------------------------------------------------------------------

    def listen(self, event: Event) -> None:
        """An event listener: keeps node state and the event log current. Events are held until the
        next write or the event loop's next turn, so a burst of them is one transaction."""
        if type(event) in QUIET_EVENTS:
            return
        self._hold([(_LOG_EVENT, (getattr(event, "run_id", None), event.kind, event.at, _event_json(event)))])

    def _hold(self, statements: _Statements) -> None:
        """Add statements to the group written at the next write or the event loop's next turn."""
        import asyncio  # (loaded already wherever there is an event loop)

        self._pending += statements
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to wait for: write now
            self.flush()
            return
        if self._flush is None or self._flush_loop is not loop:  # (a loop that ended ran its flush or lost it)
            self._flush_loop = loop
            self._flush = loop.call_soon(self.flush)

    def nodes(self, run_id: str) -> list[dict[str, Any]]:
        """A run's nodes as its events left them (status, experts, output or error). Of a run that
        is no longer running, a node its events left at work failed with the run's error (its
        process was killed: no event said how the node ended)."""
        record = self.run(run_id)
        try:
            rows = _node_rows(record.id, self.events(record.id))
        except (KeyError, TypeError, AttributeError, ValueError) as error:  # (an event missing a field it needs)
            raise StoreError(f"the event log of run {record.id} in {self.path} is damaged ({type(error).__name__}: "
                             f"{error})") from None
        if record.status != "running":
            for node in rows:
                if node["status"] in _AT_WORK:
                    node.update(status="failed", error=node["error"] or record.error)
        return rows

    def events(self, run_id: str) -> Iterator[dict[str, Any]]:
        """A run's events in order."""
        record = self.run(run_id)
        for row in self._query("SELECT id, data FROM events WHERE run_id = ? ORDER BY id", (record.id,)):
            try:
                event = json.loads(row["data"])
            except (TypeError, ValueError):
                raise StoreError(f"event {row['id']} of run {record.id} in {self.path} is damaged (not JSON)") from None
            if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
                raise StoreError(f"event {row['id']} of run {record.id} in {self.path} is damaged (not an event)")
            yield event


class StoreCache:
    """Adapter: the store's cache table as the executor's ``ResponseCache`` (see ``RunStore.cache``)."""

    def __init__(self, store: RunStore, *, namespace: str = "", reads: bool = True) -> None:
        self.store, self.namespace, self.reads = store, namespace, reads

    def get(self, model: str, key: str, request: ChatRequest) -> ChatResult | None:
        """A cached result, or None."""
        return self.store.cache_get(model, self.namespace + key, request) if self.reads else None

    def put(self, model: str, key: str, request: ChatRequest, result: ChatResult) -> None:
        """Remember a successful result."""
        self.store.cache_put(model, self.namespace + key, request, result)


_Statements = list[tuple[str, tuple[Any, ...]]]


def _write(db: sqlite3.Connection, statements: _Statements) -> None:
    """Held statements, in their order, a run of one statement at a time in one ``executemany``;
    the event log's rows first, in one go (no other statement reads or writes that table)."""
    db.executemany(_LOG_EVENT, [params for sql, params in statements if sql is _LOG_EVENT])
    run: list[tuple[Any, ...]] = []
    current = ""
    for sql, params in statements:
        if sql is _LOG_EVENT:
            continue
        if sql != current and run:
            db.executemany(current, run)
            run = []
        current = sql
        run.append(params)
    if run:
        db.executemany(current, run)


def _node_rows(run_id: str, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's nodes as its event log leaves them: the plan's nodes in order, each with the last
    status, experts, output or error its events gave it (``updated``: when that was)."""
    nodes: dict[str, dict[str, Any]] = {}
    for event in events:
        kind, at = event.get("kind"), event.get("at")
        if kind == PlanReady.kind:  # the plan as it is now (a resume with --reload may rename or drop steps)
            earlier, nodes = nodes, {}
            for planned in event["nodes"]:
                node = nodes[planned["id"]] = earlier.get(planned["id"]) or {
                    "run_id": run_id, "node_id": planned["id"], "instruction": None, "depends_on": [],
                    "status": "pending", "skills": [], "experts": [], "aggregator": None, "explanation": [],
                    "output": None, "error": None, "updated": at}
                node.update(instruction=planned["instruction"], depends_on=list(planned["depends_on"]), updated=at)
            continue
        changed = nodes.get(event.get("node"))  # type: ignore[arg-type]
        if changed is not None and kind == AggregationFellBack.kind:  # (show said nothing of why it had none)
            changed.update(aggregator=None, updated=at,
                           explanation=[*changed["explanation"], fell_back(event["aggregator"], event["reason"])])
            continue
        change = _NODE_CHANGES.get(kind)  # type: ignore[arg-type]
        if changed is None or change is None:
            continue
        changed.update(change(event), updated=at)
    return list(nodes.values())


def _recruited(event: dict[str, Any]) -> dict[str, Any]:
    change = {"status": "running", **{name: event[name] for name in ("skills", "experts", "aggregator", "explanation")}}
    if event.get("instruction"):
        change["instruction"] = event["instruction"]
    return change


#: the statuses of a node being worked on
_AT_WORK = frozenset({"recruiting", "running", "aggregating"})

#: how each node event changes its node's row (a plan's nodes are added by ``_node_rows`` itself)
_NODE_CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    NodeReady.kind: lambda event: {"status": "recruiting", "error": None},  # a resumed node starts afresh
    ExpertsRecruited.kind: _recruited,
    NodeAggregating.kind: lambda event: {"status": "aggregating"},
    NodeDone.kind: lambda event: {"status": "done", "output": event["output"], "error": None,
                                  # (recorded since it was part of the event: an aggregator recruited but not asked)
                                  **({"aggregator": event["aggregator"]} if "aggregator" in event else {})},
    NodeFailed.kind: lambda event: {"status": "failed", "error": event["error"]},
    NodeSkipped.kind: lambda event: {"status": "skipped", "error": event["reason"]},
}
