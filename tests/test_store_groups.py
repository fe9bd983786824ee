"""The store keeps up with a data set: the ends of runs that finish together are one transaction
(each committed before its result is handed over), a run begun here never looks for calls to
replay, a failed group still marks its runs ended, and the request keys stay what they were."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sqlite3
import warnings
from pathlib import Path

import pytest
from helpers import scripted_pool
from pydantic import BaseModel

from orchestra import Orchestra
from orchestra.models import ChatRequest, ChatResult
from orchestra.skills import SkillExtractor
from orchestra.store import CHECKPOINT_BYTES, RunStore

REPLAY = "SELECT response, source, prompt_tokens, completion_tokens, cost_usd, requests FROM calls"


def traced(store: RunStore) -> list[str]:
    """Every statement the store's connection runs from now on."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    return statements


def test_runs_that_end_together_are_one_transaction_committed_before_each_result_is_yielded(tmp_path: Path) -> None:
    pool, _ = scripted_pool(3)
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(pool, k=2, store=store)
    statements = traced(store)

    async def main() -> list[str]:
        seen = []
        tasks = [f"What is {i} + 1?" for i in range(12)]
        async for _, result in orc.arun_iter(tasks, window=12, rare_filter=False):  # in lockstep: end together
            # another connection (another process) sees the run ended, with its answer, already
            with sqlite3.connect(tmp_path / "runs.db") as reader:
                status, answer = reader.execute("SELECT status, answer FROM runs WHERE id=?",
                                                (result.run_id,)).fetchone()
            assert (status, answer) == ("done", result.answer)
            seen.append(result.run_id)
        return seen

    finished = asyncio.run(main())
    assert len(finished) == 12
    commits = [i for i, s in enumerate(statements) if s == "COMMIT"]
    ends = [i for i, s in enumerate(statements) if s.startswith("UPDATE runs SET status='done'")]  # (bound values)
    assert len(ends) == 12
    assert len({next(c for c in commits if c > i) for i in ends}) == 1  # ended in one turn: one transaction


def test_a_run_begun_here_never_looks_for_calls_to_replay_and_a_resumed_one_does(tmp_path: Path) -> None:
    pool, _ = scripted_pool(3)
    store = RunStore(tmp_path / "runs.db")
    statements = traced(store)
    stopped = Orchestra(pool, k=2, store=store).run("What is 2 + 2?", plan=False, budget={"max_calls": 3})
    assert stopped.status == "budget_exceeded"
    assert not [s for s in statements if s.startswith(REPLAY)]
    resumed = Orchestra(pool, k=2, store=store).resume(stopped.run_id, budget={"max_calls": 50})
    assert resumed.status == "done" and resumed.usage.replayed_calls == 3
    assert [s for s in statements if s.startswith(REPLAY)]


def test_a_group_that_cannot_be_written_still_marks_its_runs_ended(tmp_path: Path) -> None:
    pool, _ = scripted_pool(2)
    store = RunStore(tmp_path / "runs.db")
    done = Orchestra(pool, k=1, store=store).run("What is 1 + 1?", plan=False)
    ended = done.model_copy(update={"run_id": "r-full", "answer": "x" * 200_000})  # needs new pages
    store.begin_run("r-full", "t", {})
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")

    async def finish() -> None:
        store.finish_run(ended, soon=True)
        await asyncio.sleep(0)  # the group is written at the loop's next turn: the disk is full

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        asyncio.run(finish())
    assert any("could not be written" in str(w.message) for w in warned)
    assert store.run("r-full").status == "failed"  # its status alone needed no new space
    with sqlite3.connect(tmp_path / "runs.db") as reader:  # and it is on disk, for other processes too
        assert reader.execute("SELECT status, owner FROM runs WHERE id='r-full'").fetchone() == ("failed", None)


