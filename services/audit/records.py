"""What the audit trail keeps of each event: ids, stage, counts and money. Never raw text."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from aiokafka import ConsumerRecord
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.audit.chain import CHECKPOINT
from sluice import topics
from sluice.identity import pseudonymous_user
from sluice.v1 import (
    billing_pb2,
    compliance_pb2,
    events_pb2,
    feedback_pb2,
    keys_pb2,
    privacy_pb2,
    templates_pb2,
)


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
    details = {"model": e.model, "prompt_tokens": str(e.prompt_tokens), "template": e.template}
    if e.HasField("template_used"):
        used = e.template_used
        details.update(
            template_name=used.name,
            template_version=str(used.version),
            template_label=used.label,
            template_variant=used.variant,
        )
    return details


def _completed(e: events_pb2.CompletionFinished) -> dict[str, str]:
    return {
        "model": e.model,
        "finish_reason": events_pb2.FinishReason.Name(e.finish_reason),
        "prompt_tokens": str(e.usage.prompt_tokens),
        "completion_tokens": str(e.usage.completion_tokens),
        "duration_ms": str(e.duration_ms),
        "worker": e.worker,
        "engine": e.engine,
        "model_version": e.model_version,
        **({"error": e.error[:200]} if e.error else {}),
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
    """The rating and how much was said, never the comment (even redacted) or the labels."""
    details = {
        "feedback_id": e.feedback_id,
        "scale": feedback_pb2.RatingScale.Name(e.scale).removeprefix("RATING_SCALE_").lower(),
        "rating": str(e.rating),
        "labels": str(len(e.labels)),
        "has_comment": str(bool(e.comment)).lower(),
    }
    details.update({f"entities.{kind}": str(n) for kind, n in e.comment_entity_counts.items()})
    return details


def _control(e: events_pb2.ControlEvent) -> dict[str, str]:
    if e.WhichOneof("action") == "cancel":
        return {"action": "cancel", "reason": e.cancel.reason[:200]}
    return {"action": "unknown"}


# The prompts area's template registry (services/prompts/registry_log.py).
TEMPLATES = "sluice.templates.v1"
# The metering area's budgets as set by SetBudget, and its alerts (streams/metering_budgets.py).
BUDGET_POLICIES = "sluice.budget-policies.v1"
BUDGET_ALERTS = "sluice.budget-alerts.v1"
# The metering area's price catalog versions (services/metering/service.py).
PRICES = "sluice.prices.v1"
# The redaction area's per-tenant policy overrides (services/redaction/policy.py).
REDACTION_POLICIES = "sluice.policies.v1"
# Topics of the plan the audit writer deliberately does not chain, and why (tests hold
# every topic to being either audited or listed here).
NOT_AUDITED = {
    topics.TOKENS: "output text: assembled per attempt onto the `completed` record",
    topics.BUDGETS: "running totals derived from sluice.usage.v1, which is audited",
    topics.AUDIT: "the trail itself",
    topics.AUDIT_KEYS: "data keys; their destruction is chained as `compliance` records",
    topics.AUDIT_ALERTS: "derived from the trail (completeness)",
    "sluice.inference-attempts.v1": "worker bookkeeping; each attempt's completion names its worker",
    "sluice.batch-replies.v1": "reply events of batch requests (as sluice.tokens.v1)",
    "sluice.batches.v1": "a fold of batch results derived from audited completions and charges",
    "sluice.feedback-stats.v1": "aggregates derived from sluice.feedback.v1, which is audited",
}


def _template_changed(e: templates_pb2.TemplateEvent) -> dict[str, str]:
    """A registry write; the author is left out (it may be a person's e-mail)."""
    body = e.WhichOneof("body")
    if body == "version":
        return {
            "change": "version",
            "template_name": e.version.name,
            "template_version": str(e.version.version),
        }
    if body == "label":
        return {
            "change": "label",
            "template_name": e.label.name,
            "template_label": e.label.label,
            "variants": str(len(e.label.variants)),
        }
    return {"change": "unknown"}


def _compliance(e: compliance_pb2.ComplianceEvent) -> dict[str, str]:
    action = e.WhichOneof("action")
    if action == "erased":
        return {"action": "erased", "had_key": str(e.erased.had_key).lower()}
    if action == "denied":
        return {"action": "access_denied", "rpc": e.denied.rpc, "requested_tenant": e.denied.requested_tenant}
    if action == "expired":
        return {
            "action": "content_expired",
            "retention_s": str(e.expired.retention_s),
            "as_of": e.expired.as_of.ToJsonString(),
        }
    return {"action": "unknown"}


def _budget_changed(e: billing_pb2.BudgetPolicy) -> dict[str, str]:
    b = e.budget
    return {
        "key_id": b.key_id,
        "period": billing_pb2.BudgetPeriod.Name(b.period),
        "mode": billing_pb2.BudgetMode.Name(b.mode),
        "limit_nanos": str(b.limit_nanos),
        "limit_tokens": str(b.limit_tokens),
        "limit_requests": str(b.limit_requests),
        "currency": b.currency,
    }


def _budget_alert(e: billing_pb2.BudgetAlert) -> dict[str, str]:
    return {
        "key_id": e.budget.key_id,
        "period": billing_pb2.BudgetPeriod.Name(e.budget.period),
        "threshold_percent": str(e.threshold_percent),
        "limit": e.limit,
        "spent_nanos": str(e.window.spent_nanos),
    }


def _price_changed(e: billing_pb2.PriceCatalog) -> dict[str, str]:
    return {
        "price_version": e.version,
        "currency": e.currency,
        "rates": str(len(e.rates)),
        "digest": e.digest,
    }


def _redaction_policy_changed(e: privacy_pb2.PolicyUpdate) -> dict[str, str]:
    """A digest of the policy, not its text: deny-lists in it may name people."""
    return {
        "policy_sha256": hashlib.sha256(e.policy_yaml.encode()).hexdigest(),
        "policy_bytes": str(len(e.policy_yaml.encode())),
    }


def _key_changed(e: keys_pb2.ApiKey) -> dict[str, str]:
    """Role, models and limits of an API key: never its salt, hash or free-text description."""
    return {
        "key_id": e.key_id,
        "role": keys_pb2.KeyRole.Name(e.role),
        "revoked": str(e.HasField("revoked_at")).lower(),
        "allowed_models": ",".join(e.allowed_models),
        "requests_per_minute": str(e.rate_limit.requests_per_minute),
        "tokens_per_minute": str(e.rate_limit.tokens_per_minute),
    }


STAGES: dict[str, tuple[str, Callable[..., dict[str, str]]]] = {
    topics.REQUESTS: ("received", _received),
    topics.REDACTED: ("redacted", _redacted),
    topics.PROMPTS: ("assembled", _assembled),
    topics.PROMPTS_BATCH: ("assembled", _assembled),
    topics.COMPLETIONS: ("completed", _completed),
    topics.USAGE: ("charged", _charged),
    topics.DLQ: ("dead_lettered", _dead_lettered),
    topics.FEEDBACK: ("feedback", _feedback),
    topics.COMPLIANCE: ("compliance", _compliance),
    topics.CONTROL: ("control", _control),
    TEMPLATES: ("template_changed", _template_changed),
    BUDGET_POLICIES: ("budget_changed", _budget_changed),
    BUDGET_ALERTS: ("budget_alert", _budget_alert),
    PRICES: ("price_changed", _price_changed),
    REDACTION_POLICIES: ("redaction_policy_changed", _redaction_policy_changed),
    topics.KEYS: ("key_changed", _key_changed),
}
# Stages that are not steps of one request (the index keeps no request row for them).
NOT_REQUESTS = frozenset(
    {
        CHECKPOINT,
        "compliance",
        "template_changed",
        "budget_changed",
        "budget_alert",
        "price_changed",
        "redaction_policy_changed",
        "key_changed",
    }
)


def _origin(event: Message) -> tuple[str, int, str, str]:
    """request_id, attempt, tenant and event time; events without an envelope get a stable id."""
    if isinstance(event, billing_pb2.BudgetPolicy):
        b = event.budget
        period = billing_pb2.BudgetPeriod.Name(b.period)
        return f"budget/{b.tenant}/{b.key_id}/{period}", 1, b.tenant, _time(event.updated_at)
    if isinstance(event, billing_pb2.BudgetAlert):
        return f"budget-alert/{event.alert_id}", 1, event.budget.tenant, _time(event.event_time)
    if isinstance(event, billing_pb2.PriceCatalog):
        return f"prices/{event.version}", 1, "", _time(event.published_at)
    if isinstance(event, keys_pb2.ApiKey):
        changed = event.revoked_at if event.HasField("revoked_at") else event.created_at
        return f"key/{event.key_id}", 1, event.tenant, _time(changed)
    env = event.envelope  # type: ignore[attr-defined]
    return env.request_id, env.attempt, env.tenant, env.event_time.ToJsonString()


def _time(stamp: Timestamp) -> str:
    return stamp.ToJsonString() if stamp.seconds or stamp.nanos else now_json()


def _user(event: Message) -> str:
    if not hasattr(event, "envelope"):
        return ""
    tenant = event.envelope.tenant
    if isinstance(event, events_pb2.GenerationRequested | events_pb2.RequestRedacted):
        return pseudonymous_user(tenant, event.user)
    if isinstance(event, compliance_pb2.ComplianceEvent) and event.WhichOneof("action") == "erased":
        return event.erased.subject
    return ""


def audit_record(event: Message, record: ConsumerRecord[bytes, bytes]) -> events_pb2.AuditRecord:
    """An unsealed record for `event`; the writer adds seq and hashes."""
    stage, details = STAGES[record.topic]
    request_id, attempt, tenant, event_time = _origin(event)
    return events_pb2.AuditRecord(
        request_id=request_id,
        attempt=attempt,
        tenant=tenant,
        stage=stage,
        event_time=event_time,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        details=details(event),
        user=_user(event),
        api_key_id=getattr(event, "key_id", ""),
        caller_address=getattr(event, "caller_address", ""),
        model=getattr(event, "model", ""),
        ingest_time=now_json(),
    )


def now_json() -> str:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp.ToJsonString()


def checkpoint_record(head: events_pb2.AuditRecord, since: int) -> events_pb2.AuditRecord:
    """Restates the chain head: an anchor to publish or to start a range verification from."""
    now = now_json()
    return events_pb2.AuditRecord(
        request_id=f"checkpoint-{head.seq + 1}",
        attempt=1,
        tenant="",
        stage=CHECKPOINT,
        event_time=now,
        ingest_time=now,
        details={"head_seq": str(head.seq), "head_hash": head.hash, "records": str(since)},
    )
