"""``Orchestra``: the Python API. Plan, recruit, execute in batches, aggregate."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import warnings
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast, get_args

from pydantic import ValidationError

from orchestra.agents import Pool
from orchestra.budget import Budget, BudgetTracker, RunAdmission, Spent, task_budget
from orchestra.collector import paced_for_streams
from orchestra.dag import Dag
from orchestra.errors import (
    BudgetExceeded,
    ConfigError,
    MissingDependency,
    OrchestraError,
    RunHeld,
    StoreError,
    StoreGone,
    UnknownSetting,
    UserError,
)
from orchestra.events import Event, EventBus, awaitable_call
from orchestra.execute import Executor, RunLedger
from orchestra.grading import Grader
from orchestra.hints import command
from orchestra.matching import MatcherSpec, SkillMatcher, matcher_spec
from orchestra.pipeline.scheduler import CANCELLED_BY_USER, NodeSettings, Outputs, Run, Stages
from orchestra.plan import SINGLE_NODE, Plan, PlanInvalid, Subtask, validate_plan
from orchestra.prompts import MAX_CONTEXT_CHARS, MAX_TASK_CHARS
from orchestra.recruit import Recruitment
from orchestra.result import RunResult
from orchestra.settings import ORCHESTRA_LEVEL, AnswerOptions, RunSpec, Settings, WorkflowRef, nested_hint
from orchestra.sharing import sharing
from orchestra.store import EMBEDDINGS, HEARTBEAT_SECONDS, QUIET_EVENTS, RunRecord, RunStore
from orchestra.terminal_text import counted, invisible
from orchestra.workflow import Workflow, check_inputs

T = TypeVar("T")


#: the second of the last run id made here, and the suffixes used in it
_issued: tuple[str, set[str]] = ("", set())


def new_run_id() -> str:
    """A sortable, unique run id: ``20261122-143005-3fa2c1``.

    Unique within this process even when thousands are made in one second (a data set's runs):
    a suffix already used in the same second is drawn again. (24 random bits alone collide about
    once in 10,000 ids made in a second, and the store would take the second run for a resume of
    the first.)
    """
    global _issued
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    if _issued[0] != stamp:
        _issued = (stamp, set())
    used = _issued[1]
    suffix = secrets.token_hex(3)
    while suffix in used:
        suffix = secrets.token_hex(3)
    used.add(suffix)
    return f"{stamp}-{suffix}"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code; refuse clearly inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none: run it below, outside this handler (its errors are not chained to this one)
        pass
    else:
        coro.close()
        raise RuntimeError("an event loop is already running here; use the async method (arun, arun_many...)")
    return asyncio.run(coro)


#: seconds after an interrupt within which a SIGINT is the same one again, not a second Ctrl-C
#: (faster than a person presses twice; a sender's duplicate comes within microseconds)
SAME_INTERRUPT_S = 0.25


def _python_choices(node_settings: Mapping[str, NodeSettings],
                    final: Callable[[Outputs], str] | None) -> dict[str, Any]:
    """What a run's record keeps of per-node settings and a ``final`` given in Python: the settings
    (but for their prompts), and the names of what it cannot keep."""
    nodes = {node: {name: list(value) if name == "skills" else value
                    for name, value in asdict(chosen).items()
                    if name != "prompt" and value not in (None, ())}
             for node, chosen in node_settings.items()}
    unrecorded = [f"node_settings[{node!r}].prompt" for node, chosen in node_settings.items() if chosen.prompt]
    return {"nodes": nodes, "unrecorded": (["final"] if final is not None else []) + unrecorded}


def _recorded_node(chosen: Mapping[str, Any]) -> NodeSettings:
    """A node's settings as ``_python_choices`` recorded them."""
    return NodeSettings(k=chosen.get("k"), mode=chosen.get("mode"), aggregate=chosen.get("aggregate"),
                        agent=chosen.get("agent"), skills=tuple(chosen.get("skills") or ()),
                        output=chosen.get("output"))


def check_reload(record: RunRecord) -> None:
    """Refuse to resume ``record`` with its workflow file read again where that cannot apply: not a
    workflow's run, or one that is done (the edit was left out without a word, the run answered)."""
    if RunSpec.from_record(record.config, record.task).workflow is None:
        raise ConfigError(f"run {record.id} is not a workflow run; --reload reads a workflow file again")
    if record.status == "done":
        raise ConfigError(f"run {record.id} is done: --reload applies an edited workflow to a run that did "
                          "not finish; run the edited workflow anew (`orchestra run FILE`)")


#: the signals that stop a command's work as Ctrl-C does (SIGHUP ended the process at once, the run left
#: unrecorded, short of the requests it had sent)
_STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The ``KeyboardInterrupt`` of ``run_interruptibly`` stopped by SIGTERM or SIGHUP, not Ctrl-C: a
    session that goes on after a Ctrl-C (chat) ends on it, as every other command does."""


def run_interruptibly(coro: Coroutine[Any, Any, T], *, stopping: Callable[[bool], None] | None = None) -> T:
    """``asyncio.run`` for the command line: Ctrl-C, SIGTERM (what ``timeout``, ``kill``, docker
    and systemd send) or SIGHUP (its terminal closed, an SSH connection dropped) cancels the work,
    waits for it to stop (a run records itself as ``cancelled``), then raises ``KeyboardInterrupt``
    (``Terminated`` for SIGTERM or SIGHUP).

    The signals are handled by the event loop itself, installed before the work starts, so they
    are seen even while every task waits on a socket. A second Ctrl-C ends the process at once
    (``escape``); with ``stopping`` (a session that goes on: chat), it is told of the first Ctrl-C
    (``stopping(False)``) and the second (``stopping(True)``), and only a third ends the process (a
    second press while a model load finished its step ended the whole chat). A SIGINT within
    ``SAME_INTERRUPT_S`` of the latest interrupt, this call's or an earlier one's, is that interrupt again.
    """
    interrupted = terminated = False
    presses = 0
    #: signals the process was started deaf to (a shell runs `cmd &` with SIGINT ignored): left alone
    deaf = {stop for stop in _STOPS if signal.getsignal(stop) is signal.SIG_IGN}  # (nohup: deaf to SIGHUP)

    def closing(*_: Any) -> None:
        """SIGINT once the work has ended, as the loop closes and until the caller has said what was kept:
        a first is kept as an interrupt (the work's outcome stands), the same one again is ignored, and a
        second Ctrl-C ends the process at once, but in a session that goes on (it says when Ctrl-C is its own)."""
        nonlocal interrupted
        global _interrupted_at
        if not interrupted:
            interrupted, _interrupted_at = True, time.monotonic()
        elif stopping is None:
            _interrupted_again()

    async def main() -> T:
        work = asyncio.ensure_future(coro)

        def interrupt(stop: signal.Signals) -> None:
            nonlocal interrupted, terminated, presses
            global _interrupted_at
            now = time.monotonic()
            if stop == signal.SIGINT and now - _interrupted_at < SAME_INTERRUPT_S:
                # the same interrupt again: `timeout -s INT` sends the signal to the command and again to its
                # process group (the second came as a chat's next task ran, and cancelled it)
                return
            if interrupted:
                # a second Ctrl-C stops waiting (for a model load, a worker thread) at once; a second
                # SIGTERM is the same interrupt
                if stop == signal.SIGINT:
                    presses += 1
                    if stopping is None or presses > 1:
                        escape()
                    stopping(True)
                return
            interrupted, terminated, _interrupted_at = True, stop != signal.SIGINT, now
            if stopping is not None:
                stopping(False)
            work.cancel()

        loop = asyncio.get_running_loop()
        try:
            for stop in set(_STOPS) - deaf:
                loop.add_signal_handler(stop, interrupt, stop)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (or Windows): not ours
            return await work
        # the handler stays until the loop closes (closing removes it): a Ctrl-C while asyncio.run
        # shuts the loop down (its tasks, the connections) is this one's too, not a traceback there
        try:
            return await work
        finally:
            if interrupted:
                await _drain()
            if signal.SIGINT not in deaf:
                # until the caller has said what was kept (a report, the line saying how to go on), a
                # duplicate SIGINT is still this one and a second Ctrl-C ends the process at once: the
                # loop's handler gave way to Python's as the loop closed, and a second press lost the
                # report in a KeyboardInterrupt, or a traceback; one that came as the loop shut down after
                # the work ended had its duplicate raise there (``ask --json`` printed a done result, then
                # died by SIGINT)
                with contextlib.suppress(RuntimeError, ValueError):
                    loop.remove_signal_handler(signal.SIGINT)
                    signal.signal(signal.SIGINT, closing)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        if interrupted:
            raise (Terminated if terminated else KeyboardInterrupt) from None
        raise
    else:
        if terminated and stopping is not None:  # (as the work ended on its own: the session ends all the same,
            raise Terminated  # or it went on deaf to SIGTERM and SIGHUP, ignored from here on)
        if interrupted and stopping is not None and signal.SIGINT not in deaf:
            interrupts_as_usual()  # (a Ctrl-C as the work ended, which it did on its own: the session's Ctrl-C again)
        return result
    finally:
        if not interrupted and signal.getsignal(signal.SIGINT) is closing:
            interrupts_as_usual()  # (as the loop's closing left it, but for a duplicate of an earlier interrupt)
        if terminated:  # (the loop's handler is gone: a late second SIGTERM ended the process with 143)
            with contextlib.suppress(ValueError):
                for stop in set(_STOPS) - {signal.SIGINT} - deaf:
                    signal.signal(stop, signal.SIG_IGN)


#: when the latest interrupt came (monotonic seconds): a SIGINT within ``SAME_INTERRUPT_S`` of it is that one again
_interrupted_at = -math.inf


def _interrupted_again(*_: Any) -> None:
    """SIGINT after an interrupt ended the work: the same one within ``SAME_INTERRUPT_S``, else a
    second Ctrl-C (``escape``)."""
    if time.monotonic() - _interrupted_at >= SAME_INTERRUPT_S:
        escape()


def _as_usual(*_: Any) -> None:
    """SIGINT as Python takes it (``KeyboardInterrupt``), but for the latest interrupt's duplicate."""
    if time.monotonic() - _interrupted_at >= SAME_INTERRUPT_S:
        raise KeyboardInterrupt


def interrupts_as_usual() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again (after ``run_interruptibly`` was interrupted, for
    a caller that goes on, as chat does); a duplicate of the interrupt that stopped the work does not
    (``timeout -s INT`` sends two: the second cancelled a chat's next task, or ended it after its "bye")."""
    with contextlib.suppress(ValueError):  # (not the main thread: never changed)
        signal.signal(signal.SIGINT, _as_usual)


def escape() -> NoReturn:
    """End the process now, without waiting for worker threads: a KeyboardInterrupt cannot do it,
    as closing the loop waits for its executor's threads, and so does the interpreter's exit.
    What was committed is kept (calls are committed as they are answered); runs still going are
    left to their owner's lease, which ends with the process."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.write(2, b"error: interrupted again: stopped without waiting for the work in progress; finished calls "
                b"are saved where a store was kept\n")
    os._exit(130)


async def _drain() -> None:
    """Cancel the loop's other tasks and wait for them, again for any their cancelling started (a
    batch dispatched as runs stop): ``asyncio.run`` cancels only the tasks alive when it begins to
    close, and one made after that is destroyed still pending, with warnings on stderr."""
    for _ in range(100):
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]
        if not others:
            return
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


#: settings for which None is a value (``aggregator=None``: chosen per run), not "not given"
_NULLABLE = frozenset(name for name, spec in Settings.model_fields.items() if type(None) in get_args(spec.annotation))


#: what ``Orchestra(...)`` takes that is no setting (so no run's override)
_ORCHESTRA_ARGUMENTS = ("store", "tracing", "on_event", "matcher", "grader")


def _knobs(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments that name settings, as a settings layer. None leaves a setting as it is,
    except where None is one of its values (``aggregator=None`` clears an Orchestra's aggregator
    for that run)."""
    unknown = sorted(set(knobs) - set(Settings.model_fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], Settings.model_fields, n=1)
        nested = nested_hint(unknown[0], "{group}={{'{name}': ...}}")  # (competence_weight=0)
        hint = nested or (f"did you mean {close[0]!r}?" if close else "see orchestra.Settings")
        if unknown[0] in _ORCHESTRA_ARGUMENTS:  # (a run's on_event was told to see orchestra.Settings)
            hint = f"{unknown[0]} is an Orchestra(...) argument: Orchestra(pool, {unknown[0]}=...)"
        raise UnknownSetting(f"unknown setting{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; {hint}")
    return {name: value for name, value in knobs.items() if value is not None or name in _NULLABLE}


#: runs ``arun_iter`` and ``arun_many`` keep in flight at once by default
DEFAULT_WINDOW = 1000


@dataclass(frozen=True)
class Instance:
    """One task of a data set for ``arun_iter``, with what differs from task to task.

    Attributes:
        task: the task text.
        answer_format: how the final answer should be stated (for grading).
        meta: JSON-ready facts stored with this run, over the ``meta`` of the call.
        options: other ``arun`` keyword arguments for this run alone (``seed``, ``plan``,
            ``node_settings``, ``final``, ``workflow``, ``shared_budget``, any setting...), over
            those of the call.
    """

    task: str
    answer_format: str | None = None
    meta: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


Tasks = Iterable[str | Instance] | AsyncIterable[str | Instance]
"""What ``arun_iter`` takes: tasks (or ``Instance``s) from a sequence, a generator or an async iterable."""


class _NotReady:
    """An async input has no next task ready at this moment."""


NOT_READY = _NotReady()


class _Source:
    """The tasks of an ``arun_iter`` call, numbered from 0, read lazily from a sync or async iterable."""

    def __init__(self, tasks: Tasks) -> None:
        if isinstance(tasks, (str, bytes)):
            raise TypeError("tasks must be an iterable of tasks, not one string")
        self._sync: Iterator[str | Instance] | None = None
        self._async: AsyncIterator[str | Instance] | None = None
        if isinstance(tasks, AsyncIterable):
            self._async = aiter(tasks)
        elif isinstance(tasks, Iterable):
            if isinstance(tasks, Sequence):  # known in full: a bad task is refused before any run begins, as
                for index, value in enumerate(tasks):  # arun_many does (the runs before it were left cancelled)
                    _check_item(value, index)
            self._sync = iter(tasks)
        else:
            raise TypeError(f"tasks must be an iterable or an async iterable, not {type(tasks).__name__}")
        self._pending: asyncio.Future[str | Instance] | None = None
        self.count = 0
        self.exhausted = False

    async def next(self, *, wait: bool = True) -> tuple[int, Instance] | _NotReady | None:
        """The next task and its index; None at the end. With ``wait=False`` an async input that has
        no task ready within one turn of the event loop gives ``NOT_READY`` (the task it is
        producing is kept for the next call)."""
        if self.exhausted:
            return None
        try:
            if self._sync is not None:
                value = next(self._sync)
            elif self._pending is not None or not wait:
                if self._pending is None:
                    self._pending = asyncio.ensure_future(anext(cast(AsyncIterator[str | Instance], self._async)))
                if not wait and not self._pending.done():
                    await asyncio.sleep(0)  # an input whose next task is ready hands it over in this turn
                    if not self._pending.done():
                        return NOT_READY
                pending, self._pending = self._pending, None
                value = await pending
            else:
                value = await anext(cast(AsyncIterator[str | Instance], self._async))
        except (StopIteration, StopAsyncIteration):
            self.exhausted = True
            return None
        if isinstance(value, str):
            value = Instance(value)
        elif not isinstance(value, Instance):
            _check_item(value, self.count)
        self.count += 1
        return self.count - 1, value

    def close(self) -> None:
        """Stop waiting for the async input."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


_END = object()


def _check_item(value: object, index: int) -> None:
    """Refuse task ``index`` of an ``arun_iter`` input that is not a str or an ``Instance``, or whose
    task ``check_task`` refuses, naming it."""
    if not isinstance(value, (str, Instance)):
        raise TypeError(f"task {index} is a {type(value).__name__}, not a str or an Instance")
    try:
        check_task(value if isinstance(value, str) else value.task)
    except ConfigError as error:
        raise ConfigError(f"task {index}: {error}") from None


def _node_ids(plan: Plan | None, planned: bool) -> list[str] | None:
    """The ids of a run's nodes where they are known before it runs (a given plan, or no planning:
    the single node); None when a planner names them."""
    if plan is not None:
        return [subtask.id for subtask in plan.subtasks]
    return None if planned else [SINGLE_NODE]


def _given_plan(plan: Any) -> Plan | bool | None:
    """``plan`` as a run takes it: a Plan (or its JSON-ready dict), True or False (plan or not), or
    None (the settings decide); anything else is refused rather than taken as "plan"."""
    if plan is None or isinstance(plan, bool):
        return plan
    if isinstance(plan, dict):
        _known_fields(plan)
        try:
            plan = Plan.model_validate(plan)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise ConfigError(f"plan: {where}: {problem['msg']}" if where else f"plan: {problem['msg']}") from None
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a Plan (or its dict), True or False, not {type(plan).__name__} {plan!r:.40}")
    return plan


def _known_fields(plan: dict[str, Any]) -> None:
    """Refuse a field a given plan's dict names that a plan has not (a typo, ``dependson``, was
    dropped without a word: its step ran with no dependencies)."""
    subtasks = plan.get("subtasks")
    steps = enumerate(subtasks) if isinstance(subtasks, list) else ()
    fields = [(plan, Plan.model_fields, "plan"), *((subtask, Subtask.model_fields, f"plan: subtasks.{index}")
                                                   for index, subtask in steps if isinstance(subtask, dict))]
    for given, known, where in fields:
        unknown = [str(name) for name in given if name not in known]
        if unknown:
            what = "plan" if given is plan else "step"
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; a {what} has {', '.join(known)}")


def _given_graph(plan: Plan) -> Dag:
    """A given plan's DAG; a plan that is not one is the caller's to mend, so it is refused before
    the run (a ``ConfigError``, as a plan with a wrong field is), not a failed run. Its skills are
    checked as a task's text is (validation lets their lone surrogates through; instructions not)."""
    try:
        "".join(skill for subtask in plan.subtasks for skill in subtask.skills).encode()
    except UnicodeEncodeError:
        for subtask in plan.subtasks:
            for skill in subtask.skills:
                _check_text(skill, f"plan: subtask {subtask.id!r}'s skill {skill!r}")
    for subtask in plan.subtasks:  # (a blank step was sent to k experts, each asked nothing)
        try:
            check_task(subtask.instruction)
        except ConfigError as error:
            raise ConfigError(f"plan: subtask {subtask.id!r}'s instruction {str(error).removeprefix('the task ')}"
                              ) from None
    try:
        return validate_plan(plan, max_nodes=len(plan.subtasks))
    except PlanInvalid as error:
        raise ConfigError(f"plan: {error}") from None


