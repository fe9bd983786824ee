"""The executor: continuous dispatch for remote models, planned load-once waves for in-process engines.

Pipeline code runs in tasks the executor manages and sends its model calls through ``call``. Every
call is first answered from the store (on resume) or the cache where possible and checked against
its run's budget; the rest go to their model:

- **Light models** (remote endpoints) get their calls as soon as they are queued: the calls queued
  in one event-loop tick form one batch per model, sent at once. The model's endpoint holds
  ``max_concurrency``, so there is no barrier to wait for: a slow call holds up only its own task.
- **Heavy models** (in-process engines that must be loaded) run in *waves*. A wave starts when no
  managed task can make progress without one: every task is waiting on a call, no heavy wave is in
  flight, and no task waits only on remote calls that were in flight before the oldest queued
  heavy call (those could still add to the wave; later ones cannot hold it up, so steady remote
  traffic never starves the engines). The wave's calls are grouped by model, each model gets one
  batch, and the groups run one after another, each loading its model at most once, keeping at
  most ``max_resident_models`` loaded and their summed ``memory_bytes`` within
  ``memory_budget_bytes`` (a budget alone: as many as fit it; neither: one). With a ``Placement`` (Ray
  actors, ``orchestra.ray_engines``) the engines run elsewhere and as many groups run at once as
  the placement has room for; the cluster's resources, not ``max_resident_models``, bound what
  stays loaded.

The order of a wave's groups is planned with look-ahead, one group at a time: resident models first
(no load), then the others in queue order, except that a model with work waiting for a later phase
runs last, so it is still resident when that phase starts. Later-phase work is what the finished
groups' tasks have queued since (the executor lets them run before it picks the next group) and
what callers announced with ``call(..., then=...)``: the models a task will call once its calls are
answered, such as a node's aggregator while its experts run. Eviction spares the models still
needed. With a placement, the groups that fit start together, the largest first (so the wave
ends close to its total work divided over the slots), a resident model keeping its slot. An engine
whose process dies while loading or mid-batch (``EngineLost``) is loaded afresh and gets that batch
(once more); the calls fail only if it dies again. Many runs share one executor, so a whole data set's calls batch
together.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from orchestra.budget import ANSWER_ALLOWANCE, Budget, BudgetTracker, Reservation
from orchestra.errors import (
    BadResponse,
    BudgetExceeded,
    CallCancelled,
    EngineLost,
    ResourceUnavailable,
    StoreError,
    described,
)
from orchestra.events import (
    BatchFinished,
    BatchStarted,
    CallDone,
    CallRetried,
    CallsQueued,
    CallsResolved,
    EventBus,
    FeatureDropped,
    ModelLoaded,
    ModelUnloaded,
    UsageUpdated,
)
from orchestra.models import ChatRequest, ChatResult, HeavyModel, Model, Usage, is_heavy
from orchestra.models.base import (
    ModelBase,
    cancel_listener,
    downgrade_listener,
    generations,
    model_identity,
    repair_admission,
    retry_listener,
    still_wanted,
)
from orchestra.models.pricing import FREE
from orchestra.money import dollars

Outcome = ChatResult | Exception
#: One answered call for the journal: run id, key, seq, model, request (or the canonical JSON its key
#: hashed), outcome, purpose, node, source.
CallEntry = tuple[str, str, int, str, ChatRequest | str, Outcome, str, str | None, str]
#: the purpose of a node's keyword samples: one that fails leaves the node its other samples' keywords
KEYWORDS = "keywords"


class CallJournal(Protocol):
    """Durable record of a run's calls (the run store): replayed on resume, written as results arrive."""

    def replay(self, run_id: str, key: str, seq: int, request: ChatRequest) -> ChatResult | None:
        """The recorded result of this call if it completed before (what it cost was counted as its
        run was resumed)."""

    def record(self, run_id: str, key: str, seq: int, model: str, request: ChatRequest, outcome: Outcome,
               *, purpose: str, node: str | None, source: str) -> None:
        """Commit one call's outcome before anything uses it."""

    def record_all(self, entries: Iterable[CallEntry]) -> None:
        """Commit several calls' outcomes together, before anything uses them."""

    def record_embeddings(self, run_id: str, *, model: str, node: str | None, usage: Usage,
                          keywords: list[str]) -> None:
        """Record embedding requests made while recruiting a node (requests outside any call)."""


class Placement(Protocol):
    """Where heavy models run when not in this process (``orchestra.ray_engines.RayPlacement``)."""

    def engine(self, model: HeavyModel) -> HeavyModel:
        """The stand-in the executor loads, sends batches to and unloads for ``model`` (one per model)."""

    def fits(self, resident: Sequence[HeavyModel], engine: HeavyModel) -> bool:
        """Whether ``engine`` can load while the ``resident`` stand-ins stay loaded; raises when
        it could never run there (the error names the model and what it lacks)."""


class ResponseCache(Protocol):
    """Answers reused across runs, keyed by model and canonical request."""

    def get(self, model: str, key: str, request: ChatRequest) -> ChatResult | None:
        """A cached result, or None."""

    def put(self, model: str, key: str, request: ChatRequest, result: ChatResult) -> None:
        """Remember a successful result."""


class SharedAnswers(Protocol):
    """Answers runs of separate evaluations share (a sweep's points: ``orchestra.sharing``), by call key
    and seq (the n-th identical request of a run takes the n-th answer)."""

    def get(self, key: str, seq: int) -> ChatResult | None:
        """The answer an earlier run's call with this key and seq got, or None."""

    def put(self, key: str, seq: int, result: ChatResult) -> None:
        """Keep a successful answer."""


@dataclass
class BatchRecord:
    """One batch as a run saw it."""

    model: str
    size: int
    calls: int
    wave: int
    purpose: str


