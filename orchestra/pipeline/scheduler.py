"""The scheduler: one run driven through its DAG on a shared executor, and its result.

A run plans (``planning``), then starts every node whose dependencies are done; each node is
staffed (``staffing``), its experts are called through the executor (batched per model with every
other run's calls), and their answers are combined (``aggregation``). A failed node skips its
descendants; when every node is settled the sinks' outputs become the answer, merged by the
aggregator when there are several. Every step is an event on the bus; nothing here prints.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from orchestra.agents import Agent, Pool
from orchestra.dag import Dag
from orchestra.errors import (
    AuthenticationError,
    BudgetExceeded,
    CallCancelled,
    ClusterUnreachable,
    ConfigError,
    EndpointNotFound,
    EndpointUnreachable,
    ModelError,
    ModelRequestsForbidden,
    OrchestraError,
    StoreError,
    StoreGone,
    UserError,
    described,
)
from orchestra.events import (
    UNSYNTHESIZED,
    AggregationFellBack,
    EventBus,
    ExpertsRecruited,
    NodeAggregating,
    NodeDone,
    NodeFailed,
    NodeReady,
    NodeSkipped,
    PlanReady,
    PlanRequested,
    RunDone,
    RunStarted,
    SkillExtractionFailed,
    fell_back,
)
from orchestra.execute import KEYWORDS, Executor, RunLedger
from orchestra.grading import Grader, choices_of, get_grader, states_answer, strip_reasoning
from orchestra.hints import command
from orchestra.matching import SkillMatcher
from orchestra.models import ChatRequest, ChatResult, Model
from orchestra.pipeline.aggregation import FinalSynthesis, Job, Response, Strongest, Vote, cut_for_aggregator, strategy
from orchestra.pipeline.planning import Planner
from orchestra.pipeline.staffing import Pin, Staffing
from orchestra.plan import Plan, PlanInvalid
from orchestra.prebuilt import assemble
from orchestra.prompts import render_expert
from orchestra.recruit import Recruitment
from orchestra.result import (
    BatchInfo,
    ExpertOutput,
    FailedCalls,
    NodeStatus,
    NodeTrace,
    PlanTrace,
    RunResult,
    RunStatus,
    RunUsage,
)
from orchestra.settings import MAX_K, RunSpec, Settings
from orchestra.vocabulary import Mode, Strategy


class Stages:
    """The pipeline's stages for one set of settings, shared by the runs that use them.

    Args:
        pool: the agents.
        settings: the settings the stages are built from (recruiting, keywords, matcher, aggregator, grader).
        executor: the shared executor every call goes through.
        events: where every stage's events go.
        matcher: a matcher object instead of ``settings.matcher`` (Python only).
        grader: a grader object instead of ``settings.grader`` (Python only).
    """

    def __init__(self, pool: Pool, settings: Settings, executor: Executor, events: EventBus, *,
                 matcher: SkillMatcher | None = None, grader: Grader | None = None) -> None:
        assert pool.planner is not None  # a Pool always has one
        self.pool = pool
        self.executor = executor
        self.events = events
        self.planner = Planner(pool.planner)
        self.staffing = Staffing(pool, settings, matcher=matcher)
        self.grader: Grader = grader or get_grader(settings.grader)
        self.final = FinalSynthesis(self.staffing.aggregator)


Outputs = dict[str, dict[str, Any]]
"""Finished nodes' results by id: ``{"output": text, "data": parsed JSON or None}``."""


