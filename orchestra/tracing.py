"""Optional OpenTelemetry spans (the ``otel`` extra), off by default: one more event listener.

A run is a span; its nodes are child spans; batches are spans of their own, linked to the runs in
them by attribute. Nothing is exported unless the application (or ``--otel``) configures an exporter.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from orchestra.errors import MissingDependency
from orchestra.events import (
    BatchFinished,
    BatchStarted,
    CallRetried,
    Event,
    EventHandler,
    ExpertsRecruited,
    FeatureDropped,
    ModelLoaded,
    NodeDone,
    NodeFailed,
    NodeReady,
    NodeSkipped,
    PlanReady,
    RunDone,
    RunStarted,
    UsageUpdated,
)


def _trace_api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise MissingDependency("tracing needs the 'otel' extra: pip install 'skill-orchestra[otel]'") from None
    return trace


class SpanRecorder(EventHandler[None]):
    """Turns Orchestra's events into OpenTelemetry spans.

    Args:
        tracer: an OpenTelemetry tracer; the global one (``orchestra``) when None.
    """

    def __init__(self, tracer: Any = None) -> None:
        self.trace = _trace_api()
        self.tracer = tracer or self.trace.get_tracer("orchestra")
        self.runs: dict[str, Any] = {}
        self.nodes: dict[tuple[str, str], Any] = {}
        self.batches: dict[int, Any] = {}

    def listen(self, event: Event) -> None:
        """An event listener."""
        self.handle(event)

    def on_run_started(self, event: RunStarted) -> None:
        self.runs[event.run_id] = self.tracer.start_span(
            "orchestra.run", attributes={"orchestra.run_id": event.run_id, "orchestra.task": event.task[:500]})

    def on_plan_ready(self, event: PlanReady) -> None:
        if event.run_id in self.runs:
            self.runs[event.run_id].add_event("plan_ready", {"nodes": len(event.nodes), "attempts": event.attempts})

    def on_node_ready(self, event: NodeReady) -> None:
        if event.run_id in self.runs:
            context = self.trace.set_span_in_context(self.runs[event.run_id])
            self.nodes[(event.run_id, event.node)] = self.tracer.start_span(
                "orchestra.node", context=context, attributes={"orchestra.node": event.node})

    def on_experts_recruited(self, event: ExpertsRecruited) -> None:
        span = self.nodes.get((event.run_id, event.node))
        if span is not None:
            span.set_attribute("orchestra.experts", list(event.experts))
            span.set_attribute("orchestra.skills", list(event.skills))
            if event.aggregator:
                span.set_attribute("orchestra.aggregator", event.aggregator)

    def on_node_done(self, event: NodeDone) -> None:
        span = self.nodes.pop((event.run_id, event.node), None)
        if span is not None:
            span.end()

    def on_node_failed(self, event: NodeFailed) -> None:
        span = self.nodes.pop((event.run_id, event.node), None)
        if span is not None:
            span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, event.error))
            span.end()

    def on_node_skipped(self, event: NodeSkipped) -> None:
        if event.run_id in self.runs:
            self.runs[event.run_id].add_event("node_skipped", {"node": event.node, "reason": event.reason})

    def on_batch_started(self, event: BatchStarted) -> None:
        self.batches[event.batch] = self.tracer.start_span("orchestra.batch", attributes={
            "orchestra.model": event.model, "orchestra.size": event.size, "orchestra.wave": event.wave,
            "orchestra.runs": list(event.runs)})

    def on_batch_finished(self, event: BatchFinished) -> None:
        span = self.batches.pop(event.batch, None)
        if span is not None:
            span.set_attribute("orchestra.failed", event.failed)
            span.end()

    def on_engine_event(self, event: CallRetried | FeatureDropped | ModelLoaded) -> None:
        """Retries, dropped features and loads are events of every open run span."""
        attributes = {k: v for k, v in event.to_dict().items() if isinstance(v, (str, int, float))}
        for span in self.runs.values():
            span.add_event(event.kind, attributes)

    def on_usage_updated(self, event: UsageUpdated) -> None:
        span = self.runs.get(event.run_id)
        if span is not None:
            span.set_attribute("orchestra.calls", event.calls)
            span.set_attribute("orchestra.failed_calls", event.failed_calls)
            span.set_attribute("orchestra.requests", event.requests)
            span.set_attribute("orchestra.prompt_tokens", event.prompt_tokens)
            span.set_attribute("orchestra.completion_tokens", event.completion_tokens)
            span.set_attribute("orchestra.cost_usd", event.cost_usd)

    def on_run_done(self, event: RunDone) -> None:
        span = self.runs.pop(event.run_id, None)
        if span is not None:
            span.set_attribute("orchestra.status", event.status)
            if event.status != "done":
                span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, event.error or event.status))
            span.end()


def configure_exporter() -> None:
    """For ``--otel``: export over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else print spans to stderr.

    An application that already configured a tracer provider keeps it.
    """
    trace = _trace_api()
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise MissingDependency("--otel needs the 'otel' extra: pip install 'skill-orchestra[otel]'") from None
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider()
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise MissingDependency("OTLP export needs opentelemetry-exporter-otlp-proto-http") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
