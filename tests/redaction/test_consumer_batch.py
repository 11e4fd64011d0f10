"""The redaction consumer on a real broker: one poll is analyzed as one batch, yet each
record stands alone. A poison record (undecodable, no policy for its tenant, or too
costly to finish by the deadline) is dead-lettered with its reason while the rest of
the same poll is redacted; outputs keep poll order and a redelivery in the poll is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from services.gateway import keys as key_material
from services.gateway.auth import KeyStore
from services.gateway.ingress import KEY_REF
from services.redaction.analyzer import Job, Redactor
from services.redaction.service import RedactionService
from sluice import envelope as envelopes
from sluice.config import Settings, load_settings
from sluice.kafka import EventConsumer, start_producer
from sluice.service import Runtime
from sluice.topics import DLQ, REDACTED, REQUESTS, Codec, load_plan
from sluice.v1 import envelope_pb2, events_pb2
from tests.conftest import paused

PLAN = load_plan(load_settings().topics_file)
GROUP = f"test-redaction-batch-{uuid.uuid4().hex[:8]}"
POLICIES = """
tenants:
  demo:
    version: batch-1
    language: en
    entities:
      PERSON: {threshold: 0.5}
      EMAIL_ADDRESS: {}
      PHONE_NUMBER: {}
      CREDIT_CARD: {}
      US_SSN: {}
"""
PLANTED = ["Jane Roe", "jane.roe@example.org", "415-555-0132", "4111 1111 1111 1111", "078-05-1120"]


class OwnGroup(Runtime):
    """The service's own wiring, in a group of this test's (a stack may run the real one)."""

    def consumer(
        self, topics: Sequence[str], handler: Any, group_id: str | None = None, **kwargs: Any
    ) -> EventConsumer:
        return super().consumer(topics, handler, group_id=group_id or GROUP, **kwargs)


def request(request_id: str, text: str, tenant: str = "demo") -> bytes:
    return events_pb2.GenerationRequested(
        envelope=envelopes.new_envelope(request_id=request_id, tenant=tenant, producer="test"),
        model="smollm2-135m-instruct",
        messages=[envelope_pb2.ChatMessage(role="user", content=text)],
        params=events_pb2.GenerationParams(max_tokens=8),
        reply_to=envelope_pb2.ReplyTo(topic="sluice.tokens.v1", partition=0),
    ).SerializeToString()


def hostile(size: int) -> str:
    """Digit runs and nested brackets: many seconds of analysis, far past the deadline."""
    unit = "1" * 400 + " " + "(" * 200 + "[{<4111 1111 1111 1111>}]" + ")" * 200 + " 555 0132 "
    return (unit * (size // len(unit) + 1))[:size]


async def key_header(bootstrap: str, tenant: str) -> tuple[str, bytes]:
    """A fresh API key for `tenant`, published as `sluice keys create` does, as a key-ref header."""
    key_id, key = key_material.new_key()
    digest = key_material.digest(key)
    record = key_material.key_record(key_id=key_id, inner_digest=digest, tenant=tenant)
    await key_material.publish(bootstrap, [record])
    return KEY_REF, f"{key_id}:{hashlib.sha256(key.encode()).hexdigest()}".encode()


async def ends(bootstrap: str, topic: str, group: str | None = None) -> dict[TopicPartition, int]:
    """End offsets of `topic`; with `group`, also committed as that group's start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PLAN.topics[topic].partitions)]
        offsets = await consumer.end_offsets(tps)
        if group is not None:
            consumer.assign(tps)
            await consumer.commit(offsets)
        return offsets
    finally:
        await consumer.stop()


