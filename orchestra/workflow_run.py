"""Running workflows: once with given inputs, or once per item of the workflow's data set.

``workflow.py`` defines and checks a workflow; this module runs it on an ``Orchestra``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestra.budget import BudgetTracker
from orchestra.core import DEFAULT_WINDOW, Instance, Orchestra, run_sync
from orchestra.datasets import Item, load_dataset
from orchestra.errors import ConfigError
from orchestra.evaluate import (
    EvalReport,
    Tally,
    count_earlier,
    earlier_item_runs,
    grade_as_they_finish,
    loads_since,
    nothing_to_resume,
)
from orchestra.grading import answer_format, check_grader, get_grader
from orchestra.result import RunResult
from orchestra.settings import RunSpec, Settings, WorkflowRef
from orchestra.store import RunRecord, RunStore
from orchestra.vocabulary import GraderName
from orchestra.workflow import Workflow, check_inputs
from orchestra.yamlfile import read_yaml


def orchestra_for(workflow: Workflow, settings: Settings | None = None, **options: Any) -> Orchestra:
    """An ``Orchestra`` on the workflow's pool with its settings (the workflow's over the pool's,
    ``settings`` over both); ``options`` are other ``Orchestra`` arguments (store, tracing...)."""
    unused = workflow.unused_setting(Settings.layer(settings).model_fields_set)
    if unused is not None:  # (accepted, then not used)
        raise ConfigError(f"settings: {unused[0]} does nothing in workflow {workflow.name!r}: {unused[1]}; leave it "
                          "out", path=str(workflow.path))
    return Orchestra(workflow.pool, workflow.settings().layered(settings), **options)


async def arun_workflow(workflow: Workflow, inputs: Mapping[str, Any], *, orchestra: Orchestra | None = None,
                        run_id: str | None = None, meta_extra: dict[str, Any] | None = None,
                        **overrides: Any) -> RunResult:
    """Run a workflow with ``inputs`` (strings are converted to the declared types); ``meta_extra``
    is stored with the run, ``overrides`` go to ``Orchestra.arun`` (a seed, a shared budget...)."""
    task, options = run_arguments(workflow, inputs)
    orc = orchestra or orchestra_for(workflow)
    return await orc.arun(task, run_id=run_id, meta={"kind": "workflow", **(meta_extra or {})}, **options,
                          **overrides)


def run_arguments(workflow: Workflow, inputs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The task of one run of ``workflow`` with ``inputs`` and its other ``Orchestra.arun``
    arguments: the plan (the workflow's steps, or planned), per-node settings, the final answer's
    template and the workflow's reference (for a resume)."""
    values = workflow.resolve_inputs(inputs)
    plan = workflow.plan()
    titled = bool(workflow.spec.task or workflow.spec.description)  # (else the task is only its name)
    return workflow.task(values), {"plan": plan if plan is not None else True,
                                   "node_settings": workflow.node_settings(values), "final": workflow.final(values),
                                   "workflow": WorkflowRef(path=str(workflow.path.resolve()), inputs=values,
                                                           defaulted=workflow.defaulted(inputs),
                                                           source=workflow.document.text,
                                                           titled=titled)}


