"""Listeners handle events by type through one mechanism (``EventHandler``); each event type a
listener cares about has a visible effect, step by step, in the view, the log, the store and spans."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestra import events
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
)
from orchestra.models import ChatRequest
from orchestra.store import RunStore
from orchestra.tracing import SpanRecorder
from orchestra.view import LogView, RunState

R = "r1"
FELL_BACK = "aggregator x failed (HTTP 500); the experts' answers were put to a vote"
NODES = tuple({"id": n, "instruction": f"do {n}", "depends_on": d} for n, d in (("a", []), ("b", []), ("c", ["b"])))
#: One run that touches every event type, in a plausible order.
RUN: list[Event] = [
    RunStarted(run_id=R, task="the task"),
    PlanRequested(run_id=R, attempt=2),
    PlanReady(run_id=R, nodes=NODES, attempts=2, note="repaired"),
    NodeReady(run_id=R, node="a"),
    NodeReady(run_id=R, node="b"),
    ExpertsRecruited(run_id=R, node="a", experts=("x", "y"), aggregator="x", skills=("math",), explanation=("why",),
                     instruction="do a, rendered"),
    SkillExtractionFailed(run_id=R, node="b", reason="no keywords"),
    CallsQueued(model="m", count=5, run_id=R, purpose="expert"),
    CallsResolved(model="m", count=1, run_id=R, source="cache"),
    CallsResolved(model="m", count=1, run_id=R, source="store"),
    CallsResolved(model="k", count=2, run_id=R, source="shared"),
    ModelLoaded(model="m", seconds=1.5),
    BatchStarted(batch=1, model="m", size=3, wave=0, runs=(R,)),
    CallDone(run_id=R, model="m", purpose="expert", node="a", request=ChatRequest.user("q?"), response="42",
             error=None),
    CallRetried(model="m", attempt=1, wait_s=0.5, reason="503"),
    CallRetried(model="m", attempt=1, wait_s=0.5, reason="503"),
    FeatureDropped(model="m", feature="response_format:json_schema", reason="the server refused it (400)"),
    BatchFinished(batch=1, model="m", size=3, failed=1, seconds=0.1),
    ModelUnloaded(model="m"),
    NodeAggregating(run_id=R, node="a", strategy="vote"),
    AggregationFellBack(run_id=R, node="a", aggregator="x", reason="HTTP 500"),
    NodeDone(run_id=R, node="a", output="out", aggregator=None),
    NodeFailed(run_id=R, node="b", error="boom"),
    NodeSkipped(run_id=R, node="c", reason="dependency 'b' failed"),
    UsageUpdated(run_id=R, calls=3, requests=4, prompt_tokens=10, completion_tokens=5, cost_usd=0.01, cache_misses=2),
    RunDone(run_id=R, status="partial", answer="out", error="b: boom", elapsed_s=2.0),
]


def test_the_run_covers_every_event_type() -> None:
    declared = {c for c in vars(events).values() if isinstance(c, type) and issubclass(c, Event) and c is not Event}
    assert {type(e) for e in RUN} == declared


# --- the mechanism ------------------------------------------------------------------------------


class Recorder(EventHandler[str]):
    def on_node_end(self, event: NodeDone | NodeFailed) -> str:
        return f"end {event.node}"

    def on_run_started(self, event: RunStarted) -> str:
        return f"start {event.task}"


@pytest.mark.parametrize(("event", "handled"), [
    (RunStarted(run_id=R, task="t"), "start t"),
    (NodeDone(run_id=R, node="a", output="o"), "end a"),       # a union names several types
    (NodeFailed(run_id=R, node="b", error="e"), "end b"),
    (NodeSkipped(run_id=R, node="c", reason="r"), None),       # not handled: ignored
])
def test_a_handler_is_chosen_by_the_annotated_type(event: Event, handled: str | None) -> None:
    assert Recorder().handle(event) == handled


def test_handlers_are_inherited_and_overridden_by_type_or_by_name() -> None:
    class ByType(Recorder):
        def on_failure(self, event: NodeFailed) -> str:
            return "failure"

    class ByName(Recorder):
        def on_run_started(self, event: RunStarted) -> str:
            return "restarted"

    class Everything(EventHandler[str]):
        def on_any(self, event: Event) -> str:
            return event.kind

    failed, done = NodeFailed(run_id=R, node="b", error="e"), NodeDone(run_id=R, node="a", output="o")
    assert (ByType().handle(failed), ByType().handle(done)) == ("failure", "end a")
    assert ByName().handle(RunStarted(run_id=R, task="t")) == "restarted" and ByName().handle(done) == "end a"
    assert Everything().handle(done) == "node_done"  # an event's base types reach their handlers too


def test_a_handler_without_event_types_or_claiming_a_type_twice_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match="annotated with Event types"):
        class Untyped(EventHandler[None]):
            def on_thing(self, event) -> None:  # the mistake under test: no annotation
                pass
    with pytest.raises(TypeError, match="both handle NodeDone"):
        class Twice(EventHandler[None]):
            def on_done(self, event: NodeDone) -> None:
                pass

            def on_end(self, event: NodeDone | NodeFailed) -> None:
                pass


# --- the listeners ------------------------------------------------------------------------------


def _node(state: RunState, node: str) -> tuple[str, tuple[str, ...], str, str]:
    n = state.nodes[node]
    return n.status, n.experts, n.aggregator, n.detail


def _model(state: RunState) -> tuple[int, int, int, int, int, bool]:
    row = state.models["m"]
    return row.queued, row.running, row.done, row.batches, row.loads, row.resident


#: What the live view's state shows after each event of RUN.
STATE_AFTER: list[Callable[[RunState], Any]] = [
    lambda s: s.task == "the task",
    lambda s: s.note == "planning… (repair 1)",
    lambda s: (list(s.nodes), s.nodes["c"].depends_on, s.note) == (["a", "b", "c"], ["b"], "repaired"),
    lambda s: _node(s, "a")[0] == "recruiting",
    lambda s: _node(s, "b")[0] == "recruiting",
    lambda s: _node(s, "a") == ("running", ("x", "y"), "x", ""),
    lambda s: _node(s, "b")[3] == "warning: no skills found (no keywords); recruited without skills",
    lambda s: _model(s) == (5, 0, 0, 0, 0, False),
    lambda s: (_model(s)[0], s.cache_hits, s.replayed) == (4, 1, 0),
    lambda s: (_model(s)[0], s.cache_hits, s.replayed) == (3, 1, 1),
    lambda s: (s.cache_hits, s.replayed, s.reused) == (1, 1, 2) and " · reused 2 from another point · " in s.counters(),
    lambda s: _model(s) == (3, 0, 0, 0, 1, True),
    lambda s: _model(s) == (0, 3, 0, 1, 1, True),
    lambda s: _model(s) == (0, 2, 1, 1, 1, True),
    lambda s: s.retries == 1,
    lambda s: s.retries == 2,
    lambda s: s.dropped == ["m without response_format:json_schema"] and "· m without response_format" in s.counters(),
    lambda s: _model(s) == (0, 0, 1, 1, 1, True),
    lambda s: _model(s) == (0, 0, 1, 1, 1, False),
    lambda s: _node(s, "a")[0] == "aggregating",
    lambda s: _node(s, "a")[2:] == ("", f"warning: {FELL_BACK}"),
    lambda s: _node(s, "a")[0] == "done",
    lambda s: (_node(s, "b")[0], _node(s, "b")[3]) == ("failed", "boom"),
    lambda s: _node(s, "c")[0] == "skipped",
    lambda s: (s.calls, s.requests, s.prompt_tokens, s.completion_tokens, s.cost_usd, s.cache_misses)
    == (3, 4, 10, 5, 0.01, 2),
    lambda s: s.status == "partial",
]


def test_the_view_state_follows_every_event_type_step_by_step() -> None:
    state = RunState()
    assert len(STATE_AFTER) == len(RUN)
    for step, (event, check) in enumerate(zip(RUN, STATE_AFTER)):
        state.handle(event)
        assert check(state), f"after event {step}: {event.kind}"


def test_the_log_holds_lines_until_an_answer_then_writes_one_per_notable_event() -> None:
    stream = io.StringIO()
    log = LogView(stream, verbose=True, clock=lambda: 0.0)
    for event in RUN[:8]:
        log.listen(event)
    assert stream.getvalue() == ""  # nothing answered yet
    for event in RUN[8:]:
        log.listen(event)
    at = "[   0.0s] "
    assert stream.getvalue().splitlines() == [
        f"{at}run r1: the task",
        f"{at}planning… (repair 1)",
        f"{at}plan: 3 node(s): a, b, c (repaired)",
        f"{at}a: experts x, y; aggregator x",
        f"{at}b: warning: no skills found (no keywords); recruited without skills",
        f"{at}loaded m in 1.50 s",
        f"{at}batch 1: m x3 (wave 0)",
        f"{at}m · expert", "--- user ---", "q?", "--- response ---", "42",
        f"{at}retrying m (failed attempt 1, next in 0.5 s): 503",  # once per model and reason
        f"{at}m: going on without response_format:json_schema: the server refused it (400)",
        f"{at}unloaded m",
        f"{at}a: warning: {FELL_BACK}",
        f"{at}a: done",
        f"{at}b: FAILED: boom",
        f"{at}c: skipped (dependency 'b' failed)",
        f"{at}run r1 partial in 2.0 s",
    ]


@pytest.mark.parametrize("answered", [False, True])
def test_a_run_that_fails_for_a_user_reason_before_any_answer_leaves_no_log_lines(answered: bool) -> None:
    stream = io.StringIO()
    log = LogView(stream, clock=lambda: 0.0)
    log.listen(RunStarted(run_id=R, task="t"))
    if answered:
        log.listen(CallsResolved(model="m", count=1, run_id=R, source="store"))
    log.listen(RunDone(run_id=R, status="failed", answer=None, error="bad key", elapsed_s=0.1, user_error=True))
    expected = ["[   0.0s] run r1: t", "[   0.0s] run r1 failed in 0.1 s"] if answered else []
    assert stream.getvalue().splitlines() == expected


def test_a_plans_repair_is_logged_at_once_after_its_first_request() -> None:
    """The repair's `planning…` line took the place of the first one, held back, and waited for the plan:
    a slow planner's repair showed nothing for minutes (a review)."""
    stream = io.StringIO()
    log = LogView(stream, clock=lambda: 0.0)
    log.listen(RunStarted(run_id=R, task="t"))
    log.listen(CallsResolved(model="m", count=1, run_id=R, source="model"))  # (the log's lines are out)
    log.listen(PlanRequested(run_id=R, attempt=1))
    log.listen(PlanRequested(run_id=R, attempt=2))
    assert stream.getvalue().splitlines()[-2:] == ["[   0.0s] planning…", "[   0.0s] planning… (repair 1)"]


