"""Evaluation: the accuracy, cost and speed of a method on a labelled data set."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from orchestra.budget import Budget, BudgetTracker
from orchestra.datasets import Dataset, Item
from orchestra.errors import ConfigError
from orchestra.events import VOTED_INSTEAD
from orchestra.grading import Grader, answer_format, check_grader
from orchestra.money import dollars, usd_exact
from orchestra.recruit import CALIBRATED_COST_LAMBDA
from orchestra.result import RunResult

if TYPE_CHECKING:
    from orchestra.core import Orchestra
    from orchestra.settings import RunSpec, Settings
    from orchestra.store import RunRecord

T = TypeVar("T")

#: method (one of ``vocabulary.METHOD_NAMES``) -> (recruiting mode, aggregation, k or None for the caller's k)
METHODS: dict[str, tuple[str, str, int | None]] = {
    "calibrated": ("calibrated", "synthesize", None),
    "symbolic-moe": ("symbolic-moe", "synthesize", None),
    "vote": ("symbolic-moe", "vote", None),
    "moa": ("global", "synthesize", None),
    "random": ("random", "synthesize", None),
    "single": ("global", "none", 1),
}


#: the ``per_category`` entry of items without a category (they were listed as "all", which read as every item)
UNCATEGORIZED = "uncategorized"


@dataclass
class EvalReport:
    """What ``orchestra eval`` (and a data-set workflow) prints; ``answers`` holds every item's answer."""

    method: str
    items: int
    correct: int
    accuracy: float
    calls: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_per_correct_usd: float | None
    elapsed_s: float
    model_loads: dict[str, int]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: int = 0
    first_failure: str | None = None
    """The first unfinished run: its item, status and error (None: every run finished)."""
    first_failure_run: str | None = None
    """That run's id (``orchestra resume`` goes on with it)."""
    failure_exit: int = 0
    """That run's exit code (2: a user error such as a rejected key, 3: a budget stopped it; 0: none failed)."""
    skill_extraction_failures: int = 0
    unmatched_skill_items: int = 0
    """Items whose keywords matched none of the profiled skills: recruited on overall accuracy alone
    (each explanation said ``no matched skill``, the report nothing)."""
    failed_calls: int = 0
    """Calls that failed after their retries (a run that lost an expert may still finish, on the others)."""
    failed_by_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Of ``failed_calls``, per model: ``{"calls": N, "first_error": "..."}`` (which endpoint failed, and why)."""
    failed_keyword_calls: int = 0
    """Of ``failed_calls``, keyword samples: their nodes took the keywords of their other samples (a node
    whose samples all failed is among ``skill_extraction_failures``). A resumed run counts the whole run's,
    as ``failed_calls`` does."""
    saved_calls: int = 0
    """Calls confident teams did not need (their first experts agreed)."""
    cache_hits: int = 0
    """Calls the response cache answered: not made, so not among ``calls`` nor in the cost (a repeated
    evaluation with the cache on cost $0, and said nothing of why)."""
    reused_calls: int = 0
    """Calls its runs took from another point of a sweep (``RunUsage.reused_calls``): not made here, so not
    among ``calls`` nor in the cost."""
    reused_usd: float = 0.0
    """What those calls cost where they were made: ``cost_usd`` plus this is what the method costs alone."""
    voted_instead: int = 0
    """Nodes whose aggregator failed, answered by a vote of their experts instead (see ``AggregationFellBack``)."""
    budget_exceeded: str | None = None
    """Why a shared budget stopped the data set early (None: it did not)."""
    reused: int = 0
    """With ``resume``: items whose earlier run had finished, counted from the store (no call made)."""
    resumed: int = 0
    """With ``resume``: items whose earlier run was cut off, finished now (its recorded calls replayed)."""
    retried: int = 0
    """With ``resume`` and ``retry_failed``: items whose earlier run finished with failed calls, run
    again (its recorded answers replayed: only the failed calls and what depends on them sent)."""
    interrupted: bool = False
    """Cancelled (Ctrl-C) before every item ran: the report holds the items finished by then."""
    cut_off: int = 0
    """Runs an interruption stopped before they finished (not among ``items``): what they had
    spent is in the totals, and ``resume`` goes on with them."""
    answers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)


class Tally:
    """Grades finished runs one at a time and keeps only totals (and, unless they go to ``sink``,
    the answer rows): a data set's report without holding its runs."""

    def __init__(self, grader: Grader, *, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.grader = grader
        self.sink = sink
        self.items = self.correct = self.failed = self.skill_extraction_failures = self.saved_calls = 0
        self.voted_instead = self.cache_hits = self.unmatched_skill_items = 0
        self.failed_calls = 0
        self.failed_keyword_calls = 0
        self.failed_by_model: dict[str, dict[str, Any]] = {}  # in the order their first failures came
        self.cut_off = 0
        self.calls = self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = self.reused_usd = 0.0
        self.reused_calls = 0
        self.first_failure: tuple[int, str, int, str] | None = None  # (index, what happened, its exit code, run)
        self.categories: dict[str, Counter[str]] = {}
        self.category_first: dict[str, int] = {}  # a category's first item: the report lists them in data-set order
        self.answers: list[tuple[int, dict[str, Any]]] = []
        #: per position of the stream being graded, the data set's index and item (``grade_as_they_finish``)
        self.positions: Sequence[tuple[int, Item]] = ()

    def add(self, index: int, item: Item, result: RunResult) -> None:
        """Grade the run of item ``index`` and count what it spent."""
        # an unfinished run counts as wrong, as the report says, even where it left an answer (a partial
        # run whose skill extraction failed did: its right answers made 1.000 "(0 of 12 finished)")
        grade = self.grader.grade(result.answer, item) if result.answer else None  # (the answer's own, shown apart)
        ok = result.status == "done" and bool(grade)
        self.items += 1
        self.correct += ok
        self._spent(result)
        self.saved_calls += sum(node.saved_calls for node in result.plan.nodes)
        self.voted_instead += sum(1 for node in result.plan.nodes if node.recruitment and any(
            line.endswith(VOTED_INSTEAD) for line in node.recruitment.get("explanation", ())))
        self.unmatched_skill_items += result.usage.skill_extraction_failures > 0 and any(  # (said by the run: a
            matched_no_skill(node.recruitment) for node in result.plan.nodes)  # pool with no skills says nothing)
        category = item.category or UNCATEGORIZED
        tally = self.categories.setdefault(category, Counter())
        self.category_first[category] = min(index, self.category_first.get(category, index))
        tally["items"] += 1
        tally["correct"] += ok
        if result.status != "done":
            self.failed += 1
            if self.first_failure is None or index < self.first_failure[0]:
                self.first_failure = (index, f"item {item.id} ({result.status}): "
                                             f"{result.error or 'no error recorded'}", result.exit_code, result.run_id)
        row = {"id": item.id, "category": item.category, "answer": result.answer, "correct": ok, "grade": grade,
               "status": result.status, "run_id": result.run_id}
        if self.sink is not None:
            self.sink(row)
        else:
            self.answers.append((index, row))

    def stopped_run(self, position: int, result: RunResult) -> None:
        """Count what a run stopped before it finished (an interrupted evaluation) had spent; its
        item is not graded (``arun_iter``'s ``on_stopped``). One that ended before it stopped, but
        was not handed over, is graded as it ended (``positions``: the data set's index and item of
        each of the stream's positions)."""
        if result.status != "cancelled" and position < len(self.positions):
            self.add(*self.positions[position], result)
            return
        self.cut_off += 1
        self._spent(result)

    def _spent(self, result: RunResult) -> None:
        usage = result.usage
        self.calls += usage.calls
        self.requests += usage.requests
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += usage.cost_usd
        self.skill_extraction_failures += usage.skill_extraction_failures
        self.failed_calls += usage.failed_calls
        self.failed_keyword_calls += usage.failed_keyword_calls
        for model, failed in usage.failed_by_model.items():
            self.failed_by_model.setdefault(model, {"calls": 0, "first_error": failed.first_error})
            self.failed_by_model[model]["calls"] += failed.calls
        self.cache_hits += usage.cache_hits
        self.reused_calls += usage.reused_calls
        self.reused_usd += usage.reused_usd

    def report(self, method: str, *, elapsed_s: float, model_loads: dict[str, int],
               budget_exceeded: str | None = None) -> EvalReport:
        """The totals so far as a report (answers in data-set order)."""
        return EvalReport(
            method=method, items=self.items, correct=self.correct,
            accuracy=self.correct / self.items if self.items else 0.0, calls=self.calls, requests=self.requests,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, cost_usd=dollars(self.cost_usd),
            cost_per_correct_usd=dollars(self.cost_usd / self.correct) if self.correct else None, elapsed_s=elapsed_s,
            model_loads=model_loads,
            per_category={c: {"items": t["items"], "accuracy": t["correct"] / t["items"]}
                          for c, t in sorted(self.categories.items(), key=lambda ct: self.category_first[ct[0]])},
            failed=self.failed, first_failure=self.first_failure[1] if self.first_failure else None,
            failure_exit=self.first_failure[2] if self.first_failure else 0,
            first_failure_run=self.first_failure[3] if self.first_failure else None,
            skill_extraction_failures=self.skill_extraction_failures,
            unmatched_skill_items=self.unmatched_skill_items, failed_calls=self.failed_calls,
            failed_keyword_calls=self.failed_keyword_calls,
            failed_by_model={model: dict(failed) for model, failed in self.failed_by_model.items()},
            saved_calls=self.saved_calls, voted_instead=self.voted_instead, cache_hits=self.cache_hits,
            reused_calls=self.reused_calls, reused_usd=dollars(self.reused_usd),
            budget_exceeded=budget_exceeded, cut_off=self.cut_off,
            answers=[row for _, row in sorted(self.answers, key=lambda pair: pair[0])])


def matched_no_skill(recruitment: Mapping[str, Any] | None) -> bool:
    """Whether a node's recruitment by skills had keywords, none of them matching a profiled skill."""
    return bool(recruitment and recruitment.get("mode") not in ("random", "global", "fixed")
                and recruitment.get("keywords") and not recruitment.get("matches"))


def method_variant(settings: Settings, *, fixed_k: int | None = None) -> str:
    """What a method's name adds for settings that make it another method: another k (unless the
    preset fixes one, which its name says), another price trade-off λ (random recruiting weighs no
    prices), the calibrated router's cost cap per item."""
    variant = "" if fixed_k is not None else k_variant(settings)
    recruit = settings.recruit
    if recruit.cost_lambda is not None and settings.mode != "random" and recruit.cost_lambda != (
            CALIBRATED_COST_LAMBDA if settings.mode == "calibrated" else 0):  # (None: the mode's default)
        variant += f", λ={recruit.cost_lambda:g}"
    return variant + cost_cap(settings)


def k_variant(settings: Settings) -> str:
    """``, k=N`` for a k other than the default (else nothing); for adaptive recruiting, which takes
    experts until their weights reach ``recruit.p``, at most ``recruit.k_max``, those two instead."""
    from orchestra.recruit import RecruitConfig  # (here: the command line reads METHODS without pydantic)
    from orchestra.settings import Settings

    if settings.mode == "adaptive":  # (k is not its: "adaptive, k=1" asked three experts)
        default = RecruitConfig()
        return "".join(f", {name}={getattr(settings.recruit, name):g}" for name in ("p", "k_max")
                       if getattr(settings.recruit, name) != getattr(default, name))
    return f", k={settings.k}" if settings.k != Settings.model_fields["k"].default else ""


def cost_cap(settings: Settings) -> str:
    """``, cap $X/item`` for the calibrated router with a cost cap per item (else nothing)."""
    cap = settings.recruit.max_cost_per_item
    return f", cap {usd_exact(cap)}/item" if cap is not None and settings.mode == "calibrated" else ""


def check_output(path: Path, what: str, kind: str, earlier: Callable[[str, bool], bool],
                 precious: Mapping[str, str | Path | None], *, flag: str) -> None:
    """Refuse to write ``what`` over one of the ``precious`` files (a data set, the run store...) or
    over any file that is not an earlier one of its ``kind`` (``earlier`` reads its first line, and
    whether that line was too long to read whole):
    ``--output runs.db`` emptied the store, ``--output pool.yaml`` replaced the pool."""
    if str(path) == "-":  # (it wrote a file named "-", where `-` means standard input or output elsewhere)
        raise ConfigError(f"{flag} - would be a file named '-': give a file ({flag} /dev/stdout writes to standard "
                          "output)")
    for name, other in precious.items():  # (SQLite's own files beside a store, there or not yet)
        if other is None:
            continue
        for sibling in ("-wal", "-shm", "-journal"):
            if path.resolve() == Path(f"{Path(other).resolve()}{sibling}"):
                raise ConfigError(f"{what} would overwrite {name}'s {sibling} file {path}: give {flag} another file")
    if not path.exists():
        return
    for name, other in precious.items():
        if other is not None and Path(other).exists() and path.samefile(other):
            raise ConfigError(f"{what} would overwrite {name} {other}: give {flag} another file")
    if not path.is_file():  # (a device, a pipe: /dev/stdout is written, never read, which would wait for ever)
        return
    try:
        with path.open("rb") as file:
            raw = file.readline(_FIRST_LINE)
    except OSError:  # (a file it cannot read: opening it for writing says why)
        return
    first = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if first and not earlier(first, len(raw) >= _FIRST_LINE and not raw.endswith(b"\n")):
        raise ConfigError(f"{path} exists and is not {kind}: give {flag} a new file, or remove it first")


def claim_answers_file(path: Path) -> TextIO:
    """``path`` opened to be written afresh, once no other evaluation is writing it: a file is locked
    (``flock``) before it is emptied, so a second ``--output`` to it is refused and the first one's
    answers are kept (two evaluations wrote over each other's rows, and both said they had finished)."""
    try:
        file = path.open("a", encoding="utf-8")  # (not "w": that would empty it before the lock is asked for)
    except OSError as error:
        raise ConfigError(f"cannot write the answers to {path}: {error.strerror or error}") from None
    if not path.is_file():  # (a pipe or a device: written as it is)
        return file
    try:
        _lock_alone(file)
        file.truncate(0)
    except BlockingIOError:
        file.close()
        raise ConfigError(f"{path} is being written by another evaluation: give --output another file, "
                          "or wait until that one has finished") from None
    except OSError as error:
        file.close()
        raise ConfigError(f"cannot write the answers to {path}: {error.strerror or error}") from None
    return file


def _lock_alone(file: TextIO) -> None:
    """Hold an exclusive lock on ``file`` while it is open; ``BlockingIOError`` if another holds one
    (a file system without locks, or Windows, leaves it unlocked)."""
    if sys.platform == "win32":
        return
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:  # (no locks on this file system: ENOLCK, EOPNOTSUPP)
        pass


#: the most of a file's first line read to tell what it holds
_FIRST_LINE = 1 << 20


#: the fields every answers row has (``Tally.add``): another JSON Lines file, a data set, has not all of them
_ANSWER_FIELDS = frozenset({"id", "answer", "correct", "status", "run_id"})


def _answers_line(line: str, cut: bool) -> bool:
    """Whether ``line`` is the first of an answers file: a row with an answer's fields (or, ``cut``, the
    start of one too long to read whole)."""
    if cut:
        return line.startswith('{"id": ')
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and row.keys() >= _ANSWER_FIELDS


def html_page(line: str, cut: bool = False) -> bool:
    """Whether ``line`` is the first of an HTML page (an earlier plot)."""
    return line.lower().startswith(("<!doctype html", "<html"))


async def aevaluate(orchestra: Orchestra, dataset: Dataset, *, method: str | None = None, limit: int | None = None,
                    output: Path | None = None, budget: Budget | None = None,
                    on_cancel: Callable[[EvalReport], None] | None = None, resume: bool = False,
                    retry_failed: bool = False, **overrides: Any) -> EvalReport:
    """Answer every item and grade the answers as their runs finish.

    Items stream through ``Orchestra.arun_iter`` (a bounded window of runs in flight, their calls
    batched per model). ``method`` picks a preset (``METHODS``: its recruiting mode, aggregation and
    k) over the Orchestra's settings; ``overrides`` (any ``Settings`` field, e.g. ``mode``) win over
    both. With ``output``, each item's answer row is written to that JSONL file as its run finishes
    (completion order) instead of being kept in the report's ``answers``. ``budget`` bounds the
    whole evaluation (each run keeps its own limits inside it); once it is spent the items left
    are not run, and the report says why. ``on_cancel`` is given the report of the items finished
    so far when the evaluation is cancelled (Ctrl-C), before the cancellation goes on.

    ``resume``: go on with this data set's earlier evaluation by the same method, settings and pool
    (the same file, its models and profiles unchanged), from the store: an item whose latest
    earlier run finished is counted from its record (no call), one whose run was cut off (Ctrl-C, a
    crash, a budget) is resumed under its own id (recorded calls replayed, its experts kept), and
    the others run. The budget then bounds what is spent now. ``retry_failed`` (with ``resume``):
    an item whose earlier run finished with failed calls runs again under its own id, its recorded
    answers replayed, so only the failed calls (and what depends on them) are sent.
    """
    from orchestra.core import Instance  # here: the command line reads METHODS without loading the pipeline
    from orchestra.settings import RunSpec

    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset_mode, preset_aggregate, fixed_k = METHODS[method] if method else (None, None, None)
    preset = {"mode": preset_mode, "aggregate": preset_aggregate, "k": fixed_k}
    given: dict[str, Any] = {k: v for k, v in preset.items() if v is not None}
    given.update((k, v) for k, v in overrides.items() if v is not None)  # a given flag wins over the preset
    settings = orchestra.run_settings(given)
    mode, aggregate = settings.mode, settings.aggregate
    k = settings.k if fixed_k is not None else None  # (a preset that fixes k is another method with another k)
    name = method if method and (mode, aggregate, k) == (preset_mode, preset_aggregate, fixed_k) else next(
        (m for m, preset_of_m in METHODS.items() if preset_of_m == (mode, aggregate, None)),
        f"{mode} + {aggregate}" + (f", k={k}" if k is not None else ""))
    name += method_variant(settings, fixed_k=fixed_k)
    items = dataset.items[:limit] if limit else dataset.items
    check_grader(orchestra.stages_for(settings).grader, items, dataset.path)  # (before any call is paid for)
    # the data set by its absolute path: a resume from another folder, or with ./data.jsonl, finds it
    where = Path(dataset.path)
    # and the pool by what answers (its models, personas, profiles): one edited in place is another pool
    meta = {"kind": "eval", "method": name, "dataset": str(where.resolve()) if where.is_file() else dataset.path,
            "pool_fingerprint": orchestra.pool.fingerprint()}
    # its runs' settings, as arun_iter makes them (without planning)
    if retry_failed and not resume:
        raise ConfigError("retry_failed retries the failed calls of an earlier evaluation: give resume=True too")
    earlier = _earlier_runs(orchestra, meta, orchestra.run_settings({**given, "plan": False}), items) if resume else {}
    if resume and not earlier:
        nothing_to_resume("data set, method, settings and pool")
    retried = {index for index, found in earlier.items()
               if retry_failed and isinstance(found, RunResult) and found.usage.failed_calls}
    for index in retried:
        found = earlier[index]
        assert isinstance(found, RunResult) and orchestra.store is not None  # (a resume reads the store)
        record = orchestra.store.run(found.run_id)
        earlier[index] = _going_on(record, RunSpec.from_record(record.config, record.task))
    todo = [index for index in range(len(items)) if not isinstance(earlier.get(index), RunResult)]
    going_on = {index: options for index, options in earlier.items() if isinstance(options, dict)}
    instances = (Instance(items[index].prompt(), answer_format=answer_format(items[index]),
                          meta={"item": items[index].id}, options=going_on.get(index, {}))
                 for index in todo)
    started = time.perf_counter()
    loads_before = dict(orchestra.executor.stats.loads)
    with contextlib.ExitStack() as stack:
        sink = None
        if output is not None:
            if orchestra.store is not None:  # refused before the answers file is written over
                orchestra.store.check_free([options["run_id"] for options in going_on.values()])
            store = orchestra.store.path if orchestra.store is not None else None
            check_output(output, "the answers", "an earlier answers file (JSON Lines)", _answers_line,
                         {"the data set": dataset.path, "the run store": store, "the pool file": orchestra.pool.source},
                         flag="--output")
            lines = stack.enter_context(claim_answers_file(output))

            def sink(row: dict[str, Any]) -> None:
                lines.write(json.dumps(row, ensure_ascii=False) + "\n")
                lines.flush()

        tally = Tally(orchestra.stages_for(settings).grader, sink=sink)
        for index, finished in sorted(earlier.items()):
            if isinstance(finished, RunResult):
                tally.add(index, items[index], finished)
        shared = BudgetTracker(budget, None) if budget is not None else None

        def report(**extra: Any) -> EvalReport:
            return count_earlier(tally.report(name, elapsed_s=time.perf_counter() - started,
                                              model_loads=loads_since(orchestra, loads_before), **extra), earlier,
                                 retried=len(retried))

        await grade_as_they_finish(orchestra.arun_iter(instances, meta=meta, shared_budget=shared,
                                                       on_stopped=tally.stopped_run, **given), tally,
                                   [(index, items[index]) for index in todo], report, on_cancel)
    return report(budget_exceeded=str(shared.exceeded) if shared is not None and shared.exceeded else None)


async def grade_as_they_finish(stream: AsyncGenerator[tuple[int, RunResult], None], tally: Tally,
                               todo: Sequence[tuple[int, Item]], report: Callable[[], EvalReport],
                               on_cancel: Callable[[EvalReport], None] | None) -> None:
    """Grade each run of ``stream`` (``arun_iter``'s, its positions those of ``todo``: the data
    set's index and item) as it finishes; cancelled, give ``on_cancel`` the ``report()`` so far."""
    import asyncio  # (loaded already wherever there is an event loop)

    tally.positions = todo  # (a run that ended as the stream stopped comes to ``tally.stopped_run``)
    try:
        async with contextlib.aclosing(stream) as results:
            async for position, result in results:
                index, item = todo[position]
                tally.add(index, item, result)
    except asyncio.CancelledError:
        if on_cancel is not None:
            stopped = report()
            stopped.interrupted = True
            on_cancel(stopped)
        raise


def count_earlier(report: EvalReport, earlier: Mapping[int, object], *, retried: int = 0) -> EvalReport:
    """``report`` with its ``reused`` (earlier runs that finished: results), ``retried`` (finished
    runs gone on with to retry their failed calls) and ``resumed`` (the others, gone on with)
    counted from ``earlier``, per item index."""
    report.reused = sum(isinstance(finished, RunResult) for finished in earlier.values())
    report.retried = retried
    report.resumed = len(earlier) - report.reused - retried
    return report


def _earlier_runs(orchestra: Orchestra, meta: dict[str, str], settings: Settings,
                  items: Sequence[Item]) -> dict[int, RunResult | dict[str, Any]]:
    """Per item (by index), from its latest earlier run of this evaluation's data set that asked
    the same question with the same settings (so by the same method, whatever its name was then)
    and pool file, unchanged (its budget may differ: a raised one goes on with it): the result if
    it finished, else the ``Instance`` options that go on with it (its id, and its experts where it
    had recruited them, so its recorded expert calls are replayed)."""
    source = orchestra.pool.source
    pool = str(source.resolve()) if source else None  # (as a run's record names it)
    wanted = {item.id: (index, (item.prompt(), answer_format(item), settings, pool))
              for index, item in enumerate(items)}
    fingerprint = meta.get("pool_fingerprint")

    def match(record: RunRecord, spec: RunSpec) -> int | None:
        # runs stored before fingerprints were recorded have none: their pool file's path decides, as it did then
        if record.item not in wanted or spec.meta.get("pool_fingerprint", fingerprint) != fingerprint:
            return None
        index, asked = wanted[record.item]
        same = (spec.task, spec.answer_format, spec.settings.model_copy(update={"budget": settings.budget}), spec.pool)
        return index if same == asked else None

    # (not by the method's name either: the settings compared decide, and a name may gain words
    # between versions, as ", k=2" did)
    query = {name: value for name, value in meta.items() if name not in ("pool_fingerprint", "method")}
    return earlier_item_runs(orchestra, query, match, _going_on)


def _going_on(record: RunRecord, spec: RunSpec) -> dict[str, Any]:
    """The ``Instance`` options that go on with an item's earlier run: its id, and its experts where it
    had recruited them (so its recorded expert calls are replayed)."""
    return {"run_id": record.id, **({"experts": spec.pinned} if spec.pinned else {})}


def earlier_item_runs(orchestra: Orchestra, meta: dict[str, str], match: Callable[[RunRecord, RunSpec], int | None],
                      going_on: Callable[[RunRecord, RunSpec], T]) -> dict[int, RunResult | T]:
    """What a resumed data-set run keeps of its earlier runs. Of the stored runs with this ``meta``,
    ``match`` names the item (by index) each one answered the same way, or None; per item, its
    latest match that finished (its result), else its latest match's ``going_on`` (how its run goes
    on): a later run that a budget stopped before it sent anything does not undo a finished one."""
    from orchestra.settings import RunSpec

    if orchestra.store is None:
        raise ConfigError("resuming an evaluation reads the run store; drop --no-store")
    latest: dict[int, tuple[RunRecord, RunSpec]] = {}
    finished: dict[int, RunRecord] = {}
    for record in orchestra.store.runs_with_meta(**meta):  # oldest first: the latest that matches wins
        try:
            spec = RunSpec.from_record(record.config, record.task)
        except ValueError:  # a damaged record: not one to go on with
            continue
        index = match(record, spec)
        if index is not None:
            latest[index] = (record, spec)
            if record.status == "done":
                finished[index] = record
    earlier: dict[int, RunResult | T] = {}
    for index, (record, spec) in sorted(latest.items()):
        done = finished.get(index)
        result = orchestra.store.result(done.id) if done is not None else None
        earlier[index] = result or going_on(record, spec)
    return earlier


def nothing_to_resume(same: str) -> None:
    """Warn that a resumed evaluation found no earlier run to go on with: every item runs (and is
    paid for) again."""
    warnings.warn(f"resume found no earlier run of this evaluation (the same {same}) to go on with: every "
                  "item runs", UserWarning, stacklevel=3)


def loads_since(orchestra: Orchestra, before: dict[str, int]) -> dict[str, int]:
    """Model loads by this Orchestra's executor since ``before`` (a copy of its load counts)."""
    return {name: count - before.get(name, 0) for name, count in orchestra.executor.stats.loads.items()
            if count - before.get(name, 0)}
