"""What the terminal shows: a rich live view in a terminal, plain log lines elsewhere.

Both are event listeners; nothing in the pipeline prints.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from orchestra.events import (
    AggregationFellBack,
    BatchFinished,
    BatchStarted,
    CallDone,
    CallRetried,
    CallsQueued,
    CallsResolved,
    Event,
    EventHandler,
    ExpertsRecruited,
    FeatureDropped,
    ModelLoaded,
    ModelUnloaded,
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
    UsageUpdated,
    fell_back,
)
from orchestra.hints import run_error
from orchestra.money import usd_alike, usd_exact
from orchestra.terminal_text import UNSAFE, counted, printable

if TYPE_CHECKING:
    from orchestra.profile import SkillProfile
    from orchestra.result import RunResult


def terminal(**options: object) -> Console:
    """A console that prints every string literally: model output may contain ``[/INST]``,
    ``[bold]`` or ``:emoji:`` codes, and none of it is Rich markup; nor is any of it a terminal
    command (see ``printable``)."""
    return _Literal(markup=False, emoji=False, highlight=False, **options)  # type: ignore[arg-type]


def skills_cell(declared: Iterable[str], profile: SkillProfile | None) -> str:
    """An agent's skills in one cell: its profile's best estimates (items), else its ±1 sums (so
    labelled), else its declared skills, else ``(no profile)``."""
    if profile is not None:
        estimates = profile.top_estimates()
        if estimates:
            return ", ".join(f"{skill} {estimate:.2f} ({items})" for skill, estimate, items in estimates)
        return "(±1 sums) " + ", ".join(f"{k} {v:+d}" for k, v in profile.top_sums())
    declared = list(declared)
    return "(declared) " + ", ".join(declared) if declared else "(no profile)"


def literal(text: str, style: str = "") -> Text:
    """``Text`` of ``text`` as it is, its control characters written as escapes (see ``printable``):
    Rich drops a carriage return, a backspace, a bell... as it makes a ``Text`` (``10\\r50`` read
    ``1050``)."""
    return Text(printable(text), style=style)


class _Literal(Console):
    """A console whose text segments are made printable as they are rendered, whatever renderable
    (a table cell, a tree label, a panel) holds them, and whose strings are made printable before
    Rich makes them ``Text`` (see ``literal``); Rich's own styles and cursor moves are not text."""

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(printable(text), **options)

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            if segment.control is None and UNSAFE.search(segment.text):
                yield Segment(printable(segment.text), segment.style)
            else:
                yield segment


STATUS_STYLE = {"pending": ("·", "dim"), "recruiting": ("◌", "cyan"), "running": ("▶", "yellow"),
                "aggregating": ("⧗", "magenta"), "done": ("✔", "green"), "failed": ("✘", "red"),
                "skipped": ("↷", "dim red")}


@dataclass
class _Node:
    instruction: str
    depends_on: list[str]
    status: str = "pending"
    experts: tuple[str, ...] = ()
    aggregator: str = ""
    detail: str = ""


@dataclass
class _ModelRow:
    queued: int = 0
    running: int = 0
    done: int = 0
    batches: int = 0
    loads: int = 0
    resident: bool = False