def test_a_refused_begin_keeps_the_ends_and_events_held_for_other_runs(tmp_path: Path) -> None:
    """A resume refused (another owner holds the run) rolled back the transaction that carried the
    held statements of other runs: their events were lost and a held `done` end became `failed`."""
    from orchestra.errors import RunHeld
    from orchestra.events import NodeFailed

    pool, _ = scripted_pool(2)
    RunStore(tmp_path / "runs.db").begin_run("held", "t", {})  # another owner holds it
    store = RunStore(tmp_path / "runs.db")
    done = Orchestra(pool, k=1, store=store).run("What is 1 + 1?", plan=False)

    async def end_one_and_begin_the_held_one() -> None:
        store.begin_run("B", "t", {})
        store.listen(NodeFailed(run_id="B", node="answer", error="marker"))
        store.finish_run(done.model_copy(update={"run_id": "B"}), soon=True)
        with pytest.raises(RunHeld):
            store.begin_run("held", "t", {})  # in the same turn: the held statements are written first

    asyncio.run(end_one_and_begin_the_held_one())
    with sqlite3.connect(tmp_path / "runs.db") as reader:
        assert reader.execute("SELECT status, answer FROM runs WHERE id='B'").fetchone() == ("done", done.answer)
        assert reader.execute("SELECT kind FROM events WHERE run_id='B'").fetchall() == [("node_failed",)]
        assert reader.execute("SELECT status, resumes FROM runs WHERE id='held'").fetchone() == ("running", 0)


class Answer(BaseModel):
    value: int


def test_request_keys_are_the_sha256_of_the_sorted_canonical_request() -> None:
    requests = [*SkillExtractor().requests("Qué é 5 + 5? ☃"),
                ChatRequest.user("hi ☃", system="sys", temperature=0.3, max_tokens=5, seed=3, stop=["a"], output=Answer),
                ChatRequest.user("plain", output="json")]
    for request in requests:
        blob = json.dumps({"model": "OpenAICompatible:m", **request.canonical()}, sort_keys=True, ensure_ascii=False)
        assert request.key("OpenAICompatible:m") == hashlib.sha256(blob.encode()).hexdigest()
    # the key of a stored call or cache entry never changes (this one was computed before any speed-up)
    assert ChatRequest.user("hi").key("m") == "039b10d2fb25278b6c28a949d530ec8ba1966e8b7f1a3aef127f92db70a0df5f"


def test_keys_of_requests_sharing_their_messages_follow_every_other_field() -> None:
    """Requests that share their messages reuse the JSON written around the seed; any other field
    that differs (or a schema changed in place) must still give the key of the full JSON."""
    schema: dict[str, object] = {"type": "object"}
    first = ChatRequest.user("q ☃", output=schema, temperature=0.5, max_tokens=7, seed=1)
    variants = [first, first.model_copy(update={"seed": 2}), first.model_copy(update={"temperature": 0.7}),
                first.model_copy(update={"max_tokens": 8}), first.model_copy(update={"stop": ("x",)}),
                first.model_copy(update={"output": "json"}), first.model_copy(update={"temperature": 1}),
                first.model_copy(update={"temperature": 1.0})]
    for request in variants:
        for model in ("m1", "m2"):
            first.keyed("m1")  # what the cache holds: the first request's JSON, for model m1
            blob = json.dumps({"model": model, **request.canonical()}, sort_keys=True, ensure_ascii=False)
            assert request.keyed(model) == (hashlib.sha256(blob.encode()).hexdigest(), blob)
    first.model_copy(update={"temperature": 1.0}).keyed("m1")  # equal to 1, but JSON writes 1.0
    whole = first.model_copy(update={"temperature": 1})  # (a copy is not validated: an int stays an int)
    assert '"temperature": 1}' in whole.keyed("m1")[1]
    first.keyed("m1")
    schema["title"] = "changed in place"
    again = first.model_copy(update={"seed": 3})
    assert '"title": "changed in place"' in again.keyed("m1")[1]