@dataclass(eq=False)
class RunLedger:
    """One run's accounting inside the executor: budget, usage, batches, loads, call sequence."""

    run_id: str
    budget: BudgetTracker
    journal: CallJournal | None = None
    cache: ResponseCache | None = None
    batches: list[BatchRecord] = field(default_factory=list)
    model_loads: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # "cache" / "store" hits
    cache_misses: int = 0
    cache_errors: int = 0  # answers that could not be written to the cache
    #: answers shared with other evaluations' runs (a sweep's other points)
    shared: SharedAnswers | None = None
    #: of those, the ones this run took (not sent; counted by its budget as if sent): calls and their usage
    reused_calls: int = 0
    reused_usage: Usage = field(default_factory=Usage)
    failed_calls: int = 0
    #: per model: its calls of ``failed_calls`` and the first one's error
    failed_by_model: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: of ``failed_calls``, keyword samples (a node's keywords come from its other samples)
    failed_keyword_calls: int = 0
    #: the (key, seq) of calls that failed before the run was resumed, counted as it resumed
    #: (``BudgetTracker.count``): one sent again is not counted again
    counted: frozenset[tuple[str, int]] = frozenset()
    #: of ``counted``, those no request of which reached the model: answered from the cache, not calls
    unsent: frozenset[tuple[str, int]] = frozenset()
    #: ``counted`` as (key, seq, model, error, purpose), oldest first (``Earlier.failures``)
    earlier_failures: tuple[tuple[str, int, str, str, str], ...] = ()
    #: called when a request of the run, ended already, is cut off in flight and counted (its record is written again)
    after_end: Callable[[], None] | None = None
    _seq: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, run_id: str, budget: Budget | None = None, *, shared_budget: BudgetTracker | None = None,
               **options: Any) -> RunLedger:
        """A ledger with a fresh budget tracker (inside ``shared_budget`` when many runs share one)."""
        return cls(run_id=run_id, budget=BudgetTracker(budget or Budget(), run_id, parent=shared_budget), **options)

    def count_failed(self, model: str, error: BaseException, purpose: str) -> None:
        """Count a call of ``model`` for ``purpose`` that failed after its retries (``error``: why; the
        first is kept). A call failed by the run store (its answer could not be kept, or it was not
        sent because of that) is not: the model did its part, the run ends with the store's error, and
        the store's totals have no row to count."""
        if isinstance(error, StoreError):
            return
        self.failed_calls += 1
        self.failed_keyword_calls += purpose == KEYWORDS
        calls, first = self.failed_by_model.get(model, (0, described(error, model)))
        self.failed_by_model[model] = (calls + 1, first)

    def run_failures(self, *, done: bool = False) -> tuple[int, dict[str, tuple[int, str]], int]:
        """The run's failed calls, all and per model (with its first error), and of them keyword samples,
        as ``failed_calls``, ``failed_by_model`` and ``failed_keyword_calls`` count this invocation's: a
        resumed run's earlier failures not asked again now count too (one asked again counts as it ends
        now), as ``RunStore.run_totals`` does, but where the run is ``done`` (every node answered now:
        those are ``superseded``)."""
        if not self.earlier_failures:
            return self.failed_calls, self.failed_by_model, self.failed_keyword_calls
        total, keywords, by_model = 0, 0, dict[str, tuple[int, str]]()
        for key, seq, model, error, purpose in () if done else self.earlier_failures:
            if seq >= self._seq.get(key, 0):
                total += 1
                keywords += purpose == KEYWORDS
                calls, first = by_model.get(model, (0, error))
                by_model[model] = (calls + 1, first)
        for model, (calls, error) in self.failed_by_model.items():
            before, first = by_model.get(model, (0, error))
            by_model[model] = (before + calls, first)
        return total + self.failed_calls, by_model, keywords + self.failed_keyword_calls

    def superseded(self) -> list[tuple[str, int]]:
        """The (key, seq) of the earlier failures a resumed run did not ask again: once it is done,
        their requests are no longer the run's (an answer they lacked came since, and the calls that
        read it were asked anew), so they count as requests paid for, not as failed calls."""
        return [(key, seq) for key, seq, *_ in self.earlier_failures if seq >= self._seq.get(key, 0)]

    def next_seq(self, key: str) -> int:
        """How many identical requests this run made before this one."""
        seq = self._seq.get(key, 0)  # (a Counter's missing key calls Python code twice; this runs per call)
        self._seq[key] = seq + 1
        return seq

    @property
    def usage(self) -> Usage:
        """Requests, tokens and cost sent so far (the budget's, less the answers reused from another run)."""
        spent = self.budget.usage
        if not self.reused_calls:
            return spent
        reused = self.reused_usage
        return Usage(prompt_tokens=spent.prompt_tokens - reused.prompt_tokens,
                     completion_tokens=spent.completion_tokens - reused.completion_tokens,
                     cost_usd=dollars(spent.cost_usd - reused.cost_usd), requests=spent.requests - reused.requests)

    @property
    def calls(self) -> int:
        """Calls sent so far (the budget's, less the answers reused from another run)."""
        return self.budget.calls - self.reused_calls

    def reuse(self, usage: Usage) -> None:
        """Count an answer taken from another run (``shared``), which its budget counted as sent."""
        self.reused_calls += 1
        self.reused_usage = self.reused_usage + usage

    def count_embeddings(self, usage: Usage, *, model: str, node: str | None, keywords: list[str]) -> None:
        """Count (and journal) the embedding requests a recruitment made: requests, not calls."""
        self.budget.spend(usage)
        if self.journal is not None:
            self.journal.record_embeddings(self.run_id, model=model, node=node, usage=usage, keywords=keywords)


class _Waiter:
    """One managed task waiting for several calls."""

    __slots__ = ("expecting", "future", "heavy", "light_gen", "outcomes", "remaining", "then")

    def __init__(self, size: int, future: asyncio.Future[list[Outcome]]) -> None:
        self.remaining = size
        self.outcomes: list[Outcome | None] = [None] * size
        self.future = future
        self.heavy = 0  # unanswered calls to heavy models
        self.then: tuple[HeavyModel, ...] = ()  # heavy models its task calls next (a look-ahead)
        self.light_gen: int | None = None  # the generation it is counted in while it waits on light calls only
        self.expecting = False  # whether ``then`` is counted in the executor's look-ahead


@dataclass(slots=True)
class _Call:
    model: Model
    request: ChatRequest
    ledger: RunLedger
    purpose: str
    node: str | None
    waiter: _Waiter
    index: int
    key: str
    seq: int
    heavy: bool
    reserved: Reservation | None = None  # set once the budget admitted the call
    canonical: str = ""  # the JSON ``key`` hashes, recorded as the call's request
    capped: bool = False  # sent with the answer limit its budget reserved (its request set none)
    counted: bool = False  # it failed before its run resumed, and was counted then (see ``RunLedger.counted``)
    #: it waited for the same call of its run stopped earlier (see ``Executor.orphan``): a replay of
    #: that one's answer counts its usage, which the resumed run did not find recorded as it began
    orphaned: bool = False
    #: what the call it waited for spent, if that one failed: recorded after this run began, so not
    #: among what it counted then; counted once, should this call be sent again
    orphan_spent: Usage | None = None
    #: what it spent, as it settled (an orphan's, read by its resume's call: see ``orphan_spent``)
    spent: Usage | None = None


@dataclass
class ExecutorStats:
    """Totals over the executor's life: model loads and unloads, waves (dispatch rounds: each
    tick's remote batches count as one, each heavy wave as one)."""

    loads: Counter[str] = field(default_factory=Counter)
    unloads: Counter[str] = field(default_factory=Counter)
    waves: int = 0