class _Stream:
    """One ``arun_iter`` call: a feeder task reads tasks and starts runs while at most ``window``
    runs are held (made, and not yet handed to the caller); each finished run is recorded and
    queued for the caller at once. Nothing here keeps a run after it was handed over."""

    def __init__(self, orc: Orchestra, source: _Source, *, window: int | None, plan: bool, rare_filter: bool,
                 meta: Mapping[str, Any] | None, overrides: dict[str, Any],
                 shared_budget: BudgetTracker | None = None,
                 on_stopped: Callable[[int, RunResult], None] | None = None) -> None:
        self.orc = orc
        self.on_stopped = on_stopped
        self.stopped_failed = False  # (an on_stopped that raised is warned about once)
        self.shared_budget = shared_budget
        self.source = source
        self.slots = asyncio.Semaphore(window) if window is not None else None
        #: instances recruited together by the rare-expert filter (None: the whole input)
        self.chunk = max(1, window // 2) if window is not None else None
        self.filter = rare_filter and not plan
        self.plan = plan
        self.meta = dict(meta) if meta else None
        self.overrides = overrides
        #: the settings of every run without options of its own (resolved once; a bad one fails here)
        self.settings = orc.run_settings({**overrides, "plan": plan})
        self.live: dict[Run, int] = {}  # made (begun in the store) and not yet finished: its index
        self.unbegun: set[Run] = set()  # made for a chunk still recruiting, not yet begun in the store
        self.named: set[str] = set()  # the ids of the live runs whose instance gave one
        #: under a shared budget, runs start only while it can be expected to finish them
        limited = shared_budget is not None and shared_budget.budget.limited
        self.admission = RunAdmission(shared_budget) if shared_budget is not None and limited else None
        self.changed = asyncio.Event()  # a run ended
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.feeding = True
        self.chunks = 0

    async def results(self) -> AsyncGenerator[tuple[int, RunResult], None]:
        with paced_for_streams():  # (full collections would walk every run in flight, freeing nothing)
            feeder = asyncio.ensure_future(self.feed())
            try:
                while True:
                    got = await self.queue.get()
                    if got is _END:
                        return
                    if isinstance(got, BaseException):
                        raise got
                    if self.slots is not None:
                        self.slots.release()
                    yield got
            finally:
                feeder.cancel()
                self.close()

    # --- the feeder ----------------------------------------------------------------------

    async def feed(self) -> None:
        try:
            if self.filter:
                await self.feed_chunks()
                return
            while True:
                await self.acquire()
                await self.admitted()
                got = await self.source.next()
                if not isinstance(got, tuple):
                    self.give_back()
                    return
                self.start(self.make(*got))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the input failed, or a run could not begin: the caller gets it
            self.queue.put_nowait(error)
        finally:
            self.feeding = False
            self.maybe_end()

    async def feed_chunks(self) -> None:
        """Recruit each chunk of tasks together and filter rare experts across it, then run it. A
        chunk ends at ``chunk`` tasks, at the end of the input, or when an async input has no task
        ready (so an input that waits for results is never waited for); runs of the previous
        chunks go on meanwhile."""
        while True:
            chunk: list[Run] = []
            while self.chunk is None or len(chunk) < self.chunk:
                if chunk and not self.room():  # (the chunk's runs start only when it ends)
                    break
                await self.acquire()
                if chunk and not self.room():  # (no room since: waiting for it, the chunk would wait on itself)
                    self.give_back()
                    break
                await self.admitted()
                got = await self.source.next(wait=not chunk)
                if not isinstance(got, tuple):
                    self.give_back()
                    break
                index, instance = got
                if {"plan", "node_settings", "experts"} & instance.options.keys():  # its own steps or experts
                    self.start(self.make(index, instance))
                else:
                    chunk.append(self.make(index, instance, begin=False))
            if chunk:
                self.orc._begin_all(chunk)  # one transaction for the chunk, before any of its calls
                self.unbegun.difference_update(chunk)
                seed = chunk[0].settings.seed
                if self.chunks:  # every chunk draws its replacements from its own seed
                    seed = zlib.crc32(f"{seed}:rare-filter:{self.chunks}".encode())
                self.chunks += 1
                await self.orc._recruit_together(chunk, seed=seed)
                for run in chunk:
                    self.start(run)
            if self.source.exhausted:
                return

    async def acquire(self) -> None:
        if self.slots is not None:
            await self.slots.acquire()

    def room(self) -> bool:
        """Whether one more run may start now (see ``RunAdmission``)."""
        return self.admission is None or self.admission.admits(len(self.live))

    async def admitted(self) -> None:
        """Wait until one more run may start: every run in flight has started, so one will end."""
        while not self.room():
            self.changed.clear()
            await self.changed.wait()

    def give_back(self) -> None:
        if self.slots is not None:
            self.slots.release()

    def make(self, index: int, instance: Instance, *, begin: bool = True) -> Run:
        """A run of ``instance``, begun in the store (unless ``begin`` is false: the caller begins it)."""
        meta = {**(self.meta or {}), **instance.meta} if instance.meta else self.meta
        run_id = instance.options.get("run_id") if instance.options else None
        if run_id is not None:  # (as arun checks it)
            check_run_id(run_id)
            self.orc._check_same_task(self.orc._earlier_run(run_id), instance.task)
            if run_id in self.named:
                raise ConfigError(f"run id {run_id} is given to two of the tasks; give each its own, or leave "
                                  "run_id out")
        if instance.options:
            options = {"shared_budget": self.shared_budget, **self.overrides, **instance.options}
            run = self.orc._make_run(instance.task, plan=options.pop("plan", self.plan),
                                     answer_format=instance.answer_format, meta=meta, **options)
        else:
            run = self.orc._make_run(instance.task, answer_format=instance.answer_format, meta=meta,
                                     settings=self.settings, shared_budget=self.shared_budget)
        if self.admission is not None:  # (admitted with nothing in flight: it may still not be expected to finish)
            refused = self.admission.refusal(len(self.live))
            if refused is not None:
                run.ledger.budget.close(refused)  # it ends at its first call, which is not sent
                if self.admission.shared.exceeded is None:  # (the data set's report says what stopped it)
                    self.admission.shared.exceeded = refused
        if begin:
            self.orc._begin(run)
        else:
            self.unbegun.add(run)
        self.live[run] = index
        if run_id is not None:
            self.named.add(run_id)
        return run

    def start(self, run: Run) -> None:
        self.orc._hold(run)
        run.start().add_done_callback(partial(self.finished, run))

    # --- finished runs -------------------------------------------------------------------

    def finished(self, run: Run, future: asyncio.Future[RunResult]) -> None:
        index = self.live.pop(run, None)
        if index is None:  # given up by close(), which let it go and recorded it
            return
        self.named.discard(run.run_id)
        self.orc._let_go(run)
        error = None if future.cancelled() else future.exception()
        if self.admission is not None:
            status = None if future.cancelled() or error is not None else future.result().status
            self.admission.ended(run.ledger.budget, on_its_own=status not in (None, "budget_exceeded", "cancelled"),
                                 cut=status == "budget_exceeded")
            self.changed.set()
        if future.cancelled() or error is not None:  # a bug inside the run: stop it, keep its record
            run.cancel()
            self.orc.executor.orphan({run.run_id})
            self.orc._release_when_settled(run.run_id)
            self.tell_stopped(index, self.orc._record_cancelled(run))
            self.queue.put_nowait(error or asyncio.CancelledError())
            return
        result = future.result()
        self.orc._record(result, soon=True, run=run)  # with the runs that end in this turn: one transaction
        self.queue.put_nowait((index, result))
        self.maybe_end()

    def maybe_end(self) -> None:
        if not self.feeding and not self.live:
            self.queue.put_nowait(_END)

    def close(self) -> None:
        """Stop every run still held (the caller stopped early, or something failed): each is
        recorded as cancelled, as an interrupted ``arun`` is."""
        self.source.close()
        unbegun = [run for run in self.live if run in self.unbegun]
        if unbegun:  # (made for a chunk still recruiting: recorded now, so each stopped run can be resumed)
            try:
                self.orc._begin_all(unbegun)
            except OrchestraError:
                for run in unbegun:
                    del self.live[run]
            self.unbegun.clear()
        for run in [run for run in self.live if run.future.done()]:  # (ended before this: kept as they ended)
            self.finished(run, run.future)
        stopping: list[tuple[Run, int]] = []
        while self.live:
            run, index = self.live.popitem()
            if self.orc._going.get(run.run_id) is run:  # (started: free its id at once, for a resume)
                self.orc._let_go(run)
            else:  # (begun, not started: its claim on this loop ends)
                self.orc._unclaim([run])
            run.cancel()
            stopping.append((run, index))
        self.orc.executor.orphan({run.run_id for run, _ in stopping})  # (one look at the calls in flight for all)
        in_flight = self.orc.executor.in_flight_by_run()
        for run, index in stopping:  # (each holds its lease while its requests are in flight, as one run does)
            self.orc._release_when_settled(run.run_id, in_flight.get(run.run_id, []))
            self.tell_stopped(index, self.orc._record_cancelled(run))
        # runs that ended and were never handed over (the caller stopped first): theirs too, as they ended
        # (an interrupted evaluation's report left out what they spent, and their answers)
        while not self.queue.empty():
            ended = self.queue.get_nowait()
            if isinstance(ended, tuple):
                self.tell_stopped(*ended)

    def tell_stopped(self, index: int, result: RunResult) -> None:
        """Give ``on_stopped`` a stopped run; one that raises is warned about once, and the other runs
        are still recorded and told (it raised out of ``close``: the runs after it stayed running in
        the store for good)."""
        if self.on_stopped is None:
            return
        try:
            self.on_stopped(index, result)
        except Exception as error:
            if not self.stopped_failed:
                self.stopped_failed = True
                warnings.warn(f"on_stopped failed ({type(error).__name__}: {error}); every stopped run is recorded "
                              "as cancelled all the same", RuntimeWarning, stacklevel=2)


class Orchestra:
    """A team of experts from a pool, recruited by measured skills, run in per-model batches.

    Args:
        pool: a ``Pool``, a pool file, or None for the embedded default pool.
        settings: a ``Settings`` layer (or its mapping, as under ``settings:`` in a pool or
            workflow file) over the pool's own settings.
        store: the run store (a ``RunStore`` or a path); None means ``$ORCHESTRA_HOME/runs.db``
            (``~/.orchestra/runs.db``), False keeps no record (and makes resume impossible).
        tracing: OpenTelemetry spans for runs, nodes and batches: True for the global tracer, or a
            tracer (needs the ``otel`` extra); off by default.
        on_event: a listener for every event.
        matcher: a keyword matcher object instead of ``settings.matcher``; one Orchestra does not
            know how to rebuild is not recorded, so a resume uses the recorded ``matcher`` setting.
        grader: a setting name, or a ``Grader`` object (not recorded, like ``matcher``).
        knobs: any ``Settings`` field (``k=2``, ``mode="topk"``, ``budget=Budget(max_calls=50)``...),
            on top of ``settings``.
    """

    def __init__(self, pool: Pool | str | Path | None = None, settings: Settings | Mapping[str, Any] | None = None,
                 *, store: RunStore | str | Path | bool | None = None, tracing: Any = False,
                 on_event: Callable[[Event], None] | None = None, matcher: SkillMatcher | MatcherSpec | None = None,
                 grader: str | Grader | None = None, **knobs: Any) -> None:
        if pool is not None and not isinstance(pool, (Pool, str, Path)):
            raise ConfigError(f"pool must be a Pool, a pool file's path or None (the embedded default), "
                              f"not {type(pool).__name__} {pool!r:.40}")
        if settings is not None and not isinstance(settings, (Settings, Mapping)):
            raise ConfigError(f"settings must be a Settings or a mapping of setting names to values, "
                              f"not {type(settings).__name__} {settings!r:.40}")
        _check_callback(on_event, "on_event", "an event")
        if (store is not None and not isinstance(store, (bool, str, Path, RunStore))) or (
                isinstance(store, str) and not store.strip()):  # ("" was the current folder: "cannot create .")
            raise ConfigError("store must be a RunStore, a path, None ($ORCHESTRA_HOME/runs.db, else "
                              f"~/.orchestra/runs.db) or False (no record), not {type(store).__name__} {store!r:.40}")
        self.pool = pool if isinstance(pool, Pool) else Pool.load(pool)
        layer = _knobs(knobs)
        self._matcher: SkillMatcher | None = None
        if isinstance(matcher, Mapping):  # (the form settings and a pool file take: it was kept as the matcher)
            try:
                matcher = MatcherSpec.model_validate(matcher)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(map(str, ("matcher", *first["loc"])))  # (an error of the whole has no field)
                raise ConfigError(f"{where}: {first['msg']}") from None
        elif matcher is not None and not isinstance(matcher, MatcherSpec) and not hasattr(matcher, "match"):
            raise ConfigError(f"matcher must be a MatcherSpec, its fields as a dict, or an object with a match method, "
                              f"not {type(matcher).__name__}")
        if matcher is not None:
            spec = matcher if isinstance(matcher, MatcherSpec) else matcher_spec(matcher)
            if spec is not None:
                layer["matcher"] = spec
            if not isinstance(matcher, MatcherSpec):
                self._matcher = matcher
        self._grader = grader if grader is not None and not isinstance(grader, str) else None
        if isinstance(grader, str):
            layer["grader"] = grader
        #: the resolved settings: defaults < the pool's < ``settings`` < keyword arguments
        self.settings: Settings = self.pool.settings.layered(Settings.layer(settings), Settings.layer(layer))
        self.events = EventBus()
        if store is None or store is True:
            store = RunStore()
        self.store: RunStore | None = RunStore(store) if isinstance(store, (str, Path)) else (store or None)
        if self.store is not None:
            self.events.subscribe(self.store.listen, ignore=QUIET_EVENTS)
        if self.settings.cache and self.store is None:
            raise ConfigError("the response cache lives in the run store; do not combine cache=True with store=False")
        self._unpriced_told = False
        if self.settings.budget.cost_limit_set:
            self._tell_unpriced()
        self._running = 0
        self._heartbeat: asyncio.Task[None] | None = None
        #: runs stopped here whose requests are still in flight: their leases are held until those end
        self._draining: set[str] = set()
        #: the runs going here, by id (one cannot be begun again while it goes)
        self._going: dict[str, Run] = {}
        self._going_loop: asyncio.AbstractEventLoop | None = None  # the event loop they go in
        #: runs begun and not yet going (their loop is claimed: another thread's check must see them)
        self._claimed: set[Run] = set()
        self._claim_lock = threading.Lock()  # (the check and the claim as one step: threads may begin at once)
        self._last_unstored: RunResult | None = None  # with no store: the run that ended last
        self._told_gone = False  # whether a run's end was warned of as not recorded, its store's file removed
        if tracing:
            from orchestra.tracing import SpanRecorder

            self.events.subscribe(SpanRecorder(None if tracing is True else tracing).listen)
        if on_event is not None:
            self.events.subscribe(on_event)
        memory = self.settings.memory_budget_gb
        placement = None
        if self.settings.executor == "ray":  # engines as Ray actors; the cluster is joined when the first one loads
            from orchestra.ray_engines import RayPlacement

            placement = RayPlacement(self.settings.ray_address)
        else:  # engines in this process: one whose package is missing is told of now
            self._check_engines()
        self.executor = Executor(events=self.events, max_resident_models=self.settings.max_resident_models,
                                 memory_budget_bytes=int(memory * 2**30) if memory else None, placement=placement)
        self._stages: dict[str, Stages] = {}
        self.stages_for(self.settings)  # a bad aggregator or matcher setting fails here, not in the first run

    def _check_engines(self) -> None:
        """Refuse a pool whose in-process engine this process cannot load where every run needs it
        (the planner's or the keyword model's, or every agent's: a run paid its keyword calls before
        the engine failed to load); warn of agents whose engine it cannot load otherwise (a mixed
        pool's remote agents still answer: runs that recruit the others fail as their engine loads)."""
        missing: dict[int, MissingDependency] = {}
        for model in self.pool.models:
            installed = getattr(model, "check_installed", None)
            try:
                if installed is not None:
                    installed()
            except MissingDependency as error:
                missing[id(model)] = error
        if not missing:
            return
        needed = [model for model in (self.pool.planner, self.pool.keyword_model)
                  if model is not None and id(model) in missing]
        unable = [agent for agent in self.pool.agents if id(agent.model) in missing]
        if needed or len(unable) == len(self.pool.agents):
            raise missing[id(needed[0] if needed else unable[0].model)]
        warnings.warn(f"{counted(len(unable), 'agent')} cannot answer in this process "
                      f"({', '.join(agent.name for agent in unable)}: {missing[id(unable[0].model)]}); runs that "
                      "recruit them fail as their engine loads", UserWarning, stacklevel=3)

    @property
    def stages(self) -> Stages:
        """The pipeline stages of this Orchestra's own settings."""
        return self.stages_for(self.settings)

    def stages_for(self, settings: Settings) -> Stages:
        """The stages for ``settings`` (made once per distinct staffing and grading settings)."""
        key = settings.model_dump_json(include=set(_STAGE_SETTINGS))
        stages = self._stages.get(key)
        if stages is None:
            stages = self._stages[key] = Stages(self.pool, settings, self.executor, self.events,
                                                matcher=self._matcher, grader=self._grader)
        return stages

    @classmethod
    def resuming(cls, run_id: str, *, store: RunStore, reload: bool = False,
                 placement: Mapping[str, Any] | None = None) -> Orchestra:
        """An Orchestra to resume a stored run from the command line: its pool comes from the
        recorded pool or workflow (``reload``: the workflow file as it is now; see ``aresume``);
        ``placement``: ``executor`` and ``ray_address`` other than the run's (its cluster is gone).
        Where models run does not change their calls' keys: recorded calls are still replayed."""
        record = store.run(run_id)
        if reload:  # (before the pool is looked for: that is not what stops it)
            check_reload(record)
        spec = RunSpec.from_record(record.config, record.task)
        if spec.pool and not Path(spec.pool).is_file():
            raise ConfigError(f"run {record.id} used pool {spec.pool}, which no longer exists")
        if spec.workflow is not None:
            pool = Workflow.load(spec.workflow.path, pool=Pool.load(spec.pool) if spec.pool else None,
                                 text=None if reload else spec.workflow.source, data=False).pool
        elif spec.pool:
            pool = Pool.load(spec.pool)
        else:
            raise UserError(f"run {record.id} used a pool built in Python; resume it there: "
                            f"Orchestra(pool).resume({record.id!r})")
        with warnings.catch_warnings():  # (a record sets every limit: which were chosen, the run warned of already)
            warnings.filterwarnings("ignore", "the cost budget counts no dollars", UserWarning)
            return cls(pool, spec.settings.layered(dict(placement)) if placement else spec.settings, store=store)

    # --- single runs -----------------------------------------------------------------------

    def run(self, task: str, **overrides: Any) -> RunResult:
        """Answer ``task`` (blocking). See ``arun`` for the overrides."""
        return run_sync(self.arun(task, **overrides))

    async def arun(self, task: str, *, plan: Plan | dict[str, Any] | bool | None = None, run_id: str | None = None,
                   meta: dict[str, Any] | None = None, node_settings: dict[str, NodeSettings] | None = None,
                   final: Callable[[Outputs], str] | None = None, shared_budget: BudgetTracker | None = None,
                   answer_format: str | None = None, context: str = "", workflow: WorkflowRef | None = None,
                   experts: Mapping[str, Sequence[str]] | None = None,
                   answer: AnswerOptions | Mapping[str, Any] | None = None,
                   on_answer_text: Callable[[str], None] | None = None, spent_before: Spent | None = None,
                   **overrides: Any) -> RunResult:
        """Answer ``task``.

        Args:
            task: what to do.
            plan: a ``Plan`` to run as given, or a bool to switch planning on or off.
            run_id: an id for the run (default: a new one; an existing id continues that run).
            meta: JSON-ready facts stored with the run (``kind``, ``item``... shown in listings).
            node_settings: per-node recruiting, aggregation, output schema and prompt (workflows).
            final: renders the answer from the nodes' outputs instead of aggregating the sinks.
            shared_budget: a budget this run shares with others (a data set's); its calls must fit both.
            answer_format: how the final answer should be stated (for grading).
            context: conversation context the planner and the experts see.
            workflow: the workflow file and inputs this run comes from (rendered again on resume).
            experts: agent names fixed per node id (``{"answer": ["coder"]}`` with ``plan=False``),
                recorded, so a resume keeps them.
            answer: how the answer is written: JSON or a JSON schema, token limit, temperature.
            on_answer_text: given the answer's text so far while the call that writes it streams
                (an OpenAI-compatible endpoint streams it; other backends do not call it).
            spent_before: what the task spent before this run, under the same limits (its planning,
                ``aplan``, as chat plans first): recorded, and counted against the run's limits
                with the run's own calls, on resume too; not part of the run's usage.
            overrides: ``Settings`` fields for this run only (k, mode, aggregate, seed, budget...).
        """
        _check_callback(on_answer_text, "on_answer_text", "the answer's text so far")
        earlier: RunRecord | None = None
        if run_id is not None:
            check_run_id(run_id)
            earlier = self._earlier_run(run_id)
            self._check_same_task(earlier, task)
        run = self._make_run(task, plan=plan, run_id=run_id, node_settings=node_settings, final=final,
                             shared_budget=shared_budget, answer_format=answer_format, context=context,
                             workflow=workflow, meta=meta, experts=experts, answer=answer,
                             spent_before=spent_before, **overrides)
        self._check_same_settings(earlier, run.spec)
        run.on_answer_text = _going_on(on_answer_text) if on_answer_text is not None else None
        self._begin(run)
        result = await self._finish(run)
        if run.forbidden is not None:
            raise run.forbidden
        return result

    def _earlier_run(self, run_id: str) -> RunRecord | None:
        """The stored run ``run_id`` names exactly, which a run given that id continues; None for a
        new run (no store, no such run, or an id that is only a prefix of stored ones)."""
        if self.store is None:
            return None
        try:
            record = self.store.run(run_id)
        except StoreError:  # none (or an id that is a prefix of several): a new run
            return None
        return record if record.id == run_id else None

    @staticmethod
    def _check_same_task(earlier: RunRecord | None, task: str) -> None:
        """A run continuing ``earlier`` (see ``_earlier_run``) of another task is refused (its record
        would hold one task and the other's answer and calls)."""
        if earlier is not None and earlier.task != task:
            shown = earlier.task if len(earlier.task) <= 60 else earlier.task[:57] + "..."
            raise ConfigError(f"run {earlier.id} answers another task ({shown!r}); leave out run_id for a new run, "
                              f"or resume that one ({command('resume', earlier.id)})")

    @staticmethod
    def _check_same_settings(earlier: RunRecord | None, spec: RunSpec) -> None:
        """A run continuing ``earlier`` with other settings (its budget aside, which a run goes on
        under when raised) is refused. It was run again under the new ones, its record overwritten,
        its usage adding what the first settings' calls had cost (k=1 reported the 9 calls of k=3)."""
        if earlier is None:
            return
        ignored = {"budget", *ORCHESTRA_LEVEL}
        before = RunSpec.from_record(earlier.config, earlier.task).settings.model_dump(exclude=ignored)
        now = spec.settings.model_dump(exclude=ignored)
        changed = [f"{name} {before[name]!r}, now {now[name]!r}" for name in now if now[name] != before.get(name)]
        if changed:
            raise ConfigError(f"run {earlier.id} was made with other settings ({'; '.join(changed[:3])}); leave out "
                              f"run_id for a new run, or go on with it as it was ({command('resume', earlier.id)})")

    def run_settings(self, overrides: Mapping[str, Any]) -> Settings:
        """This Orchestra's settings with a run's ``overrides`` on top; settings of the executor
        (``max_resident_models``, ``memory_budget_gb``, ``executor``, ``ray_address``) belong to
        the Orchestra, not to a run."""
        settings = self.settings.layered(Settings.layer(_knobs(overrides), where="run setting"))
        fixed = [name for name in ORCHESTRA_LEVEL if getattr(settings, name) != getattr(self.settings, name)]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} set{'s' if len(fixed) == 1 else ''} the Orchestra's executor; "
                              f"pass {'it' if len(fixed) == 1 else 'them'} to Orchestra(...), not to a run")
        if settings.cache and self.store is None:
            raise ConfigError("the response cache lives in the run store; this Orchestra was made with store=False")
        if not self._unpriced_told and settings.budget.cost_limit_set:
            self._tell_unpriced()
        return settings

    def _tell_unpriced(self) -> None:
        """Given a cost budget: warn once that the models with no price are not bounded by it."""
        self._unpriced_told = True
        warning = self.pool.unpriced()
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=3)

    def _make_run(self, task: str, *, plan: Plan | dict[str, Any] | bool | None = None, run_id: str | None = None,
                  node_settings: dict[str, NodeSettings] | None = None, final: Callable[[Outputs], str] | None = None,
                  shared_budget: BudgetTracker | None = None, answer_format: str | None = None, context: str = "",
                  workflow: WorkflowRef | None = None, meta: dict[str, Any] | None = None,
                  settings: Settings | None = None, experts: Mapping[str, Sequence[str]] | None = None,
                  answer: AnswerOptions | Mapping[str, Any] | None = None, spent_before: Spent | None = None,
                  **overrides: Any) -> Run:
        """A run of ``task``; ``settings``: the run's resolved settings, when the caller made them
        already (then ``overrides`` are not read)."""
        check_task(task)
        if run_id is not None:
            check_run_id(run_id)
        _check_callback(final, "final", "the nodes' outputs")  # (not callable: it failed after the calls, paid)
        if context is None:
            context = ""
        for text, what in ((context, "context"), (answer_format, "answer_format")):
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"{what} must be text, not {type(text).__name__} {text!r:.40}")
            if text:
                check_context(text, f"the {what.replace('_', ' ')}")
        if meta:
            _check_meta(meta)
        plan = _given_plan(plan)
        graph = _given_graph(plan) if isinstance(plan, Plan) else None
        if settings is None:
            if isinstance(plan, bool):
                overrides["plan"] = plan
            settings = self.run_settings(overrides)
        source = self.pool.source
        spec = RunSpec(task=task, settings=settings, plan=plan if isinstance(plan, Plan) else None,
                       answer_format=answer_format, context=context, workflow=workflow, meta=meta or {},
                       pool=str(source.resolve()) if source else None, answer=AnswerOptions.given(answer),
                       pinned=self._known_experts(experts, plan if isinstance(plan, Plan) else None,
                                                  settings.plan) if experts else {},
                       spent_before=spent_before)
        if node_settings:
            self._check_node_settings(node_settings, plan if isinstance(plan, Plan) else None, settings.plan)
        if workflow is None and (node_settings or final):  # (a workflow's run rebuilds them from the workflow)
            spec = spec.model_copy(update=_python_choices(node_settings or {}, final))
        run = self._run(spec, run_id or new_run_id(), shared_budget=shared_budget, node_settings=node_settings,
                        final=final)
        run.given_graph = graph  # checked here: the planner does not check it again
        return run

    def _check_node_settings(self, given: Mapping[str, NodeSettings], plan: Plan | None, planned: bool) -> None:
        """Refuse node settings this run could not use, before any call: what is not a NodeSettings
        (which checks its own values), a node the run has not (a misspelt id was ignored without a word),
        an agent not in the pool."""
        if not isinstance(given, Mapping):
            raise ConfigError(f"node_settings must map node ids to NodeSettings, not {type(given).__name__}")
        nodes = _node_ids(plan, planned)
        for node, chosen in given.items():
            where = f"node_settings[{node!r}]"
            if not isinstance(chosen, NodeSettings):
                raise ConfigError(f"{where} must be a NodeSettings(...), not {type(chosen).__name__} {chosen!r:.40}")
            if nodes is not None and node not in nodes:
                raise ConfigError(f"{where}: the run has no node {node!r}; its nodes: {', '.join(nodes)}")
            if chosen.agent is not None and chosen.agent not in self.pool:
                raise ConfigError(f"{where}.agent: {chosen.agent!r} is not an agent of pool {self.pool.name!r}; "
                                  f"agents: {', '.join(self.pool.names)}")

    def _known_experts(self, experts: Mapping[str, Sequence[str]], plan: Plan | None,
                       planned: bool) -> dict[str, list[str]]:
        """Experts fixed per node, each an agent of the pool; where the run's nodes are known before it
        runs (a given ``plan``, or none: not ``planned``), a node misnamed is refused, not ignored."""
        nodes = _node_ids(plan, planned)
        if not isinstance(experts, Mapping):
            raise ConfigError(f"experts must map node ids to lists of agent names ({{'answer': ['coder']}}), "
                              f"not {type(experts).__name__} {experts!r:.40}")
        for node, names in experts.items():
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise ConfigError(f"experts[{node!r}] must be a list of agent names ([{names!r:.40}]), "
                                  f"not {type(names).__name__} {names!r:.40}")
            if nodes is not None and node not in nodes:
                raise ConfigError(f"experts[{node!r}]: the run has no node {node!r}; its nodes: {', '.join(nodes)}")
            if not names:
                raise ConfigError(f"experts[{node!r}] names no agent; give a list of agents of pool "
                                  f"{self.pool.name!r}: {', '.join(self.pool.names)}")
            unknown = [name for name in names if name not in self.pool]
            if unknown:
                raise ConfigError(f"experts: {', '.join(unknown)} not agents of pool "
                                  f"{self.pool.name!r}; agents: {', '.join(self.pool.names)}")
        return {node: list(names) for node, names in experts.items()}

    def _run(self, spec: RunSpec, run_id: str, *, shared_budget: BudgetTracker | None = None,
             node_settings: dict[str, NodeSettings] | None = None,
             final: Callable[[Outputs], str] | None = None) -> Run:
        """A run of ``spec`` on this Orchestra's executor, with the stages of its settings; a task
        that spent before its run (``spent_before``) has a budget of its own above the run's."""
        settings = spec.settings
        if spec.spent_before is not None:
            shared_budget = task_budget(settings.budget, spec.spent_before, parent=shared_budget)
        ledger = RunLedger.create(run_id, settings.budget, shared_budget=shared_budget, journal=self.store,
                                  cache=self.store.cache() if settings.cache and self.store else None,
                                  shared=sharing.get())
        return Run(self.stages_for(settings), spec, ledger, node_settings=node_settings, final=final)

    def _begin(self, run: Run) -> None:
        self._begin_all([run])

    def _begin_all(self, runs: Sequence[Run], *, force: bool = False, resuming: bool = False) -> None:
        """Record the runs as begun (one transaction); a run resumed counts what it spent before:
        the calls it replays, its failed attempts (their calls are sent again, and the store adds
        both up) and calls it will not ask again (a request changed since), so its usage is what
        the endpoints received, as the store's totals say."""
        for run in runs:
            if self._going.get(run.run_id, run) is not run:
                raise ConfigError(f"run {run.run_id} is already running here; wait for it to end" + (
                    "" if resuming else ", or leave out run_id for a new run"))
        self._claim(runs)
        if self.store is None:
            return
        try:
            for run in runs:  # (Orchestras sharing one store object share its owner tag: the store cannot tell)
                if self.store.going.get(run.run_id, self) is not self:
                    raise RunHeld(run.run_id, self.store.owner.rpartition(":")[0], 0.0)
            self.store.begin_runs([(run.run_id, run.task, run.spec.record_json()) for run in runs], force=force)
            earlier = self.store.earlier_usage([run.run_id for run in runs])
        except BaseException:
            self._unclaim(runs)
            raise
        self._keep_alive()
        self.executor.forget_recorded_orphans({run.run_id for run in runs})  # (counted just now, with ``earlier``)
        for run in runs:
            if run.run_id in earlier:
                before = earlier[run.run_id]
                run.ledger.budget.count(before.usage, calls=before.calls)
                run.ledger.counted, run.ledger.unsent = before.failed, before.unsent
                run.ledger.earlier_failures = before.failures

    def _claim(self, runs: Sequence[Run]) -> None:
        """Claim this event loop for ``runs`` (until each goes, or is given up), refusing one while
        runs begun or going here belong to another loop (another thread's)."""
        loop = asyncio.get_running_loop()
        with self._claim_lock:
            going = self._going_loop  # (one loop for all the runs going: a scan of them ran for every run begun)
            if going is None or going.is_closed():  # (claims a loop left behind end with it)
                self._claimed = {run for run in self._claimed if not run.future.get_loop().is_closed()}
            elif going is not loop and (self._running or self._claimed):
                raise ConfigError("this Orchestra is running runs in another event loop (another thread); give "
                                  "each thread its own Orchestra (they may share the pool and the store file), "
                                  "or run the tasks together in one loop (arun_many)")
            self._going_loop = loop
            self._claimed.update(runs)

    def _unclaim(self, runs: Iterable[Run]) -> None:
        """``runs`` were begun here but will not go (their beginning failed, or they were given up)."""
        with self._claim_lock:
            self._claimed.difference_update(runs)
        self._rest()

    async def _finish(self, run: Run) -> RunResult:
        self._hold(run)
        try:
            return await self._settle(run)
        finally:
            self._let_go(run)

    def _hold(self, run: Run) -> None:
        """Count ``run`` as going here, and in the store object (other Orchestras may share it)."""
        with self._claim_lock:
            self._claimed.discard(run)
            if not self._running:
                self._going_loop = run.future.get_loop()
            self._running += 1
        self._going[run.run_id] = run
        if self.store is not None:
            self.store.going[run.run_id] = self
        self._keep_alive()

    def _let_go(self, run: Run) -> None:
        """``run`` has ended (or was given up): it is no longer going here; with none going, the
        heartbeat stops (left sleeping, a loop closed without ``aclose`` destroyed it pending)."""
        with self._claim_lock:
            self._running -= 1
        if self._going.get(run.run_id) is run:
            del self._going[run.run_id]
        if self.store is not None and self.store.going.get(run.run_id) is self:
            del self.store.going[run.run_id]
        self._rest()

    def _rest(self) -> None:
        """Stop the heartbeat when no run is going or begun here (left sleeping, a loop closed without
        ``aclose`` destroyed it pending)."""
        beat = self._heartbeat
        if (not self._running and not self._claimed and beat is not None and not beat.done()
                and beat.get_loop() is _running_loop()):
            beat.cancel()

    def _keep_alive(self) -> None:
        """Make sure a heartbeat tells other processes this one still holds its runs: those going, and
        those begun and not going yet (a data set's chunk while it is recruited: keyword calls to a
        slow endpoint let their lease run out, and another process took them over)."""
        if self.store is None:
            return
        loop = asyncio.get_running_loop()
        beat = self._heartbeat
        if beat is None or beat.done() or beat.get_loop() is not loop:
            self._heartbeat = loop.create_task(self._beat())

    def _release_when_settled(self, run_id: str, in_flight: list[asyncio.Task[Any]] | None = None) -> None:
        """Hold the lease of a run stopped with requests in flight (``in_flight``: its batches, found if
        not given) until they end, the heartbeat keeping it: its record is written ``held`` (call this
        first), and a resume in another process is refused meanwhile, as it would send them again
        (paid twice; a served run whose client left was resumed so at once)."""
        in_flight = self.executor.in_flight_for(run_id) if in_flight is None else in_flight
        if self.store is None or not in_flight:
            return
        self._draining.add(run_id)
        store, loop = self.store, in_flight[0].get_loop()
        with contextlib.suppress(RuntimeError):  # (outside the loop: the heartbeat already beats, or none can)
            self._keep_alive()

        def release() -> None:  # (a turn later: the batch's answers are committed first)
            if self.executor.in_flight_for(run_id):  # stopped again since, with requests of a resume in flight
                return  # (that stop's own wait releases it)
            self._draining.discard(run_id)
            with contextlib.suppress(StoreError):
                store.release(run_id)

        asyncio.gather(*in_flight, return_exceptions=True).add_done_callback(lambda _: loop.call_soon(release))

    async def _beat(self) -> None:
        while (self._running or self._claimed or self._draining) and self.store is not None:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                lost = self.store.heartbeat(self._going)
            except StoreError:  # a full or locked disk: the run's own writes will say so
                continue
            for run_id, owner in lost.items():  # (two processes finishing one run send its calls twice)
                run = self._going.get(run_id)
                if run is not None:
                    holder = f"({owner.rsplit(':', 1)[0]}), which finishes it" if owner else "which has ended it"
                    run.cancel(f"run {run_id} was taken over by another process {holder}; this process stopped it")

    async def _settle(self, run: Run) -> RunResult:
        try:
            result = await run.start()
        except BaseException as error:  # cancelled by the caller, or a bug: stop the run's other work, keep its record
            said = error.args[0] if isinstance(error, asyncio.CancelledError) and error.args else None
            reason = said if isinstance(said, str) and said else None  # (task.cancel("why"), as serve says it)
            run.cancel(reason or CANCELLED_BY_USER)
            self.executor.orphan({run.run_id})  # (a resume here waits for the requests it left in flight)
            self._release_when_settled(run.run_id)  # (and one elsewhere is refused until they end)
            self._record_cancelled(run, reason)
            raise
        self._record(result, run=run)
        return result

    def _record_cancelled(self, run: Run, reason: str | None = None) -> RunResult:
        """Record a run stopped before it finished (``reason``: why, where its canceller said), and
        again whenever a request it had in flight is cut off later (the loop cancels those after the
        run's own tasks): its record counts what the endpoints received. Returns the result first
        recorded."""
        def record() -> RunResult:
            result = run.result("cancelled", None, reason or "stopped before it finished")
            self._record(result, held=run.run_id in self._draining)
            return result

        def again() -> None:  # unless the run has been resumed since (it is running, or done)
            if self.store is not None:
                try:
                    if self.store.run(run.run_id).status != "cancelled":
                        return
                except StoreError:
                    return
            record()

        stopped = record()
        run.ledger.after_end = again
        return stopped

    def _record(self, result: RunResult, *, soon: bool = False, held: bool = False, run: Run | None = None) -> None:
        """Store a finished run (``soon``: at the event loop's next turn, before the caller's task
        runs again; ``held``: its lease kept, see ``_release_when_settled``; ``run``: its earlier
        failures it did not ask again are superseded, where it is done); a store that cannot be
        written is a warning, not a lost answer."""
        if self.store is None:
            self._last_unstored = result
            return
        superseded = run.ledger.superseded() if run is not None and result.status == "done" else []
        try:
            self.store.finish_run(result, soon=soon, held=held, superseded=superseded)
        except StoreError as error:
            if str(error) in (result.error or ""):  # the run's own error already says so
                return
            if isinstance(error, StoreGone):  # (said once: an evaluation printed it for each of 20 runs)
                if self._told_gone:
                    return
                self._told_gone = True
            warnings.warn(f"run {result.run_id} finished but was not recorded: {error}", RuntimeWarning, stacklevel=2)

    def ended(self, run_id: str) -> RunResult | None:
        """The result of a run this Orchestra saw end, as recorded (a caller whose ``await`` was
        cancelled never got it): from the store, or with ``store=False`` the run that ended last."""
        if self.store is None:
            last = self._last_unstored
            return last if last is not None and last.run_id == run_id else None
        try:
            return self.store.result(run_id)
        except StoreError:
            return None

    # --- planning only -------------------------------------------------------------------------

    def plan(self, task: str, **options: Any) -> tuple[Plan, str]:
        """Make (and validate) a plan without running it (blocking). See ``aplan``."""
        return run_sync(self.aplan(task, **options))

    async def aplan(self, task: str, *, context: str = "", **overrides: Any) -> tuple[Plan, str]:
        """Ask the planner for a plan and validate it, with the usual repairs; returns the plan and a note.

        The plan can be shown, edited, and then run with ``arun(task, plan=plan)``.
        """
        run = self._make_run(task, plan=True, context=context, **overrides)
        run.ledger.journal = None  # planning alone is not a run of its own
        try:
            plan, _, _, note = await self.executor.run_task(run.make_plan())
        except BudgetExceeded as error:
            error.resumable = False  # (its run id is no stored run)
            raise
        return plan, note

    # --- resume ----------------------------------------------------------------------------

    def resume(self, run_id: str, **overrides: Any) -> RunResult:
        """Finish an interrupted run (blocking). See ``aresume``."""
        return run_sync(self.aresume(run_id, **overrides))

    async def aresume(self, run_id: str, *, budget: Budget | dict[str, Any] | None = None,
                      force: bool = False, reload: bool = False, inputs: Mapping[str, Any] | None = None,
                      retry_failed: bool = False) -> RunResult:
        """Finish a stored run from its record alone: the recorded settings, plan, pinned experts and
        workflow steps (not this Orchestra's settings); recorded calls are replayed, only missing
        ones are sent. A run that is done is returned as recorded, unless ``retry_failed``.

        Args:
            run_id: the run (a unique prefix is enough).
            budget: raised limits (a ``Budget`` or some of its fields) when the run stopped on one.
            force: take the run over even if another process seems to hold it (it was killed
                less than ``LEASE_SECONDS`` ago).
            reload: for a workflow run, read the workflow file as it is now (a template fixed
                since the run failed on it): its steps, prompts and final template, recorded with
                the run from then on; calls whose requests did not change are still replayed.
            inputs: with ``reload``, workflow inputs over the recorded ones (one the edited file
                added, a value to change); strings are converted as ``-i`` values are.
            retry_failed: a done run whose calls failed after their retries (it finished on the
                others) runs again: its recorded answers replayed, so only the failed calls, and
                what depends on them (an aggregator given one more answer), are sent; its new
                result is recorded over the old one. A done run with no failed call is returned.
        """
        if self.store is None:
            raise ConfigError("resume needs the run store; this Orchestra was made with store=False")
        if not isinstance(run_id, str):
            raise ConfigError(f"run_id must be a run's id (text), not {type(run_id).__name__}")
        record = self.store.run(run_id)
        if reload:
            check_reload(record)
        if inputs is not None:
            check_inputs(inputs)
        if inputs and not reload:  # (the recorded steps were made with the recorded inputs)
            raise ConfigError("inputs are given to a resume that reads the workflow file again: add reload=True, "
                              "or leave them out to go on with the run's own")
        if record.status == "done":
            stored = self.store.result(record.id)
            if stored is not None and not (retry_failed and stored.usage.failed_calls):
                return stored
        spec = RunSpec.from_record(record.config, record.task)
        self._check_pool_fits(record.id, spec)
        if budget:
            spec = spec.model_copy(update={"settings": spec.settings.layered({"budget": budget})})
        steps: dict[str, Any] = {}
        ref = spec.workflow
        if ref is None and spec.unrecorded:  # (resumed without them, it recruited afresh and answered otherwise)
            raise ConfigError(f"run {record.id} was given {' and '.join(spec.unrecorded)} in Python, which its "
                              f"record cannot hold; finish it with orc.arun(task, run_id={record.id!r}, ...) given "
                              "them again (its recorded calls are replayed)")
        if ref is None and spec.nodes:
            steps = {"node_settings": {node: _recorded_node(chosen) for node, chosen in spec.nodes.items()}}
        if ref is not None:  # the steps' prompts and the final template, as they were when it began
            workflow = Workflow.load(ref.path, pool=self.pool, text=None if reload else ref.source, data=False)
            if reload:  # the file as it is now, its inputs' defaults too, recorded as the run's from here on
                given = {**{name: value for name, value in ref.inputs.items() if name not in ref.defaulted},
                         **(inputs or {})}
                values = workflow.resolve_inputs(given)
                plan = workflow.plan()
                spec = spec.model_copy(update={
                    "workflow": ref.model_copy(update={"source": workflow.document.text, "inputs": values,
                                                       "defaulted": workflow.defaulted(given)}),
                    "plan": plan if spec.plan is not None and plan is not None else spec.plan})
            else:
                values = workflow.resolve_inputs(ref.inputs)
            steps = {"node_settings": workflow.node_settings(values), "final": workflow.final(values)}
        run = self._run(spec, record.id, **steps)
        self._begin_all([run], force=force, resuming=True)
        return await self._finish(run)

    def _check_pool_fits(self, run_id: str, spec: RunSpec) -> None:
        """Refuse to resume a run on a pool that cannot go on with it: one without the experts it
        pinned (its keyword calls were paid before it failed), or without the models its recorded
        answers came from (none was replayed: the run was answered anew on other models, paid
        again, its record mixing two pools)."""
        assert self.store is not None
        pinned = sorted({name for names in spec.pinned.values() for name in names if name not in self.pool})
        if pinned:
            raise ConfigError(f"run {run_id} fixed its experts to {', '.join(pinned)}, which this Orchestra's pool "
                              f"has not (its agents: {', '.join(self.pool.names)}); resume it on the pool it ran on")
        ours = [model.name for model in self.pool.models]
        gone = sorted({row["model"] for row in self.store.calls(run_id)
                       if row["status"] == "ok" and row["purpose"] != EMBEDDINGS and row["model"] not in ours})
        if gone:
            raise ConfigError(f"run {run_id}'s recorded answers came from {', '.join(gone)}, which this Orchestra's "
                              f"pool has not (its models: {', '.join(ours)}); resume it on the pool it ran on (they "
                              "would be asked anew of other models, not replayed)")

    # --- many runs -------------------------------------------------------------------------

    def run_many(self, tasks: Iterable[str | Instance], **options: Any) -> list[RunResult]:
        """Answer many tasks, their calls batched together (blocking). See ``arun_many``."""
        return run_sync(self.arun_many(tasks, **options))

    async def arun_many(self, tasks: Iterable[str | Instance], *, plan: bool = False, rare_filter: bool = True,
                        answer_formats: Sequence[str | None] | None = None, meta: dict[str, Any] | None = None,
                        window: int | None = DEFAULT_WINDOW, shared_budget: BudgetTracker | None = None,
                        **overrides: Any) -> list[RunResult]:
        """Answer many tasks on one executor so every wave's calls group per model; the results
        in the order of ``tasks``. Built on ``arun_iter``: at most ``window`` runs are in flight.

        Args:
            tasks: the questions: strings or ``Instance`` objects, from a list or any iterable.
            plan: plan each task (off by default at data-set scale).
            rare_filter: without planning, recruit the tasks together, a chunk at a time, and
                replace experts chosen for under the rare threshold of a chunk's tasks, so fewer
                models load (see ``arun_iter``). Only this call's tasks are considered: runs of
                other callers never change these recruitments.
            answer_formats: a per-task hint on how to state the final answer (for grading; over an
                ``Instance``'s own).
            meta: JSON-ready facts stored with each run.
            window: the most runs in flight at once (None: all of them).
            shared_budget: a budget all these runs spend together (``BudgetTracker(Budget(...), None)``),
                on top of each run's own.
            overrides: ``Settings`` fields for all these runs.
        """
        if isinstance(tasks, str):  # (a string is an iterable of one-letter tasks)
            raise ConfigError("tasks must be a list of tasks, not one string; run(...) answers one task")
        if isinstance(tasks, AsyncIterable):  # (it was "'async_generator' object is not iterable")
            raise ConfigError("tasks must be a list of tasks, not an async iterable; arun_iter(tasks) takes one and "
                              "yields each result as its run ends")
        items = list(tasks)
        formats = list(answer_formats) if answer_formats is not None else [None] * len(items)
        if len(formats) != len(items):
            raise ValueError("answer_formats must have one entry per task")
        instances: list[Instance] = []
        for item, fmt in zip(items, formats):  # refused before any run begins
            if isinstance(item, Instance):
                check_task(item.task)
                instances.append(item if fmt is None else replace(item, answer_format=fmt))
            else:
                check_task(item)
                instances.append(Instance(item, answer_format=fmt))
        self.run_settings({**overrides, "plan": plan})
        results: list[RunResult | None] = [None] * len(instances)
        async with aclosing(self.arun_iter(instances, window=window, plan=plan, rare_filter=rare_filter, meta=meta,
                                           shared_budget=shared_budget, **overrides)) as stream:
            async for index, result in stream:
                results[index] = result
        return cast(list[RunResult], results)

    async def arun_iter(self, tasks: Tasks, *, window: int | None = DEFAULT_WINDOW, plan: bool = False,
                        rare_filter: bool = True, meta: Mapping[str, Any] | None = None,
                        shared_budget: BudgetTracker | None = None,
                        on_stopped: Callable[[int, RunResult], None] | None = None,
                        **overrides: Any) -> AsyncGenerator[tuple[int, RunResult], None]:
        """Answer a stream of tasks, at most ``window`` runs at a time; yield ``(index, result)``
        as each run finishes (completion order; ``index`` is the task's position in ``tasks``).

        Runs share the executor, so the calls of the runs in flight batch per model. A new task is
        read only when a slot is free: a run holds its slot from the moment it is made until its
        result is handed over, so memory stays bounded whatever the number of tasks (results the
        caller keeps are its own). Each result is recorded in the store as its run finishes, before
        it is yielded. Stopping early (``break``, an error, cancellation) stops the runs in flight;
        they are recorded as cancelled (``contextlib.aclosing`` makes that immediate).

        Args:
            tasks: task strings or ``Instance``s (a task with its own answer format, meta and
                options), from a sequence, a generator or an async iterable. An async input may
                wait for results before giving more tasks.
            window: the most runs held at once (None: no bound; every task is read at once).
            plan: plan each task (off by default at data-set scale).
            rare_filter: without planning, recruit tasks together a chunk at a time (``window // 2``
                tasks, fewer at the end of the input or when an async input has no task ready)
                and replace experts chosen for under the rare threshold of the chunk's tasks
                (Symbolic-MoE's batch-level step, per chunk), so fewer models load. The next chunk
                is recruited while the previous one runs. Instances with their own ``plan`` or
                ``node_settings`` or ``experts`` are not filtered.
            meta: JSON-ready facts stored with each run.
            shared_budget: a budget all these runs spend together (``BudgetTracker(Budget(...), None)``),
                on top of each run's own; an ``Instance``'s options may give its own.
            on_stopped: given ``(index, result)`` of each run stopped early (its status ``cancelled``,
                its usage what it had counted when stopped), as it is recorded, and of each run that
                ended but was not yielded before the caller stopped (its result as it ended). Requests
                a stopped run had in flight then reached their endpoint too: the store counts them as
                they end (``store.result(run_id)``); this result does not.
            overrides: ``Settings`` fields for all these runs.
        """
        if window is not None and (type(window) is not int or window < 1):
            raise ValueError(f"window must be a whole number of at least 1 (or None for no bound), not {window!r:.40}")
        if meta:
            _check_meta(meta)
        _check_callback(on_stopped, "on_stopped", "(index, result)")
        stream = _Stream(self, _Source(tasks), window=window, plan=plan, rare_filter=rare_filter, meta=meta,
                         overrides=overrides, shared_budget=shared_budget, on_stopped=on_stopped)
        async with aclosing(stream.results()) as results:
            async for item in results:
                yield item

    async def _recruit_together(self, runs: list[Run], *, seed: int | None = None) -> None:
        """Recruit the runs' one node together and filter rare experts across them (keeping the
        filtered experts in each run's record, so a resume recruits the same ones)."""
        node = "answer"

        async def recruit(run: Run) -> Recruitment:  # the coroutine is made only once its task runs
            return cast(Recruitment, await self.executor.run_task(run.recruit(node, run.task, ())))

        outcomes = await asyncio.gather(*(recruit(run) for run in runs), return_exceptions=True)
        recruited = [(run, o) for run, o in zip(runs, outcomes) if not isinstance(o, BaseException)]
        for run, outcome in zip(runs, outcomes):
            if isinstance(outcome, Exception):  # (its keyword calls were made: not made again)
                run.recruiting_failed(node, outcome)
        filtered = runs[0].stages.staffing.filter_rare([o for _, o in recruited],
                                                       seed=runs[0].settings.seed if seed is None else seed)
        for (run, _), recruitment in zip(recruited, filtered):
            run.pin(node, recruitment)
        if self.store is not None:  # one transaction for the chunk
            self.store.update_configs((run.run_id, run.spec.record_json()) for run in runs)

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the calls that runs cancelled or abandoned left going; then, unless runs are still
        going in this event loop (another part of the program awaits them: they are left to finish,
        and the loop's end closes their connections), unload every resident model and close every
        connection the pool's models and matchers hold (closed under a run still going, its requests
        were cut and its retries sent them again on new connections)."""
        await self.executor.stop_in_flight()
        loop = asyncio.get_running_loop()
        if any(run.future.get_loop() is loop and not run.future.done() for run in self._going.values()):
            return
        beat = self._heartbeat
        if (beat is not None and not beat.done() and beat.get_loop() is asyncio.get_running_loop()
                and not self._running):  # (a run still going keeps telling other processes it is held)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        await self.executor.unload_all()
        await self.pool.aclose()
        for stages in self._stages.values():
            close = getattr(stages.staffing.matcher, "aclose", None)
            if close is not None:
                await close()

    def close(self) -> None:
        """``aclose`` from synchronous code (each sync call runs its own event loop, whose
        connections are closed with it)."""
        run_sync(self.aclose())

    async def __aenter__(self) -> Orchestra:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


#: the settings the pipeline stages are built from (runs that differ only elsewhere share stages)
_STAGE_SETTINGS = ("recruit", "keywords", "matcher", "aggregator", "aggregator_choice", "grader")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if one is."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def check_task(task: object) -> None:
    """Refuse a task that is not text, is empty, is longer than ``MAX_TASK_CHARS`` or cannot be sent
    (see ``_check_text``), in one line."""
    if not isinstance(task, str):
        raise ConfigError(f"the task must be a string, not {type(task).__name__}")
    if not task.strip():
        raise ConfigError("the task is empty")
    if invisible(task):  # (NUL bytes piped in, or zero-width spaces: nine paid requests answered nothing)
        raise ConfigError("the task has no visible character (only spaces, control characters such as NUL and "
                          "format characters such as a zero-width space)")
    if len(task) > MAX_TASK_CHARS:
        raise ConfigError(f"the task is {len(task):,} characters; at most {MAX_TASK_CHARS:,} fit Orchestra's "
                          "prompts (the planner's holds the task twice): shorten it")
    _check_text(task, "the task")


#: what a run id given by a caller may hold: it is typed into ``orchestra resume`` and shown in tables
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_run_id(run_id: object) -> None:
    """Refuse a run id a person could not type, read or see whole (a newline, an escape sequence,
    a path, 5,000 characters), in one line."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        shown = repr(run_id) if len(repr(run_id)) <= 40 else repr(run_id)[:37] + "..."
        raise ConfigError(f"run_id {shown} is not a run id: use 1 to 128 letters, digits and . _ : - "
                          "(starting with a letter or digit), or leave it out for a new one")


