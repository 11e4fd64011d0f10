"""The writer's append step on real events: checkpoints, encrypted content, erasure.

No Kafka here: `append` is what the consumer loop calls per event, and what it
returns is exactly what gets produced in the transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from google.protobuf.message import Message

from services.audit import chain
from services.audit.keys import subject_of
from services.audit.policy import Policies
from services.audit.records import BUDGET_POLICIES, NOT_AUDITED, PRICES, REDACTION_POLICIES, STAGES, TEMPLATES
from services.audit.service import AuditService, RetentionSweep, entry
from sluice import envelope as envelopes
from sluice.config import load_settings
from sluice.identity import pseudonymous_user
from sluice.kafka import Output
from sluice.topics import (
    AUDIT,
    AUDIT_KEYS,
    COMPLETIONS,
    COMPLIANCE,
    CONTROL,
    KEYS,
    REDACTED,
    REQUESTS,
    load_plan,
)
from sluice.v1 import (
    audit_pb2,
    billing_pb2,
    compliance_pb2,
    envelope_pb2,
    events_pb2,
    keys_pb2,
    privacy_pb2,
    templates_pb2,
)


@pytest.fixture
def writer(tmp_path: Path) -> AuditService:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "policies.yaml").write_text("tenants:\n  demo: {store_content: true}\n")
    service = AuditService(load_settings(state_dir=tmp_path, audit_checkpoint_every=3))
    return service


def consumed(topic: str, event: Message, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    value = event.SerializeToString()
    return ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())


def redacted(request_id: str, user: str) -> events_pb2.RequestRedacted:
    return events_pb2.RequestRedacted(
        envelope=envelopes.new_envelope(request_id=request_id, tenant="demo", producer="test"),
        model="m",
        user=pseudonymous_user("demo", user),
        messages=[envelope_pb2.ChatMessage(role="user", content="Mail <EMAIL_ADDRESS_1> please")],
        entity_counts={"EMAIL_ADDRESS": 1},
    )


def sealed(outputs: Sequence[Output]) -> list[events_pb2.AuditRecord]:
    return [o.event for o in outputs if o.topic == AUDIT]  # type: ignore[misc]


async def test_a_checkpoint_follows_every_n_records_and_the_whole_chain_walks(writer: AuditService) -> None:
    records: list[events_pb2.AuditRecord] = []
    for i in range(6):
        event = events_pb2.GenerationRequested(
            envelope=envelopes.new_envelope(request_id=f"r{i}", tenant="demo", producer="test"), user="bob"
        )
        records += sealed(await writer.append(event, consumed(REQUESTS, event, i)))
    assert [r.stage for r in records] == ["received"] * 3 + ["checkpoint"] + ["received"] * 3 + ["checkpoint"]
    assert records[3].details["head_hash"] == records[2].hash and records[3].details["records"] == "3"
    assert records[0].user == pseudonymous_user("demo", "bob") != "bob"
    walk = chain.ChainWalk()
    walk.start_after(None)
    assert all(walk.feed(r, offset) for offset, r in enumerate(records))
    assert (walk.checked, walk.checkpoints) == (8, 2)


async def test_content_is_encrypted_under_the_users_key_and_erasure_destroys_it(writer: AuditService) -> None:
    outputs = await writer.append(redacted("r1", "alice"), consumed(REDACTED, redacted("r1", "alice")))
    subject = subject_of("demo", pseudonymous_user("demo", "alice"))
    keys = [o for o in outputs if o.topic == AUDIT_KEYS]
    assert len(keys) == 1 and isinstance(keys[0].event, compliance_pb2.SubjectKey)
    assert keys[0].event.subject == subject and keys[0].key == f"{subject}@{keys[0].event.period}"
    record = sealed(outputs)[0]
    assert record.content_subject == subject and b"EMAIL_ADDRESS" not in record.content
    assert entry(writer.ring, 0, record).content_state == audit_pb2.CONTENT_STATE_READABLE
    assert "Mail <EMAIL_ADDRESS_1> please" in entry(writer.ring, 0, record).content

    again = await writer.append(redacted("r2", "alice"), consumed(REDACTED, redacted("r2", "alice"), 1))
    assert [o.topic for o in again] == [AUDIT]  # the subject's key for this period is reused

    # The next key period gets a key of its own; erasure destroys both.
    writer.clock = lambda: time.time() + 86_400
    later = await writer.append(redacted("r3", "alice"), consumed(REDACTED, redacted("r3", "alice"), 2))
    assert [o.topic for o in later if o.topic == AUDIT_KEYS] == [AUDIT_KEYS]  # (then a checkpoint)

    erase = compliance_pb2.ComplianceEvent(
        envelope=envelopes.new_envelope(request_id="erasure-1", tenant="demo", producer="test"),
        erased=compliance_pb2.SubjectErased(subject=pseudonymous_user("demo", "alice"), had_key=True),
    )
    assert writer.ring.forget(subject)  # what the Erase RPC does at once
    done = await writer.append(erase, consumed(COMPLIANCE, erase))
    destroyed = [o.event for o in done if o.topic == AUDIT_KEYS]
    assert len(destroyed) == 2 and all(k.destroyed and k.subject == subject for k in destroyed)  # type: ignore[attr-defined]
    assert sealed(done)[0].details == {"action": "erased", "had_key": "true", "keys_destroyed": "2"}
    for r in (record, sealed(later)[0]):
        assert entry(writer.ring, 0, r).content_state == audit_pb2.CONTENT_STATE_ERASED
        assert entry(writer.ring, 0, r).content == ""


async def test_a_tenant_without_the_policy_stores_no_content(writer: AuditService) -> None:
    event = redacted("r3", "carol")
    event.envelope.tenant = "acme"
    outputs = await writer.append(event, consumed(REDACTED, event))
    assert [o.topic for o in outputs] == [AUDIT]
    assert not sealed(outputs)[0].content
    assert sealed(outputs)[0].details["entities.EMAIL_ADDRESS"] == "1"


async def test_template_registry_writes_are_chained_without_their_author(writer: AuditService) -> None:
    event = templates_pb2.TemplateEvent(
        envelope=envelopes.new_envelope(request_id="write-1", tenant="operator", producer="prompts"),
        version=templates_pb2.TemplateVersion(name="support", version=3, author="jane@example.com"),
    )
    record = sealed(await writer.append(event, consumed(TEMPLATES, event)))[0]
    assert record.stage == "template_changed"
    assert dict(record.details) == {"change": "version", "template_name": "support", "template_version": "3"}
    assert "jane" not in str(record)


def completion(request_id: str, tenant: str = "demo") -> events_pb2.CompletionFinished:
    return events_pb2.CompletionFinished(
        envelope=envelopes.new_envelope(request_id=request_id, tenant=tenant, producer="inference"),
        model="m",
        finish_reason=events_pb2.FINISH_REASON_STOP,
        engine="llamacpp",
        model_version="smollm2-135m-q8",
        worker="w1",
    )


async def test_a_completion_records_the_engine_and_says_when_its_output_is_unavailable(
    writer: AuditService,
) -> None:
    event = completion("r9")  # no reply partition: a Kafka-only caller, no chunks to assemble
    record = sealed(await writer.append(event, consumed(COMPLETIONS, event)))[0]
    assert (record.details["engine"], record.details["model_version"]) == ("llamacpp", "smollm2-135m-q8")
    assert record.details["output"] == "unavailable" and not record.content


async def test_the_caller_address_is_recorded_on_received(writer: AuditService) -> None:
    event = events_pb2.GenerationRequested(
        envelope=envelopes.new_envelope(request_id="r10", tenant="demo", producer="gateway"),
        caller_address="ipv4:10.1.2.3:5555",
        key_id="abc123def456",
    )
    record = sealed(await writer.append(event, consumed(REQUESTS, event)))[0]
    assert (record.caller_address, record.api_key_id) == ("ipv4:10.1.2.3:5555", "abc123def456")


async def test_retention_shreds_only_the_periods_older_than_the_tenants_retention(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "policies.yaml").write_text(
        "tenants:\n  demo: {store_content: true, content_retention: 5}\n  acme: {store_content: true}\n"
    )
    writer = AuditService(load_settings(state_dir=tmp_path, audit_key_period_s=10))
    sweep = RetentionSweep(writer, 60)
    t0 = 1_800_000_000.0  # the start of a 10 s period
    writer.clock = lambda: t0
    old = sealed(await writer.append(redacted("o1", "alice"), consumed(REDACTED, redacted("o1", "alice"))))[0]
    other = redacted("o2", "bob")
    other.envelope.tenant = "acme"
    kept = sealed(await writer.append(other, consumed(REDACTED, other, 1)))[0]
    writer.clock = lambda: t0 + 10  # the next period
    new = sealed(
        await writer.append(redacted("o3", "alice"), consumed(REDACTED, redacted("o3", "alice"), 2))
    )[0]

    assert sweep.due(t0 + 14.9) == []  # the first period ends at t0+10; plus 5 s retention
    due = sweep.due(t0 + 15)
    assert [(e.envelope.tenant, e.expired.retention_s) for e in due] == [("demo", 5)]
    done = await writer.append(due[0], consumed(COMPLIANCE, due[0], 3))
    destroyed = [o.event for o in done if o.topic == AUDIT_KEYS]
    assert [k.key_id for k in destroyed] == [old.content_key_id]  # type: ignore[attr-defined]
    shredded = sealed(done)[0]
    assert (shredded.stage, shredded.details["action"], shredded.details["keys_destroyed"]) == (
        "compliance",
        "content_expired",
        "1",
    )
    assert entry(writer.ring, 0, old).content_state == audit_pb2.CONTENT_STATE_ERASED
    assert entry(writer.ring, 0, new).content_state == audit_pb2.CONTENT_STATE_READABLE
    assert entry(writer.ring, 0, kept).content_state == audit_pb2.CONTENT_STATE_READABLE  # no retention set
    assert sweep.due(t0 + 15) == []


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ("tenants:\n  demo: {content_retention: soon}\n", "tenants.demo.content_retention"),
        ("tenants:\n  demo: {content_retention: 0}\n", "tenants.demo.content_retention"),
        ("tenants:\n  demo: {store_contents: true}\n", "tenants.demo.store_contents"),
    ],
)
def test_an_invalid_policy_file_stops_the_service_naming_the_field(
    tmp_path: Path, policy: str, field: str
) -> None:
    (tmp_path / "policies.yaml").write_text(policy)
    with pytest.raises(SystemExit, match=rf"{field}: "):
        Policies(tmp_path / "policies.yaml").check()


def test_a_retention_is_an_iso_duration_or_seconds(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(
        "tenants:\n  demo: {store_content: true, content_retention: P30D}\n  acme: {content_retention: 90}\n"
    )
    assert Policies(tmp_path / "policies.yaml").with_retention() == {"demo": 30 * 86_400, "acme": 90}


async def test_budget_and_key_changes_are_chained_without_secrets(writer: AuditService) -> None:
    budget = billing_pb2.BudgetPolicy(
        budget=billing_pb2.Budget(
            tenant="demo", key_id="k1", period=billing_pb2.BUDGET_PERIOD_DAY, limit_nanos=5_000
        )
    )
    record = sealed(await writer.append(budget, consumed(BUDGET_POLICIES, budget)))[0]
    assert (record.stage, record.tenant, record.request_id) == (
        "budget_changed",
        "demo",
        "budget/demo/k1/BUDGET_PERIOD_DAY",
    )
    assert record.details["limit_nanos"] == "5000"

    key = keys_pb2.ApiKey(
        key_id="0123456789ab",
        tenant="demo",
        role=keys_pb2.KEY_ROLE_AUDITOR,
        salt=b"salty",
        key_hash=b"\x01" * 32,
        description="for jane@example.com",
    )
    key.created_at.GetCurrentTime()
    record = sealed(await writer.append(key, consumed(KEYS, key)))[0]
    assert (record.stage, record.details["role"], record.details["revoked"]) == (
        "key_changed",
        "KEY_ROLE_AUDITOR",
        "false",
    )
    assert b"salty" not in record.SerializeToString() and "jane" not in str(record)
    assert ("\x01" * 32).encode() not in record.SerializeToString()


async def test_a_cancel_on_the_control_topic_is_chained(writer: AuditService) -> None:
    cancel = events_pb2.ControlEvent(
        envelope=envelopes.new_envelope(request_id="r11", tenant="demo", producer="gateway"),
        cancel=events_pb2.CancelRequest(reason="client disconnected"),
    )
    record = sealed(await writer.append(cancel, consumed(CONTROL, cancel)))[0]
    assert (record.stage, record.request_id, record.details["reason"]) == (
        "control",
        "r11",
        "client disconnected",
    )


def test_every_topic_in_the_plan_is_audited_or_excluded_with_a_reason() -> None:
    plan = load_plan(load_settings().topics_file)
    undecided = set(plan.topics) - set(STAGES) - set(NOT_AUDITED)
    assert not undecided, f"decide whether the audit writer chains {sorted(undecided)}"
    assert not set(STAGES) & set(NOT_AUDITED)
    assert set(STAGES) <= set(plan.topics)  # the writer subscribes to nothing the cluster lacks


async def test_price_and_redaction_policy_changes_are_chained_as_digests(writer: AuditService) -> None:
    prices = billing_pb2.PriceCatalog(version="2026-11", currency="USD", digest="abc")
    record = sealed(await writer.append(prices, consumed(PRICES, prices)))[0]
    assert (record.stage, record.request_id, record.details["price_version"]) == (
        "price_changed",
        "prices/2026-11",
        "2026-11",
    )
    update = privacy_pb2.PolicyUpdate(
        envelope=envelopes.new_envelope(request_id="pol-1", tenant="demo", producer="redaction"),
        tenant="demo",
        policy_yaml="deny_list: [Jane Roe]\n",
    )
    record = sealed(await writer.append(update, consumed(REDACTION_POLICIES, update)))[0]
    assert record.stage == "redaction_policy_changed" and len(record.details["policy_sha256"]) == 64
    assert "Jane" not in str(record)
