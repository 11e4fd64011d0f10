"""The completion record carries the model's output, assembled from real reply chunks on Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from services.audit.keys import subject_of
from services.audit.service import AuditService, entry
from sluice import envelope as envelopes
from sluice.config import load_settings
from sluice.identity import pseudonymous_user
from sluice.topics import AUDIT, COMPLETIONS, REDACTED, TOKENS
from sluice.v1 import audit_pb2, envelope_pb2, events_pb2
from tests.audit.test_audit_writer import consumed, redacted

PARTITION = 1


@pytest.fixture
async def writer(topics_ready: str, tmp_path: Path) -> AsyncIterator[AuditService]:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "policies.yaml").write_text("tenants:\n  demo: {store_content: true}\n")
    service = AuditService(load_settings(state_dir=tmp_path, kafka_bootstrap=topics_ready))
    task = asyncio.create_task(service.outputs.run())
    await asyncio.wait_for(service.outputs.ready.wait(), 60)
    yield service
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def reply(request_id: str, tenant: str, attempt: int, seq: int, delta: str) -> bytes:
    env = envelopes.new_envelope(request_id=request_id, tenant=tenant, attempt=attempt, producer="inference")
    event = events_pb2.ReplyEvent(envelope=env, chunk=events_pb2.TokenChunk(seq=seq, delta=delta, tokens=1))
    return event.SerializeToString()


async def test_the_output_is_assembled_from_the_chunks_and_sealed_under_the_users_key(
    writer: AuditService, topics_ready: str
) -> None:
    rid, other = f"out-{uuid.uuid4().hex}", f"out-{uuid.uuid4().hex}"
    producer = AIOKafkaProducer(bootstrap_servers=topics_ready)
    await producer.start()
    try:
        for value in (
            reply(rid, "demo", 1, 0, "Hello <EMAIL_ADDRESS_1>"),
            reply(rid, "demo", 2, 0, "a later attempt"),
            reply(other, "acme", 1, 0, "a tenant that keeps no content"),
            reply(rid, "demo", 1, 1, ", nice"),
            reply(rid, "demo", 1, 1, ", nice"),  # re-sent after a producer retry
            reply(rid, "demo", 1, 2, " day."),
        ):
            await producer.send_and_wait(TOKENS, value, key=rid.encode(), partition=PARTITION)
    finally:
        await producer.stop()

    await writer.append(redacted(rid, "alice"), consumed(REDACTED, redacted(rid, "alice")))
    done = events_pb2.CompletionFinished(
        envelope=envelopes.new_envelope(request_id=rid, tenant="demo", attempt=1, producer="inference"),
        model="m",
        reply_to=envelope_pb2.ReplyTo(topic=TOKENS, partition=PARTITION),
    )
    outputs = await writer.append(done, consumed(COMPLETIONS, done, 1))
    record = next(o.event for o in outputs if o.topic == AUDIT)
    assert isinstance(record, events_pb2.AuditRecord)
    assert record.details["output"] == "stored"
    assert record.content_subject == subject_of("demo", pseudonymous_user("demo", "alice"))
    assert b"nice" not in record.content  # encrypted
    shown = entry(writer.ring, 0, record)
    assert (shown.content_state, shown.content) == (
        audit_pb2.CONTENT_STATE_READABLE,
        "Hello <EMAIL_ADDRESS_1>, nice day.",
    )
    assert writer.outputs.assembled(rid, 2) == "a later attempt"  # kept apart per attempt
    assert writer.outputs.assembled(other, 1) is None  # never held: acme stores no content
