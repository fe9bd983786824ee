"""Typed events: every stage reports through them; the live view, the store and tracing listen."""

from __future__ import annotations

import dataclasses
import inspect
import operator
import time
import types
import typing
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from orchestra.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events. ``kind`` names the event in logs and the store."""

    kind: ClassVar[str] = "event"
    at: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, with ``kind`` first. Shallow (an event's values are JSON-ready already,
        and are never changed): this runs for every event the store keeps."""
        names, values = _reader(type(self))
        return dict(zip(names, values(self)))


#: per event type: ``kind`` and its field names, and a function reading their values in one call
_READERS: dict[type[Event], tuple[tuple[str, ...], Callable[[Event], tuple[Any, ...]]]] = {}


def _reader(kind: type[Event]) -> tuple[tuple[str, ...], Callable[[Event], tuple[Any, ...]]]:
    reader = _READERS.get(kind)
    if reader is None:
        names = ("kind", *(f.name for f in dataclasses.fields(kind)))  # two at least: kind and at
        reader = _READERS[kind] = (names, operator.attrgetter(*names))
    return reader


@dataclass(frozen=True, slots=True)
class RunStarted(Event):
    """A run began."""

    kind: ClassVar[str] = "run_started"
    run_id: str
    task: str


@dataclass(frozen=True, slots=True)
class PlanRequested(Event):
    """The planner was asked for a plan (attempt 1), or for a repaired one (2 and later)."""

    kind: ClassVar[str] = "plan_requested"
    run_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class PlanReady(Event):
    """The plan was made (or given) and validated."""

    kind: ClassVar[str] = "plan_ready"
    run_id: str
    nodes: tuple[dict[str, Any], ...]
    attempts: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class NodeReady(Event):
    """Every dependency of a node is done."""

    kind: ClassVar[str] = "node_ready"
    run_id: str
    node: str


@dataclass(frozen=True, slots=True)
class ExpertsRecruited(Event):
    """A node's experts (and aggregator) were chosen."""

    kind: ClassVar[str] = "experts_recruited"
    run_id: str
    node: str
    experts: tuple[str, ...]
    aggregator: str
    skills: tuple[str, ...]
    explanation: tuple[str, ...]
    instruction: str = ""
    """The node's instruction as its experts get it (a workflow step's prompt, rendered)."""


@dataclass(frozen=True, slots=True)
class SkillExtractionFailed(Event):
    """A node's keyword calls, or its own skills, named none of the pool's skills; it is recruited without
    skills (a warning)."""

    kind: ClassVar[str] = "skill_extraction_failed"
    run_id: str
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class AggregationFellBack(Event):
    """A node's aggregator failed; its experts' answers were put to a vote instead (a warning)."""

    kind: ClassVar[str] = "aggregation_fell_back"
    run_id: str
    node: str
    aggregator: str
    reason: str


#: how a node's explanation ends when its aggregator failed (see ``fell_back``)
VOTED_INSTEAD = "the experts' answers were put to a vote"


#: what a run whose final synthesis failed says of its answer (the sinks' outputs, one after another)
UNSYNTHESIZED = "the answer is the last steps' outputs one after another, not synthesized"


def awaitable_call(function: object) -> bool:
    """Whether calling ``function`` makes a coroutine: an ``async def`` function, a partial of one, or
    an object whose ``__call__`` is one (called as a listener, it would never be awaited)."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(type(function).__call__)


def fell_back(aggregator: str, reason: str) -> str:
    """What a node whose aggregator failed says of it (its explanation, the views, ``show``)."""
    return f"aggregator {aggregator} failed ({reason}); {VOTED_INSTEAD}"


@dataclass(frozen=True, slots=True)
class NodeAggregating(Event):
    """A node's expert outputs are being combined."""

    kind: ClassVar[str] = "node_aggregating"
    run_id: str
    node: str
    strategy: str


@dataclass(frozen=True, slots=True)
class NodeDone(Event):
    """A node produced its output."""

    kind: ClassVar[str] = "node_done"
    run_id: str
    node: str
    output: str
    aggregator: str | None = None
    """The agent that aggregated the node's answers (None: none was asked, one answer stood)."""


@dataclass(frozen=True, slots=True)
class NodeFailed(Event):
    """A node failed; its dependents will be skipped."""

    kind: ClassVar[str] = "node_failed"
    run_id: str
    node: str
    error: str


@dataclass(frozen=True, slots=True)
class NodeSkipped(Event):
    """A node did not run because a dependency failed."""

    kind: ClassVar[str] = "node_skipped"
    run_id: str
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallsQueued(Event):
    """Calls joined a model's queue."""

    kind: ClassVar[str] = "calls_queued"
    model: str
    count: int
    run_id: str
    purpose: str


@dataclass(frozen=True, slots=True)
class CallsResolved(Event):
    """Calls settled without reaching the model: from the cache, from the store on resume, from
    another point of a sweep (which made the same request), or refused because the run's budget is spent."""

    kind: ClassVar[str] = "calls_resolved"
    model: str
    count: int
    run_id: str
    source: str  # "cache", "store", "shared" or "budget"


@dataclass(frozen=True, slots=True)
class CallDone(Event):
    """One call came back from its model (what ``--verbose`` shows)."""

    kind: ClassVar[str] = "call_done"
    run_id: str
    model: str
    purpose: str
    node: str | None
    request: Any  # the ChatRequest that was sent
    response: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ModelLoaded(Event):
    """A heavy model was loaded."""

    kind: ClassVar[str] = "model_loaded"
    model: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ModelUnloaded(Event):
    """A heavy model was unloaded to make room."""

    kind: ClassVar[str] = "model_unloaded"
    model: str


