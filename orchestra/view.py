"""What the terminal shows: a rich live view in a terminal, plain log lines elsewhere.

Both are event listeners; nothing in the pipeline prints.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from orchestra.events import (
    BatchFinished,
    BatchStarted,
    CallDone,
    CallRetried,
    CallsQueued,
    CallsResolved,
    Event,
    ExpertsRecruited,
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
)
from orchestra.result import RunResult

def terminal(**options: object) -> Console:
    """A console that prints every string literally: model output may contain ``[/INST]``,
    ``[bold]`` or ``:emoji:`` codes, and none of it is Rich markup."""
    return Console(markup=False, emoji=False, highlight=False, **options)  # type: ignore[arg-type]


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
class RunState:
    """Everything the views show, kept current from events."""

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
    retries: int = 0
    status: str = "running"
    note: str = ""
    started: float = field(default_factory=time.monotonic)

    def apply(self, event: Event) -> None:
        """Update the state from one event."""
        if isinstance(event, RunStarted):
            self.task = event.task
        elif isinstance(event, PlanRequested):
            self.note = "planning…" if event.attempt == 1 else f"planning… (repair {event.attempt - 1})"
        elif isinstance(event, PlanReady):
            self.nodes = {n["id"]: _Node(n["instruction"], list(n["depends_on"])) for n in event.nodes}
            self.note = event.note
        elif isinstance(event, NodeReady):
            self._node(event.node).status = "recruiting"
        elif isinstance(event, ExpertsRecruited):
            node = self._node(event.node)
            node.status, node.experts, node.aggregator = "running", event.experts, event.aggregator
        elif isinstance(event, SkillExtractionFailed):
            self._node(event.node).detail = f"warning: no skills found ({event.reason}); recruited without skills"
        elif isinstance(event, NodeAggregating):
            self._node(event.node).status = "aggregating"
        elif isinstance(event, NodeDone):
            self._node(event.node).status = "done"
        elif isinstance(event, NodeFailed):
            node = self._node(event.node)
            node.status, node.detail = "failed", event.error
        elif isinstance(event, NodeSkipped):
            self._node(event.node).status = "skipped"
        elif isinstance(event, CallsQueued):
            self._model(event.model).queued += event.count
        elif isinstance(event, CallsResolved):
            row = self._model(event.model)
            row.queued = max(0, row.queued - event.count)
            if event.source == "cache":
                self.cache_hits += event.count
            elif event.source == "store":
                self.replayed += event.count
        elif isinstance(event, BatchStarted):
            row = self._model(event.model)
            row.queued, row.running, row.batches = max(0, row.queued - event.size), row.running + event.size, row.batches + 1
        elif isinstance(event, CallDone):
            row = self._model(event.model)
            row.running, row.done = max(0, row.running - 1), row.done + 1
        elif isinstance(event, BatchFinished):
            self._model(event.model).running = 0
        elif isinstance(event, ModelLoaded):
            row = self._model(event.model)
            row.loads, row.resident = row.loads + 1, True
        elif isinstance(event, ModelUnloaded):
            self._model(event.model).resident = False
        elif isinstance(event, CallRetried):
            self.retries += 1
        elif isinstance(event, UsageUpdated):
            self.calls, self.requests, self.prompt_tokens = event.calls, event.requests, event.prompt_tokens
            self.completion_tokens, self.cost_usd = event.completion_tokens, event.cost_usd
            self.cache_misses = event.cache_misses
        elif isinstance(event, RunDone):
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
        extra += f" · retries {self.retries}" if self.retries else ""
        return (f"calls {self.calls} · requests {self.requests} · tokens {self.prompt_tokens:,} in / {self.completion_tokens:,} out · "
                f"${self.cost_usd:.4f}{extra} · {self.elapsed:.1f} s")


class LiveView:
    """The rich terminal view: the plan as a tree, a per-model batch panel, counters."""

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.state = RunState()
        self._lock = threading.Lock()
        self._live = Live(console=console, refresh_per_second=8, transient=False,
                          get_renderable=self._render)  # type: ignore[call-arg]

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.refresh()  # the final state; _render takes the lock itself
        self._live.stop()

    def listen(self, event: Event) -> None:
        """An event listener. A run that failed for a user's reason clears the view when it stops,
        so the one line saying what to fix is all that stays on the screen."""
        with self._lock:
            self.state.apply(event)
        if isinstance(event, RunDone) and event.user_error:
            self._live.transient = True
        if self.verbose and isinstance(event, CallDone):
            self._live.console.print(Panel(Text(_call_text(event)), title=Text(f"{event.model} · {event.purpose}"),
                                           border_style="dim"))

    def _render(self) -> RenderableType:
        with self._lock:
            return Group(self._tree(), self._models(), Text(self.state.counters(), style="bold"))

    def _tree(self) -> RenderableType:
        state = self.state
        tree = Tree(Text(state.task or "planning…", style="bold"))
        if state.note:
            tree.add(Text(state.note, style="dim italic"))
        for node_id, node in state.nodes.items():
            icon, style = STATUS_STYLE.get(node.status, ("?", ""))
            label = Text.assemble((f"{icon} {node_id}", style), f"  {node.instruction}")
            if node.depends_on:
                label.append(f"  ← {', '.join(node.depends_on)}", style="dim")
            branch = tree.add(label)
            if node.experts:
                experts = ", ".join(node.experts)
                branch.add(Text(f"experts: {experts}" + (f" · aggregator: {node.aggregator}" if node.aggregator else ""),
                                style="cyan"))
            if node.detail:
                branch.add(Text(node.detail, style="red"))
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


class LogView:
    """Plain log lines, one per notable event, for logs and pipes.

    Lines are held back until the first call comes back answered: a run that cannot start (a
    refused key, an unreachable endpoint) prints nothing here, and the command's one error line
    is all the user reads. Each held line keeps the time of its event.
    """

    def __init__(self, stream: IO[str], *, verbose: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.verbose = verbose
        self.clock = clock
        self.started = clock()
        self._retries_shown: set[tuple[str, str]] = set()
        self._held: list[str] | None = []

    def listen(self, event: Event) -> None:
        """An event listener."""
        line = self._line(event)
        if line:
            line = f"[{self.clock() - self.started:6.1f}s] {line}\n"
            if self._held is not None:
                self._held.append(line)
            else:
                self.stream.write(line)
        answered = (isinstance(event, CallDone) and event.error is None) or isinstance(event, CallsResolved)
        if self._held is not None and (answered or isinstance(event, RunDone)):
            held, self._held = self._held, None
            if not (isinstance(event, RunDone) and event.user_error):
                self.stream.write("".join(held))
        self.stream.flush()

    def _line(self, event: Event) -> str | None:
        if isinstance(event, RunStarted):
            return f"run {event.run_id}: {event.task}"
        if isinstance(event, PlanRequested):
            return "planning…" if event.attempt == 1 else f"planning… (repair {event.attempt - 1})"
        if isinstance(event, PlanReady):
            note = f" ({event.note})" if event.note else ""
            return f"plan: {len(event.nodes)} node(s): {', '.join(n['id'] for n in event.nodes)}{note}"
        if isinstance(event, ExpertsRecruited):
            aggregator = f"; aggregator {event.aggregator}" if event.aggregator else ""
            return f"{event.node}: experts {', '.join(event.experts)}{aggregator}"
        if isinstance(event, BatchStarted):
            return f"batch {event.batch}: {event.model} x{event.size} (wave {event.wave})"
        if isinstance(event, ModelLoaded):
            return f"loaded {event.model} in {event.seconds:.2f} s"
        if isinstance(event, ModelUnloaded):
            return f"unloaded {event.model}"
        if isinstance(event, CallRetried):  # once per model and reason: a batch of calls fails alike
            if (event.model, event.reason) in self._retries_shown:
                return None
            self._retries_shown.add((event.model, event.reason))
            return f"retrying {event.model} (failed attempt {event.attempt}, next in {event.wait_s:.1f} s): {event.reason}"
        if isinstance(event, SkillExtractionFailed):
            return f"{event.node}: warning: no skills found ({event.reason}); recruited without skills"
        if isinstance(event, NodeDone):
            return f"{event.node}: done"
        if isinstance(event, NodeFailed):
            return f"{event.node}: FAILED: {event.error}"
        if isinstance(event, NodeSkipped):
            return f"{event.node}: skipped ({event.reason})"
        if isinstance(event, RunDone):
            return f"run {event.run_id} {event.status} in {event.elapsed_s:.1f} s"
        if isinstance(event, CallDone) and self.verbose:
            return f"{event.model} · {event.purpose}\n{_call_text(event)}"
        return None


def _call_text(event: CallDone) -> str:
    parts = [f"--- {m.role} ---\n{m.content}" for m in event.request.messages]
    parts.append(f"--- response ---\n{event.response}" if event.error is None else f"--- error ---\n{event.error}")
    return "\n".join(parts)


def print_result(console: Console, result: RunResult, *, rich_output: bool, errors: Console | None = None) -> None:
    """The answer, exactly as the model wrote it, and one line with the reason when the run did not
    finish (on ``errors``, e.g. stderr, when given)."""
    if result.answer:
        console.print(Text(result.answer), soft_wrap=not rich_output)
    if result.status != "done":
        (errors or console).print(Text(f"error: run {result.run_id} {result.status}: {result.error or ''}".rstrip(),
                                       style="red" if rich_output else ""), soft_wrap=True)


def summary_line(result: RunResult) -> str:
    """``run ID · status · calls · requests · tokens · cost · time``."""
    usage = result.usage
    return (f"run {result.run_id} · {result.status} · {usage.calls} calls · {usage.requests} requests · "
            f"{usage.prompt_tokens + usage.completion_tokens:,} tokens · ${usage.cost_usd:.4f} · "
            f"{result.elapsed_s:.1f} s")
