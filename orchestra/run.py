"""One run: a task through plan, recruit, batched execution and aggregation, on a shared executor."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from orchestra.agents import Agent, Pool
from orchestra.aggregate import Response, Strategy, ranked, refine_prompt, synthesize_prompt, vote
from orchestra.budget import Budget
from orchestra.errors import (
    AuthenticationError,
    BudgetExceeded,
    EndpointUnreachable,
    InvalidOutput,
    OrchestraError,
    PlanError,
    UserError,
)
from orchestra.events import (
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
)
from orchestra.execute import Executor, RunLedger
from orchestra.grading import Grader, strip_reasoning
from orchestra.matching import SkillMatcher
from orchestra.models import ChatRequest, ChatResult, Model
from orchestra.models.metering import metering
from orchestra.plan import (
    Plan,
    PlanInvalid,
    is_simple_task,
    off_topic_steps,
    parse_plan,
    planner_request,
    repair_request,
    validate_plan,
)
from orchestra.prompts import render
from orchestra.recruit import AggregatorChoiceMode, Mode, Recruiter, Recruitment, SkillTable, node_aggregator
from orchestra.result import BatchInfo, ExpertOutput, NodeTrace, PlanTrace, RunResult, RunUsage
from orchestra.skills import SkillExtractor, skill_names


@dataclass(frozen=True)
class RunOptions:
    """Everything that shapes one run. Stored with the run, so a resume repeats it exactly."""

    k: int = 3
    mode: Mode = "symbolic-moe"
    aggregate: Strategy = "synthesize"
    plan: bool = True
    max_nodes: int = 12
    plan_repairs: int = 2
    plan_fallback: Literal["fail", "single"] = "fail"
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    context_chars: int = 4000
    max_response_chars: int = 100_000
    planner_max_tokens: int = 1024
    answer_format: str | None = None
    context: str = ""
    fast_path: bool = True
    plan_check: bool = True
    aggregator_choice: AggregatorChoiceMode = "best"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["budget"] = self.budget.model_dump()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        """Rebuild stored options (unknown keys from other versions are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "budget" in known:
            known["budget"] = Budget.model_validate(known["budget"])
        return cls(**known)


@dataclass
class RunEnv:
    """What every run of one ``Orchestra`` shares."""

    pool: Pool
    executor: Executor
    events: EventBus
    table: SkillTable
    recruiter: Recruiter
    matcher: SkillMatcher
    extractor: SkillExtractor
    aggregator: Agent
    grader: Grader
    aggregator_fixed: bool = False
    """The aggregator was configured (``aggregator:``): it aggregates every node, whatever the choice."""


Outputs = dict[str, dict[str, Any]]
"""Finished nodes' results by id: ``{"output": text, "data": parsed JSON or None}``."""


@dataclass(frozen=True)
class NodeSettings:
    """Per-node choices a workflow step can make; unset fields follow the run's options.

    Attributes:
        k, mode, aggregate: recruiting and aggregation for this node.
        agent: a fixed expert (no recruiting).
        skills: the skills to recruit on (no keyword extraction).
        output: a JSON schema the node's output must follow.
        prompt: renders the node's instruction from upstream outputs (then the expert prompt does
            not list the dependencies' outputs itself).
    """

    k: int | None = None
    mode: str | None = None
    aggregate: str | None = None
    agent: str | None = None
    skills: tuple[str, ...] = ()
    output: dict[str, Any] | None = None
    prompt: Callable[[Outputs], str] | None = None


DEFAULT_NODE = NodeSettings()


@dataclass(slots=True, eq=False)
class NodeState:
    """A node's mutable state during a run; turned into a ``NodeTrace`` for the result."""

    id: str
    instruction: str
    depends_on: list[str]
    strategy: str
    status: str = "pending"
    recruitment: Recruitment | None = None
    explanation: list[str] = field(default_factory=list)
    aggregator: str | None = None
    output: str | None = None
    data: Any = None
    expert_outputs: list[ExpertOutput] = field(default_factory=list)
    error: str | None = None
    elapsed_s: float = 0.0

    def trace(self) -> NodeTrace:
        """The JSON-ready trace of this node."""
        recruitment = self.recruitment
        return NodeTrace.model_construct(
            id=self.id, instruction=self.instruction, depends_on=self.depends_on, status=self.status,
            skills=list(recruitment.keywords) if recruitment else [],
            experts=list(recruitment.experts) if recruitment else [], aggregator=self.aggregator,
            strategy=self.strategy, output=self.output, data=self.data, expert_outputs=self.expert_outputs,
            recruitment=recruitment.to_dict(self.explanation) if recruitment else None, error=self.error,
            elapsed_s=self.elapsed_s)


def _plain(value: Any) -> Any:
    """A parsed output as plain JSON data (pydantic models dumped)."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def node_seed(seed: int, task: str, node_id: str) -> int:
    """A per-node seed from the run's seed, the task and the node id: reproducible, distinct per task."""
    return zlib.crc32(f"{seed}:{node_id}:{task}".encode())


class Run:
    """Drives one task. Its coroutines run as managed tasks of the shared executor."""

    def __init__(self, env: RunEnv, task: str, options: RunOptions, ledger: RunLedger, *,
                 plan: Plan | None = None, fixed_experts: dict[str, list[str]] | None = None,
                 node_settings: dict[str, NodeSettings] | None = None,
                 final: Callable[[Outputs], str] | None = None) -> None:
        self.env = env
        self.task = task
        self.options = options
        self.ledger = ledger
        self.run_id = ledger.run_id
        self.given_plan = plan
        self.presets: dict[str, Recruitment] = {}
        self.fixed_experts = fixed_experts or {}
        self.node_settings = node_settings or {}
        self.final_template = final
        self.future: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self.traces: dict[str, NodeState] = {}
        self.plan_attempts, self.plan_note = 0, ""
        self.graph: nx.DiGraph = nx.DiGraph()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.user_error = False  # a failure the user must fix (key, URL, context): exit code 2
        self.skill_extraction_failures = 0
        self._unresolved = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Future[RunResult]:
        """Begin the run (from a managed task or the event loop); the future gets the result."""
        self.env.events.emit(RunStarted(run_id=self.run_id, task=self.task))
        self._spawn(self._begin())
        return self.future

    def cancel(self) -> None:
        """Stop the run: cancel its tasks and finish with status ``cancelled``."""
        for task in list(self.tasks):
            task.cancel()
        if not self.future.done():
            self._finish("cancelled", None, "cancelled by the user")

    async def _call(self, calls: Sequence[tuple[Model, ChatRequest]], *, purpose: str,
                    node: str | None = None) -> list[ChatResult | Exception]:
        """Send calls through the shared executor. A key the endpoint refuses, or an endpoint that
        cannot be reached, ends the whole run at once: every other call would fail the same way."""
        outcomes = await self.env.executor.call(self.ledger, calls, purpose=purpose, node=node)
        fatal = next((o for o in outcomes if isinstance(o, (AuthenticationError, EndpointUnreachable))), None)
        if fatal is not None:
            self.user_error = True
            if node is not None:
                self.traces[node].status, self.traces[node].error = "failed", str(fatal)
            self._finish("failed", None, str(fatal))
            current = asyncio.current_task()
            for task in list(self.tasks):
                if task is not current:
                    task.cancel()
            raise fatal
        return outcomes

    def _spawn(self, coro: Any) -> None:
        task = self.env.executor.spawn(coro, owner=self.future)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _begin(self) -> None:
        started = time.perf_counter()
        try:
            plan, self.graph, attempts, note = await self.make_plan()
        except (OrchestraError, PlanInvalid) as error:
            self.user_error |= isinstance(error, UserError)
            self._finish(self._failure_status(), None, str(error))
            return
        except Exception as error:  # noqa: BLE001 - e.g. a model backend's own bug: one line, not a traceback
            self._finish("failed", None, f"planning failed: unexpected {type(error).__name__}: {error}")
            return
        self.timings["plan_s"] = time.perf_counter() - started
        self.subtasks = plan.by_id()
        for subtask in plan.subtasks:
            self.traces[subtask.id] = NodeState(id=subtask.id, instruction=subtask.instruction,
                                                depends_on=list(subtask.depends_on), strategy=self.options.aggregate)
        self.plan_attempts, self.plan_note = attempts, note
        self.env.events.emit(PlanReady(run_id=self.run_id, attempts=attempts, note=note,
                                       nodes=tuple({"id": s.id, "instruction": s.instruction,
                                                    "depends_on": list(s.depends_on), "skills": list(s.skills)}
                                                   for s in plan.subtasks)))
        self._unresolved = len(plan.subtasks)
        self._execute_started = time.perf_counter()
        for node_id in nx.topological_sort(self.graph):
            if self.graph.in_degree(node_id) == 0:
                self._ready(node_id)

    async def make_plan(self) -> tuple[Plan, nx.DiGraph, int, str]:
        """The plan: given, single-step, or from the planner with repairs; with its DAG, attempts and a note."""
        if self.given_plan is not None:
            given = self.given_plan
            return given, validate_plan(given, max_nodes=max(self.options.max_nodes, len(given.subtasks))), 0, "given"
        if not self.options.plan:
            single = Plan.single(self.task)
            return single, validate_plan(single), 0, "planning off"
        if self.options.fast_path and is_simple_task(self.task):
            single = Plan.single(self.task)
            return single, validate_plan(single), 0, "simple task: one step, no planner call (fast path)"
        pool = self.env.pool
        request = planner_request(self.task, max_nodes=self.options.max_nodes, context=self.options.context,
                                  seed=self.options.seed, max_tokens=self.options.planner_max_tokens)
        problem = ""
        for attempt in range(1, self.options.plan_repairs + 2):
            self.env.events.emit(PlanRequested(run_id=self.run_id, attempt=attempt))
            [outcome] = await self._call([(pool.planner, request)], purpose="plan")
            if isinstance(outcome, InvalidOutput):  # a plan problem: worth a repair
                problem, answer = str(outcome), "(invalid JSON)"
            elif isinstance(outcome, Exception):  # HTTP or transport: not the plan's fault, never "repaired"
                raise outcome
            else:
                answer = outcome.text
                try:
                    plan = parse_plan(outcome.parsed)
                    graph = validate_plan(plan, max_nodes=self.options.max_nodes)
                except PlanInvalid as invalid:
                    problem = str(invalid)
                else:
                    strays = ", ".join(off_topic_steps(plan, self.task, self.options.context)
                                       if self.options.plan_check else [])
                    if strays:
                        single = Plan.single(self.task)
                        return (single, validate_plan(single), attempt,
                                f"the planner's steps ({strays}) were not about the task; ran it as one step")
                    return plan, graph, attempt, "planned as one step" if len(plan.subtasks) == 1 else ""
            request = repair_request(request, answer, problem)
        if self.options.plan_fallback == "single":
            single = Plan.single(self.task)
            note = f"planner failed ({problem}); ran the task as one step"
            return single, validate_plan(single), self.options.plan_repairs + 1, note
        raise PlanError(f"the planner's plan stayed invalid after {self.options.plan_repairs} repair(s): {problem}")

    # --- nodes -----------------------------------------------------------------------------

    def _ready(self, node_id: str) -> None:
        self.env.events.emit(NodeReady(run_id=self.run_id, node=node_id))
        self._spawn(self._node(node_id))

    async def _node(self, node_id: str) -> None:
        trace = self.traces[node_id]
        subtask = self.subtasks[node_id]
        settings = self.node_settings.get(node_id, DEFAULT_NODE)
        strategy = settings.aggregate or self.options.aggregate
        started = time.perf_counter()
        try:
            instruction = settings.prompt(self.outputs()) if settings.prompt else subtask.instruction
            trace.instruction = instruction  # a workflow step's prompt, rendered: what the experts get
            trace.status = "recruiting"
            recruitment = await self.recruit(node_id, instruction, settings.skills or subtask.skills, settings)
            agents = [self.env.pool[name] for name in recruitment.experts]
            trace.recruitment = recruitment
            trace.explanation = recruitment.explain()
            needs_aggregator = len(agents) > 1 and strategy in ("synthesize", "refine")
            trace.aggregator = self._node_aggregator(trace, recruitment) if needs_aggregator else None
            self.env.events.emit(ExpertsRecruited(
                run_id=self.run_id, node=node_id, experts=recruitment.experts,
                aggregator=trace.aggregator or "", skills=recruitment.keywords,
                explanation=tuple(trace.explanation), instruction=instruction))
            trace.status = "running"
            inputs = [] if settings.prompt else self._inputs(node_id)
            prompt = render("expert.j2", task=self.task, instruction=instruction, inputs=inputs,
                            answer_format=self.options.answer_format, context=self.options.context)
            seed = node_seed(self.options.seed, self.task, node_id)
            output = settings.output or "text"
            calls = [(agent.model, agent.request(prompt, seed=seed + i, output=output))
                     for i, agent in enumerate(agents)]
            outcomes = await self._call(calls, purpose="expert", node=node_id)
            responses = self._collect(trace, agents, outcomes, recruitment)
            trace.output, trace.data = await self._aggregate(node_id, instruction, responses, seed, strategy,
                                                             settings.output)
            trace.status = "done"
            self.env.events.emit(NodeDone(run_id=self.run_id, node=node_id, output=trace.output))
        except (OrchestraError, PlanInvalid) as error:
            self.user_error |= isinstance(error, UserError)
            self._node_failed(trace, str(error))
        except Exception as error:  # noqa: BLE001 - reported on the node, the rest of the run goes on
            self._node_failed(trace, f"unexpected {type(error).__name__}: {error}")
        trace.elapsed_s = time.perf_counter() - started
        self._settle(node_id)

    def _node_aggregator(self, trace: NodeState, recruitment: Recruitment) -> str:
        """The node's aggregator: the pool's best, or with ``aggregator_choice="per-node"`` the best
        measured aggregator among the agents that fit the node (a configured aggregator always wins)."""
        env = self.env
        if self.options.aggregator_choice != "per-node" or env.aggregator_fixed:
            return env.aggregator.name
        choice = node_aggregator(env.pool.profiles, env.table.competence, recruitment, env.aggregator.name)
        trace.explanation.append(choice.explain())
        return choice.agent

    def _node_failed(self, trace: NodeState, error: str) -> None:
        trace.status, trace.error = "failed", error
        if self.future.done():  # the run already ended (an endpoint-level failure)
            return
        self.env.events.emit(NodeFailed(run_id=self.run_id, node=trace.id, error=error))

    def outputs(self) -> Outputs:
        """The results of the nodes finished so far."""
        return {node_id: {"output": state.output, "data": state.data}
                for node_id, state in self.traces.items() if state.status == "done"}

    async def recruit(self, node_id: str, instruction: str, skills: Sequence[str],
                      settings: NodeSettings = DEFAULT_NODE) -> Recruitment:
        """Choose a node's experts: preset or fixed, else from given skills, else from extracted keywords."""
        if node_id in self.presets:
            return self.presets[node_id]
        if settings.agent is not None:
            return Recruitment(experts=(settings.agent,), keywords=tuple(skills), matches=(), candidates=(),
                               mode="fixed", notes=(f"{settings.agent}: fixed by the workflow",))
        mode = settings.mode or self.options.mode
        keywords = skill_names(skills, 40)  # a planner's skills too: plain words only
        skill_blind = mode in ("global", "random")  # these baselines ignore skills
        if not keywords and not skill_blind:
            extractor = self.env.extractor
            requests = extractor.requests(instruction, seed=node_seed(self.options.seed, self.task, node_id))
            model = self.env.pool.keyword_model
            outcomes = await self._call([(model, r) for r in requests],
                                                    purpose="keywords", node=node_id)
            budget_errors = [o for o in outcomes if isinstance(o, BudgetExceeded)]
            if budget_errors:
                raise budget_errors[0]
            keywords = extractor.combine(outcomes)
            if not keywords:  # recruiting goes on without skills; the user is told, not left guessing
                self.skill_extraction_failures += 1
                self.env.events.emit(SkillExtractionFailed(run_id=self.run_id, node=node_id,
                                                           reason=extractor.failure(outcomes)))
        with metering() as meter:  # an embedding matcher's requests belong to this run too
            matches = await self.env.matcher.match(keywords, self.env.table.vocabulary)
        if meter.requests:
            self.ledger.count_embeddings(meter.usage, model=getattr(self.env.matcher, "model", "matcher"),
                                         node=node_id, keywords=list(keywords))
            self.env.executor.emit_usage(self.ledger)
        recruitment = self.env.recruiter.recruit(keywords, matches, seed=node_seed(self.options.seed, self.task, node_id),
                                                 k=settings.k or self.options.k, mode=mode)  # type: ignore[arg-type]
        fixed = self.fixed_experts.get(node_id)
        if fixed:  # a resumed run keeps the experts its batch's rare-expert filter chose
            recruitment = dataclasses.replace(recruitment, experts=tuple(fixed),
                                              notes=(*recruitment.notes, "experts as first recruited"))
        return recruitment

    def _inputs(self, node_id: str) -> list[dict[str, str]]:
        limit = self.options.context_chars
        inputs = []
        for dependency in self.subtasks[node_id].depends_on:
            output = self.traces[dependency].output or ""
            if len(output) > limit:
                output = output[:limit] + " [...]"
            inputs.append({"id": dependency, "instruction": self.traces[dependency].instruction, "output": output})
        return inputs

    def _collect(self, trace: NodeState, agents: list[Agent], outcomes: list[ChatResult | Exception],
                 recruitment: Recruitment) -> list[Response]:
        responses = []
        for agent, outcome in zip(agents, outcomes):
            if isinstance(outcome, Exception):
                trace.expert_outputs.append(ExpertOutput.model_construct(agent=agent.name, model=agent.model.name,
                                                                         text=None, error=str(outcome)))
                continue
            trace.expert_outputs.append(ExpertOutput.model_construct(agent=agent.name, model=agent.model.name,
                                                                     text=outcome.text, error=None))
            candidate = recruitment.candidate(agent.name)
            responses.append(Response(agent=agent.name, text=self._capped(outcome.text), data=_plain(outcome.parsed),
                                      weight=candidate.probability if candidate else 1.0))
        errors = [o for o in outcomes if isinstance(o, Exception)]
        budget = next((e for e in errors if isinstance(e, BudgetExceeded)), None)
        if budget is not None:  # stop here rather than answer with fewer experts: a resume finishes the node
            raise budget
        if not responses:
            if all(isinstance(e, UserError) for e in errors):  # the cause itself, e.g. a rejected key
                raise errors[0]
            raise OrchestraError(f"every expert failed; first error: {errors[0]}")
        return responses

    def _capped(self, text: str) -> str:
        """An expert's answer as the aggregator gets it: at most ``max_response_chars``."""
        limit = self.options.max_response_chars
        return text if len(text) <= limit else f"{text[:limit]} [... cut at max_response_chars={limit}]"

    async def _aggregate(self, node_id: str, instruction: str, responses: list[Response], seed: int,
                         strategy: str, schema: dict[str, Any] | None) -> tuple[str, Any]:
        """The node's output text, and its parsed value when the node has an output schema."""
        if strategy == "none" or (len(responses) == 1 and strategy != "vote"):
            best = ranked(responses)[0]
            return strip_reasoning(best.text), best.data
        if strategy == "vote":
            winner = vote(responses, self.env.grader)
            return winner.text, winner.data
        self.traces[node_id].status = "aggregating"
        self.env.events.emit(NodeAggregating(run_id=self.run_id, node=node_id, strategy=strategy))
        build = synthesize_prompt if strategy == "synthesize" else refine_prompt
        chosen = self.traces[node_id].aggregator
        aggregator = self.env.pool[chosen] if chosen else self.env.aggregator
        request = aggregator.request(build(self.task, instruction, responses, self.options.answer_format),
                                     seed=seed + 101, output=schema or "text")
        [outcome] = await self._call([(aggregator.model, request)],
                                                 purpose="aggregate", node=node_id)
        if isinstance(outcome, Exception):
            raise outcome
        return strip_reasoning(outcome.text), _plain(outcome.parsed)

    def _settle(self, node_id: str) -> None:
        if self.future.done():
            return
        self._unresolved -= 1
        if self.traces[node_id].status == "failed":
            for descendant in nx.descendants(self.graph, node_id):
                trace = self.traces[descendant]
                if trace.status == "pending":
                    trace.status = "skipped"
                    trace.error = f"skipped: dependency {node_id!r} failed"
                    self._unresolved -= 1
                    self.env.events.emit(NodeSkipped(run_id=self.run_id, node=descendant, reason=trace.error))
        else:
            for dependent in self.graph.successors(node_id):
                if self.traces[dependent].status == "pending" and all(
                        self.traces[d].status == "done" for d in self.graph.predecessors(dependent)):
                    self._ready(dependent)
        if self._unresolved == 0:
            self._spawn(self._final())

    # --- the answer ------------------------------------------------------------------------

    async def _final(self) -> None:
        self.timings["execute_s"] = time.perf_counter() - self._execute_started
        sinks = [n for n in nx.topological_sort(self.graph) if self.graph.out_degree(n) == 0]
        done = [n for n in sinks if self.traces[n].status == "done"]
        failures = [f"{t.id}: {t.error}" for t in self.traces.values() if t.status == "failed"]
        if not done:
            self._finish(self._failure_status(), None, "; ".join(failures) or "no node finished")
            return
        answer = self.traces[done[0]].output
        if self.final_template is not None and not failures:
            try:
                answer = self.final_template(self.outputs())
            except OrchestraError as error:
                self._finish("failed", None, str(error))
                return
        elif len(done) > 1:
            inputs = [{"id": n, "instruction": self.traces[n].instruction, "output": self.traces[n].output}
                      for n in done]
            aggregator = self.env.aggregator
            request = aggregator.request(render("final.j2", task=self.task, inputs=inputs, context=self.options.context),
                                         seed=node_seed(self.options.seed, self.task, "final"))
            started = time.perf_counter()
            [outcome] = await self._call([(aggregator.model, request)], purpose="final")
            self.timings["final_s"] = time.perf_counter() - started
            if isinstance(outcome, Exception):
                self.user_error |= isinstance(outcome, UserError)
                failures.append(f"final aggregation: {outcome}")
                self._finish(self._failure_status(), None, "; ".join(failures))
                return
            answer = strip_reasoning(outcome.text)
        complete = len(done) == len(sinks) and not failures
        status = "done" if complete else ("budget_exceeded" if self.ledger.budget.exceeded else "partial")
        self._finish(status, answer, "; ".join(failures) or None)

    def _failure_status(self) -> Literal["failed", "budget_exceeded"]:
        return "budget_exceeded" if self.ledger.budget.exceeded else "failed"

    def _finish(self, status: str, answer: str | None, error: str | None) -> None:
        if self.future.done():
            return
        if self.ledger.budget.exceeded is not None:
            error = str(self.ledger.budget.exceeded) if not error else f"{self.ledger.budget.exceeded} ({error})"
        result = self.result(status, answer, error)
        self.env.events.emit(RunDone(run_id=self.run_id, status=status, answer=answer, error=error,
                                     elapsed_s=result.elapsed_s, user_error=result.exit_code == 2))
        self.future.set_result(result)

    def result(self, status: str, answer: str | None, error: str | None) -> RunResult:
        """The ``RunResult`` as things stand."""
        ledger = self.ledger
        usage = ledger.usage
        loads = dict(ledger.model_loads)
        return RunResult(
            run_id=self.run_id, task=self.task, status=status, answer=answer, error=error,  # type: ignore[arg-type]
            plan=PlanTrace(nodes=[state.trace() for state in self.traces.values()], attempts=self.plan_attempts,
                           note=self.plan_note),
            usage=RunUsage(calls=ledger.budget.calls, requests=usage.requests, prompt_tokens=usage.prompt_tokens,
                           completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd,
                           failed_calls=ledger.failed_calls, cache_hits=ledger.answered["cache"],
                           skill_extraction_failures=self.skill_extraction_failures,
                           cache_misses=ledger.cache_misses, replayed_calls=ledger.answered["store"],
                           cache_errors=ledger.cache_errors),
            batches=[BatchInfo(model=b.model, size=b.size, calls=b.calls, wave=b.wave, purpose=b.purpose)
                     for b in ledger.batches],
            model_loads=loads, elapsed_s=time.perf_counter() - self.started, user_error=self.user_error,
            timings={k: round(v, 4) for k, v in self.timings.items()})
