"""The writer's append step on real events: checkpoints, encrypted content, erasure.

No Kafka here: `append` is what the consumer loop calls per event, and what it
returns is exactly what gets produced in the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from google.protobuf.message import Message

from services.audit import chain
from services.audit.keys import subject_of
from services.audit.records import TEMPLATES
from services.audit.service import AuditService, entry
from sluice import envelope as envelopes
from sluice.config import load_settings
from sluice.identity import pseudonymous_user
from sluice.kafka import Output
from sluice.topics import AUDIT, AUDIT_KEYS, COMPLIANCE, REDACTED, REQUESTS
from sluice.v1 import audit_pb2, compliance_pb2, envelope_pb2, events_pb2, templates_pb2


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
    keys = [o.event for o in outputs if o.topic == AUDIT_KEYS]
    assert len(keys) == 1 and isinstance(keys[0], compliance_pb2.SubjectKey) and keys[0].subject == subject
    record = sealed(outputs)[0]
    assert record.content_subject == subject and b"EMAIL_ADDRESS" not in record.content
    assert entry(writer.ring, 0, record).content_state == audit_pb2.CONTENT_STATE_READABLE
    assert "Mail <EMAIL_ADDRESS_1> please" in entry(writer.ring, 0, record).content

    again = await writer.append(redacted("r2", "alice"), consumed(REDACTED, redacted("r2", "alice"), 1))
    assert [o.topic for o in again] == [AUDIT]  # the subject's key is reused, not replaced

    erase = compliance_pb2.ComplianceEvent(
        envelope=envelopes.new_envelope(request_id="erasure-1", tenant="demo", producer="test"),
        erased=compliance_pb2.SubjectErased(subject=pseudonymous_user("demo", "alice"), had_key=True),
    )
    done = await writer.append(erase, consumed(COMPLIANCE, erase))
    destroyed = [o.event for o in done if o.topic == AUDIT_KEYS]
    assert destroyed == [compliance_pb2.SubjectKey(subject=subject, destroyed=True)]
    assert sealed(done)[0].details == {"action": "erased", "had_key": "true"}
    assert entry(writer.ring, 0, record).content_state == audit_pb2.CONTENT_STATE_ERASED
    assert entry(writer.ring, 0, record).content == ""


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