def test_every_task_s_keyword_requests_share_one_schema_dict_so_its_json_is_written_once() -> None:
    from orchestra.models import types

    first, second = SkillExtractor().requests("What is 1 + 1?"), SkillExtractor().requests("Who wrote Hamlet?")
    assert all(request.output is first[0].output for request in [*first, *second])
    types._schemas.clear()
    for request in [*first, *second]:
        request.keyed("m")
    assert len(types._schemas) == 1


def test_checkpoints_copy_the_wal_into_the_file_from_their_own_thread_and_close_ends_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    store = RunStore(path)
    size = path.stat().st_size
    payload = "x" * 4000
    for i in range(200):  # 200 transactions, ~1 MB: far below the writers' own checkpoint threshold
        store.begin_run(f"r{i}", payload, {"n": i})
    pages = store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert pages * store._db.execute("PRAGMA page_size").fetchone()[0] == CHECKPOINT_BYTES
    assert path.stat().st_size - size < 200 * 4000  # committed to the WAL; the file itself is behind
    store._checkpoints.wait()
    assert path.stat().st_size - size > 200 * 4000  # copied in by the thread
    thread = store._checkpoints._thread
    assert thread is not None and thread.is_alive() and thread is not __import__("threading").current_thread()
    store.close()
    assert not thread.is_alive()
    assert [r.task for r in RunStore(path).runs(limit=1)] == [payload]


def test_a_store_never_closed_leaves_every_commit_in_the_file_when_the_process_ends(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "runs.db"
    script = ("import sys\nfrom orchestra.store import RunStore\nstore = RunStore(sys.argv[1])\n"
              "for i in range(300):\n    store.begin_run(f'r{i}', 'x' * 2000, {})\n")  # no close(): the process ends
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=120)
    wal = path.with_name("runs.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    alone = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the file by itself, no WAL read
    assert alone.execute("SELECT count(*) FROM runs").fetchone()[0] == 300
    alone.close()



def test_json_columns_are_stored_as_text_even_when_written_from_bytes(tmp_path: Path) -> None:
    """Results, responses and events go to SQLite as pydantic's UTF-8 bytes; they must land as TEXT
    (not BLOB), so SQLite's JSON functions and other readers see JSON, non-ASCII included."""
    pool, _ = scripted_pool(3)
    store = RunStore(tmp_path / "runs.db")
    result = Orchestra(pool, k=2, store=store).run("What is γ + 1?", plan=False)
    assert result.status == "done", result.error
    store.cache_put("m", "k" * 64, ChatRequest.user("γ?"), ChatResult(text="γ answer", model="m"))
    db = sqlite3.connect(tmp_path / "runs.db")
    columns = (("runs", "result"), ("calls", "response"), ("events", "data"), ("cache", "response"))
    types = {f"{table}.{column}": {row[0] for row in db.execute(f"SELECT DISTINCT typeof({column}) FROM {table}")}
             for table, column in columns}
    assert types == {name: {"text"} for name in types}
    assert db.execute("SELECT json_extract(result, '$.task') FROM runs").fetchone() == ("What is γ + 1?",)
    assert db.execute("SELECT json_extract(response, '$.text') FROM cache").fetchone() == ("γ answer",)
    assert store.result(result.run_id) == result


def test_runs_begun_together_are_listed_last_begun_first(tmp_path: Path) -> None:
    # a data set's chunk of runs shares one time stamp: they were listed in no set order (item 0 first)
    store = RunStore(tmp_path / "runs.db")
    store.begin_runs([(f"r{i}", f"item {i}", {}) for i in range(5)])
    assert [run.id for run in store.runs()] == ["r4", "r3", "r2", "r1", "r0"]
    assert len({run.created for run in store.runs()}) == 1


def test_a_data_set_chunk_being_recruited_is_kept_alive_by_the_heartbeat(tmp_path: Path, monkeypatch) -> None:
    """A chunk's runs are begun, then recruited together before they go: nothing beat for them, so
    slow keyword calls (over the 30 s lease) let another process list them failed and take them over."""
    from helpers import kind_of

    from orchestra import Agent, Pool
    from orchestra.core import Instance
    from orchestra.models import FunctionModel

    monkeypatch.setattr("orchestra.core.HEARTBEAT_SECONDS", 0)  # a beat every turn of the loop
    path = tmp_path / "runs.db"
    beats: list[bool] = []
    slow = [True]  # the first keyword call only

    async def reply(request: ChatRequest) -> object:
        if kind_of(request) != "keywords":
            return "The answer is 4"
        if slow:
            slow.clear()
            with sqlite3.connect(path) as other:  # as if the lease had run out, seen from another process
                other.execute("UPDATE runs SET updated=0 WHERE id='ds-1'")
            for _ in range(200):  # the keyword call is slow: turns of the loop go by
                await asyncio.sleep(0)
            with sqlite3.connect(path) as other:
                beats.append(other.execute("SELECT updated FROM runs WHERE id='ds-1'").fetchone()[0] > 0)
        return {"keywords": ["arithmetic"]}

    model = FunctionModel(reply, name="m")
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model), Agent(name="duo", model=model)]), k=1, plan=False,
                    store=path)
    results = orc.run_many([Instance("What is 2 + 2?", options={"run_id": "ds-1"}),
                            Instance("What is 3 + 3?", options={"run_id": "ds-2"})])
    assert [r.status for r in results] == ["done", "done"]
    assert beats == [True]


