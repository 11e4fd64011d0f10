"""The topic plan (schemas/topics.yaml) and the per-topic event codec."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from pydantic import BaseModel, Field

# Importing registers every message type in the default descriptor pool.
from sluice.v1 import attempts_pb2, audit_pb2, batches_pb2, compliance_pb2, events_pb2, keys_pb2  # noqa: F401

REQUESTS = "sluice.requests.v1"
REDACTED = "sluice.redacted.v1"
PROMPTS = "sluice.prompts.v1"
PROMPTS_BATCH = "sluice.prompts-batch.v1"
TOKENS = "sluice.tokens.v1"
COMPLETIONS = "sluice.completions.v1"
USAGE = "sluice.usage.v1"
BUDGETS = "sluice.budgets.v1"
FEEDBACK = "sluice.feedback.v1"
CONTROL = "sluice.control.v1"
BATCH_REPLIES = "sluice.batch-replies.v1"
BATCHES = "sluice.batches.v1"
INFERENCE_ATTEMPTS = "sluice.inference-attempts.v1"
DLQ = "sluice.dlq.v1"
AUDIT = "sluice.audit.v1"
COMPLIANCE = "sluice.compliance.v1"
AUDIT_KEYS = "sluice.audit-keys.v1"
AUDIT_ALERTS = "sluice.audit-alerts.v1"
KEYS = "sluice.keys.v1"

JSON_CONTENT_TYPE = b"application/json"


class TopicSpec(BaseModel):
    partitions: int = Field(gt=0)
    key: str
    value: str
    retention_ms: int
    cleanup_policy: Literal["delete", "compact", "compact,delete"]
    replication_factor: int | None = Field(default=None, gt=0)

    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


class TopicDefaults(BaseModel):
    replication_factor: int = Field(default=1, gt=0)


class TopicPlan(BaseModel):
    defaults: TopicDefaults = TopicDefaults()
    topics: dict[str, TopicSpec]

    def replication(self, name: str) -> int:
        return self.topics[name].replication_factor or self.defaults.replication_factor


@cache
def load_plan(path: Path) -> TopicPlan:
    plan = TopicPlan.model_validate(yaml.safe_load(path.read_text()))
    for name, spec in plan.topics.items():
        message_class(spec.value)  # fail at load time on a typo'd message name
        if not name.startswith("sluice."):
            raise ValueError(f"topics.{name}: topic names start with 'sluice.'")
    return plan


@cache
def message_class(full_name: str) -> type[Message]:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        raise ValueError(f"unknown message type {full_name!r}") from None
    return message_factory.GetMessageClass(descriptor)


class BadEvent(ValueError):
    """A record that can never be processed; it goes to the dead-letter topic."""


@dataclass(frozen=True)
class Codec:
    """Decodes a topic's records into its declared message type."""

    plan: TopicPlan

    def decode(self, topic: str, value: bytes | None, content_type: bytes | None = None) -> Message:
        if value is None:
            raise BadEvent("value is empty (tombstone)")
        spec = self.plan.topics.get(topic)
        if spec is None:
            raise BadEvent(f"topic {topic} is not in the topic plan")
        cls = message_class(spec.value)
        event = cls()
        try:
            if content_type == JSON_CONTENT_TYPE:
                json_format.Parse(value, event)
            else:
                event.ParseFromString(value)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
            raise BadEvent(f"not a valid {spec.value}: {_without_values(str(exc))}") from None
        return event


def _without_values(error: str) -> str:
    """Parser messages quote offending values, which may be raw PII; keep only the field path."""
    path = re.findall(r"Failed to parse (\S+) field", error)
    if path:
        return f"field {'.'.join(path)} has an invalid value"
    return error.split(":", 1)[0].strip()
