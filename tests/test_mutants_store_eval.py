"""Tests that kill mutants of orchestra.store and orchestra.evaluate that survived the suite.

Each test names the behaviour it pins and the bug it guards against; all use a real SQLite store,
scripted models and the evaluation's own functions, with no timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import scripted_pool

from orchestra import Orchestra
from orchestra.datasets import Dataset, Item
from orchestra.errors import ConfigError, RunHeld, StoreError
from orchestra.evaluate import (
    Tally,
    _answers_line,
    aevaluate,
    check_output,
    claim_answers_file,
    html_page,
    method_variant,
)
from orchestra.events import ExpertsRecruited, NodeDone, NodeReady, PlanReady
from orchestra.grading import get_grader
from orchestra.models import ChatRequest, ChatResult, Usage
from orchestra.recruit import CALIBRATED_COST_LAMBDA
from orchestra.result import NodeTrace, PlanTrace, RunResult, RunUsage
from orchestra.settings import Settings
from orchestra.store import ABANDONED, LEASE_SECONDS, RunStore, _process

# --- the store: who holds a run --------------------------------------------------------------------


def test_check_free_refuses_a_run_another_live_owner_holds_as_begin_runs_would(tmp_path: Path) -> None:
    """``check_free`` is an evaluation's look before it writes its answers file over: it must refuse
    what ``begin_runs`` refuses (a bug passing ``force=True`` along let the answers file be emptied
    before the begin was refused)."""
    path = tmp_path / "runs.db"
    holder = RunStore(path)  # another store object: another owner tag, a fresh lease, a live process
    holder.begin_run("r1", "t", {})
    store = RunStore(path)
    with pytest.raises(RunHeld):
        store.check_free(["r1"])
    with pytest.raises(RunHeld):
        store.begin_runs([("r1", "t", {})])
    store.check_free(["unknown"])  # (no such run: nothing to refuse)
    store.close()
    holder.close()


def test_a_run_whose_lease_ran_out_is_taken_over_without_force_even_while_its_process_lives(
        tmp_path: Path) -> None:
    """A holder that stopped touching its run for ``LEASE_SECONDS`` (stuck) no longer holds it: a plain
    resume takes it over. (A bug refusing every run of a live process of this machine, lease or not,
    left such a run unresumable without killing the stuck process.)"""
    path = tmp_path / "runs.db"
    RunStore(path).begin_run("r1", "t", {})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        seen = _process(sleeper.pid)
        assert seen is not None
        tag = f"{socket.gethostname()} pid {sleeper.pid}:beef@{seen[1]}"  # pid and start time: surely running
        with sqlite3.connect(path) as db:
            db.execute("UPDATE runs SET status='running', owner=?, updated=?", (tag, time.time() - LEASE_SECONDS - 60))
        store = RunStore(path)
        store.begin_run("r1", "t", {})
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT owner, resumes FROM runs").fetchone() == (store.owner, 1)
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)


def test_a_run_another_process_ended_reads_as_ended_to_the_process_it_was_taken_from(tmp_path: Path) -> None:
    """An ended run is held by nobody: the process it was taken from learns from its heartbeat that
    the run was ended (owner ""), not that the other process still finishes it (a bug leaving the
    owner on an ended run told the user "(host pid N), which finishes it" of a finished run)."""
    path = tmp_path / "runs.db"
    first = RunStore(path)
    first.begin_run("r1", "t", {})
    second = RunStore(path)  # takes the run over (force: its holder is this process, whose runs it may take)
    second.begin_run("r1", "t", {}, force=True)
    assert first.heartbeat(["r1"]) == {"r1": second.owner}
    second.finish_run(RunResult(run_id="r1", task="t", status="done", answer="4", plan=PlanTrace(nodes=[])))
    assert first.heartbeat(["r1"]) == {"r1": ""}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status, answer, owner FROM runs").fetchone() == ("done", "4", None)
    first.close()
    second.close()


def test_a_run_whose_end_cannot_be_written_is_listed_with_the_status_it_ended_with(tmp_path: Path) -> None:
    """Where not even a run's status can be written, the store that saw it end lists it with that
    status (cancelled, stopped by its budget), not as failed: only a ``done`` run, whose answer is
    lost, reads as failed."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_runs([("r-cancelled", "t", {}), ("r-budget", "t", {})])
    store._db.execute("PRAGMA busy_timeout=0")  # (fail at once instead of waiting for the lock)
    locker = sqlite3.connect(tmp_path / "runs.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        for run_id, status in (("r-cancelled", "cancelled"), ("r-budget", "budget_exceeded")):
            ended = RunResult(run_id=run_id, task="t", status=status, answer=None, error="stopped",  # type: ignore[arg-type]
                              plan=PlanTrace(nodes=[]))
            with pytest.raises(StoreError, match="locked"):
                store.finish_run(ended)
        assert [(store.run(r).status, store.run(r).error) for r in ("r-cancelled", "r-budget")] == [
            ("cancelled", ABANDONED), ("budget_exceeded", ABANDONED)]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    store.close()


# --- the store: the response cache ---------------------------------------------------------------


def test_a_cache_that_only_records_never_answers_and_namespaces_stay_apart(tmp_path: Path) -> None:
    """``cache(reads=False)`` (``orchestra profile`` without ``--resume``) records answers for a later
    resume but never answers from them: a bug reading anyway made a fresh profile replay the last one."""
    store = RunStore(tmp_path / "runs.db")
    request = ChatRequest.user("What is 2 + 2?")
    writer = store.cache(namespace="profile:", reads=False)
    writer.put("m", "key", request, ChatResult(text="4", model="m", usage=Usage(prompt_tokens=3, requests=1)))
    assert writer.get("m", "key", request) is None
    reader = store.cache(namespace="profile:")
    answered = reader.get("m", "key", request)
    assert answered is not None and answered.text == "4"
    assert store.cache().get("m", "key", request) is None  # the runs' cache is another namespace
    store.close()


# --- the store: node rows read from the event log -----------------------------------------------------


def test_a_nodes_rendered_instruction_and_the_aggregator_that_answered_are_what_show_lists(tmp_path: Path) -> None:
    """``ExpertsRecruited`` carries the instruction the experts got (a workflow step's prompt, rendered):
    it replaces the plan's (an empty one keeps it). ``NodeDone`` names the aggregator that answered:
    None where one was recruited but not asked (one answer stood), which must not keep the recruited name."""
    store = RunStore(tmp_path / "runs.db")
    store.begin_run("r1", "t", {})
    plan = ({"id": "a", "instruction": "do {x}", "depends_on": []},
            {"id": "b", "instruction": "do b", "depends_on": []})
    events = [PlanReady(run_id="r1", nodes=plan, attempts=1), NodeReady(run_id="r1", node="a"),
              NodeReady(run_id="r1", node="b"),
              ExpertsRecruited(run_id="r1", node="a", experts=("agent0",), aggregator="judge", skills=("math",),
                               explanation=("why",), instruction="do 7"),
              ExpertsRecruited(run_id="r1", node="b", experts=("agent0", "agent1"), aggregator="judge",
                               skills=("math",), explanation=("why",)),
              NodeDone(run_id="r1", node="a", output="7", aggregator=None),
              NodeDone(run_id="r1", node="b", output="8", aggregator="judge")]
    for event in events:
        store.listen(event)
    rows = {row["node_id"]: row for row in store.nodes("r1")}
    assert (rows["a"]["instruction"], rows["b"]["instruction"]) == ("do 7", "do b")
    assert (rows["a"]["aggregator"], rows["b"]["aggregator"]) == (None, "judge")
    assert [rows[n]["status"] for n in ("a", "b")] == ["done", "done"]
    store.close()


# --- evaluation reports ----------------------------------------------------------------------------


def _finished(run_id: str, status: str = "done", answer: str | None = "The answer is 1") -> RunResult:
    return RunResult(run_id=run_id, task="t", status=status, answer=answer,  # type: ignore[arg-type]
                     plan=PlanTrace(nodes=[NodeTrace(id="answer", instruction="t")]),
                     usage=RunUsage(calls=1, requests=1, prompt_tokens=1, completion_tokens=1))


def test_categories_are_listed_by_their_first_item_even_when_a_later_one_finished_first() -> None:
    """A category's place is its smallest item index, not the index of its first run to finish (runs
    finish in any order: ``x``'s last item finishing first put ``y`` ahead of it)."""
    items = [Item(id=f"q{i}", question="q", answer="1", category=category) for i, category in enumerate("xyx")]
    tally = Tally(get_grader("auto"))
    for index in (2, 1, 0):  # completion order
        tally.add(index, items[index], _finished(f"r{index}"))
    assert list(tally.report("vote", elapsed_s=0.0, model_loads={}).per_category) == ["x", "y"]


def test_a_methods_name_gains_only_the_settings_that_make_it_another_method() -> None:
    """λ is named only where it differs from the mode's default (the calibrated router's own λ, 0
    elsewhere) and never for random recruiting (which weighs no prices); a cost cap per item only
    for the calibrated router (the others ignore it): two runs of one method were reported as two methods."""
    def variant(mode: str, cost_lambda: float | None = None, cap: float | None = None) -> str:
        return method_variant(Settings(mode=mode, recruit={"cost_lambda": cost_lambda, "max_cost_per_item": cap}))

    assert variant("random", 0.5) == ""
    assert variant("calibrated", CALIBRATED_COST_LAMBDA) == ""
    assert variant("symbolic-moe", 0) == ""
    assert (variant("calibrated", 0), variant("symbolic-moe", CALIBRATED_COST_LAMBDA)) == (
        ", λ=0", f", λ={CALIBRATED_COST_LAMBDA:g}")
    assert (variant("symbolic-moe", cap=0.01), variant("calibrated", cap=0.01)) == ("", ", cap $0.0100/item")


DATA = Dataset.from_items([{"id": f"q{i}", "question": f"What is {i} - {i} + 1?", "answer": "1"} for i in range(2)])


def test_a_combination_no_preset_has_is_named_by_its_mode_and_aggregation_with_k_only_when_not_the_default() -> None:
    """``global`` recruiting with a vote is no preset: it is named ``global + vote``, and a k other than
    the default is said once (a bug named every such method with its k, and a k of 2 twice)."""
    pool, _ = scripted_pool(3)
    assert asyncio.run(aevaluate(Orchestra(pool, k=3, store=False), DATA, mode="global",
                                 aggregate="vote")).method == "global + vote"
    assert asyncio.run(aevaluate(Orchestra(pool, k=2, store=False), DATA, mode="global",
                                 aggregate="vote")).method == "global + vote, k=2"


# --- the answers file and the plot: what may be written over ------------------------------------------


def test_an_empty_file_may_be_replaced_by_the_answers(tmp_path: Path) -> None:
    """An empty (or blank) file holds nothing to lose: ``--output`` may write over it (``touch
    answers.jsonl`` first was refused as "not an earlier answers file")."""
    for text in ("", "\n", "\ufeff\n"):
        output = tmp_path / "answers.jsonl"
        output.write_text(text, encoding="utf-8")
        check_output(output, "the answers", "an earlier answers file", _answers_line, {}, flag="--output")


def test_a_first_line_too_long_to_read_whole_is_an_answers_row_only_if_it_starts_as_one(tmp_path: Path) -> None:
    """A cut first line is judged by its start: a data set with a huge first question is no answers
    file (a bug taking every long line for one let ``--output big_data.jsonl`` replace the data)."""
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"question": "x" * (1 << 20), "answer": "4"}) + "\n")
    with pytest.raises(ConfigError, match="exists and is not an earlier answers file"):
        check_output(data, "the answers", "an earlier answers file", _answers_line, {}, flag="--output")
    assert _answers_line('{"id": "q0", "answer": "xxx', True)