async def aevaluate_workflow(workflow: Workflow, inputs: Mapping[str, Any], *, orchestra: Orchestra | None = None,
                             window: int | None = DEFAULT_WINDOW, grader: GraderName | None = None,
                             on_cancel: Callable[[EvalReport], None] | None = None,
                             resume: bool = False, retry_failed: bool = False) -> EvalReport:
    """Run the workflow once per data-set item (``inputs.question`` and ``inputs.answer_format`` set per
    item), all runs on one executor so their calls batch per model, and grade the answers.

    Items stream through ``Orchestra.arun_iter`` (at most ``window`` runs in flight; None: every
    item at once), each run graded as it finishes: no item's run is held once graded.

    The Orchestra's budget (the workflow's ``budget:``, or the command line's) bounds the whole data
    set; each item's run may spend as much, within it. Each item gets its own seed
    (from the workflow's seed and the item's id), so recruiting varies from item to item as it would
    over separate runs.

    Answers are graded by ``grader`` when given (the command line's ``--grader``), else by the
    data set's ``grader:``, else by the run settings' (the one votes read answers with).
    ``on_cancel`` is given the report of the items finished when the evaluation is cancelled (Ctrl-C).
    ``resume``: go on with an earlier evaluation of this workflow (its content unchanged, but for
    comments, layout, its budget and its data set's ``limit`` and ``grader``): each item's
    latest run with the same inputs, settings (a raised budget aside) and pool is counted if it
    finished, or finished under its own id (its recorded calls replayed); only the others run.
    ``retry_failed`` (with ``resume``): an item whose finished run had failed calls runs again under
    its own id, its recorded answers replayed, so only the failed calls and what depends on them are sent.
    """
    spec = workflow.spec.dataset
    if spec is None:
        raise ConfigError("this workflow has no dataset to evaluate", path=str(workflow.path))
    check_inputs(inputs)
    per_item = [name for name in ("question", "answer_format")
                if name in inputs and (name == "question" or name in workflow.spec.inputs)]
    if per_item:  # the data set's item would silently replace it
        raise ConfigError(f"input {per_item[0]!r} is set from each item of the data set; leave it out",
                          path=str(workflow.path))
    dataset = load_dataset(workflow.path.parent / spec.path)
    items = dataset.items[: spec.limit] if spec.limit else dataset.items
    orc = orchestra or orchestra_for(workflow)
    grading = get_grader(grader or spec.grader or orc.settings.grader)
    check_grader(grading, items, dataset.path)  # (before any call is paid for: every answer would count wrong)
    shared = BudgetTracker(orc.settings.budget, None)
    per_run = orc.settings.budget.model_dump()  # each run may spend as much, within the whole

    def given(item: Item) -> dict[str, Any]:
        values = {**inputs, "question": item.prompt()}
        if "answer_format" in workflow.spec.inputs:
            values["answer_format"] = answer_format(item)
        return values

    if retry_failed and not resume:
        raise ConfigError("retry_failed retries the failed calls of an earlier evaluation: give resume=True too")
    earlier = _earlier_item_runs(orc, workflow, [(item, given(item)) for item in items], per_run) if resume else {}
    if resume and not earlier:
        nothing_to_resume("workflow, inputs, settings and pool")
    retried = [index for index, found in earlier.items()
               if retry_failed and isinstance(found, RunResult) and found.usage.failed_calls]
    for index in retried:  # (it goes on under its id: its answers replayed, its failed calls sent again)
        found = earlier[index]
        assert isinstance(found, RunResult)
        earlier[index] = found.run_id
    todo = [index for index in range(len(items)) if not isinstance(earlier.get(index), RunResult)]

    def instances() -> Iterator[Instance]:
        for index in todo:
            item = items[index]
            task, options = run_arguments(workflow, given(item))
            going_on = earlier.get(index)  # the id of its earlier run, cut off: it goes on under that id
            yield Instance(task, meta={"item": item.id}, options={
                **options, "budget": per_run, "seed": item_seed(orc.settings.seed, item.id),
                **({"run_id": going_on} if isinstance(going_on, str) else {})})

    tally = Tally(grading)
    for index, finished in sorted(earlier.items()):
        if isinstance(finished, RunResult):
            tally.add(index, items[index], finished)
    loads_before = dict(orc.executor.stats.loads)
    started = time.perf_counter()

    def report(**extra: Any) -> EvalReport:
        return count_earlier(tally.report(workflow.name, elapsed_s=time.perf_counter() - started,
                                          model_loads=loads_since(orc, loads_before), **extra), earlier,
                             retried=len(retried))

    # each run has its workflow's steps (or plans): no chunk of runs to recruit together
    stream = orc.arun_iter(instances(), window=window, rare_filter=False, on_stopped=tally.stopped_run,
                           shared_budget=shared, meta={"kind": "workflow", "pool_fingerprint": orc.pool.fingerprint()})
    await grade_as_they_finish(stream, tally, [(index, items[index]) for index in todo], report, on_cancel)
    return report(budget_exceeded=str(shared.exceeded) if shared.exceeded else None)