def _check_callback(callback: Any, name: str, takes: str) -> None:
    """Refuse a callback that is not a plain function: an ``async def`` one would never be awaited."""
    if callback is not None and (not callable(callback) or awaitable_call(callback)):
        why = ("an async function: it is called, not awaited; hand what it gets to your own task"
               if callable(callback) else f"{type(callback).__name__} {callback!r:.40}")
        raise ConfigError(f"{name} must be a plain function that takes {takes}, not {why}")


def _going_on(on_answer_text: Callable[[str], None]) -> Callable[[str], None]:
    """``on_answer_text`` whose failures are warned about (once) instead of failing the call that
    writes the answer: it raised inside that call, which failed, paid for, and the run with it."""
    warned = False

    def relay(text: str) -> None:
        nonlocal warned
        try:
            on_answer_text(text)
        except Exception as error:
            if not warned:
                warned = True
                warnings.warn(f"on_answer_text failed ({type(error).__name__}: {error}); the run goes on and its "
                              "answer is written whole", RuntimeWarning, stacklevel=2)

    return relay


def _check_meta(meta: Any) -> None:
    """``meta`` is stored with each run as JSON: a mapping of names to JSON-ready values."""
    if not isinstance(meta, Mapping) or not all(isinstance(key, str) for key in meta):
        raise ConfigError(f"meta must be a dict of names to JSON-ready values, not {type(meta).__name__} {meta!r:.40}")
    try:
        json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"meta must hold JSON-ready values (text, numbers, lists, dicts): {error}") from None


def check_context(text: str, what: str = "the context", *, limit: int = MAX_CONTEXT_CHARS) -> None:
    """Refuse a context (or what goes into one: chat's replan hint, given the room the conversation
    leaves as ``limit``) longer than ``limit`` or that cannot be sent, in one line: one 2.1 million
    characters long failed as a template that wrote too much (a jinja2 ``SecurityError``)."""
    if len(text) > limit:
        raise ConfigError(f"{what} is {len(text):,} characters; at most {limit:,} fit Orchestra's prompts: shorten it")
    _check_text(text, what)


def _check_text(text: str, what: str) -> None:
    """Refuse text no endpoint can be sent and no store can keep: a lone surrogate (JSON's ``\\ud800``
    escape, or a command line's bytes that are not UTF-8 in its locale)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(f"{what} is not valid Unicode: character {error.start + 1} is a lone surrogate "
                          f"({text[error.start]!r}); send UTF-8 text (on a command line: bytes that are "
                          "not UTF-8 in this locale)") from None