def test_the_store_keeps_node_rows_and_the_event_log_from_every_node_event(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    store.begin_run(R, "the task", {})
    statuses = []
    for event in RUN:
        store.listen(event)
        statuses.append({row["node_id"]: row["status"] for row in store.nodes(R)}.get("a"))
    assert statuses == [None, None, "pending", "recruiting", "recruiting", "running", *["running"] * 13,
                        "aggregating", "aggregating", "done", "done", "done", "done", "done"]
    nodes = {row["node_id"]: row for row in store.nodes(R)}
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    assert (a["output"], a["experts"], a["aggregator"], a["skills"], a["explanation"], a["instruction"]) == (
        "out", ["x", "y"], None, ["math"], ["why", FELL_BACK], "do a, rendered")
    assert (b["status"], b["error"], c["status"], c["error"], c["depends_on"]) == (
        "failed", "boom", "skipped", "dependency 'b' failed", ["b"])
    quiet = {"usage_updated", "calls_queued", "call_done"}  # calls live in their own table
    logged = [e for e in RUN if e.kind not in quiet and getattr(e, "run_id", None) == R]
    assert list(store.events(R)) == [json.loads(json.dumps(e.to_dict(), default=str)) for e in logged]
    for event in RUN:  # every field, kind first
        assert list(event.to_dict().items()) == [("kind", event.kind), *(
            (f.name, getattr(event, f.name)) for f in dataclasses.fields(event))]
    store.close()


def test_spans_follow_every_traced_event_type() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = SpanRecorder(provider.get_tracer("test"))
    for event in RUN:
        recorder.listen(event)
    spans = {(s.name, s.attributes.get("orchestra.node")): s for s in exporter.get_finished_spans()}
    run, a, b = spans[("orchestra.run", None)], spans[("orchestra.node", "a")], spans[("orchestra.node", "b")]
    batch = spans[("orchestra.batch", None)]
    assert [e.name for e in run.events] == ["plan_ready", "model_loaded", "call_retried", "call_retried",
                                            "feature_dropped", "node_skipped"]
    assert (run.attributes["orchestra.status"], run.status.status_code.name, run.status.description) == (
        "partial", "ERROR", "b: boom")
    assert (run.attributes["orchestra.calls"], run.attributes["orchestra.cost_usd"]) == (3, 0.01)
    assert (a.parent.span_id, a.attributes["orchestra.experts"], a.attributes["orchestra.aggregator"]) == (
        run.context.span_id, ("x", "y"), "x")
    assert a.status.status_code.name == "UNSET"
    assert (b.status.status_code.name, b.status.description) == ("ERROR", "boom")
    assert (batch.attributes["orchestra.size"], batch.attributes["orchestra.failed"]) == (3, 1)
    assert not recorder.runs and not recorder.nodes and not recorder.batches  # every span ended


def test_events_no_listener_wants_are_not_made_and_a_listener_gets_only_what_it_wants(tmp_path: Path) -> None:
    from orchestra import Agent, Orchestra, Pool
    from orchestra.models import FunctionModel

    model = FunctionModel(lambda request: "The answer is 1", name="m")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)], planner=model), store=tmp_path / "runs.db")
    assert not orc.events.wants(CallDone) and not orc.events.wants(UsageUpdated) and orc.events.wants(NodeDone)
    seen: list[str] = []
    remove = orc.events.subscribe(lambda event: seen.append(event.kind), ignore=[UsageUpdated])
    assert orc.events.wants(CallDone) and not orc.events.wants(UsageUpdated)
    result = orc.run("What is 1 + 1?", k=1, plan=False)
    assert "call_done" in seen and "calls_queued" in seen and "usage_updated" not in seen
    assert not {"call_done", "calls_queued"} & {e["kind"] for e in orc.store.events(result.run_id)}  # the store's own
    remove()
    assert not orc.events.wants(CallDone) and orc.events.listeners == [orc.store.listen]
    orc.events.emit(CallDone(run_id=result.run_id, model="m", purpose="expert", node="answer",
                             request=ChatRequest.user("q?"), response="42", error=None))
    assert "call_done" not in {e["kind"] for e in orc.store.events(result.run_id)}