def workflow_runs(store: RunStore, workflow: Workflow) -> list[RunRecord]:
    """The stored single runs of ``workflow`` (by its file's absolute path, as a run records it),
    oldest first: a data set's item runs are not among them."""
    path = str(workflow.path.resolve())
    runs: list[RunRecord] = []
    for record in store.runs_with_meta(kind="workflow"):
        try:
            spec = RunSpec.from_record(record.config, record.task)
        except ValueError:  # a damaged record: not one to go on with
            continue
        if spec.workflow is not None and spec.workflow.path == path and record.item is None:
            runs.append(record)
    return runs


def _earlier_item_runs(orc: Orchestra, workflow: Workflow, items: list[tuple[Item, dict[str, Any]]],
                       budget: dict[str, Any]) -> dict[int, RunResult | str]:
    """Per item (by index): the result of its latest earlier run of this workflow (the same content,
    inputs, pool, as it answers, and settings, a raised budget aside) if it finished, else that
    run's id to go on with."""
    path, content = str(workflow.path.resolve()), _content(workflow.document.text, workflow.path)
    contents: dict[str, Any] = {}  # per recorded text (a data set's runs share theirs)
    source = orc.pool.source
    pool = str(source.resolve()) if source else None  # (as a run's record names it)
    fingerprint = orc.pool.fingerprint()  # (a pool file edited in place is another pool)
    planned = {"plan": True} if workflow.plan() is None else {}
    wanted = {item.id: (index, workflow.resolve_inputs(values),
                        orc.run_settings({"budget": budget, "seed": item_seed(orc.settings.seed, item.id), **planned}))
              for index, (item, values) in enumerate(items)}

    def match(record: RunRecord, spec: RunSpec) -> int | None:
        if record.item not in wanted:
            return None
        index, values, settings = wanted[record.item]
        ref = spec.workflow
        if ref is None or ref.source is None:
            return None
        if ref.source not in contents:
            contents[ref.source] = _content(ref.source, workflow.path)
        same = ((ref.path, ref.inputs, spec.pool) == (path, values, pool) and contents[ref.source] == content
                and spec.meta.get("pool_fingerprint") == fingerprint
                and spec.settings.model_copy(update={"budget": settings.budget}) == settings)
        return index if same else None

    return earlier_item_runs(orc, {"kind": "workflow"}, match, lambda record, spec: record.id)


def _content(text: str, path: Path) -> Any:
    """A workflow as a resume compares it: its data (comments and layout do not count) without its
    budget (a raised budget goes on with the same runs) or its data set's ``limit`` and ``grader``
    (items are matched by id, and graded as the evaluation ends); None for a text that no longer parses."""
    try:
        data = read_yaml(path, text).data
    except ConfigError:
        return None
    if not isinstance(data, dict):
        return data
    data = {key: value for key, value in data.items() if key != "budget"}
    for part, left_out in (("settings", ("budget",)), ("dataset", ("limit", "grader"))):
        if isinstance(data.get(part), dict):
            data[part] = {key: value for key, value in data[part].items() if key not in left_out}
    return data


def item_seed(seed: int, item_id: str) -> int:
    """The seed of one data-set item's run: the workflow's seed and the item's id."""
    return zlib.crc32(f"{seed}:item:{item_id}".encode())


def run_workflow(workflow: Workflow, inputs: Mapping[str, Any], **options: Any) -> RunResult:
    """Run a workflow (blocking). See ``arun_workflow``."""
    return run_sync(arun_workflow(workflow, inputs, **options))
