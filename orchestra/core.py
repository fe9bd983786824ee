"""``Orchestra``: the Python API. Plan, recruit, execute in batches, aggregate."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import signal
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from orchestra.agents import Pool, PoolSettings
from orchestra.aggregate import STRATEGIES
from orchestra.budget import Budget, BudgetTracker
from orchestra.errors import ConfigError, StoreError
from orchestra.events import Event, EventBus
from orchestra.execute import Executor, RunLedger
from orchestra.grading import Grader, get_grader
from orchestra.matching import LexicalMatcher, MatcherSpec, SkillMatcher, matcher_spec
from orchestra.plan import Plan
from orchestra.recruit import AGGREGATOR_CHOICES, MODES, RecruitConfig, Recruiter
from orchestra.result import RunResult
from orchestra.run import NodeSettings, Outputs, Run, RunEnv, RunOptions
from orchestra.skills import KeywordConfig, SkillExtractor
from orchestra.store import HEARTBEAT_SECONDS, RunStore

T = TypeVar("T")


def new_run_id() -> str:
    """A sortable, unique run id: ``20261122-143005-3fa2c1``."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine from synchronous code; refuse clearly inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    if hasattr(coro, "close"):
        coro.close()  # type: ignore[union-attr]
    raise RuntimeError("an event loop is already running here; use the async method (arun, arun_many...)")