@dataclass
class RunState(EventHandler[None]):
    """Everything the views show, kept current from events (``handle`` applies one)."""

    task: str = ""
    nodes: dict[str, _Node] = field(default_factory=dict)
    models: dict[str, _ModelRow] = field(default_factory=dict)
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    replayed: int = 0
    reused: int = 0  # calls answered by another point of a sweep
    retries: int = 0
    dropped: list[str] = field(default_factory=list)  # "model without feature", once each
    status: str = "running"
    note: str = ""
    started: float = field(default_factory=time.monotonic)

    def on_run_started(self, event: RunStarted) -> None:
        self.task = event.task

    def on_plan_requested(self, event: PlanRequested) -> None:
        self.note = "planning…" if event.attempt == 1 else f"planning… (repair {event.attempt - 1})"

    def on_plan_ready(self, event: PlanReady) -> None:
        self.nodes = {n["id"]: _Node(n["instruction"], list(n["depends_on"])) for n in event.nodes}
        self.note = event.note

    def on_node_ready(self, event: NodeReady) -> None:
        self._node(event.node).status = "recruiting"

    def on_experts_recruited(self, event: ExpertsRecruited) -> None:
        node = self._node(event.node)
        node.status, node.experts, node.aggregator = "running", event.experts, event.aggregator

    def on_skill_extraction_failed(self, event: SkillExtractionFailed) -> None:
        self._node(event.node).detail = f"warning: no skills found ({event.reason}); recruited without skills"

    def on_aggregation_fell_back(self, event: AggregationFellBack) -> None:
        node = self._node(event.node)
        node.detail, node.aggregator = f"warning: {fell_back(event.aggregator, event.reason)}", ""

    def on_node_aggregating(self, event: NodeAggregating) -> None:
        self._node(event.node).status = "aggregating"

    def on_node_done(self, event: NodeDone) -> None:
        self._node(event.node).status = "done"

    def on_node_failed(self, event: NodeFailed) -> None:
        node = self._node(event.node)
        node.status, node.detail = "failed", event.error

    def on_node_skipped(self, event: NodeSkipped) -> None:
        self._node(event.node).status = "skipped"

    def on_calls_queued(self, event: CallsQueued) -> None:
        self._model(event.model).queued += event.count

    def on_calls_resolved(self, event: CallsResolved) -> None:
        row = self._model(event.model)
        row.queued = max(0, row.queued - event.count)
        if event.source == "cache":
            self.cache_hits += event.count
        elif event.source == "store":
            self.replayed += event.count
        elif event.source == "shared":
            self.reused += event.count

    def on_batch_started(self, event: BatchStarted) -> None:
        row = self._model(event.model)
        row.queued, row.running = max(0, row.queued - event.size), row.running + event.size
        row.batches += 1

    def on_call_done(self, event: CallDone) -> None:
        row = self._model(event.model)
        row.running, row.done = max(0, row.running - 1), row.done + 1

    def on_batch_finished(self, event: BatchFinished) -> None:
        self._model(event.model).running = 0

    def on_model_loaded(self, event: ModelLoaded) -> None:
        row = self._model(event.model)
        row.loads, row.resident = row.loads + 1, True

    def on_model_unloaded(self, event: ModelUnloaded) -> None:
        self._model(event.model).resident = False

    def on_call_retried(self, event: CallRetried) -> None:
        self.retries += 1

    def on_feature_dropped(self, event: FeatureDropped) -> None:
        self.dropped.append(f"{event.model} without {event.feature}")

    def on_usage_updated(self, event: UsageUpdated) -> None:
        self.calls, self.requests, self.prompt_tokens = event.calls, event.requests, event.prompt_tokens
        self.completion_tokens, self.cost_usd = event.completion_tokens, event.cost_usd
        self.cache_misses = event.cache_misses

    def on_run_done(self, event: RunDone) -> None:
        self.status = event.status

    def _node(self, node_id: str) -> _Node:
        return self.nodes.setdefault(node_id, _Node(node_id, []))

    def _model(self, name: str) -> _ModelRow:
        return self.models.setdefault(name, _ModelRow())

    @property
    def elapsed(self) -> float:
        """Seconds since the view started."""
        return time.monotonic() - self.started

    def counters(self) -> str:
        """One line of totals."""
        cached = self.cache_hits + self.cache_misses
        extra = f" · cache {self.cache_hits} hit / {self.cache_misses} miss" if cached else ""
        extra += f" · replayed {self.replayed}" if self.replayed else ""
        extra += f" · reused {self.reused} from another point" if self.reused else ""
        extra += f" · retries {self.retries}" if self.retries else ""
        extra += "".join(f" · {dropped}" for dropped in self.dropped)
        return (f"calls {self.calls} · requests {self.requests} · tokens {self.prompt_tokens:,} in / "
                f"{self.completion_tokens:,} out · {usd_exact(self.cost_usd)}{extra} · {self.elapsed:.1f} s")


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ctrl-C ignored while the view closes (in the main thread, where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if before is not None:  # (None: a handler not set from Python, which it cannot put back)
            signal.signal(signal.SIGINT, before)


class LiveView(EventHandler[None]):
    """The rich terminal view: the plan as a tree, a per-model batch panel, counters."""

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.state = RunState()
        self._lock = threading.Lock()
        self._live = Live(console=console, refresh_per_second=8, transient=False,
                          get_renderable=self._render)

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with _interrupts_ignored():  # (a second Ctrl-C here left the refresh thread drawing for ever: chat)
            self._live.refresh()  # the final state; _render takes the lock itself
            self._live.stop()

    def listen(self, event: Event) -> None:
        """An event listener."""
        with self._lock:
            self.state.handle(event)
        self.handle(event)

    def on_run_done(self, event: RunDone) -> None:
        """A run that failed for a user's reason clears the view when it stops, so the one line
        saying what to fix is all that stays on the screen."""
        if event.user_error:
            self._live.transient = True

    def on_call_done(self, event: CallDone) -> None:
        """With ``verbose``, print each call's prompt and answer above the view."""
        if self.verbose:
            self._live.console.print(Panel(literal(_call_text(event)), border_style="dim",
                                           title=literal(f"{event.model} · {event.purpose}")))

    def _render(self) -> RenderableType:
        with self._lock:
            return Group(self._tree(), self._models(), literal(self.state.counters(), style="bold"))

    def _tree(self) -> RenderableType:
        state = self.state
        tree = Tree(literal(state.task or "planning…", style="bold"))
        if state.note:
            tree.add(literal(state.note, style="dim italic"))
        for node_id, node in state.nodes.items():
            icon, style = STATUS_STYLE.get(node.status, ("?", ""))
            label = Text.assemble((printable(f"{icon} {node_id}"), style), printable(f"  {node.instruction}"))
            if node.depends_on:
                label.append(f"  ← {', '.join(node.depends_on)}", style="dim")
            branch = tree.add(label)
            if node.experts:
                experts = ", ".join(node.experts)
                aggregator = f" · aggregator: {node.aggregator}" if node.aggregator else ""
                branch.add(literal(f"experts: {experts}{aggregator}", style="cyan"))
            if node.detail:
                branch.add(literal(node.detail, style="red"))
        return Panel(tree, title="plan", border_style="blue")

    def _models(self) -> RenderableType:
        table = Table(expand=False, box=None, pad_edge=False)
        for column in ("model", "queued", "running", "done", "batches", "loads"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for name, row in self.state.models.items():
            marker = " ●" if row.resident else ""
            table.add_row(name + marker, str(row.queued), str(row.running), str(row.done), str(row.batches),
                          str(row.loads))
        return Panel(table, title="batches per model", border_style="blue")


class LogView(EventHandler[str]):
    """Plain log lines, one per notable event, for logs and pipes.

    Lines are held back until the first call comes back answered: a run that cannot start (a
    refused key, an unreachable endpoint) prints nothing here, and the command's one error line
    is all the user reads. Each held line keeps the time of its event. A ``planning…`` line waits
    for the next line: a resumed run's planner answer, replayed from its record, asks no planner,
    and its plan line says so instead.
    """

    def __init__(self, stream: IO[str], *, verbose: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.verbose = verbose
        self.clock = clock
        self.started = clock()
        self._retries_shown: set[tuple[str, str]] = set()
        self._held: list[str] | None = []
        self._planning: dict[str, str] = {}  # per run, its "planning…" line, until the planner is asked
        self._plan_from: dict[str, str] = {}  # per run, where its plan request was answered from, if not the planner

    def listen(self, event: Event) -> None:
        """An event listener."""
        line = self.handle(event)
        if line:
            line = f"[{self.clock() - self.started:6.1f}s] {printable(line)}\n"
            if isinstance(event, PlanRequested) and event.attempt == 1:  # (a repair: the planner answered before)
                self._planning[event.run_id] = line
                return
            if self._planning:  # (the planner was asked: something else happened since)
                line = "".join(self._planning.values()) + line
                self._planning.clear()
            if self._held is not None:
                self._held.append(line)
            else:
                self.stream.write(line)
        self.stream.flush()

    def _release(self) -> None:
        """Write the held lines: a call came back answered, or the run ended."""
        if self._held is not None:
            held, self._held = self._held, None
            self.stream.write("".join(held))

    def on_run_started(self, event: RunStarted) -> str:
        return f"run {event.run_id}: {event.task}"

    def on_plan_requested(self, event: PlanRequested) -> str:
        self._plan_from.pop(event.run_id, None)
        return "planning…" if event.attempt == 1 else f"planning… (repair {event.attempt - 1})"

    def on_plan_ready(self, event: PlanReady) -> str:
        note = f" ({event.note})" if event.note else ""
        source = self._plan_from.pop(event.run_id, None)
        return (f"plan{f' ({source})' if source else ''}: {len(event.nodes)} node(s): "
                f"{', '.join(n['id'] for n in event.nodes)}{note}")

    def on_experts_recruited(self, event: ExpertsRecruited) -> str:
        aggregator = f"; aggregator {event.aggregator}" if event.aggregator else ""
        return f"{event.node}: experts {', '.join(event.experts)}{aggregator}"

    def on_batch_started(self, event: BatchStarted) -> str:
        return f"batch {event.batch}: {event.model} x{event.size} (wave {event.wave})"

    def on_model_loaded(self, event: ModelLoaded) -> str:
        return f"loaded {event.model} in {event.seconds:.2f} s"

    def on_model_unloaded(self, event: ModelUnloaded) -> str:
        return f"unloaded {event.model}"

    def on_call_retried(self, event: CallRetried) -> str | None:
        """Once per model and reason: a batch of calls fails alike."""
        if (event.model, event.reason) in self._retries_shown:
            return None
        self._retries_shown.add((event.model, event.reason))
        return f"retrying {event.model} (failed attempt {event.attempt}, next in {event.wait_s:.1f} s): {event.reason}"

    def on_feature_dropped(self, event: FeatureDropped) -> str:
        return f"{event.model}: going on without {event.feature}: {event.reason}"

    def on_skill_extraction_failed(self, event: SkillExtractionFailed) -> str:
        return f"{event.node}: warning: no skills found ({event.reason}); recruited without skills"

    def on_aggregation_fell_back(self, event: AggregationFellBack) -> str:
        return f"{event.node}: warning: {fell_back(event.aggregator, event.reason)}"

    def on_node_done(self, event: NodeDone) -> str:
        return f"{event.node}: done"

    def on_node_failed(self, event: NodeFailed) -> str:
        return f"{event.node}: FAILED: {event.error}"

    def on_node_skipped(self, event: NodeSkipped) -> str:
        return f"{event.node}: skipped ({event.reason})"

    def on_call_done(self, event: CallDone) -> str | None:
        if event.error is None:
            self._release()
        return f"{event.model} · {event.purpose}\n{_call_text(event)}" if self.verbose else None

    def on_calls_resolved(self, event: CallsResolved) -> None:
        if event.run_id in self._planning and event.source in _NOT_ASKED:  # (a run plans before it calls anything else)
            del self._planning[event.run_id]
            self._plan_from[event.run_id] = _NOT_ASKED[event.source]
        self._release()

    def on_run_done(self, event: RunDone) -> str | None:
        """A run that failed for a user's reason before any answer drops the held lines, its own too."""
        if self._held is not None and event.user_error:
            self._held = None
            return None
        self._release()
        return f"run {event.run_id} {event.status} in {event.elapsed_s:.1f} s"


#: where a call answered without its model was answered from (``CallsResolved.source``), as a plan line says it
_NOT_ASKED = {"store": "replayed from the run's record: the planner is not asked again",
              "cache": "the planner's answer from the response cache"}


def _call_text(event: CallDone) -> str:
    parts = [f"--- {m.role} ---\n{m.content}" for m in event.request.messages]
    parts.append(f"--- response ---\n{event.response}" if event.error is None else f"--- error ---\n{event.error}")
    return "\n".join(parts)


#: what a run whose answer stopped at its writer's token limit says beside it
ANSWER_CUT = ("the answer stopped at its token limit and may be incomplete: raise max_tokens for the agent that "
              "writes it (or the budget's --max-tokens, if that set the limit)")
#: ... and one that stopped where its writer's context window filled (before its max_tokens)
CONTEXT_FULL = ("the answer stopped where its writer's context window filled up, before its max_tokens, and may be "
                "incomplete: give the model's server a larger context (llama.cpp's n_ctx), or send it a shorter "
                "prompt (fewer experts, --k; shorter expert answers, max_tokens or max_response_chars)")


def print_result(console: Console, result: RunResult, *, rich_output: bool, errors: Console | None = None,
                 stored: bool = True) -> None:
    """The answer, exactly as the model wrote it, and one line with the reason when the run did not
    finish (on ``errors``, e.g. stderr, when given; ``stored``: whether the run was kept to resume)."""
    if result.answer:
        console.print(literal(result.answer), soft_wrap=not rich_output)
    if result.answer_cut:  # (it read as a whole answer: done, exit 0, and nothing said)
        said = CONTEXT_FULL if result.context_full else ANSWER_CUT
        (errors or console).print(literal(f"warning: {said}", style="yellow" if rich_output else ""), soft_wrap=True)
    if result.status != "done":
        (errors or console).print(literal(f"error: {run_error(result, stored=stored)}",
                                       style="red" if rich_output else ""),
                                  soft_wrap=True)


def summary_line(result: RunResult, *, earlier: dict[str, Any] | None = None) -> str:
    """``run ID · status · calls · requests · tokens · cost · time``; for a resumed run (``earlier``:
    what it had spent before, as ``RunStore.run_totals`` counts it), the run's totals in all, then
    what this resume sent (a resume's totals read as a fresh charge)."""
    spent = spent_text(result)
    if earlier is not None:
        usage = result.usage
        # (the two amounts to the same decimals: `$0.0001 in all; this resume sent ... ($0.0000586)`)
        whole, now = usd_alike(usage.cost_usd, usage.cost_usd - earlier["cost_usd"])
        spent = spent.removesuffix(usd_exact(usage.cost_usd)) + whole
        spent += f" in all; this resume sent {counted(usage.requests - earlier['requests'], 'request')} ({now})"
    return f"run {result.run_id} · {result.status} · {spent} · {result.elapsed_s:.1f} s"


def spent_text(result: RunResult) -> str:
    """``calls (failed) · answered from the cache · requests · tokens · cost`` of a run (the cache's
    part only where it answered any)."""
    usage = result.usage
    failed = f" ({usage.failed_calls} failed)" if usage.failed_calls else ""  # (a done run may have lost an expert)
    # (a run the cache answered whole read `0 calls · 0 requests · 0 tokens`, as if it had done nothing)
    cached = f" · {usage.cache_hits} answered from the cache" if usage.cache_hits else ""
    return (f"{counted(usage.calls, 'call')}{failed}{cached} · {counted(usage.requests, 'request')} · "
            f"{usage.prompt_tokens + usage.completion_tokens:,} tokens · {usd_exact(usage.cost_usd)}")
