"""OpenTelemetry spans: off by default, one span per run, node and batch when switched on."""

from __future__ import annotations

from helpers import kind_of, plan_json, scripted_pool
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestra import Orchestra
from orchestra.errors import BadResponse
from orchestra.models import ChatRequest


def tracer_and_exporter() -> tuple[object, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_spans_for_run_nodes_and_batches() -> None:
    tracer, exporter = tracer_and_exporter()
    pool, _ = scripted_pool(plan=plan_json(("a", []), ("b", ["a"])))
    result = Orchestra(pool, k=2, tracing=tracer).run("traced task")
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("orchestra.run") == 1 and names.count("orchestra.node") == 2
    assert names.count("orchestra.batch") == len(result.batches)
    run = next(s for s in spans if s.name == "orchestra.run")
    nodes = [s for s in spans if s.name == "orchestra.node"]
    assert all(n.parent.span_id == run.context.span_id for n in nodes)
    assert run.attributes["orchestra.status"] == "done" and run.attributes["orchestra.calls"] == result.usage.calls
    assert {n.attributes["orchestra.node"] for n in nodes} == {"a", "b"}
    assert all(len(n.attributes["orchestra.experts"]) == 2 for n in nodes)


def test_failed_node_span_has_error_status() -> None:
    tracer, exporter = tracer_and_exporter()

    def expert(name: str, request: ChatRequest) -> object:
        return BadResponse("boom") if kind_of(request) == "expert" else "ok"

    pool, _ = scripted_pool(plan=plan_json(("a", [])), expert=expert)
    result = Orchestra(pool, k=1, tracing=tracer).run("failing task")
    spans = exporter.get_finished_spans()
    node = next(s for s in spans if s.name == "orchestra.node")
    assert node.status.status_code.name == "ERROR" and "boom" in node.status.description
    run = next(s for s in spans if s.name == "orchestra.run")  # (it had calls alone: no requests, no failed ones)
    assert result.usage.failed_calls == 1
    assert (run.attributes["orchestra.calls"], run.attributes["orchestra.failed_calls"],
            run.attributes["orchestra.requests"]) == (result.usage.calls, 1, result.usage.requests)


def test_tracing_is_off_by_default() -> None:
    pool, _ = scripted_pool()
    orc = Orchestra(pool)
    assert not any(type(getattr(listener, "__self__", None)).__name__ == "SpanRecorder"
                   for listener in orc.events.listeners)
