"""What the audit trail keeps of each event: ids, stage, counts and money. Never text."""

from __future__ import annotations

from collections.abc import Callable

from aiokafka import ConsumerRecord
from google.protobuf.message import Message

from sluice import topics
from sluice.v1 import events_pb2


def _received(e: events_pb2.GenerationRequested) -> dict[str, str]:
    return {
        "model": e.model,
        "messages": str(len(e.messages)),
        "max_tokens": str(e.params.max_tokens),
        "has_user": str(bool(e.user)).lower(),
    }


def _redacted(e: events_pb2.RequestRedacted) -> dict[str, str]:
    details = {"policy_version": e.policy_version}
    details.update({f"entities.{kind}": str(n) for kind, n in e.entity_counts.items()})
    return details


def _assembled(e: events_pb2.PromptAssembled) -> dict[str, str]:
    return {"model": e.model, "prompt_tokens": str(e.prompt_tokens), "template": e.template}


def _completed(e: events_pb2.CompletionFinished) -> dict[str, str]:
    return {
        "model": e.model,
        "finish_reason": events_pb2.FinishReason.Name(e.finish_reason),
        "prompt_tokens": str(e.usage.prompt_tokens),
        "completion_tokens": str(e.usage.completion_tokens),
        "duration_ms": str(e.duration_ms),
        "worker": e.worker,
    }


def _charged(e: events_pb2.UsageCharged) -> dict[str, str]:
    return {
        "model": e.model,
        "cost_nanos": str(e.cost.nanos),
        "currency": e.cost.currency,
        "price_version": e.cost.price_version,
    }


def _dead_lettered(e: events_pb2.DeadLetter) -> dict[str, str]:
    return {
        "source_topic": e.source_topic,
        "source_offset": str(e.source_offset),
        "consumer_group": e.consumer_group,
        "reason": e.reason,
    }


def _feedback(e: events_pb2.FeedbackSubmitted) -> dict[str, str]:
    return {"score": str(e.score)}  # the free-text label may hold personal data


STAGES: dict[str, tuple[str, Callable[..., dict[str, str]]]] = {
    topics.REQUESTS: ("received", _received),
    topics.REDACTED: ("redacted", _redacted),
    topics.PROMPTS: ("assembled", _assembled),
    topics.COMPLETIONS: ("completed", _completed),
    topics.USAGE: ("charged", _charged),
    topics.DLQ: ("dead_lettered", _dead_lettered),
    topics.FEEDBACK: ("feedback", _feedback),
}


def audit_record(event: Message, record: ConsumerRecord[bytes, bytes]) -> events_pb2.AuditRecord:
    """An unsealed record for `event`; the writer adds seq and hashes."""
    stage, details = STAGES[record.topic]
    env = event.envelope  # type: ignore[attr-defined]
    return events_pb2.AuditRecord(
        request_id=env.request_id,
        attempt=env.attempt,
        tenant=env.tenant,
        stage=stage,
        event_time=env.event_time.ToJsonString(),
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        details=details(event),
    )