class Executor:
    """Schedules managed tasks and dispatches their model calls in per-model batches.

    Args:
        events: where batch, load and retry events go.
        max_resident_models: heavy models kept loaded at once; None: 1, or with a
            ``memory_budget_bytes``, as many as fit it (the budget alone bounds them).
        memory_budget_bytes: if set, heavy models are also evicted to keep their summed
            ``memory_bytes`` within it. A model larger than the whole budget is loaded alone, with a
            warning; so is one of no size (``memory_bytes`` 0) when the budget alone bounds them
            (else a model of unknown size would never count, and every one would stay loaded).
        placement: where heavy models run instead of this process (Ray actors); then as many
            groups run at once as it has room for, and it alone bounds what stays loaded.
    """

    def __init__(self, *, events: EventBus | None = None, max_resident_models: int | None = None,
                 memory_budget_bytes: int | None = None, placement: Placement | None = None) -> None:
        self.events = events or EventBus()
        #: heavy models kept loaded at once; None: as many as ``memory_budget_bytes`` holds
        self.max_resident_models: int | None = (
            max(1, max_resident_models) if max_resident_models is not None
            else None if memory_budget_bytes is not None else 1)
        self.memory_budget_bytes = memory_budget_bytes
        self._told_size: set[str] = set()  # models warned of as loaded alone for their size
        self.placement = placement
        self.stats = ExecutorStats()
        self._resident: list[HeavyModel] = []  # least recently used first (with a placement: its stand-ins)
        self._busy: set[int] = set()  # heavy models (by id) whose group is running now
        self._batch_no = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        """A clean schedule (the loop's tasks are gone); resident models stay."""
        self._pending: list[_Call] = []  # queued since the last dispatch (this tick)
        #: calls the budget would take once the calls in flight end: queued again when one does
        self._held: list[_Call] = []
        self._heavy: list[_Call] = []  # admitted heavy calls waiting for the next heavy wave
        self._active = 0  # managed tasks that are running, not waiting on a call
        self._kick_scheduled = False
        self._heavy_running = False
        self._light_waiters: Counter[int] = Counter()  # waiters on light calls only, by generation
        self._generation = 0
        self._heavy_waits_for = 0  # the generation of light waiters the next heavy wave waits for
        self._expected: Counter[int] = Counter()  # id(heavy model) -> waiting tasks that will call it next
        self._wave_left: set[int] = set()  # heavy models still to run in the current wave
        self._settled: list[asyncio.Future[None]] = []  # woken once no managed task is running
        #: batches and waves in flight (kept referenced, so none is collected mid-flight), with their calls
        self._in_flight: dict[asyncio.Task[Any], list[_Call]] = {}
        #: calls of stopped runs whose requests are still in flight, by (run id, key, seq): the
        #: batch or wave that sent them (see ``orphan``)
        self._orphans: dict[tuple[str, str, int], tuple[asyncio.Task[Any], _Call]] = {}

    # --- managed tasks ---------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; a new loop (a sync wrapper's next ``asyncio.run``, or one after Ctrl-C)
        starts from a clean schedule, since the old loop's tasks are gone. Resident models stay."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._reset()
        return loop

    def spawn(self, coro: Coroutine[Any, Any, Any], *, owner: asyncio.Future[Any] | None = None,
              group: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a managed task. If it raises, ``owner`` (a run's future) gets the error;
        ``group`` holds the task while it runs (a run's tasks, to cancel them)."""
        loop = self._bind_loop()
        self._active += 1
        task = loop.create_task(coro)
        if group is not None:
            group.add(task)
        # one done callback (each is a turn of the loop), which runs even if the task is cancelled
        # before it starts; not a wrapping coroutine, as each resumption of the task would pass through it
        task.add_done_callback(self._task_done if owner is None and group is None
                               else partial(self._owned_task_done, owner, group))
        return task

    def _task_done(self, _: asyncio.Task[Any]) -> None:
        self._active -= 1
        self._schedule_kick()

    def _owned_task_done(self, owner: asyncio.Future[Any] | None, group: set[asyncio.Task[Any]] | None,
                         task: asyncio.Task[Any]) -> None:
        self._task_done(task)
        if group is not None:
            group.discard(task)
        if owner is None or task.cancelled():
            return
        error = task.exception()  # read here: the owner gets it, or the loop's handler reports it
        if error is None:
            return
        if isinstance(error, Exception) and not owner.done():
            owner.set_exception(error)
        else:
            task.get_loop().call_exception_handler({"message": "a managed task failed after its run ended",
                                                    "exception": error, "task": task})

    async def run_task(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run one managed coroutine from unmanaged code and wait for its result."""
        owner: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def wrapped() -> None:
            result = await coro
            if not owner.done():
                owner.set_result(result)

        task = self.spawn(wrapped(), owner=owner)
        try:
            return await owner
        except asyncio.CancelledError:
            task.cancel()
            raise

    # --- calls -----------------------------------------------------------------------------

    async def call(self, ledger: RunLedger, calls: Sequence[tuple[Model, ChatRequest]], *, purpose: str,
                   node: str | None = None, then: Sequence[Model] = ()) -> list[Outcome]:
        """Queue calls from a managed task and wait for all of them; outcomes in call order.

        A failed call comes back as its exception, so one bad expert does not sink its siblings.

        Args:
            ledger: the run's accounting.
            calls: (model, request) pairs.
            purpose: what the calls are for (recorded with their batches).
            node: the plan node they serve.
            then: models this task will call once these calls are answered (a node's aggregator
                while its experts run). A look-ahead: a heavy one among them runs last in its wave,
                so it is still loaded when its turn comes.
        """
        if not calls:
            return []
        loop = self._bind_loop()
        if self._active < 1:  # a managed task that calls is running: it counts itself
            raise RuntimeError("Executor.call() must come from a task the executor manages: "
                               "wrap the coroutine in executor.run_task(...)")
        waiter = _Waiter(len(calls), loop.create_future())
        for index, (model, request) in enumerate(calls):
            # the key (a hash of the canonical request) is needed only to journal or cache the call
            key, canonical = (request.keyed(model_identity(model)) if ledger.journal is not None
                              or ledger.cache is not None or ledger.shared is not None else ("", ""))
            heavy = is_heavy(model)
            if heavy and self.placement is not None and is_heavy(model):  # (narrowed for the type checker)
                model = self.placement.engine(model)  # its stand-in: queued, grouped and loaded as the model
            waiter.heavy += heavy
            self._pending.append(_Call(model, request, ledger, purpose, node, waiter, index, key,
                                       ledger.next_seq(key) if key else 0, heavy, canonical=canonical))
        if then:
            waiter.then = tuple(m if self.placement is None else self.placement.engine(m) for m in then if is_heavy(m))
        if self.events.wants(CallsQueued):
            per_model = Counter(call.model.name for call in self._pending[-len(calls):])  # as queued (stand-ins)
            for name, count in per_model.items():
                self.events.emit(CallsQueued(model=name, count=count, run_id=ledger.run_id, purpose=purpose))
        self._active -= 1
        self._track(waiter)
        self._schedule_kick()
        try:
            outcomes = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.cancelled():  # nobody woke this task: count it as running until it ends
                self._active += 1
                self._track(waiter)
            raise
        return outcomes

    def _resolve(self, call: _Call, outcome: Outcome) -> None:
        waiter = call.waiter
        if waiter.future.done():
            return
        waiter.outcomes[call.index] = outcome
        waiter.remaining -= 1
        waiter.heavy -= call.heavy
        if waiter.remaining == 0:
            self._active += 1  # the waiting task is runnable again
            waiter.future.set_result(list(waiter.outcomes))  # type: ignore[arg-type]
        self._track(waiter)

    def _track(self, waiter: _Waiter) -> None:
        """Count a waiting task in the light-only waiters (it may wake without any engine) and its
        look-ahead in the expected models, while it waits; drop it from both once it does not."""
        waiting = not waiter.future.done()
        light_only = waiting and waiter.heavy == 0
        if light_only and waiter.light_gen is None:
            waiter.light_gen = self._generation
            self._light_waiters[self._generation] += 1
        elif not light_only and waiter.light_gen is not None:
            self._light_waiters[waiter.light_gen] -= 1
            if not self._light_waiters[waiter.light_gen]:
                del self._light_waiters[waiter.light_gen]
            waiter.light_gen = None
        if waiting != waiter.expecting and waiter.then:
            waiter.expecting = waiting
            for model in waiter.then:
                self._expected[id(model)] += 1 if waiting else -1
                if not self._expected[id(model)]:
                    del self._expected[id(model)]

    # --- dispatch --------------------------------------------------------------------------

    def _schedule_kick(self) -> None:
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        """Once per tick with news: send what was queued, and start a heavy wave when one is due."""
        self._kick_scheduled = False
        if self._pending:
            self._dispatch()
        if self._active:
            return
        for settled in self._settled:
            if not settled.done():
                settled.set_result(None)
        self._settled.clear()
        if self._heavy and not self._heavy_running and min(self._light_waiters, default=self._generation) \
                > self._heavy_waits_for:
            self._heavy_running = True
            wave = asyncio.get_running_loop().create_task(self._heavy_wave())
            self._in_flight[wave] = self._heavy  # (the list the wave takes when it starts)
            wave.add_done_callback(self._in_flight.pop)
            wave.add_done_callback(partial(self._unbegun_wave, self._heavy))

    def _dispatch(self) -> None:
        """Answer what the store, the cache or the budget can; send each light model its batch now;
        queue heavy calls for the next heavy wave."""
        calls, self._pending = self._pending, []
        light: dict[int, list[_Call]] = {}
        for call in calls:
            if call.waiter.future.done():  # its task was cancelled
                continue
            if self._orphans and self._waits_for_orphan(call):
                continue
            try:
                handled = self._answer_without_model(call)
            except Exception as error:
                self._fail([call], error)
                continue
            if handled:
                continue
            if not call.heavy:
                light.setdefault(id(call.model), []).append(call)
                continue
            if not self._heavy:  # light waiters from now on cannot hold up the wave these calls start
                self._heavy_waits_for = self._generation
                self._generation += 1
            self._heavy.append(call)
        if light:
            self.stats.waves += 1
            loop = asyncio.get_running_loop()
            for group in light.values():
                task = loop.create_task(self._send(group, self.stats.waves))
                self._in_flight[task] = group
                task.add_done_callback(self._in_flight.pop)
                task.add_done_callback(partial(self._sent, group))

    def orphan(self, run_ids: Collection[str]) -> None:
        """Note the calls of runs stopped while their requests were in flight (they go on: the
        endpoint has them, and their answers are stored as they come). A resume of such a run in this
        process waits for them instead of sending the same requests again (paid twice)."""
        if not run_ids:
            return
        for task, group in self._in_flight.items():
            for call in group:
                run_id = call.ledger.run_id
                if run_id in run_ids and call.key and call.waiter.outcomes[call.index] is None:
                    orphan = (run_id, call.key, call.seq)
                    self._orphans[orphan] = (task, call)
                    task.add_done_callback(partial(self._orphan_ended, orphan))

    def in_flight_for(self, run_id: str) -> list[asyncio.Task[Any]]:
        """The batches still sending requests of ``run_id``, a run stopped (``orphan``) while they were in flight."""
        return self.in_flight_by_run().get(run_id, [])

    def in_flight_by_run(self) -> dict[str, list[asyncio.Task[Any]]]:
        """``in_flight_for`` of every stopped run with requests in flight, in one look."""
        found: dict[str, set[asyncio.Task[Any]]] = {}
        for (run_id, _, _), (task, _) in self._orphans.items():
            if not task.done():
                found.setdefault(run_id, set()).add(task)
        return {run_id: list(tasks) for run_id, tasks in found.items()}

    def _orphan_ended(self, orphan: tuple[str, str, int], _: asyncio.Task[Any]) -> None:
        self._orphans.pop(orphan, None)

    def forget_recorded_orphans(self, run_ids: Collection[str]) -> None:
        """Forget the calls in flight of stopped runs ``run_ids`` that have their outcomes recorded
        by now: resumes of those runs have just counted what the store holds, so these are replayed
        as any recorded call (waited for, they would be counted twice)."""
        for orphan, (_, call) in list(self._orphans.items()):
            if orphan[0] in run_ids and call.reserved is None:  # (settled: recorded in its journal first)
                del self._orphans[orphan]

    def _waits_for_orphan(self, call: _Call) -> bool:
        """Whether ``call`` is one a stopped run still has in flight: then it is queued again once that
        one is answered (and so recorded, to be replayed) or has failed (then it is sent)."""
        task, orphan = self._orphans.get((call.ledger.run_id, call.key, call.seq), (None, None))
        if task is None or task.done():
            return False

        def again(_: asyncio.Task[Any]) -> None:
            call.orphaned = True
            call.orphan_spent = orphan.spent if orphan is not None else None
            self._pending.append(call)
            self._schedule_kick()

        task.add_done_callback(again)
        return True

    def _sent(self, group: list[_Call], task: asyncio.Future[Any]) -> None:
        """After a batch's task: if it failed outside its model's answers (a bug, or an object that
        is not a model) or was cancelled, its unanswered calls fail with that error instead of
        waiting for ever (those cut off in flight were failed as such already)."""
        if task.cancelled():
            self._fail_unanswered(group, _unsent_error(group))
            return
        if task.exception() is None:
            return
        error = task.exception()
        self._fail_unanswered(group, error if isinstance(error, Exception) else RuntimeError(repr(error)))

    def _fail_unanswered(self, group: list[_Call], error: Exception) -> None:
        """Fail the calls of ``group`` that have no outcome yet; those nobody waits for any more give
        their budget reservations back."""
        unanswered = [c for c in group if c.waiter.outcomes[c.index] is None]
        self._fail([c for c in unanswered if not c.waiter.future.done()], error)
        for call in unanswered:
            self._settle(call, None)  # (a no-op for a call settled already: cut off in flight, or failed above)

    def _answer_without_model(self, call: _Call) -> bool:
        """Replay from the store, answer from the cache, or refuse on budget; True if handled."""
        ledger = call.ledger
        if ledger.journal is not None:
            gone = getattr(ledger.journal, "gone", None)
            if gone is not None:  # its answer could not be kept: not sent (a data set paid for 75 such answers)
                raise type(gone)(str(gone))
            recorded = ledger.journal.replay(ledger.run_id, call.key, call.seq, call.request)
            if recorded is not None:
                if call.orphaned:
                    ledger.budget.count(recorded.usage, calls=1)
                ledger.answered["store"] += 1
                if isinstance(call.model, ModelBase):
                    call.model.replayed(call.request)
                self.events.emit(CallsResolved(model=call.model.name, count=1, run_id=ledger.run_id, source="store"))
                self._resolve(call, recorded)
                return True
        if call.orphan_spent is not None:  # it failed: a call of the run, sent again here (and not counted again)
            ledger.budget.count(call.orphan_spent, calls=1)
            ledger.counted = ledger.counted | {(call.key, call.seq)}
            call.orphan_spent = None
        if ledger.cache is not None:
            cached = ledger.cache.get(call.model.name, call.key, call.request)
            if cached is not None:
                ledger.answered["cache"] += 1
                if ledger.unsent and (call.key, call.seq) in ledger.unsent:  # (its row becomes a cache answer)
                    ledger.budget.count(Usage(), calls=-1)
                self._answer_unsent(call, cached, "cache")
                return True
        answer_limit = _answer_limit(call.model)
        call.counted = bool(ledger.counted) and (call.key, call.seq) in ledger.counted
        try:
            call.reserved = ledger.budget.admit(call.request, getattr(call.model, "price", FREE),
                                                getattr(call.model, "prompt_gauge", None), answer_limit=answer_limit,
                                                counted=call.counted)
        except BudgetExceeded as exceeded:
            # it fits once the calls in flight end (their worst cases are held): it waits for them, unless
            # they are heavy calls queued for a wave that waits for this call's task (a task waiting on
            # light calls only: then it stops); a task with an engine's calls outstanding holds up no wave
            if exceeded.held and (call.waiter.heavy > 0 or not (self._heavy and not self._heavy_running)):
                self._held.append(call)
                ledger.budget.on_release(self._release_held)  # (the room may be another executor's, in a shared budget)
                return True  # (its cache miss is counted when it goes on: it is asked about again each time room frees)
            if ledger.cache is not None:
                ledger.cache_misses += 1
            if exceeded.held:  # (it could not wait: its run stops at the budget, as any refused call's)
                ledger.budget.stop(exceeded)
            self.events.emit(CallsResolved(model=call.model.name, count=1, run_id=ledger.run_id, source="budget"))
            self._resolve(call, exceeded)
            return True
        if ledger.shared is not None:
            found = ledger.shared.get(call.key, call.seq)
            if found is not None:  # another point of the sweep asked it: paid there, as the endpoint saw
                # (its budgets count it as sent, so the run stops where its method alone would; its usage not)
                self._settle(call, found.usage)
                ledger.reuse(found.usage)
                self._answer_unsent(call, found, "shared")
                return True
        if call.request.max_tokens is None and answer_limit is None and not call.heavy and ledger.budget.bounds_answers:
            # an endpoint's answer without a limit is unbounded: under a limit of the user's it gets the
            # one it was reserved for, so the budget holds (its key stays the request's own; its answer,
            # cut there, is not one for the response cache)
            call.request = call.request.model_copy(update={"max_tokens": ANSWER_ALLOWANCE})
            call.capped = True
        if ledger.cache is not None:
            ledger.cache_misses += 1
        return False

    def _answer_unsent(self, call: _Call, result: ChatResult, source: str) -> None:
        """Answer ``call`` with ``result``, which no request of its own got (``source``: "cache", or
        "shared": another point of a sweep asked it), recorded as such in its run's journal."""
        ledger = call.ledger
        if ledger.journal is not None:
            ledger.journal.record(ledger.run_id, call.key, call.seq, call.model.name, call.request, result,
                                  purpose=call.purpose, node=call.node, source=source)
        self.events.emit(CallsResolved(model=call.model.name, count=1, run_id=ledger.run_id, source=source))
        self._resolve(call, result)

    # --- heavy waves -----------------------------------------------------------------------

    async def _heavy_wave(self) -> None:
        calls, self._heavy = self._heavy, []
        self.stats.waves += 1
        wave = self.stats.waves
        running: dict[asyncio.Task[None], list[_Call]] = {}  # the groups running, by their task
        groups: dict[int, list[_Call]] = {}
        try:
            for call in calls:
                groups.setdefault(id(call.model), []).append(call)
            self._wave_left = set(groups)
            while groups or running:
                started = self._startable(groups, running)
                for key in started:
                    group = self._live(groups.pop(key))
                    self._wave_left.discard(key)
                    if group:
                        self._busy.add(key)
                        task = asyncio.get_running_loop().create_task(self._run_group(group, wave))
                        task.add_done_callback(partial(self._sent, group))
                        running[task] = group
                if not running:
                    if groups and not started:  # none fits beside nothing running: none ever would (it spun)
                        for key in list(groups):
                            self._wave_left.discard(key)
                            group = groups.pop(key)
                            self._fail(self._live(group), _no_room(group[0].model.name))
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                if groups:  # let the tasks these batches woke queue their next calls: they tell what comes later
                    await self._until_settled()
                    self._join_unstarted(groups, calls)
        except Exception as error:  # a bug: the wave's calls fail with it, rather than wait for ever
            for group in [*groups.values(), *running.values()]:
                self._fail_unanswered(group, error)
        finally:
            for task in running:  # when the wave itself is cancelled, or broke (its calls failed above)
                task.cancel()
            for group in groups.values():  # (cancelled: the groups not started give their reservations back)
                self._fail_unanswered(group, _unsent_error(group))
            self._wave_left = set()
            self._busy.clear()
            self._heavy_running = False
            # calls held for room while the wave ran are asked about again: with heavy calls queued
            # for the next wave, which waits for their tasks, they cannot wait any longer
            self._pending += self._held
            self._held = []
            self._schedule_kick()

    def _join_unstarted(self, groups: dict[int, list[_Call]], calls: list[_Call]) -> None:
        """Calls queued for the next wave whose model has a group of this wave not started yet join
        that group (and the wave's ``calls``): the model loads once for both (the next wave loaded it
        again)."""
        staying = [call for call in self._heavy if id(call.model) not in groups]
        if len(staying) == len(self._heavy):
            return
        for call in self._heavy:
            if id(call.model) in groups:
                groups[id(call.model)].append(call)
                calls.append(call)  # (the wave's calls, as the executor's in flight: orphans, cancellation)
        self._heavy = staying

    def _unbegun_wave(self, calls: list[_Call], wave: asyncio.Task[None]) -> None:
        """A wave cancelled before it began (its calls are still the queued ones): they fail or give
        their reservations back, and the next wave may start."""
        if wave.cancelled() and calls is self._heavy:
            self._heavy = []
            self._heavy_running = False
            self._fail_unanswered(calls, _unsent_error(calls))
            self._schedule_kick()

    def _startable(self, groups: dict[int, list[_Call]],
                   running: Mapping[asyncio.Task[None], list[_Call]]) -> list[int]:
        """The groups to start now, in order. In process: the next one, once none runs. With a
        placement: every group that fits beside those running, in planned order; a group whose model
        could never fit is failed here with the reason."""
        if self.placement is None:
            return [] if running or not groups else [self._next_group(groups)]
        chosen: list[int] = []
        busy = [m for m in self._resident if id(m) in self._busy]
        for key in self._group_order(groups, longest_first=True):
            model = groups[key][0].model
            assert is_heavy(model)  # queued as heavy
            if model in self._resident:  # its slot is held already
                chosen.append(key)
                busy.append(model)
                continue
            try:
                fits = self.placement.fits(busy, model)
            except Exception as error:
                self._wave_left.discard(key)
                self._fail(self._live(groups.pop(key)), error)
                continue
            if fits:
                chosen.append(key)
                busy.append(model)
        return chosen

    async def _run_group(self, group: list[_Call], wave: int) -> None:
        """Load the group's model (once) and send it the group's batch; an engine lost mid-batch
        is loaded afresh and gets the unanswered calls once more."""
        model = group[0].model
        assert is_heavy(model)  # queued as heavy
        try:
            for retry in (False, True):
                try:
                    await self._make_resident(model, {c.ledger for c in group})
                except EngineLost as error:  # its process died while loading: nothing was sent
                    if retry:
                        self._fail(group, EngineLost(f"{error}, again on a fresh start; not retried further"))
                        return
                    self.events.emit(CallRetried(model=model.name, attempt=2, wait_s=0.0,
                                                 reason=f"{error}; loading it afresh for {len(group)} call(s)"))
                    continue
                except Exception as error:
                    self._fail(group, error)
                    return
                lost = await self._send(group, wave, lost_ok=True)
                if lost is None:
                    return
                group, why = lost
                if model in self._resident:  # its process is gone: nothing to unload
                    self._resident.remove(model)
                if retry:
                    self._fail(group, EngineLost(f"{why}, again on a fresh start; not retried further"))
                    return
                self.events.emit(CallRetried(model=model.name, attempt=2, wait_s=0.0,
                                             reason=f"{why}; loading it afresh for {len(group)} call(s)"))
        finally:
            self._busy.discard(id(model))

    def _live(self, group: list[_Call]) -> list[_Call]:
        """The calls whose task still waits; a cancelled one gives its budget reservation back."""
        live = []
        for call in group:
            if call.waiter.future.done():
                self._settle(call, None)
            else:
                live.append(call)
        return live

    async def _until_settled(self) -> None:
        """Wait until every managed task is waiting on a call (or done)."""
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settled.append(settled)
        self._schedule_kick()
        await settled

    def _later(self) -> Counter[int]:
        """Work per heavy model (by id) after the current wave: calls queued for the next one, and
        waiting tasks that announced they will call it."""
        later = Counter(id(c.model) for c in self._heavy)
        later.update(self._expected)
        return later

    def _next_group(self, groups: dict[int, list[_Call]]) -> int:
        """The group to run next (see ``_group_order``)."""
        return self._group_order(groups)[0]

    def _group_order(self, groups: dict[int, list[_Call]], *, longest_first: bool = False) -> list[int]:
        """The groups in the order to run them: a resident model first (no load); then, in queue
        order (or the largest first, ``longest_first``), models no later phase needs, and last those
        with later work, the most wanted last, so it stays loaded."""
        resident = {id(m) for m in self._resident}
        later = self._later()
        order = {key: position for position, key in enumerate(groups)}
        size = {key: len(group) for key, group in groups.items()} if longest_first else {}
        return sorted(groups, key=lambda key: (key not in resident, later[key], -size.get(key, 0), order[key]))

    async def _make_resident(self, model: HeavyModel, ledgers: set[RunLedger]) -> None:
        if model in self._resident:
            self._resident.remove(model)
            self._resident.append(model)
            return
        evicted = []  # chosen and its place taken before any await, so groups starting together agree
        while self._resident and not self._room_for(model):
            evicted.append(victim := self._eviction())
            self._resident.remove(victim)
        self._resident.append(model)
        self._tell_alone(model)
        try:
            for victim in evicted:
                await victim.unload()
                self.stats.unloads[victim.name] += 1
                self.events.emit(ModelUnloaded(model=victim.name))
            if not model.loaded:
                seconds = await model.load()
                self.stats.loads[model.name] += 1
                for ledger in ledgers:
                    ledger.model_loads[model.name] += 1
                self.events.emit(ModelLoaded(model=model.name, seconds=seconds))
        except BaseException:
            if model in self._resident:
                self._resident.remove(model)
            raise

    def _room_for(self, model: HeavyModel) -> bool:
        """Whether ``model`` can load beside the resident models."""
        if self.placement is not None:
            return self.placement.fits(self._resident, model)
        if self.max_resident_models is not None and len(self._resident) >= self.max_resident_models:
            return False
        return not self._over_memory(model)

    def _eviction(self) -> HeavyModel:
        """The resident model to unload: an idle one this wave and later phases do not need, least
        recently used first."""
        later = self._later()
        idle = [m for m in self._resident if id(m) not in self._busy]
        if not idle:
            raise RuntimeError("no idle engine to unload for the next one")  # the wave starts only what fits
        return min(idle, key=lambda m: (id(m) in self._wave_left, later[id(m)] > 0, self._resident.index(m)))

    def _over_memory(self, incoming: HeavyModel) -> bool:
        if self.memory_budget_bytes is None:
            return False
        used = sum(self._size(m) for m in self._resident)
        return used + self._size(incoming) > self.memory_budget_bytes

    def _size(self, model: HeavyModel) -> int:
        """What ``model`` counts against the memory budget: its ``memory_bytes``; one of no size,
        when the budget alone bounds what stays loaded, the whole budget (so it loads alone)."""
        size = model.memory_bytes
        if size <= 0 and self.max_resident_models is None and self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        return size

    def _tell_alone(self, model: HeavyModel) -> None:
        """Warn (once per model) that ``model`` is loaded alone because of its size: larger than the
        whole memory budget (it loads all the same: the budget bounds what stays loaded beside it),
        or of no size under a budget that alone bounds them."""
        budget = self.memory_budget_bytes
        if budget is None or self.placement is not None or model.name in self._told_size:
            return
        size = model.memory_bytes
        if size > budget:
            why = (f"takes {_gib(size)} GiB, more than the whole memory budget ({_gib(budget)} GiB, "
                   "memory_budget_gb): it is loaded alone")
        elif size <= 0 and self.max_resident_models is None:
            why = (f"has no memory size (memory_bytes 0; a pool's models take memory_gb), so the memory budget "
                   f"({_gib(budget)} GiB) cannot count it: it is loaded alone; give its size, or max_resident_models")
        else:
            return
        self._told_size.add(model.name)
        warnings.warn(f"model {model.name} {why}", UserWarning, stacklevel=2)

    async def _send(self, group: list[_Call], wave: int, *,
                    lost_ok: bool = False) -> tuple[list[_Call], EngineLost] | None:
        """Send ``group`` as one batch and settle its calls as answers come. ``lost_ok``: when the
        engine's process dies mid-batch, return the unanswered calls and why, instead of failing them."""
        model = group[0].model
        self._batch_no += 1
        batch = self._batch_no
        runs = tuple(dict.fromkeys(c.ledger.run_id for c in group))
        own: Counter[int] = Counter(id(c.ledger) for c in group)
        for ledger in {id(c.ledger): c.ledger for c in group}.values():
            ledger.batches.append(BatchRecord(model=model.name, size=len(group), calls=own[id(ledger)],
                                              wave=wave, purpose=group[0].purpose))
        self.events.emit(BatchStarted(batch=batch, model=model.name, size=len(group), wave=wave, runs=runs))
        started = time.perf_counter()
        token = retry_listener.set(self._on_retry)
        dropped = downgrade_listener.set(self._on_downgrade)
        cancelled = cancel_listener.set(partial(self._cancelled_in_flight, group, set()))
        unsent: set[int] = set()  # calls whose tasks stopped before their turn came: never sent

        def wanted(index: int) -> bool:
            if group[index].waiter.future.done():  # (done before all its calls are answered: cancelled)
                unsent.add(index)
                return False
            return True

        asked = still_wanted.set(wanted)
        # an engine generating one request at a time: a call whose task stops has its generation stopped
        # (left to run, a long answer held the engine for minutes, and the next calls waited behind it)
        running: dict[int, asyncio.Task[Any]] = {}
        stoppers = [] if getattr(model, "concurrent", True) else [
            (call.waiter.future, partial(self._stop_generation, running, index, unsent))
            for index, call in enumerate(group)]
        for future, stop in stoppers:
            future.add_done_callback(stop)
        stopping = generations.set(running if stoppers else None)

        def reserve_repair(request: ChatRequest, repair: ChatRequest, spent: Usage) -> None:
            # (repairs are rare: no index kept; a call settled already holds nothing)
            call = next((c for c in group if c.request is request and c.reserved is not None), None)
            if call is None or call.reserved is None:
                return
            budget = call.ledger.budget
            # the call holds what its first request cost, no longer that request's worst case
            call.reserved = budget.hold(call.reserved, Reservation(spent.prompt_tokens + spent.completion_tokens,
                                                                   spent.cost_usd))
            extra = budget.admit(repair, getattr(model, "price", FREE), getattr(model, "prompt_gauge", None),
                                 within=True, answer_limit=_answer_limit(model))
            call.reserved = Reservation(call.reserved.tokens + extra.tokens, call.reserved.cost_usd + extra.cost_usd)

        repairing = repair_admission.set(reserve_repair)
        pending = dict(enumerate(group))
        answered: list[tuple[_Call, Outcome]] = []  # answers of this turn of the loop, not yet committed
        flush: asyncio.Handle | None = None

        def finish_answered() -> None:
            nonlocal flush
            flush = None
            done = answered[:]
            answered.clear()
            self._finish_all(done)

        failed = 0
        lost: tuple[list[_Call], EngineLost] | None = None
        try:
            async for index, outcome in model.complete_each([c.request for c in group]):
                if index not in pending:  # (it failed as `first error: 5`)
                    raise BadResponse(f"{model.name} answered request {index!r} of a batch of {len(group)}, one it "
                                      "had answered already or never got")
                if index in unsent and not _billed(outcome):  # nothing to record or count: its reservation goes back
                    self._settle(pending.pop(index), None)
                    continue
                answered.append((pending.pop(index), outcome))
                failed += isinstance(outcome, Exception)
                if flush is None:
                    flush = asyncio.get_running_loop().call_soon(finish_answered)
            if pending:  # (a model that answered fewer than it was asked: its calls waited for ever)
                raise BadResponse(f"{model.name} answered {len(group) - len(pending)} of the {len(group)} "
                                  "requests of its batch")
        except EngineLost as error:
            failed += len(pending)
            if lost_ok:
                lost = (list(pending.values()), error)
            else:
                self._fail(list(pending.values()), error)
        except Exception as error:
            failed += len(pending)
            self._fail(list(pending.values()), error)
        finally:
            if flush is not None:
                flush.cancel()
                finish_answered()
            retry_listener.reset(token)
            downgrade_listener.reset(dropped)
            cancel_listener.reset(cancelled)
            still_wanted.reset(asked)
            generations.reset(stopping)
            for future, stop in stoppers:
                future.remove_done_callback(stop)
            repair_admission.reset(repairing)
        self.events.emit(BatchFinished(batch=batch, model=model.name, size=len(group), failed=failed,
                                       seconds=time.perf_counter() - started))
        return lost

    @staticmethod
    def _stop_generation(running: dict[int, asyncio.Task[Any]], index: int, unsent: set[int],
                         _: asyncio.Future[Any]) -> None:
        """The task waiting for a batch's call ``index`` stopped (or has its answers): a generation
        still running for it is stopped (its request is recorded as cut off, as the endpoint got it)."""
        generation = running.get(index)
        if generation is not None and not generation.done():
            unsent.add(index)  # (its outcome comes back as a cancellation: nothing more to record)
            generation.cancel()

    def _finish_all(self, answered: list[tuple[_Call, Outcome]]) -> None:
        """Commit answers to their runs' journals, one transaction per journal, and only then hand
        them to their tasks. A journal that cannot be written fails its calls with that error."""
        journals: dict[int, tuple[CallJournal, list[CallEntry]]] = {}
        for call, outcome in answered:
            journal = call.ledger.journal
            if journal is not None:
                journals.setdefault(id(journal), (journal, []))[1].append(
                    (call.ledger.run_id, call.key, call.seq, call.model.name, call.canonical or call.request, outcome,
                     call.purpose, call.node, "model"))
        unwritten: dict[int, Exception] = {}
        for key, (journal, entries) in journals.items():
            try:
                journal.record_all(entries)
            except Exception as error:
                unwritten[key] = error
        report = self.events.wants(CallDone)  # asked once a batch: events are not free on this path
        usage = self.events.wants(UsageUpdated)
        for call, outcome in answered:
            self._finish(call, outcome, unwritten.get(id(call.ledger.journal)) if unwritten else None,
                         report=report, usage=usage)

    def _finish(self, call: _Call, outcome: Outcome, unwritten: Exception | None, *, report: bool,
                usage: bool) -> None:
        """Settle an answered call; ``unwritten``: why its journal could not record it (then it
        fails); ``report``, ``usage``: whether to emit its ``CallDone`` and the run's ``UsageUpdated``."""
        ledger = call.ledger
        paid = getattr(outcome, "usage", None) or Usage()  # a failed call carries what it cost too
        if unwritten is not None:
            outcome = unwritten
        self._settle(call, paid)
        if isinstance(outcome, Exception):
            ledger.count_failed(call.model.name, outcome, call.purpose)
        elif not call.capped:  # (an answer cut at the limit it was sent with is not the request's own)
            if ledger.cache is not None:
                try:
                    ledger.cache.put(call.model.name, call.key, call.request, outcome)
                except Exception:
                    ledger.cache_errors += 1
            if ledger.shared is not None:
                ledger.shared.put(call.key, call.seq, outcome)
        if ledger.after_end is not None:  # its run was recorded as stopped before this answer came: again
            ledger.after_end()
        if report:
            failed = isinstance(outcome, Exception)
            self.events.emit(CallDone(run_id=ledger.run_id, model=call.model.name, purpose=call.purpose,
                                      node=call.node, request=call.request,
                                      response=None if failed else outcome.text,  # type: ignore[union-attr]
                                      error=str(outcome) if failed else None))
        if usage:
            self.emit_usage(ledger)
        self._resolve(call, outcome)

    def emit_usage(self, ledger: RunLedger) -> None:
        """Tell listeners that want it a run's spending so far."""
        if not self.events.wants(UsageUpdated):
            return
        spent = ledger.usage
        self.events.emit(UsageUpdated(run_id=ledger.run_id, calls=ledger.calls, requests=spent.requests,
                                      prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
                                      cost_usd=spent.cost_usd, cache_misses=ledger.cache_misses,
                                      failed_calls=ledger.run_failures()[0]))

    def _settle(self, call: _Call, usage: Usage | None) -> None:
        """Release the call's reservation (if the budget admitted it) and count what it spent; the
        calls that waited for a reservation to end are asked about again."""
        if call.reserved is not None:
            call.ledger.budget.settle(call.reserved, usage, counted=call.counted)
            call.reserved = None
            call.spent = usage

    def _release_held(self) -> None:
        """A reservation was released: the calls that waited for room are asked about again (from
        another thread's loop, in this executor's)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            loop.call_soon_threadsafe(self._release_held)
            return
        if self._held:
            self._pending += self._held
            self._held = []
            self._schedule_kick()

    def _fail(self, calls: list[_Call], error: Exception) -> None:
        """Fail calls that got no outcome of their own: each is a call of its run that failed, counted
        and journaled as one (with the requests that reached the model: none where an engine could not
        load, its cluster be joined or its room be found; a run counted such a call among its failed
        calls but not its calls, and its record left it out)."""
        spent = getattr(error, "usage", None) or Usage()
        journals: dict[int, tuple[CallJournal, list[CallEntry]]] = {}
        for call in calls:
            journal = call.ledger.journal
            if journal is not None:
                journals.setdefault(id(journal), (journal, []))[1].append(
                    (call.ledger.run_id, call.key, call.seq, call.model.name, call.canonical or call.request, error,
                     call.purpose, call.node, "model"))
        for journal, entries in journals.values():
            try:
                journal.record_all(entries)
            except Exception:  # (a store that cannot be written tells its runs as they end)
                pass
        for call in calls:
            if call.reserved is None and not call.counted:  # failed before it was admitted: counted here
                call.ledger.budget.tally(spent)
            else:
                self._settle(call, spent)
            call.ledger.count_failed(call.model.name, error, call.purpose)
            self._resolve(call, error)

    def _cancelled_in_flight(self, group: list[_Call], counted: set[int], request: ChatRequest, usage: Usage) -> None:
        """A call of ``group`` cancelled after its requests went out (Ctrl-C, the loop ending): the
        endpoint got them, so its run counts them and its journal records them, as a failed call
        would be. (Found by a search: this is rare, and the batch's path stays as it was.)"""
        # (one request object may be sent twice in a batch: the first of them not yet counted here)
        place = next((i for i, c in enumerate(group) if c.request is request and i not in counted
                      and c.reserved is not None), None)  # (not settled: a cancelled task's outcomes stay unset)
        if place is None:
            return
        counted.add(place)
        call = group[place]
        error = CallCancelled(f"{call.model.name}: cancelled while its request was in flight")
        error.usage = usage
        self._settle(call, usage)
        call.ledger.count_failed(call.model.name, error, call.purpose)
        self.emit_usage(call.ledger)  # (a live panel shows them too, as the run's record counts them)
        journal = call.ledger.journal
        if journal is not None:
            try:
                journal.record_all([(call.ledger.run_id, call.key, call.seq, call.model.name,
                                     call.canonical or call.request, error, call.purpose, call.node, "model")])
            except Exception:  # (a store that cannot be written already told its run)
                pass
        if call.ledger.after_end is not None:
            call.ledger.after_end()
        self._resolve(call, error)

    def _on_retry(self, model: str, attempt: int, wait_s: float, reason: str) -> None:
        self.events.emit(CallRetried(model=model, attempt=attempt, wait_s=wait_s, reason=reason))

    def _on_downgrade(self, model: str, feature: str, reason: str) -> None:
        self.events.emit(FeatureDropped(model=model, feature=feature, reason=reason))

    # --- residency -------------------------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        """Names of the heavy models loaded now, least recently used first."""
        return [m.name for m in self._resident]

    async def stop_in_flight(self) -> None:
        """Cancel the batches and waves of this loop that no run waits for any more (those of runs
        cancelled or abandoned) and wait until they have stopped; requests they had sent are counted
        and journaled as cut off. Connections can then be closed without a retry opening them again.
        Those of runs still going are left to finish."""
        loop = asyncio.get_running_loop()
        going = [task for task, calls in self._in_flight.items() if task.get_loop() is loop and not task.done()
                 and all(call.waiter.future.done() for call in calls)]
        for task in going:
            task.cancel()
        await asyncio.gather(*going, return_exceptions=True)

    async def unload_all(self) -> None:
        """Unload every resident heavy model."""
        while self._resident:
            model = self._resident.pop(0)
            await model.unload()
            self.stats.unloads[model.name] += 1
            self.events.emit(ModelUnloaded(model=model.name))


def _billed(outcome: Outcome) -> bool:
    """Whether a call that came back unwanted had sent requests before it stopped (a retry or a
    repair not sent once its call was cancelled): they are recorded and counted as a failed call's."""
    usage = getattr(outcome, "usage", None)
    return usage is not None and usage.requests > 0


def _answer_limit(model: Any) -> int | None:
    """A model's own limit on an answer whose request sets none: an engine's ``default_max_tokens``,
    or ``max_completion_tokens`` / ``max_tokens`` in an endpoint's ``extra_body``; None: unbounded."""
    limit = getattr(model, "default_max_tokens", None)
    if limit is None:
        extra = getattr(model, "extra_body", None) or {}
        limit = next((extra[key] for key in ("max_completion_tokens", "max_tokens")
                      if isinstance(extra.get(key), int) and not isinstance(extra.get(key), bool)), None)
    return limit if isinstance(limit, int) else None


def _gib(size: int) -> str:
    """``size`` bytes in GiB, for a message (``2``, ``8.5``, ``0.0009537``)."""
    return f"{size / 2**30:.4g}"


def _no_room(name: str) -> ResourceUnavailable:
    """What the calls of a wave's group fail with when their placement has no room for its model
    (``name``) with no engine of this process busy."""
    return ResourceUnavailable(f"model {name} does not fit where its engines run, with none of this process's "
                               f"other engines busy (its resources are taken by something else); free them or "
                               f"lower the resources it asks for")


def _unsent_error(calls: list[_Call]) -> CallCancelled:
    """What calls cancelled before their requests were sent fail with."""
    return CallCancelled(f"{calls[0].model.name}: cancelled before its request was sent")