async def read_until(
    bootstrap: str, start: dict[TopicPartition, int], done: Any
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        for _ in range(600):  # a bound for a loaded machine, not a timing assertion
            for records in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(records)
            if done(got):
                break
        return got
    finally:
        await consumer.stop()


@pytest.fixture
async def producer(topics_ready: str) -> Any:
    made = await start_producer(topics_ready, "test")
    yield made
    await made.stop()


def ours(records: list[ConsumerRecord[bytes, bytes]]) -> list[events_pb2.DeadLetter]:
    """This test's consumer's letters: other groups on the same topics dead-letter garbage too."""
    letters = (events_pb2.DeadLetter.FromString(r.value) for r in records)
    return [letter for letter in letters if letter.consumer_group == GROUP]


@pytest.fixture
def redaction_paused(stack_settings: Settings) -> Iterator[None]:
    """The session stack's redaction would take these records too (same group, same topic)."""
    with paused(stack_settings, "redaction"):
        yield


async def test_one_poll_is_one_batch_and_each_poison_record_is_dead_lettered_alone(
    redaction_paused: None,
    topics_ready: str,
    tmp_path: Path,
    loaded_redactor: Redactor,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICIES)
    settings: Settings = load_settings(
        kafka_bootstrap=topics_ready,
        state_dir=tmp_path,
        redaction_policies_file=policies,
        redaction_max_text_bytes=1_000_000,
        redaction_deadline_s=5.0,
    )
    batches: list[int] = []
    analyze = loaded_redactor.find_many

    def recorded(jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        batches.append(len(jobs))  # the real analysis runs; only the batch sizes are noted
        return analyze(jobs, **kwargs)

    monkeypatch.setattr(loaded_redactor, "find_many", recorded)
    monkeypatch.setattr(KeyStore, "_shared", {})  # a store of this event loop, not an earlier test's
    demo, acme = await key_header(topics_ready, "demo"), await key_header(topics_ready, "acme")

    ids = {name: uuid.uuid4().hex for name in ("good1", "garbage", "good2", "acme", "hostile", "good3")}
    records = [
        (ids["good1"], request(ids["good1"], "My name is Jane Roe, mail jane.roe@example.org"), demo),
        (ids["garbage"], b"\x08\x96\x01garbage\xff", demo),
        (ids["good2"], request(ids["good2"], "Call 415-555-0132, card 4111 1111 1111 1111"), demo),
        (ids["acme"], request(ids["acme"], "SSN 078-05-1120", tenant="acme"), acme),
        (ids["hostile"], request(ids["hostile"], hostile(600_000)), demo),
        (ids["good3"], request(ids["good3"], "Dear Jane Roe, your SSN is 078-05-1120"), demo),
        (ids["good1"], request(ids["good1"], "My name is Jane Roe, mail jane.roe@example.org"), demo),
    ]
    await ends(topics_ready, REQUESTS, group=GROUP)  # the group starts at this test's records
    redacted_start, dlq_start = await ends(topics_ready, REDACTED), await ends(topics_ready, DLQ)
    # All on one partition, before the consumer starts: one fetch, one poll.
    for key, value, header in records:
        await producer.send_and_wait(REQUESTS, value, key=key.encode(), partition=0, headers=[header])

    svc = RedactionService(settings)
    svc.boundary.loaded(loaded_redactor)
    runtime = OwnGroup(settings, "redaction", Codec(PLAN), producer)
    consumer = (await svc.connect(runtime))[0]
    assert consumer.topics == [REQUESTS] and consumer.concurrent
    task = asyncio.create_task(consumer.run())
    try:
        letters = ours(await read_until(topics_ready, dlq_start, lambda got: len(ours(got)) >= 3))
        outputs = await read_until(topics_ready, redacted_start, lambda got: len(got) >= 3)
    finally:
        await consumer.stop()
        await task
        for store in KeyStore._shared.values():
            if store._task is not None:
                store._task.cancel()

    reasons = {letter.envelope.request_id: letter.reason for letter in letters}
    assert any("not a valid sluice.v1.GenerationRequested" in reason for reason in reasons.values())
    assert reasons[ids["acme"]] == "tenant: no redaction policy for tenant 'acme'"
    assert reasons[ids["hostile"]] == "redaction: deadline: PII analysis did not finish in time"

    redacted = [events_pb2.RequestRedacted.FromString(r.value) for r in outputs]
    assert sorted(e.envelope.request_id for e in redacted) == sorted(
        [ids["good1"], ids["good2"], ids["good3"]]
    ), "each good record once: the redelivery within the poll is dropped"
    texts = {e.envelope.request_id: e.messages[0].content for e in redacted}
    assert texts[ids["good1"]] == "My name is <PERSON_1>, mail <EMAIL_ADDRESS_1>"
    assert texts[ids["good2"]] == "Call <PHONE_NUMBER_1>, card <CREDIT_CARD_1>"
    assert texts[ids["good3"]] == "Dear <PERSON_1>, your SSN is <US_SSN_1>"
    for record in outputs:
        assert not any(value.encode() in record.value for value in PLANTED)

    # Poll order: good3's output waited for the hostile record's dead letter before it.
    when = {e.envelope.request_id: r.timestamp for e, r in zip(redacted, outputs, strict=True)}
    hostile_letter = next(
        r.timestamp
        for r in await read_until(topics_ready, dlq_start, lambda got: len(ours(got)) >= 3)
        if events_pb2.DeadLetter.FromString(r.value).envelope.request_id == ids["hostile"]
        and events_pb2.DeadLetter.FromString(r.value).consumer_group == GROUP
    )
    assert when[ids["good1"]] <= when[ids["good2"]] <= hostile_letter <= when[ids["good3"]]

    # One nlp.pipe batch for the poll's short requests (the redelivery included: dedupe
    # happens at produce time); the hostile one ran alone under its own deadline.
    assert batches[0] == 4
    assert batches[1:] == [1]