@pytest.mark.parametrize("ended", [False, True])
def test_a_run_another_process_took_over_is_stopped_here_and_its_end_not_written(tmp_path: Path, monkeypatch,
                                                                                ended: bool) -> None:
    """An owner whose lease ran out was never told: it went on sending the run's calls beside the
    process that took it over, and its end overwrote that process's record (``ended``: that process
    has finished the run already, which leaves no owner: its record was overwritten too)."""
    from helpers import kind_of

    from orchestra import Agent, Pool
    from orchestra.models import FunctionModel

    monkeypatch.setattr("orchestra.core.HEARTBEAT_SECONDS", 0)
    path = tmp_path / "runs.db"
    turns: list[int] = []
    taken = ("UPDATE runs SET status='done', answer='B: 4', owner=NULL WHERE id='taken'" if ended else
             "UPDATE runs SET owner='elsewhere pid 1:beef', updated=1e12 WHERE id='taken'")

    async def reply(request: ChatRequest) -> object:
        if kind_of(request) == "keywords":
            return {"keywords": ["arithmetic"]}
        with sqlite3.connect(path) as other:  # another process takes the run over (its lease ran out)
            other.execute(taken)
        for turn in range(500):  # a slow expert: the next heartbeat finds the run taken
            turns.append(turn)
            await asyncio.sleep(0)
        return "The answer is 4"

    orc = Orchestra(Pool(agents=[Agent(name="solo", model=FunctionModel(reply, name="m"))]), k=1, plan=False,
                    store=path)
    result = orc.run("What is 2 + 2?", run_id="taken")
    assert result.status == "cancelled" and len(turns) < 500
    holder = "which has ended it" if ended else "(elsewhere pid 1), which finishes it"
    assert result.error == f"run taken was taken over by another process {holder}; this process stopped it"
    with sqlite3.connect(path) as reader:  # the new owner's record stands
        assert reader.execute("SELECT status, owner, answer, result FROM runs WHERE id='taken'").fetchone() == (
            ("done", None, "B: 4", None) if ended else ("running", "elsewhere pid 1:beef", None, None))