def test_an_earlier_plot_is_recognised_whatever_the_case_of_its_doctype(tmp_path: Path) -> None:
    """HTML's doctype is case-insensitive (``<!DOCTYPE html>`` is the usual spelling): such a page is
    an earlier plot, which ``--plot`` may replace; a page of another kind is refused."""
    assert html_page("<!DOCTYPE html>") and html_page("<HTML lang=en>") and not html_page("# notes")
    plot = tmp_path / "frontier.html"
    plot.write_text("<!DOCTYPE HTML>\n<html><body>old</body></html>\n")
    check_output(plot, "the plot", "an earlier plot (an HTML page)", html_page, {}, flag="--plot")


def test_an_output_that_is_a_precious_file_by_another_name_is_refused_naming_that_file(tmp_path: Path) -> None:
    """A link to the data set (or the same file spelled another way) is that file: the refusal names
    the data set, not the generic "not an earlier answers file" (a bug compared the paths as written)."""
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "q0", "question": "2+2?", "answer": "4"}\n')
    link = tmp_path / "answers.jsonl"
    link.symlink_to(data)
    (tmp_path / "sub").mkdir()
    for output in (link, tmp_path / "sub" / ".." / "val.jsonl"):
        with pytest.raises(ConfigError, match=r"^the answers would overwrite the data set "):
            check_output(output, "the answers", "an earlier answers file", _answers_line, {"the data set": data},
                         flag="--output")