@dataclass(frozen=True)
class NodeSettings:
    """Per-node choices a workflow step can make; unset fields follow the run's settings.

    Attributes:
        k, mode, aggregate: recruiting and aggregation for this node.
        agent: a fixed expert (no recruiting).
        skills: the skills to recruit on (no keyword extraction).
        output: a JSON schema the node's output must follow.
        prompt: renders the node's instruction from upstream outputs (then the expert prompt does
            not list the dependencies' outputs itself).
    """

    k: int | None = None
    mode: Mode | None = None
    aggregate: Strategy | None = None
    agent: str | None = None
    skills: tuple[str, ...] = ()
    output: dict[str, Any] | None = None
    prompt: Callable[[Outputs], str] | None = None

    def __post_init__(self) -> None:
        """Refuse values no run could use where they are made (a k of -3 failed the run with an
        IndexError after its keyword calls); whether ``agent`` is in the pool is the run's to check."""
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K):
            raise ConfigError(f"NodeSettings.k must be a whole number from 1 to {MAX_K}, not {k!r}")
        for name, allowed in (("mode", get_args(Mode)), ("aggregate", get_args(Strategy))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"NodeSettings.{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.agent is not None and (not isinstance(self.agent, str) or not self.agent):
            raise ConfigError(f"NodeSettings.agent must be an agent's name, not {self.agent!r:.40}")
        skills = self.skills
        if isinstance(skills, str) or not isinstance(skills, Sequence) or not all(
                isinstance(skill, str) and skill.strip() for skill in skills):
            raise ConfigError(f"NodeSettings.skills must be a list of skill names (['algebra']), not {skills!r:.40}")
        object.__setattr__(self, "skills", tuple(skills))  # (a list given is kept as the tuple it is read as)
        if self.output is not None:
            from orchestra.models.structured import class_in_place_of_schema, schema_problem

            problem = class_in_place_of_schema(self.output) or schema_problem(self.output)
            if problem:
                raise ConfigError(f"NodeSettings.output: {problem}")
        if self.prompt is not None and not callable(self.prompt):
            raise ConfigError(f"NodeSettings.prompt must be a function of the outputs, not "
                              f"{type(self.prompt).__name__}")


DEFAULT_NODE = NodeSettings()


@dataclass(slots=True, eq=False, init=False)
class NodeState:
    """A node's mutable state during a run; turned into a ``NodeTrace`` for the result."""

    id: str
    instruction: str
    depends_on: list[str]
    strategy: Strategy
    seed: int
    """The node's seed (``node_seed``): its keyword samples, its draw and its calls."""
    status: NodeStatus
    recruitment: Recruitment | None
    explanation: list[str]
    aggregator: str | None
    output: str | None
    data: Any
    expert_outputs: list[ExpertOutput]
    error: str | None
    elapsed_s: float
    saved_calls: int

    def __init__(self, id: str, instruction: str, depends_on: list[str], strategy: Strategy, seed: int) -> None:
        # written out, positional: made for every node as a run starts (the generated one took half as long again)
        self.id, self.instruction, self.depends_on = id, instruction, depends_on
        self.strategy, self.seed = strategy, seed
        self.status, self.recruitment, self.explanation, self.aggregator = "pending", None, [], None
        self.output = self.data = self.error = None
        self.expert_outputs, self.elapsed_s, self.saved_calls = [], 0.0, 0

    def trace(self) -> NodeTrace:
        """The JSON-ready trace of this node: it takes the node's own lists (a run's result is made
        as it ends, when its nodes change no more)."""
        recruitment = self.recruitment
        return assemble(NodeTrace, {  # the fields are typed here: validating them again took most of the time
            "id": self.id, "instruction": self.instruction, "depends_on": self.depends_on,
            "status": self.status, "skills": list(recruitment.keywords) if recruitment else [],
            "experts": list(recruitment.experts) if recruitment else [], "aggregator": self.aggregator,
            "strategy": self.strategy, "output": self.output, "data": self.data,
            "expert_outputs": self.expert_outputs,
            "recruitment": recruitment.to_dict(self.explanation) if recruitment else None, "error": self.error,
            "elapsed_s": self.elapsed_s, "saved_calls": self.saved_calls})


_RUN_ENDING = (AuthenticationError, EndpointUnreachable, EndpointNotFound, StoreError, ModelRequestsForbidden,
               ClusterUnreachable)
"""Failures that end the whole run at once: every other call would fail the same way (a Ray cluster
that cannot be joined: every engine's; a run went on with its other experts, done, exit 0)."""


def _falls_back(error: Exception) -> bool:
    """Whether a node whose aggregator's call failed with ``error`` answers by a vote of its experts
    instead: not when the call was cancelled, a budget refused it (the node stops there, and a resume
    with more budget aggregates) or the failure ends the run."""
    return not isinstance(error, (CallCancelled, BudgetExceeded, *_RUN_ENDING))


def _plain(value: Any) -> Any:
    """A parsed output as plain JSON data (pydantic models dumped)."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def node_seed(seed: int, task: str, node_id: str) -> int:
    """A per-node seed from the run's seed, the task and the node id: reproducible, distinct per task."""
    return zlib.crc32(f"{seed}:{node_id}:{task}".encode())


#: why a run was cancelled, unless whoever cancelled it said (``task.cancel("the client disconnected")``)
CANCELLED_BY_USER = "cancelled by the user"


class Run:
    """Drives one task. Its coroutines run as managed tasks of the shared executor.

    Args:
        stages: the planner, staffing and aggregation this run uses.
        spec: what the run was asked to do (task, resolved settings, given plan, pins...).
        ledger: its accounting inside the executor.
        node_settings: per-node choices (a workflow's steps).
        final: renders the answer from the nodes' outputs instead of aggregating the sinks.
        on_answer_text: given the answer's text so far while the call that writes it streams
            (a backend that can stream; the answer in the result is the reference).
    """

    def __init__(self, stages: Stages, spec: RunSpec, ledger: RunLedger, *,
                 node_settings: dict[str, NodeSettings] | None = None,
                 final: Callable[[Outputs], str] | None = None,
                 on_answer_text: Callable[[str], None] | None = None) -> None:
        self.stages = stages
        self.spec = spec
        self.task = spec.task
        self.settings = spec.settings
        self.ledger = ledger
        self.run_id = ledger.run_id
        self.pins: dict[str, Pin] = {node: Pin(tuple(names)) for node, names in spec.pinned.items()}
        #: nodes whose recruiting failed before the run began (with its chunk of a data set): the error
        #: it raises when it recruits them, rather than making the same calls again
        self._recruit_errors: dict[str, Exception] = {}
        self.node_settings = node_settings or {}
        self.final_template = final
        self.on_answer_text = on_answer_text
        self.future: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self.traces: dict[str, NodeState] = {}
        self.plan_attempts, self.plan_note = 0, ""
        self.graph = Dag({})
        #: the DAG of the spec's given plan, when it was checked as the run was made
        self.given_graph: Dag | None = None
        self._order: list[str] = []  # the nodes in an order that puts each after its dependencies
        self._waiting: dict[str, int] = {}  # per node, its dependencies not done yet
        self.subtasks: dict[str, Any] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.user_error = False  # a failure the user must fix (key, URL, context): exit code 2
        #: a real model's request the test switch forbade: ``Orchestra.arun`` raises it once the run
        #: is recorded (a test that forgot a double fails there, whatever it asserts)
        self.forbidden: ModelRequestsForbidden | None = None
        self._told_done = False  # RunDone emitted
        self.skill_extraction_failures = 0
        #: nodes whose keyword calls failed, so their experts were recruited without skills: not kept on resume
        self.skill_less: set[str] = set()
        self.stage_failures: list[str] = []  # stages that failed without stopping the run: it is not done
        self._unresolved = 0
        self._execute_started = self.started
        self.answer_node: str | None = None  # the one sink whose output is the answer, once planned
        #: texts of answer-writing calls that stopped at a token limit, as an answer may show them
        self._cut_texts: set[str] = set()
        self._context_full: set[str] = set()

    def pin(self, node: str, recruitment: Recruitment) -> None:
        """Fix a node's experts to this recruitment (and record them, so a resume keeps them, unless
        its keyword calls failed: a resume recruits it again, on the skills they then give; it kept
        the experts chosen without skills, and read as a clean run)."""
        self.pins[node] = Pin(recruitment.experts, recruitment)
        if node not in self.skill_less:
            self.spec.pinned[node] = list(recruitment.experts)

    def recruiting_failed(self, node: str, error: Exception) -> None:
        """The node's recruiting failed with its chunk (see ``Orchestra._recruit_together``): when
        the run recruits it, it fails as it would have alone, with no second round of calls."""
        self._recruit_errors[node] = error

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Future[RunResult]:
        """Begin the run (from a managed task or the event loop); the future gets the result. A run
        that ended already (an endpoint that cannot be used, found while its chunk of a data set was
        recruited together) is not begun again."""
        if not self.future.done():
            self.stages.events.emit(RunStarted(run_id=self.run_id, task=self.task))
            self._spawn(self._begin())
        return self.future

    def cancel(self, reason: str = CANCELLED_BY_USER) -> None:
        """Stop the run: cancel its tasks and finish with status ``cancelled`` and ``reason``; the
        nodes it was working on fail with that reason (they are not left reading as running)."""
        for task in list(self.tasks):
            task.cancel()
        # told even when the caller's cancelled await has ended the run's future (the store's nodes agree)
        for trace in self.traces.values():
            if trace.status in ("recruiting", "running", "aggregating"):
                trace.status, trace.error = "failed", reason
                self.stages.events.emit(NodeFailed(run_id=self.run_id, node=trace.id, error=trace.error))
        self._finish("cancelled", None, reason)

    def caller(self, purpose: str, node: str | None = None) -> Callable[
            [Sequence[tuple[Model, ChatRequest]]], Coroutine[Any, Any, list[ChatResult | Exception]]]:
        """A stage's way to send this run's calls for ``purpose`` (and ``node``)."""
        async def call(calls: Sequence[tuple[Model, ChatRequest]]) -> list[ChatResult | Exception]:
            return await self._call(calls, purpose=purpose, node=node)
        return call

    def _noting(self, failures: list[Exception], node: str) -> Callable[
            [Sequence[tuple[Model, ChatRequest]]], Coroutine[Any, Any, list[ChatResult | Exception]]]:
        """``caller("aggregate", node)`` that adds the calls' failed outcomes to ``failures``."""
        async def call(calls: Sequence[tuple[Model, ChatRequest]]) -> list[ChatResult | Exception]:
            outcomes = await self._call(calls, purpose="aggregate", node=node)
            failures.extend(o for o in outcomes if isinstance(o, Exception))
            return outcomes
        return call

    async def _call(self, calls: Sequence[tuple[Model, ChatRequest]], *, purpose: str,
                    node: str | None = None, then: Sequence[Model] = ()) -> list[ChatResult | Exception]:
        """Send calls through the shared executor. A key the endpoint refuses, an endpoint that
        cannot be reached, or a run store that cannot be written (a full disk) ends the whole run
        at once: every other call would fail the same way. ``then``: the models this task calls
        next (see ``Executor.call``)."""
        outcomes = await self.stages.executor.call(self.ledger, calls, purpose=purpose, node=node, then=then)
        if node == self.answer_node or purpose == "final":
            self._note_cut(calls, outcomes)
        fatal = None
        for outcome in outcomes:  # a loop, not a generator: this runs for every call
            if isinstance(outcome, _RUN_ENDING):
                fatal = outcome
                break
        if fatal is not None:
            self.user_error = True
            if isinstance(fatal, ModelRequestsForbidden):
                self.forbidden = fatal
            trace = self.traces.get(node) if node is not None else None  # (none yet in a chunk's recruiting)
            if trace is not None:
                trace.status, trace.error = "failed", str(fatal)
            reason = str(fatal)
            if isinstance(fatal, StoreGone):
                reason += "; nothing can resume it: run it again"
            elif isinstance(fatal, StoreError):
                # (it said "resume run ID": a store given with --store went unsaid, and the resume found no run)
                resume = command("resume", self.run_id)
                reason += f"; the calls answered before are saved: once it can be written, `{resume}` finishes it"
            self._finish("failed", None, reason)
            current = asyncio.current_task()
            for task in list(self.tasks):
                if task is not current:
                    task.cancel()
            raise fatal
        return outcomes

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.stages.executor.spawn(coro, owner=self.future, group=self.tasks)

    def _emit_attempt(self, attempt: int) -> None:
        self.plan_attempts = attempt  # (a plan that stayed invalid took them too: its result said 0)
        self.stages.events.emit(PlanRequested(run_id=self.run_id, attempt=attempt))

    async def make_plan(self) -> tuple[Plan, Dag, int, str]:
        """The plan (see ``Planner.plan``) with its DAG, the attempts it took and a note."""
        if self.given_graph is not None and self.spec.plan is not None:
            return self.spec.plan, self.given_graph, 0, "given"
        outcome = await self.stages.planner.plan(self.task, self.settings, self.caller("plan"), given=self.spec.plan,
                                                 context=self.spec.context, on_attempt=self._emit_attempt)
        return outcome.plan, outcome.graph, outcome.attempts, outcome.note

    async def _begin(self) -> None:
        started = time.perf_counter()
        try:
            plan, self.graph, attempts, note = await self.make_plan()
        except (OrchestraError, PlanInvalid) as error:
            self.user_error |= isinstance(error, UserError)
            self._finish(self._failure_status(), None, str(error))
            return
        except Exception as error:
            self._finish("failed", None, f"planning failed: unexpected {type(error).__name__}: {error}")
            return
        self.timings["plan_s"] = time.perf_counter() - started
        self.subtasks = plan.by_id()
        traces, own, seed, task = self.traces, self.node_settings, self.settings.seed, self.task
        for subtask in plan.subtasks:
            settings = own.get(subtask.id, DEFAULT_NODE)
            traces[subtask.id] = NodeState(subtask.id, subtask.instruction, list(subtask.depends_on),
                                           settings.aggregate or self.settings.aggregate,
                                           node_seed(seed, task, subtask.id))
        unplanned = [node for node in own if node not in self.subtasks]
        if unplanned:  # (a misspelt id under a planner's plan was dropped without a word)
            note = "; ".join(filter(None, [note, f"node_settings for {', '.join(map(repr, unplanned))} not used: "
                                                 f"the plan has no such node (its nodes: {', '.join(self.subtasks)})"]))
        self.plan_attempts, self.plan_note = attempts, note
        if self.stages.events.wants(PlanReady):
            self.stages.events.emit(PlanReady(run_id=self.run_id, attempts=attempts, note=note,
                                              nodes=tuple({"id": s.id, "instruction": s.instruction,
                                                           "depends_on": list(s.depends_on), "skills": list(s.skills)}
                                                          for s in plan.subtasks)))
        check_plan = getattr(self.final_template, "check_plan", None)  # (a plan: auto workflow's final)
        problem = check_plan([s.id for s in plan.subtasks]) if check_plan is not None else None
        if problem is not None:  # before any step is paid for
            self.user_error = True
            self._finish("failed", None, problem)
            return
        self._unresolved = len(plan.subtasks)
        self._waiting = {node: len(needs) for node, needs in self.graph.dependencies.items()}
        self._order = self.graph.order()
        sinks = self.graph.sinks
        self.answer_node = sinks[0] if len(sinks) == 1 and self.final_template is None else None
        self._execute_started = time.perf_counter()
        for node_id in self._order:
            if not self._waiting[node_id]:
                self._ready(node_id)

    # --- nodes -----------------------------------------------------------------------------

    def _ready(self, node_id: str) -> None:
        if self.stages.events.wants(NodeReady):  # a node's events are built only for a listener
            self.stages.events.emit(NodeReady(run_id=self.run_id, node=node_id))
        self._spawn(self._node(node_id))

    async def _node(self, node_id: str) -> None:
        trace = self.traces[node_id]
        subtask = self.subtasks[node_id]
        settings = self.node_settings.get(node_id, DEFAULT_NODE)
        started = time.perf_counter()
        try:
            instruction = settings.prompt(self.outputs()) if settings.prompt else subtask.instruction
            if not isinstance(instruction, str) or not instruction.strip():  # ("Your assignment: None" went out)
                raise ConfigError(f"node {node_id}: NodeSettings.prompt must return the instruction as text, not "
                                  f"{type(instruction).__name__} {instruction!r:.40}")
            trace.instruction = instruction  # a workflow step's prompt, rendered: what the experts get
            trace.status = "recruiting"
            skills = settings.skills or subtask.skills
            recruitment = self.stages.staffing.known(
                skills, seed=trace.seed, k=settings.k or self.settings.k, mode=settings.mode or self.settings.mode,
                agent=settings.agent, pin=self.pins.get(node_id))  # no request to make, so no coroutine either
            if recruitment is None:
                recruitment = await self.recruit(node_id, instruction, skills, settings)
            unmatched = self.stages.staffing.unmatched(skills, recruitment)
            if unmatched is not None:  # (matched once per skills, then known: said for every node that names them)
                self._recruited_without_skills(node_id, unmatched)
            agents = [self.stages.pool[name] for name in recruitment.experts]
            trace.recruitment = recruitment
            trace.explanation = recruitment.explain()
            if strategy(trace.strategy, len(agents)).uses_aggregator:  # chosen before the calls: it is shown
                trace.aggregator, why = self.stages.staffing.aggregator_for(recruitment)
                if why:
                    trace.explanation.append(why)
            if self.stages.events.wants(ExpertsRecruited):
                self.stages.events.emit(ExpertsRecruited(
                    run_id=self.run_id, node=node_id, experts=recruitment.experts,
                    aggregator=trace.aggregator or "", skills=recruitment.keywords,
                    explanation=tuple(trace.explanation), instruction=instruction))
            trace.status = "running"
            writes = node_id == self.answer_node  # the node whose output is the answer
            output = settings.output if settings.output is not None else (
                self._answer_output(node_id) if writes else None)  # (a schema of {}: any JSON value)
            sampling = self._answer_sampling(node_id) if writes else {}
            stream = self._answer_stream(node_id) if writes else None
            responses = await self._experts(trace, agents, recruitment, instruction, settings.prompt is not None,
                                            output, sampling, stream)
            combine = strategy(trace.strategy, 1 if trace.saved_calls else len(responses))
            if not combine.uses_aggregator:  # a confident team's first experts agreed, or one expert answered
                trace.aggregator = None  # (the node's aggregator was never asked)
            if isinstance(combine, (Strongest, Vote)):  # no model to call: no job to build, nothing to await
                trace.output, trace.data = combine.pick(responses, self.stages.grader, self.task)
            else:
                trace.status = "aggregating"
                self.stages.events.emit(NodeAggregating(run_id=self.run_id, node=node_id, strategy=trace.strategy))
                job = Job(task=self._overall(instruction), instruction=instruction, responses=responses,
                          seed=trace.seed, aggregator=(self.stages.pool[trace.aggregator] if trace.aggregator
                                                       else self.stages.staffing.aggregator),
                          grader=self.stages.grader, answer_format=self.spec.answer_format, schema=output,
                          on_text=stream, context=self.spec.context, **sampling)
                failures: list[Exception] = []  # what the aggregator's call came back with, if it failed
                try:
                    trace.output, trace.data = await combine.combine(job, self._noting(failures, node_id))
                except Exception as error:
                    # (a model in Python may fail with any exception: a RuntimeError of its client
                    # library failed the run where an HTTP 500 fell back to the vote)
                    if not (isinstance(error, ModelError) or any(error is f for f in failures)) \
                            or not _falls_back(error):
                        raise
                    # the experts answered: one failing aggregator endpoint failed the whole node
                    trace.output, trace.data = Vote.pick(responses, self.stages.grader, self.task)
                    failed, trace.aggregator = job.aggregator.name, None
                    reason = described(error, job.aggregator.model.name)  # (a KeyError's alone: 'text')
                    trace.explanation.append(fell_back(failed, reason))
                    self.stages.events.emit(AggregationFellBack(run_id=self.run_id, node=node_id, aggregator=failed,
                                                                reason=reason))
            trace.status = "done"
            if self.stages.events.wants(NodeDone):
                self.stages.events.emit(NodeDone(run_id=self.run_id, node=node_id, output=trace.output,
                                                 aggregator=trace.aggregator))
        except (OrchestraError, PlanInvalid) as error:
            self.user_error |= isinstance(error, UserError)
            self._node_failed(trace, str(error))
        except Exception as error:
            self._node_failed(trace, f"unexpected {type(error).__name__}: {error}")
        trace.elapsed_s = time.perf_counter() - started
        self._settle(node_id)

    async def recruit(self, node_id: str, instruction: str, skills: Sequence[str],
                      settings: NodeSettings = DEFAULT_NODE) -> Recruitment:
        """Staff a node (see ``Staffing.recruit``), reporting a failed skill extraction and the
        matcher's embedding requests."""
        if node_id in self._recruit_errors:
            raise self._recruit_errors.pop(node_id)
        state = self.traces.get(node_id)
        staffed = await self.stages.staffing.recruit(
            instruction, skills, self.caller(KEYWORDS, node_id),
            seed=state.seed if state else node_seed(self.settings.seed, self.task, node_id),
            k=settings.k or self.settings.k,
            mode=settings.mode or self.settings.mode, agent=settings.agent, pin=self.pins.get(node_id))
        if staffed.extraction_failure is not None:
            self._recruited_without_skills(node_id, staffed.extraction_failure)
            if staffed.keyword_calls_failed:
                self.skill_less.add(node_id)
                self.stage_failures.append(f"{node_id}: skill extraction failed ({staffed.extraction_failure}); "
                                           "its experts were recruited without skills")
        if staffed.embedding_usage is not None:
            self.ledger.count_embeddings(staffed.embedding_usage, model=staffed.matcher_model, node=node_id,
                                         keywords=list(staffed.recruitment.keywords))
            self.stages.executor.emit_usage(self.ledger)
        return staffed.recruitment

    def _recruited_without_skills(self, node_id: str, reason: str) -> None:
        """Count and tell the user of a node recruited as if no skill mattered (``reason``: why)."""
        self.skill_extraction_failures += 1
        self.stages.events.emit(SkillExtractionFailed(run_id=self.run_id, node=node_id, reason=reason))

    def _answer_output(self, node_id: str) -> str | dict[str, Any] | None:
        """The answer's format ("json" or a JSON schema) for the node that writes it (None: text)."""
        output = self.spec.answer.output
        return None if node_id != self.answer_node or output == "text" else output

    def _answer_stream(self, node_id: str) -> Callable[[str], None] | None:
        """Where the text of the node's answer-writing call goes as it streams (a text answer's)."""
        if node_id != self.answer_node or self.spec.answer.output != "text":
            return None
        return self.on_answer_text

    def _answer_sampling(self, node_id: str) -> dict[str, Any]:
        """The answer's token limit and temperature, for the calls that write it."""
        if node_id != self.answer_node:
            return {}
        answer = self.spec.answer
        return {"max_tokens": answer.max_tokens, "temperature": answer.temperature}

    def _overall(self, instruction: str) -> str:
        """The task a prompt about ``instruction`` shows as the overall one: ``instruction`` itself, which
        the prompts then leave out, where the task is only a workflow's name ("Overall task: two-step")."""
        untitled = self.spec.workflow is not None and not self.spec.workflow.titled
        return instruction if untitled else self.task

    async def _experts(self, trace: NodeState, agents: list[Agent], recruitment: Recruitment, instruction: str,
                       prompted: bool, output: str | dict[str, Any] | None, sampling: dict[str, Any],
                       stream: Callable[[str], None] | None) -> list[Response]:
        """The experts' answers to the node (a failed expert is traced; the others still count).
        ``prompted``: the instruction is a workflow step's prompt, which shows the inputs itself;
        ``sampling`` and ``stream``: the answer's, for the node that writes it."""
        inputs = [] if prompted else self._inputs(trace.id)
        prompt = render_expert(task=self._overall(instruction), instruction=instruction, inputs=inputs,
                               answer_format=self.spec.answer_format, context=self.spec.context)
        seed = trace.seed
        alone = stream if len(agents) == 1 else None  # its answer is the answer
        asked = "text" if output is None else output  # (a schema of {}: any JSON value)
        calls = [(agent.model, agent.request(prompt, seed=seed + i, output=asked, on_text=alone, **sampling))
                 for i, agent in enumerate(agents)]
        # the aggregator is called next: announced, so an engine serving it stays loaded until then
        then = [self.stages.pool[trace.aggregator].model] if trace.aggregator else []
        first = recruitment.staged if len(agents) >= 2 else 0
        if not first:
            outcomes = await self._call(calls, purpose="expert", node=trace.id, then=then)
            return self._collect(trace, agents, outcomes, recruitment)
        rest = [model for model, _ in calls[first:]]
        outcomes = await self._call(calls[:first], purpose="expert", node=trace.id, then=[*rest, *then])
        if self._agree(outcomes):
            aggregation = strategy(trace.strategy, len(agents)).uses_aggregator
            trace.saved_calls = len(agents) - first + aggregation
            return self._collect(trace, agents[:first], outcomes, recruitment)
        if calls[first:]:
            outcomes += await self._call(calls[first:], purpose="expert", node=trace.id, then=then)
        return self._collect(trace, agents, outcomes, recruitment)

    def _agree(self, outcomes: Sequence[ChatResult | Exception]) -> bool:
        """Whether every answer is there and the grader reads the same answer from each. Experts
        told how to state their answer (``answer_format``) agree only on answers they stated: two
        replies ending in "I am not sure" are no agreement. Replies are read with the choices the
        task lists ("London." and "(B)" agree where (B) is London)."""
        stated = self.spec.answer_format is None or all(
            not isinstance(o, Exception) and states_answer(o.text) for o in outcomes)
        choices = choices_of(self.task)
        answers = {None if isinstance(o, Exception) else self.stages.grader.extract(o.text, choices)
                   for o in outcomes}
        return stated and len(answers) == 1 and None not in answers

    def _node_failed(self, trace: NodeState, error: str) -> None:
        trace.status, trace.error = "failed", error
        if self.future.done():  # the run already ended (an endpoint-level failure)
            return
        self.stages.events.emit(NodeFailed(run_id=self.run_id, node=trace.id, error=error))

    def outputs(self) -> Outputs:
        """The results of the nodes finished so far."""
        return {node_id: {"output": state.output, "data": state.data}
                for node_id, state in self.traces.items() if state.status == "done"}

    def _inputs(self, node_id: str) -> list[dict[str, str]]:
        limit = self.settings.context_chars
        inputs = []
        for dependency in self.graph.dependencies[node_id]:  # (each once, as the DAG has it)
            output = self.traces[dependency].output or ""
            if len(output) > limit:
                output = output[:limit] + " [...]"
            inputs.append({"id": dependency, "instruction": self.traces[dependency].instruction, "output": output})
        return inputs

    def _collect(self, trace: NodeState, agents: list[Agent], outcomes: list[ChatResult | Exception],
                 recruitment: Recruitment) -> list[Response]:
        responses = []
        limit = self.settings.max_response_chars
        first_error = ""
        for agent, outcome in zip(agents, outcomes):
            if isinstance(outcome, Exception):
                error = described(outcome, agent.model.name)
                first_error = first_error or error
                trace.expert_outputs.append(ExpertOutput(agent=agent.name, model=agent.model.name, text=None,
                                                         error=error))
                continue
            trace.expert_outputs.append(assemble(ExpertOutput, {"agent": agent.name, "model": agent.model.name,
                                                                "text": outcome.text, "error": None}))
            candidate = recruitment.candidate(agent.name)
            text, data = outcome.text, outcome.parsed
            responses.append(Response(agent=agent.name, text=text, data=None if data is None else _plain(data),
                                      weight=candidate.probability if candidate else 1.0, limit=limit))
        if responses and len(responses) == len(outcomes):
            return responses
        errors = [o for o in outcomes if isinstance(o, Exception)]
        budget = next((e for e in errors if isinstance(e, BudgetExceeded)), None)
        if budget is not None:  # stop here rather than answer with fewer experts: a resume finishes the node
            raise budget
        if not responses:
            if all(isinstance(e, UserError) for e in errors):  # the cause itself, e.g. a rejected key
                raise errors[0]
            raise OrchestraError(f"every expert failed; first error: {first_error}")
        return responses

    def _settle(self, node_id: str) -> None:
        if self.future.done():
            return
        self._unresolved -= 1
        if self.traces[node_id].status == "failed":
            for descendant in self.graph.descendants(node_id):
                trace = self.traces[descendant]
                if trace.status == "pending":
                    trace.status = "skipped"
                    trace.error = f"skipped: dependency {node_id!r} failed"
                    self._unresolved -= 1
                    self.stages.events.emit(NodeSkipped(run_id=self.run_id, node=descendant, reason=trace.error))
        else:
            for dependent in self.graph.dependents[node_id]:
                self._waiting[dependent] -= 1
                if not self._waiting[dependent] and self.traces[dependent].status == "pending":
                    self._ready(dependent)
        if self._unresolved == 0:
            self._spawn(self._final())

    # --- the answer ------------------------------------------------------------------------

    async def _final(self) -> None:
        self.timings["execute_s"] = time.perf_counter() - self._execute_started
        sinks = [n for n in self._order if not self.graph.dependents[n]]
        done = [n for n in sinks if self.traces[n].status == "done"]
        failures = [f"{t.id}: {t.error}" for t in self.traces.values() if t.status == "failed"]
        if not done:
            self._finish(self._failure_status(), None, "; ".join(failures) or "no node finished")
            return
        answer = self._answer_text(self.traces[done[0]])
        if self.final_template is not None and not failures:
            try:
                answer = self.final_template(self.outputs())
            except OrchestraError as error:  # a template that cannot render: the workflow is to fix
                self.user_error |= isinstance(error, UserError)
                self._finish("failed", None, str(error))
                return
            except Exception as error:  # a `final=` function of the caller's (it escaped: the run read as cancelled)
                self.user_error = True
                self._finish("failed", None, f"final: {type(error).__name__}: {error}")
                return
            if not isinstance(answer, str):
                self.user_error = True
                self._finish("failed", None, f"final must return the answer as text, not {type(answer).__name__} "
                                             f"{answer!r:.40}")
                return
        elif len(done) > 1:
            limit = self.settings.max_response_chars  # (a sink's output may be one expert's answer, whole)
            inputs = [{"id": n, "instruction": self.traces[n].instruction,
                       "output": cut_for_aggregator(self.traces[n].output or "", limit)} for n in done]
            started = time.perf_counter()
            try:
                answer = await self.stages.final.answer(self._overall(""), inputs, self.caller("final"),
                                                        seed=node_seed(self.settings.seed, self.task, "final"),
                                                        context=self.spec.context, options=self.spec.answer,
                                                        on_text=self.on_answer_text)
            except Exception as error:
                self.user_error |= isinstance(error, UserError)
                failures.append(f"final aggregation: {error}")
                if not isinstance(error, ModelError) or not _falls_back(error) or self.spec.answer.output != "text":
                    self._finish(self._failure_status(), None, "; ".join(failures))
                    return
                # the steps answered: their outputs are kept as the answer, and the run is partial (a resume asks again)
                answer = FinalSynthesis.unsynthesized([(self.traces[n].instruction, self.traces[n].output or "")
                                                       for n in done])
                failures[-1] += f" ({UNSYNTHESIZED})"
            finally:
                self.timings["final_s"] = time.perf_counter() - started
        failures += self.stage_failures
        complete = len(done) == len(sinks) and not failures
        status: RunStatus = "done" if complete else ("budget_exceeded" if self.ledger.budget.exceeded else "partial")
        self._finish(status, answer, "; ".join(failures) or None)

    def _note_cut(self, calls: Sequence[tuple[Model, ChatRequest]], outcomes: Sequence[ChatResult | Exception]) -> None:
        """Remember the answers cut at a token limit, as the node's output or the run's answer may
        show them (reasoning stripped), and those cut where the context window filled: fewer tokens
        written than their request's ``max_tokens`` allowed (the advice to raise it could not help)."""
        for (_, request), outcome in zip(calls, outcomes):
            if not isinstance(outcome, Exception) and outcome.finish_reason == "length":
                texts = (outcome.text, strip_reasoning(outcome.text))
                self._cut_texts.update(texts)
                if request.max_tokens is not None and outcome.usage.completion_tokens < request.max_tokens:
                    self._context_full.update(texts)

    def _answer_text(self, trace: NodeState) -> str | None:
        """A sink's output as the answer: its parsed JSON, compact, when the answer is JSON."""
        if trace.id == self.answer_node and self.spec.answer.output != "text" and trace.data is not None:
            return json.dumps(trace.data, ensure_ascii=False, separators=(",", ":"))
        return trace.output

    def _failure_status(self) -> Literal["failed", "budget_exceeded"]:
        return "budget_exceeded" if self.ledger.budget.exceeded else "failed"

    def _finish(self, status: RunStatus, answer: str | None, error: str | None) -> None:
        if self.future.done():
            if self.future.cancelled() and not self._told_done:  # (the caller's cancelled await ended it)
                self._tell_done(self.result(status, answer, error))
            return
        refused = self.ledger.budget.exceeded
        if refused is not None:  # the budget first, then what else failed (not it again)
            # counted as the run ends (the calls in flight at the refusal are made by now), so the
            # message agrees with the run's usage; a limit the next call only might have passed keeps
            # the refusal's words
            final = self.ledger.budget.reached()
            budget = str(final if final is not None and final.limit == refused.limit else refused)
            stop = str(refused).split(" (", 1)[0]  # its words before the counts, which each refusal wrote anew
            others = [part for part in (error or "").split("; ") if part and stop not in part]
            error = f"{budget} ({'; '.join(others)})" if others else budget
        result = self.result(status, answer, error)
        self._tell_done(result)
        self.future.set_result(result)

    def _tell_done(self, result: RunResult) -> None:
        """Tell the listeners how the run ended (once)."""
        self._told_done = True
        self.stages.events.emit(RunDone(run_id=self.run_id, status=result.status, answer=result.answer,
                                        error=result.error, elapsed_s=result.elapsed_s,
                                        user_error=result.exit_code == 2 and result.status == "failed"))

    def result(self, status: RunStatus, answer: str | None, error: str | None) -> RunResult:
        """The ``RunResult`` as things stand."""
        ledger = self.ledger
        usage = ledger.usage
        failed_calls, failed_by_model, failed_keyword_calls = ledger.run_failures(done=status == "done")
        return RunResult(
            run_id=self.run_id, task=self.task, status=status, answer=answer, error=error,
            plan=PlanTrace(nodes=[state.trace() for state in self.traces.values()], attempts=self.plan_attempts,
                           note=self.plan_note),
            usage=RunUsage(calls=ledger.calls, requests=usage.requests, prompt_tokens=usage.prompt_tokens,
                           completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd,
                           failed_calls=failed_calls, failed_keyword_calls=failed_keyword_calls,
                           failed_by_model={model: FailedCalls(calls=calls, first_error=error)
                                            for model, (calls, error) in failed_by_model.items()},
                           cache_hits=ledger.answered["cache"], reused_calls=ledger.reused_calls,
                           reused_usd=ledger.reused_usage.cost_usd,
                           skill_extraction_failures=self.skill_extraction_failures,
                           cache_misses=ledger.cache_misses, replayed_calls=ledger.answered["store"],
                           cache_errors=ledger.cache_errors),
            batches=[BatchInfo(model=b.model, size=b.size, calls=b.calls, wave=b.wave, purpose=b.purpose)
                     for b in ledger.batches],
            model_loads=dict(ledger.model_loads), elapsed_s=time.perf_counter() - self.started,
            user_error=self.user_error, timings={k: round(v, 4) for k, v in self.timings.items()},
            answer_cut=answer is not None and answer in self._cut_texts,
            context_full=answer is not None and answer in self._context_full)