def test_a_resume_clears_the_last_attempts_end_so_a_killed_one_reads_abandoned(tmp_path: Path) -> None:
    """A resume left the last attempt's answer, error and result on the run: killed, it was listed
    with that attempt's error (a budget's, advising a larger budget), and its result was the old one."""
    from orchestra.store import ABANDONED

    pool, _ = scripted_pool(3)
    first = Orchestra(pool, k=2, store=tmp_path / "runs.db").run("What is 2 + 2?", plan=False,
                                                                  budget={"max_calls": 3}, run_id="b1")
    assert first.status == "budget_exceeded"
    resuming = RunStore(tmp_path / "runs.db")
    resuming.begin_run("b1", "What is 2 + 2?", {})  # then its process is killed: no end recorded
    with sqlite3.connect(tmp_path / "runs.db") as db:  # (a process of this machine that is gone)
        db.execute("UPDATE runs SET owner=? WHERE id='b1'", (f"{socket.gethostname()} pid 999999999:dead",))
    record = RunStore(tmp_path / "runs.db").run("b1")
    assert (record.status, record.error, record.answer, record.resumes) == ("failed", ABANDONED, None, 1)
    assert RunStore(tmp_path / "runs.db").result("b1") is None


def test_a_damaged_event_or_call_row_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    from test_cli import cli

    pool, _ = scripted_pool(2)
    path = tmp_path / "runs.db"
    Orchestra(pool, k=1, store=path).run("What is 1 + 1?", plan=False, run_id="dmg")
    with sqlite3.connect(path) as db:
        event, kept = db.execute("SELECT id, data FROM events ORDER BY id DESC LIMIT 1").fetchone()
        plan = db.execute("SELECT id FROM events WHERE kind='plan_ready'").fetchone()[0]
    for data, says, at in ((kept[:20], "event {} of run dmg in {} is damaged (not JSON)", event),
                           ("[1, 2]", "event {} of run dmg in {} is damaged (not an event)", event),
                           ('{"kind": "plan_ready"}', "the event log of run dmg in {1} is damaged (KeyError: 'nodes')",
                            plan)):
        with sqlite3.connect(path) as db:
            original = db.execute("SELECT data FROM events WHERE id = ?", (at,)).fetchone()[0]
            db.execute("UPDATE events SET data = ? WHERE id = ?", (data, at))
        shown = cli("show", "dmg", "--store", str(path))
        assert (shown.returncode, shown.stderr) == (2, f"error: {says.format(at, path)}\n")
        with sqlite3.connect(path) as db:
            db.execute("UPDATE events SET data = ? WHERE id = ?", (original, at))
    with sqlite3.connect(path) as db:
        call = db.execute("SELECT max(id) FROM calls").fetchone()[0]
        db.execute("UPDATE calls SET response = 'oops' WHERE id = ?", (call,))
    shown = cli("show", "dmg", "--store", str(path), "--json")
    assert shown.returncode == 2 and shown.stderr == (f"error: call {call} of run dmg in {path} is damaged (its "
                                                      "request or response is not JSON)\n")


def test_a_chunks_recruiting_does_not_write_over_the_config_of_a_run_another_process_took(tmp_path: Path) -> None:
    from helpers import kind_of

    from orchestra import Agent, Pool
    from orchestra.core import Instance
    from orchestra.models import FunctionModel

    path = tmp_path / "runs.db"
    slow = [True]

    def reply(request: ChatRequest) -> object:
        if kind_of(request) != "keywords":
            return "The answer is 4"
        if slow:
            slow.clear()
            with sqlite3.connect(path) as other:  # taken over (forced) while the chunk is recruited
                other.execute("UPDATE runs SET owner='elsewhere pid 1:beef', config='{\"B\": \"mine\"}' "
                              "WHERE id='ds-1'")
        return {"keywords": ["arithmetic"]}

    model = FunctionModel(reply, name="m")
    orc = Orchestra(Pool(agents=[Agent(name="solo", model=model), Agent(name="duo", model=model)]), k=1, plan=False,
                    store=path)
    orc.run_many([Instance("What is 2 + 2?", options={"run_id": "ds-1"}),
                  Instance("What is 3 + 3?", options={"run_id": "ds-2"})])
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT config, owner FROM runs WHERE id='ds-1'").fetchone() == (
            '{"B": "mine"}', "elsewhere pid 1:beef")
        assert reader.execute("SELECT status FROM runs WHERE id='ds-2'").fetchone() == ("done",)