def test_an_answers_file_another_evaluation_is_writing_is_refused_and_kept_whole(orchestra_home: Path,
                                                                                   tmp_path: Path) -> None:
    """Two evaluations given one ``--output``: the second is refused before any call and leaves the
    first one's rows as they are (both ran, each emptied the file and wrote its own rows over the
    other's, and both ended as if their answers were all there). Once the first is done it is free."""
    pool, models = scripted_pool(3)
    orc = Orchestra(pool, k=2, store=orchestra_home / "runs.db")
    answers = tmp_path / "answers.jsonl"
    first = asyncio.run(aevaluate(orc, DATA, method="vote", output=answers))
    written = answers.read_text()
    assert first.items == 2 and len(written.splitlines()) == 2
    with claim_answers_file(answers) as held:  # (another evaluation, writing it now)
        held.write(written)
        held.flush()
        asked = sum(len(model.requests) for model in models.values())
        with pytest.raises(ConfigError, match=r"answers.jsonl is being written by another evaluation: give --output"):
            asyncio.run(aevaluate(orc, DATA, method="vote", output=answers))
        assert sum(len(model.requests) for model in models.values()) == asked  # refused before any call
        assert answers.read_text() == written
    again = asyncio.run(aevaluate(orc, DATA, method="vote", output=answers))
    assert again.items == 2 and len(answers.read_text().splitlines()) == 2  # written afresh, not appended