def run_interruptibly(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` for the command line: Ctrl-C cancels the work, waits for it to stop (a run
    records itself as ``cancelled``), then raises ``KeyboardInterrupt``.

    The signal is handled by the event loop itself, installed before the work starts, so it is
    seen even while every task waits on a socket.
    """
    interrupted = False

    async def main() -> T:
        work = asyncio.ensure_future(coro)

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            work.cancel()

        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, interrupt)
        except (RuntimeError, ValueError):  # not the main thread: Ctrl-C is not ours to handle
            return await work
        try:
            return await work
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise


def _first(*values: T | None) -> T:
    """The first value that is set (the layering of a setting: call, then pool, then default)."""
    return next(v for v in values if v is not None)


def _check_choices(mode: str | None, aggregate: str | None, aggregator_choice: str | None = None) -> None:
    if aggregator_choice is not None and aggregator_choice not in AGGREGATOR_CHOICES:
        raise ConfigError(f"unknown aggregator choice {aggregator_choice!r}; choose one of "
                          f"{', '.join(AGGREGATOR_CHOICES)}")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"unknown recruiting mode {mode!r}; choose one of {', '.join(MODES)}")
    if aggregate is not None and aggregate not in STRATEGIES:
        raise ConfigError(f"unknown aggregation {aggregate!r}; choose one of {', '.join(STRATEGIES)}")


class Orchestra:
    """A team of experts from a pool, recruited by measured skills, run in per-model batches.

    Args:
        pool: a ``Pool``, a pool file, or None for the embedded default pool.
        k: experts per subtask.
        mode: ``symbolic-moe``, ``topk``, ``adaptive`` or ``random``.
        aggregate: ``synthesize``, ``vote``, ``refine`` or ``none``.
        plan: plan the task into subtasks (False runs it as one node).
        max_nodes: the largest plan accepted.
        fast_path: run a short, single-sentence task as one step without asking the planner.
        plan_check: run the task as one step when the planner's steps are not about the task
            (a small planner copies examples).
        plan_repairs: how often an invalid plan is sent back to the planner.
        plan_fallback: ``fail`` or ``single`` (run the task as one step) when planning fails.
        seed: the seed of every sampling choice; same seed, same recruitments.
        budget: per-run limits (on by default).
        matcher: maps keywords to profile skills (lexical by default).
        keywords: the skill-extraction settings.
        recruit: recruiting settings beyond mode and k (adaptive p, cost λ, rare filter...).
        grader: extracts answers for voting and evaluation (``auto``, ``mc``, ``numeric``, ``exact``).
        planner_max_tokens: the planner's answer limit.
        context_chars: the most characters of a dependency's output a node sees.
        max_response_chars: the most characters of an expert's answer passed on to aggregation.
        aggregator: an agent name that always aggregates (default: best measured aggregator).
        aggregator_choice: ``best`` (one aggregator for every node: the best measured aggregation
            score) or ``per-node`` (each node's aggregator is the best measured aggregator on its
            skills among the agents whose profile fits the node). A fixed ``aggregator`` wins.
        max_resident_models: heavy models kept loaded at once.
        memory_budget_gb: heavy models are also evicted to stay within this.
        store: the run store (a ``RunStore`` or a path); None means ``~/.orchestra/runs.db``,
            False keeps no record (and makes resume impossible).
        cache: reuse stored answers to identical requests across runs (opt-in).
        tracing: OpenTelemetry spans for runs, nodes and batches: True for the global tracer, or a
            tracer (needs the ``otel`` extra); off by default.
        settings: pool-style settings (``PoolSettings`` or its mapping, as under ``settings:`` in a
            pool or workflow file) layered over the pool's own; keyword arguments win over both.
        on_event: a listener for every event.
    """

    def __init__(self, pool: Pool | str | Path | None = None, *, k: int | None = None, mode: str | None = None,
                 aggregate: str | None = None, plan: bool = True, max_nodes: int | None = None,
                 plan_repairs: int | None = None, plan_fallback: str | None = None, seed: int = 0,
                 budget: Budget | dict[str, Any] | None = None, matcher: SkillMatcher | None = None,
                 keywords: KeywordConfig | None = None, recruit: RecruitConfig | None = None,
                 grader: str | Grader | None = None, aggregator: str | None = None,
                 aggregator_choice: str | None = None,
                 max_resident_models: int | None = None, memory_budget_gb: float | None = None,
                 context_chars: int | None = None, max_response_chars: int | None = None,
                 planner_max_tokens: int | None = None, fast_path: bool | None = None,
                 plan_check: bool | None = None, store: RunStore | str | Path | bool | None = None,
                 cache: bool = False, tracing: Any = False, settings: PoolSettings | Mapping[str, Any] | None = None,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.pool = pool if isinstance(pool, Pool) else Pool.load(pool)
        settings = self.pool.settings.layered(settings)
        mode = mode or settings.mode or "symbolic-moe"
        aggregate = aggregate or settings.aggregate or "synthesize"
        aggregator_choice = _first(aggregator_choice, settings.aggregator_choice, "best")
        _check_choices(mode, aggregate, aggregator_choice)
        if aggregator is not None and aggregator not in self.pool:
            raise ConfigError(f"aggregator {aggregator!r} is not an agent of pool {self.pool.name!r}")
        self.options = RunOptions(
            k=k or settings.k or 3, mode=mode, aggregate=aggregate, plan=plan,  # type: ignore[arg-type]
            max_nodes=max_nodes or settings.max_nodes or 12,
            plan_repairs=_first(plan_repairs, settings.plan_repairs, 2),
            plan_fallback=plan_fallback or settings.plan_fallback or "fail",  # type: ignore[arg-type]
            seed=seed, budget=budget if isinstance(budget, Budget) else Budget.model_validate(budget or {}),
            planner_max_tokens=planner_max_tokens or settings.planner_max_tokens or 1024,
            context_chars=context_chars or settings.context_chars or 4000,
            max_response_chars=max_response_chars or settings.max_response_chars or 100_000,
            fast_path=_first(fast_path, settings.fast_path, True),
            plan_check=_first(plan_check, settings.plan_check, True),
            aggregator_choice=aggregator_choice)  # type: ignore[arg-type]
        self.events = EventBus()
        if store is None or store is True:
            store = RunStore()
        self.store: RunStore | None = RunStore(store) if isinstance(store, (str, Path)) else (store or None)
        if self.store is not None:
            self.events.subscribe(self.store.listen)
        if cache and self.store is None:
            raise ConfigError("the response cache lives in the run store; do not combine cache=True with store=False")
        self.cache = cache
        self._running = 0
        self._heartbeat: asyncio.Task[None] | None = None
        if tracing:
            from orchestra.tracing import SpanRecorder

            self.events.subscribe(SpanRecorder(None if tracing is True else tracing).listen)
        if on_event is not None:
            self.events.subscribe(on_event)
        max_resident_models = max_resident_models or settings.max_resident_models or 1
        memory_budget_gb = memory_budget_gb or settings.memory_budget_gb
        self.executor = Executor(
            events=self.events, max_resident_models=max_resident_models,
            memory_budget_bytes=int(memory_budget_gb * 2**30) if memory_budget_gb else None)
        grader = _first(grader, settings.grader, "auto")
        recruit_config = dataclasses.replace(recruit or settings.recruit or RecruitConfig(), mode=mode, k=self.options.k)
        keywords = keywords or settings.keywords or KeywordConfig()
        if matcher is None:
            matcher = settings.matcher.build() if settings.matcher else LexicalMatcher()
        table = self.pool.skill_table(recruit_config)
        self.env = RunEnv(pool=self.pool, executor=self.executor, events=self.events, table=table,
                          recruiter=Recruiter(table, recruit_config), matcher=matcher,
                          extractor=SkillExtractor(keywords), aggregator=self.pool.choose_aggregator(table, aggregator),
                          grader=get_grader(grader), aggregator_fixed=bool(aggregator or self.pool.aggregator))
        spec = matcher_spec(matcher)
        #: what a resume needs to rebuild this Orchestra (stored with each run; see ``restore``)
        self.settings = {"recruit": dataclasses.asdict(recruit_config), "keywords": dataclasses.asdict(keywords),
                         "matcher": spec.model_dump(exclude_none=True) if spec else None, "aggregator": aggregator,
                         "grader": grader if isinstance(grader, str) else "auto", "cache": cache,
                         "max_resident_models": max_resident_models, "memory_budget_gb": memory_budget_gb}

    @classmethod
    def restore(cls, pool: Pool, stored: Mapping[str, Any], **options: Any) -> Orchestra:
        """An Orchestra rebuilt from the settings a run recorded (``self.settings``), to resume it."""
        matcher = stored.get("matcher")
        return cls(pool, recruit=RecruitConfig(**stored["recruit"]) if stored.get("recruit") else None,
                   keywords=KeywordConfig(**stored["keywords"]) if stored.get("keywords") else None,
                   matcher=MatcherSpec.model_validate(matcher).build() if matcher else None,
                   aggregator=stored.get("aggregator"), grader=stored.get("grader"), cache=stored.get("cache", False),
                   max_resident_models=stored.get("max_resident_models"),
                   memory_budget_gb=stored.get("memory_budget_gb"), **options)

    # --- single runs -----------------------------------------------------------------------

    def run(self, task: str, **overrides: Any) -> RunResult:
        """Answer ``task`` (blocking). See ``arun`` for the overrides."""
        return run_sync(self.arun(task, **overrides))

    async def arun(self, task: str, *, plan: Plan | bool | None = None, run_id: str | None = None,
                   meta: dict[str, Any] | None = None, node_settings: dict[str, NodeSettings] | None = None,
                   final: Callable[[Outputs], str] | None = None, shared_budget: BudgetTracker | None = None,
                   **overrides: Any) -> RunResult:
        """Answer ``task``.

        Args:
            task: what to do.
            plan: a ``Plan`` to run as given, or a bool to switch planning on or off.
            run_id: an id for the run (default: a new one; an existing id continues that run).
            meta: JSON-ready facts stored with the run (how to rebuild it on resume).
            node_settings: per-node recruiting, aggregation, output schema and prompt (workflows).
            final: renders the answer from the nodes' outputs instead of aggregating the sinks.
            shared_budget: a budget this run shares with others (a data set's); its calls must fit both.
            overrides: any ``RunOptions`` field for this run only (k, mode, aggregate, seed, budget...).
        """
        run = self._make_run(task, plan=plan, run_id=run_id, node_settings=node_settings, final=final,
                             shared_budget=shared_budget, **overrides)
        self._begin(run, meta)
        return await self._finish(run)

    def _make_run(self, task: str, *, plan: Plan | bool | None = None, run_id: str | None = None,
                  fixed_experts: dict[str, list[str]] | None = None, node_settings: dict[str, NodeSettings] | None = None,
                  final: Callable[[Outputs], str] | None = None, shared_budget: BudgetTracker | None = None,
                  **overrides: Any) -> Run:
        if not task or not task.strip():
            raise ConfigError("the task is empty")
        given = plan if isinstance(plan, Plan) else None
        if isinstance(plan, bool):
            overrides["plan"] = plan
        options = self._options(overrides)
        ledger = RunLedger.create(run_id or new_run_id(), options.budget, shared_budget=shared_budget,
                                  journal=self.store, cache=self.store.cache() if self.cache and self.store else None)
        return Run(self.env, task, options, ledger, plan=given, fixed_experts=fixed_experts,
                   node_settings=node_settings, final=final)

    def _begin(self, run: Run, meta: dict[str, Any] | None) -> None:
        if self.store is not None:
            self.store.begin_run(run.run_id, run.task, self._config(run, meta))

    def _config(self, run: Run, meta: dict[str, Any] | None) -> dict[str, Any]:
        return {"pool": str(self.pool.source) if self.pool.source else None, "options": run.options.to_dict(),
                "orchestra": self.settings,
                "plan": run.given_plan.model_dump() if run.given_plan else None,
                "fixed_experts": {node: list(r.experts) for node, r in run.presets.items()} or run.fixed_experts,
                "meta": meta or {}}

    async def _finish(self, run: Run) -> RunResult:
        self._running += 1
        self._keep_alive()
        try:
            return await self._settle(run)
        finally:
            self._running -= 1

    def _keep_alive(self) -> None:
        """Make sure a heartbeat tells other processes this one still holds its running runs."""
        if self.store is None:
            return
        loop = asyncio.get_running_loop()
        beat = self._heartbeat
        if beat is None or beat.done() or beat.get_loop() is not loop:
            self._heartbeat = loop.create_task(self._beat())

    async def _beat(self) -> None:
        while self._running and self.store is not None:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                self.store.heartbeat()
            except StoreError:  # a full or locked disk: the run's own writes will say so
                pass

    async def _settle(self, run: Run) -> RunResult:
        try:
            result = await run.start()
        except BaseException:  # cancelled by the caller, or a bug: stop the run's other work, keep its record
            run.cancel()
            self._record(run.result("cancelled", None, "stopped before it finished"))
            raise
        self._record(result)
        return result

    def _record(self, result: RunResult) -> None:
        """Store a finished run; a store that cannot be written is a warning, not a lost answer."""
        if self.store is None:
            return
        try:
            self.store.finish_run(result)
        except StoreError as error:
            warnings.warn(f"run {result.run_id} finished but was not recorded: {error}", RuntimeWarning, stacklevel=2)

    # --- planning only -------------------------------------------------------------------------

    def plan(self, task: str, **options: Any) -> tuple[Plan, str]:
        """Make (and validate) a plan without running it (blocking). See ``aplan``."""
        return run_sync(self.aplan(task, **options))

    async def aplan(self, task: str, **overrides: Any) -> tuple[Plan, str]:
        """Ask the planner for a plan and validate it, with the usual repairs; returns the plan and a note.

        The plan can be shown, edited, and then run with ``arun(task, plan=plan)``.
        """
        run = self._make_run(task, plan=True, **overrides)
        run.ledger.journal = None  # planning alone is not a run of its own
        plan, _, _, note = await self.executor.run_task(run.make_plan())
        return plan, note

    # --- resume ----------------------------------------------------------------------------

    def resume(self, run_id: str, **overrides: Any) -> RunResult:
        """Finish an interrupted run (blocking). See ``aresume``."""
        return run_sync(self.aresume(run_id, **overrides))

    async def aresume(self, run_id: str, *, budget: Budget | dict[str, Any] | None = None,
                      force: bool = False) -> RunResult:
        """Finish a stored run: recorded calls are replayed, only missing ones are sent.

        Args:
            run_id: the run (a unique prefix is enough).
            budget: raised limits (a ``Budget`` or some of its fields) when the run stopped on one.
            force: take the run over even if another process seems to hold it (it was killed
                less than ``LEASE_SECONDS`` ago).
        """
        if self.store is None:
            raise ConfigError("resume needs the run store; this Orchestra was made with store=False")
        record = self.store.run(run_id)
        if record.status == "done":
            stored = self.store.result(record.id)
            if stored is not None:
                return stored
        config = record.config
        options = RunOptions.from_dict(config["options"])
        options = dataclasses.replace(options, budget=self._resume_budget(options, budget))
        plan = Plan.model_validate(config["plan"]) if config.get("plan") else None
        ledger = RunLedger.create(record.id, options.budget, journal=self.store,
                                  cache=self.store.cache() if self.cache else None)
        steps: dict[str, Any] = {}
        meta = config.get("meta") or {}
        if meta.get("kind") == "workflow":  # the steps' prompts and the final template come from the file
            from orchestra.workflow import Workflow

            workflow = Workflow.load(meta["workflow"], pool=self.pool)
            values = workflow.resolve_inputs(meta.get("inputs") or {})
            steps = {"node_settings": workflow.node_settings(values), "final": workflow.final(values)}
        run = Run(self.env, record.task, options, ledger, plan=plan, fixed_experts=config.get("fixed_experts"),
                  **steps)
        self.store.begin_run(record.id, record.task, config, force=force)
        return await self._finish(run)

    def _options(self, overrides: dict[str, Any]) -> RunOptions:
        unknown = sorted(set(overrides) - set(RunOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(unknown)}")
        _check_choices(overrides.get("mode"), overrides.get("aggregate"), overrides.get("aggregator_choice"))
        if isinstance(overrides.get("budget"), dict):
            overrides["budget"] = self.options.budget.merged(**overrides["budget"])
        return dataclasses.replace(self.options, **overrides)

    @staticmethod
    def _resume_budget(options: RunOptions, budget: Budget | dict[str, Any] | None) -> Budget:
        if isinstance(budget, Budget):
            return budget
        return options.budget.merged(**budget) if budget else options.budget

    # --- many runs -------------------------------------------------------------------------

    def run_many(self, tasks: Sequence[str], **options: Any) -> list[RunResult]:
        """Answer many tasks at once, their calls batched together (blocking). See ``arun_many``."""
        return run_sync(self.arun_many(tasks, **options))

    async def arun_many(self, tasks: Sequence[str], *, plan: bool = False, rare_filter: bool = True,
                        answer_formats: Sequence[str | None] | None = None, meta: dict[str, Any] | None = None,
                        **overrides: Any) -> list[RunResult]:
        """Answer many tasks on one executor so every wave's calls group per model.

        Args:
            tasks: the questions.
            plan: plan each task (off by default at data-set scale).
            rare_filter: without planning, recruit every task first and replace experts chosen for
                under the rare threshold of tasks, so fewer models load. Only this call's tasks are
                considered: runs of other callers never change these recruitments.
            answer_formats: a per-task hint on how to state the final answer (for grading).
            meta: JSON-ready facts stored with each run.
            overrides: ``RunOptions`` fields for all these runs.
        """
        formats = list(answer_formats) if answer_formats is not None else [None] * len(tasks)
        if len(formats) != len(tasks):
            raise ValueError("answer_formats must have one entry per task")
        runs = [self._make_run(task, plan=plan, answer_format=fmt, **overrides)
                for task, fmt in zip(tasks, formats)]
        for run in runs:
            self._begin(run, meta)
        if rare_filter and not plan and runs:
            await self._recruit_together(runs)
            if self.store is not None:
                for run in runs:  # keep the filtered experts, so a resume recruits the same ones
                    self.store.update_config(run.run_id, self._config(run, meta))
        return list(await asyncio.gather(*(self._finish(run) for run in runs)))

    async def _recruit_together(self, runs: list[Run]) -> None:
        node = "answer"
        outcomes = await asyncio.gather(*(self.executor.run_task(run.recruit(node, run.task, ())) for run in runs),
                                        return_exceptions=True)
        recruited = [(run, o) for run, o in zip(runs, outcomes) if not isinstance(o, BaseException)]
        filtered = self.env.recruiter.filter_rare([o for _, o in recruited], seed=runs[0].options.seed)
        for (run, _), recruitment in zip(recruited, filtered):
            run.presets[node] = recruitment

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Unload every resident model."""
        await self.executor.unload_all()

    def close(self) -> None:
        """Unload every resident model (blocking)."""
        run_sync(self.aclose())