def test_a_transaction_whose_body_fails_commits_the_held_statements_but_not_its_own(tmp_path: Path) -> None:
    from orchestra.events import NodeFailed
    from orchestra.store import StoreError

    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r", "t", {})

    async def fail_after_writing() -> None:
        store.listen(NodeFailed(run_id="r", node="answer", error="held"))  # held for the next write
        with pytest.raises(RuntimeError), store._transaction() as db:
            db.execute("UPDATE runs SET task='changed' WHERE id='r'")
            raise RuntimeError("the body's own failure")

    asyncio.run(fail_after_writing())
    with sqlite3.connect(tmp_path / "runs.db") as reader:
        assert reader.execute("SELECT task FROM runs WHERE id='r'").fetchone() == ("t",)  # its own undone
        assert reader.execute("SELECT kind FROM events WHERE run_id='r'").fetchall() == [("node_failed",)]
    store.unwritable = "it is read-only"  # (a store on a read-only disk: refused before an evaluation writes its answers)
    with pytest.raises(StoreError) as refused:  # (with what to do: SQLite's words alone said nothing of it)
        store.check_free([])
    assert str(refused.value) == (f"cannot write the run store {store.path}: it is read-only; choose a file you can "
                                  "write with --store (or store= in Python), or record nothing with --no-store")
    assert str(store._unwritable("attempt to write a readonly database")).endswith("or record nothing with --no-store")
    assert str(store._unwritable("database or disk is full")).endswith("disk is full")
    # (a store another program locks: it said "database is locked" alone, naming nothing to do)
    assert str(store._unwritable(sqlite3.OperationalError("database is locked"))) == (
        f"cannot write the run store {store.path}: database is locked (another program held it for 30 s: one with "
        "a transaction open on it, such as a sqlite3 shell or a backup; writes of other Orchestra processes take "
        "moments)")


def test_a_resume_clears_the_answer_a_partial_attempt_left(tmp_path: Path) -> None:
    from orchestra.result import RunResult

    store = RunStore(tmp_path / "runs.db")
    store.begin_run("p", "t", {})
    store.finish_run(RunResult(run_id="p", task="t", status="partial", answer="half of it", error="a step failed"))
    RunStore(tmp_path / "runs.db").begin_run("p", "t", {})
    with sqlite3.connect(tmp_path / "runs.db") as reader:
        assert reader.execute("SELECT status, answer, error, result FROM runs WHERE id='p'").fetchone() == (
            "running", None, None, None)


def test_an_end_from_the_process_a_run_was_taken_from_never_overwrites_the_end_of_the_one_that_took_it(
        tmp_path: Path) -> None:
    """Both ended `done`: the stale owner's answer replaced the new owner's finished record (the status
    check let a process's late re-record of its own end through)."""
    from orchestra.result import PlanTrace, RunResult

    def ended(answer: str, status: str = "done") -> RunResult:
        return RunResult(run_id="r", task="task", status=status, answer=answer, plan=PlanTrace(nodes=[]))

    path = tmp_path / "runs.db"
    old, new = RunStore(path), RunStore(path)
    old.begin_run("r", "task", {})
    new.begin_run("r", "task", {}, force=True)  # (its lease ran out: the machine slept)
    new.finish_run(ended("B's answer"))
    old.finish_run(ended("A's stale answer"))
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT status, answer FROM runs WHERE id='r'").fetchone() == ("done", "B's answer")
    new.finish_run(ended("B's answer, counted again"))  # (its own end recorded again: an answer that came late)
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT answer FROM runs WHERE id='r'").fetchone() == ("B's answer, counted again",)