# --- resuming an evaluation ------------------------------------------------------------------------------


def test_a_resume_finds_the_earlier_runs_whatever_the_method_was_called_then(orchestra_home: Path) -> None:
    """Earlier runs are matched by their settings, not the method's name (a name gains words between
    versions, as ", k=2" did): a bug querying the name too found none and ran, and paid for, every item again."""
    pool, models = scripted_pool(3)
    orc = Orchestra(pool, k=2, store=orchestra_home / "runs.db")
    assert asyncio.run(aevaluate(orc, DATA, method="vote")).correct == 2
    with sqlite3.connect(orchestra_home / "runs.db") as db:
        db.execute("UPDATE runs SET config = json_set(config, '$.spec.meta.method', 'vote (0.9)')")
    asked = sum(len(model.requests) for model in models.values())
    resumed = asyncio.run(aevaluate(orc, DATA, method="vote", resume=True))
    assert (resumed.items, resumed.correct, resumed.reused, resumed.resumed) == (2, 2, 2, 0)
    assert sum(len(model.requests) for model in models.values()) == asked


def test_a_resumed_evaluation_goes_on_with_the_experts_its_cut_off_run_recorded(orchestra_home: Path) -> None:
    """A run cut off after its chunk's recruiting goes on with the experts recorded for it (so its
    recorded expert calls are replayed), not with a recruiting done afresh over another chunk."""
    failing = [True]

    def expert(name: str, request: ChatRequest) -> Any:
        if failing[0] and "What is 1 - 1 + 1?" in request.prompt_text():
            raise RuntimeError("endpoint down")
        return f"{name}: The answer is 1"

    pool, _ = scripted_pool(3, expert=expert)
    orc = Orchestra(pool, k=2, store=orchestra_home / "runs.db")
    first = asyncio.run(aevaluate(orc, DATA, method="vote"))
    assert (first.correct, first.failed) == (1, 1)
    with sqlite3.connect(orchestra_home / "runs.db") as db:
        (pinned,) = db.execute("SELECT json_extract(config, '$.spec.pinned') FROM runs "
                               "WHERE status != 'done'").fetchone()
    assert json.loads(pinned)["answer"]  # the chunk's recruiting recorded its experts
    given: list[dict[str, Any]] = []
    real = orc.arun_iter

    def spy(instances: Any, **options: Any) -> Any:
        def each() -> Any:
            for instance in instances:
                given.append(dict(instance.options))
                yield instance
        return real(each(), **options)

    orc.arun_iter = spy  # type: ignore[method-assign]
    failing[0] = False
    resumed = asyncio.run(aevaluate(orc, DATA, method="vote", resume=True))
    assert (resumed.correct, resumed.reused, resumed.resumed) == (2, 1, 1)
    assert [options.get("experts") for options in given] == [json.loads(pinned)]