@dataclass(frozen=True, slots=True)
class BatchStarted(Event):
    """One batch went to one model."""

    kind: ClassVar[str] = "batch_started"
    batch: int
    model: str
    size: int
    wave: int
    runs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BatchFinished(Event):
    """A batch came back."""

    kind: ClassVar[str] = "batch_finished"
    batch: int
    model: str
    size: int
    failed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CallRetried(Event):
    """The model layer is retrying a call."""

    kind: ClassVar[str] = "call_retried"
    model: str
    attempt: int
    wait_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class FeatureDropped(Event):
    """A server refused an optional request feature; its requests go on without it."""

    kind: ClassVar[str] = "feature_dropped"
    model: str
    feature: str
    reason: str


@dataclass(frozen=True, slots=True)
class UsageUpdated(Event):
    """A run's running totals changed."""

    kind: ClassVar[str] = "usage_updated"
    run_id: str
    calls: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cache_misses: int = 0
    failed_calls: int = 0


@dataclass(frozen=True, slots=True)
class RunDone(Event):
    """A run ended (done, partial, failed, budget_exceeded or cancelled)."""

    kind: ClassVar[str] = "run_done"
    run_id: str
    status: str
    answer: str | None
    error: str | None
    elapsed_s: float
    user_error: bool = False  # it failed for a reason the user must fix (a key, a URL): exit code 2


Listener = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events to listeners; a failing listener never breaks a run."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.listener_errors: list[str] = []
        self._ignored: list[frozenset[type[Event]]] = []  # per listener, the event types it does not want
        self._wanted: dict[type[Event], bool] = {}  # wants(), per type, until the listeners change

    def subscribe(self, listener: Listener, *, ignore: Collection[type[Event]] = ()) -> Callable[[], None]:
        """Add a listener; the returned function removes it. ``ignore``: event types it has no use
        for (when no listener wants a type, the hot paths that make it need not). An ``async def``
        listener is refused: it would be called, never awaited."""
        if not callable(listener):  # (a string's `'str' object is not callable` was counted for every event)
            raise ConfigError(f"an event listener must be a plain function, not {type(listener).__name__} "
                              f"{listener!r:.40}")
        if awaitable_call(listener):
            raise ConfigError("an event listener must be a plain function, not an async one: it is called, not "
                              "awaited; hand what it gets to your own task (an asyncio.Queue)")
        self.listeners.append(listener)
        self._ignored.append(frozenset(ignore))
        self._wanted = {}

        def remove() -> None:
            if listener in self.listeners:
                del self._ignored[self.listeners.index(listener)]
                self.listeners.remove(listener)
                self._wanted = {}

        return remove

    def wants(self, kind: type[Event]) -> bool:
        """Whether some listener wants events of this type (the store, say, has no use for each call's)."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            wanted = self._wanted[kind] = any(kind not in ignored for ignored in self._ignored)
        return wanted

    def emit(self, event: Event) -> None:
        """Give ``event`` to every listener that does not ignore its type."""
        kind = type(event)
        for listener, ignored in list(zip(self.listeners, self._ignored)):
            if kind in ignored:
                continue
            try:
                listener(event)
            except Exception as error:
                problem = f"{getattr(listener, '__qualname__', type(listener).__name__)}: {error}"
                if not self.listener_errors:
                    warnings.warn(f"an event listener failed ({problem}); the run goes on, later failures are "
                                  "collected in EventBus.listener_errors", RuntimeWarning, stacklevel=2)
                self.listener_errors.append(problem)


R = TypeVar("R")


class EventHandler(Generic[R]):
    """Base of listeners that handle events by type, each type in its own method.

    A method named ``on_*`` handles the event types its event parameter is annotated with (a
    union names several; an event's subclasses go to it too) and may return an ``R``. ``handle``
    calls the method for an event's type; events no method handles are ignored. Handlers are
    inherited; a subclass overrides one by name, or by handling the same type.
    """

    handlers: ClassVar[dict[type[Event], Callable[[Any, Any], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = {}
        for klass in reversed(cls.__mro__):  # bases first, so a subclass's handler wins
            claimed: dict[type[Event], str] = {}
            for name, method in vars(klass).items():
                if not name.startswith("on_") or not inspect.isfunction(method) or getattr(cls, name) is not method:
                    continue
                for kind in _handled_types(klass, name, method):
                    if kind in claimed:
                        raise TypeError(f"{klass.__name__}.{name} and .{claimed[kind]} both handle {kind.__name__}")
                    claimed[kind] = name
                    cls.handlers[kind] = method

    def handle(self, event: Event) -> R | None:
        """Give ``event`` to the method for its type; None when no method handles it."""
        for kind in type(event).__mro__:
            handler = self.handlers.get(kind)
            if handler is not None:
                return handler(self, event)
        return None


def _handled_types(klass: type, name: str, method: Callable[..., Any]) -> tuple[type[Event], ...]:
    """The event types an ``on_*`` method's event parameter is annotated with."""
    parameters = list(inspect.signature(method).parameters)[1:]
    hint = typing.get_type_hints(method).get(parameters[0]) if len(parameters) == 1 else None
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    kinds = typing.get_args(hint) if union else (hint,)
    if not all(isinstance(kind, type) and issubclass(kind, Event) for kind in kinds):
        raise TypeError(f"{klass.__name__}.{name} must take one event parameter annotated with Event types")
    return kinds
