"""OpenTelemetry tracing across gRPC and Kafka hops, so one trace follows a request.

Every produced record carries W3C `traceparent` in its headers (and the envelope
keeps the request's original one as a fallback for foreign producers). Each
consumed record opens a CONSUMER span that continues that context, so the
gateway's RPC span, redaction, prompts, inference, metering and audit all hang
off one trace. Span attributes are ids, model names, token counts and cost,
never content: attributes are exported to systems outside the privacy boundary.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from sluice.v1 import events_pb2

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from sluice.config import Settings
    from sluice.kafka import Output

TRACER_NAME = "sluice"
FINISH_NAMES = {
    events_pb2.FINISH_REASON_STOP: "stop",
    events_pb2.FINISH_REASON_LENGTH: "length",
    events_pb2.FINISH_REASON_ERROR: "error",
    events_pb2.FINISH_REASON_CANCELLED: "cancelled",
    events_pb2.FINISH_REASON_EXPIRED: "expired",
}


_enabled = False  # with tracing off, the per-record hooks cost nothing (hot consumer loops)


def configure(service: str, settings: Settings) -> None:
    """Install the process's tracer provider from settings (`none` keeps tracing off)."""
    global _enabled
    exporter = _exporter(service, settings)
    if exporter is None:
        return
    _enabled = True
    provider = TracerProvider(resource=Resource.create({"service.name": f"sluice-{service}"}))
    if settings.traces_exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:  # console and file: written as spans end, so a test or a tail -f sees them at once
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _exporter(service: str, settings: Settings) -> SpanExporter | None:
    kind = settings.traces_exporter
    if kind == "none":
        return None
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint, insecure = settings.traces_otlp_endpoint, settings.traces_otlp_insecure
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    out: TextIO = sys.stderr
    if kind == "file":
        path = traces_file(settings.state_dir, service)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path.open("a", buffering=1)  # lives as long as the process
    return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")


def traces_file(state_dir: Path, service: str) -> Path:
    """Where the `file` exporter writes one JSON span per line."""
    return state_dir / "traces" / f"{service}.jsonl"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def server_interceptors() -> list[Any]:
    """gRPC server interceptors that open a SERVER span per call (a no-op when tracing is off)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def current_traceparent() -> str | None:
    """The current span's W3C traceparent, for an envelope that starts a request."""
    if not _enabled:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def with_trace_headers(output: Output) -> Output:
    """`output` with the current context's traceparent (and tracestate) in its headers."""
    if not _enabled:
        return output
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return output
    kept = tuple((k, v) for k, v in output.headers if k not in carrier)
    return replace(output, headers=kept + tuple((k, v.encode()) for k, v in carrier.items()))


def _record_context(record: ConsumerRecord[bytes, bytes], event: Message | None) -> otel_context.Context:
    carrier = {
        name: bytes(value).decode(errors="replace")
        for name, value in record.headers or ()
        if name in ("traceparent", "tracestate")
    }
    if "traceparent" not in carrier:
        envelope = getattr(event, "envelope", None)
        if envelope is not None and envelope.traceparent:
            carrier["traceparent"] = envelope.traceparent
    return propagate.extract(carrier)


@contextmanager
def consume_span(service: str, record: ConsumerRecord[bytes, bytes], event: Message | None) -> Iterator[Span]:
    """A CONSUMER span for one record, continuing the trace its producer started."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": record.topic,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "sluice.service": service,
    }
    envelope = getattr(event, "envelope", None)
    if envelope is not None:
        attributes["sluice.request_id"] = envelope.request_id
        attributes["sluice.attempt"] = envelope.attempt
        attributes["sluice.tenant"] = envelope.tenant
    if event is not None:
        attributes.update(event_attributes(event))
    with tracer().start_as_current_span(
        f"process {record.topic}",
        context=_record_context(record, event),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def traced_outputs(outputs: Sequence[Output], outcome: str) -> list[Output]:
    """Close out the current hop: note what it produced (usage, cost) and pass its context on."""
    if not _enabled:
        return list(outputs)
    span = trace.get_current_span()
    span.set_attribute("sluice.outcome", outcome)
    if outcome != "ok":
        span.set_status(Status(StatusCode.ERROR, outcome))
    for output in outputs:
        for key, value in event_attributes(output.event).items():
            span.set_attribute(key, value)
    return [with_trace_headers(output) for output in outputs]


def event_attributes(event: Message) -> dict[str, Any]:
    """GenAI semantic-convention and cost attributes of an event; never its text."""
    if isinstance(event, events_pb2.PromptAssembled):
        params = event.params
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": event.model,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.usage.input_tokens": event.prompt_tokens,
        }
    if isinstance(event, events_pb2.CompletionFinished):
        return {
            "gen_ai.response.model": event.model,
            "gen_ai.response.finish_reasons": [FINISH_NAMES.get(event.finish_reason, "unknown")],
            "gen_ai.usage.input_tokens": event.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": event.usage.completion_tokens,
            "sluice.usage.cached_tokens": event.usage.cached_tokens,
        }
    if isinstance(event, events_pb2.UsageCharged):
        return {
            "gen_ai.request.model": event.model,
            "sluice.cost.nanos": event.cost.nanos,
            "sluice.cost.currency": event.cost.currency,
            "sluice.cost.price_version": event.cost.price_version,
        }
    if isinstance(event, events_pb2.GenerationRequested | events_pb2.RequestRedacted):
        return {"gen_ai.request.model": event.model}
    return {}
