"""Every event type through a real broker, and the consume loop's guarantees:
duplicates dropped, malformed records dead-lettered, the consumer carries on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from google.protobuf.message import Message

from sluice import topics
from sluice.config import load_settings
from sluice.envelope import new_envelope
from sluice.kafka import EventConsumer, Output, send, start_producer
from sluice.topics import Codec, load_plan, message_class
from sluice.v1 import envelope_pb2, events_pb2

PLAN = load_plan(load_settings().topics_file)
CODEC = Codec(PLAN)


def sample(topic: str, request_id: str, attempt: int = 1) -> Message:
    """A populated event of the topic's declared type."""
    cls = message_class(PLAN.topics[topic].value)
    env = new_envelope(request_id=request_id, tenant="demo", producer="test", attempt=attempt)
    if topic == topics.AUDIT:
        return cls(seq=1, request_id=request_id, stage="received", hash="h", prev_hash="p")
    if topic == topics.BUDGETS:
        return cls(tenant="demo", spent_nanos=5, limit_nanos=10, currency="USD")
    if "envelope" not in cls.DESCRIPTOR.fields_by_name:
        return cls()  # catalogs, policies and alerts carry their own ids, not an envelope
    event = cls(envelope=env)
    if topic == topics.TOKENS:
        event.chunk.delta = "hello"
    elif hasattr(event, "model"):
        event.model = "m"
    return event


@pytest.fixture
async def producer(topics_ready: str) -> AsyncIterator[AIOKafkaProducer]:
    p = await start_producer(topics_ready, "test")
    yield p
    await p.stop()


async def read_new(
    bootstrap: str, topic: str, start: dict[int, int], want: int
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in start]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        got: list[ConsumerRecord[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + 20
        while len(got) < want and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(records)
        return got
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PLAN.topics[topic].partitions)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


@pytest.mark.parametrize("topic", sorted(PLAN.topics))
async def test_every_event_type_roundtrips_through_its_topic(
    topic: str, producer: AIOKafkaProducer, topics_ready: str
) -> None:
    start = await end_offsets(topics_ready, topic)
    event = sample(topic, uuid.uuid4().hex)
    key = "demo" if topic == topics.BUDGETS else uuid.uuid4().hex
    await send(producer, "test", Output(topic, event, key))
    records = await read_new(topics_ready, topic, start, 1)
    assert [CODEC.decode(topic, r.value) for r in records] == [event]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.fail_on: set[str] = set()

    async def __call__(
        self, event: events_pb2.RequestRedacted, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        if event.envelope.request_id in self.fail_on:
            raise RuntimeError("simulated dependency failure")
        self.seen.append((event.envelope.request_id, event.envelope.attempt))
        return ()


async def run_consumer(bootstrap: str, producer: AIOKafkaProducer, handler: Recorder, until: str) -> None:
    """Consume from the start until `until` (a request id sent last) is handled.

    The session's broker also holds other tests' events, so a count would stop too early.
    """
    consumer = EventConsumer(
        service="test",
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        topics=[topics.REDACTED],
        handler=handler,
        codec=CODEC,
        bootstrap=bootstrap,
        producer=producer,
    )
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(200):
            if any(request_id == until for request_id, _ in handler.seen):
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
        await task


async def test_duplicates_are_dropped_and_new_attempts_are_not(
    producer: AIOKafkaProducer, topics_ready: str
) -> None:
    request_id = uuid.uuid4().hex
    first = sample(topics.REDACTED, request_id)
    retry = sample(topics.REDACTED, request_id, attempt=2)
    marker = sample(topics.REDACTED, uuid.uuid4().hex)
    for event in (first, first, retry, retry, marker):
        await send(producer, "test", Output(topics.REDACTED, event, request_id))
    handler = Recorder()
    await run_consumer(topics_ready, producer, handler, until=marker.envelope.request_id)
    mine = [s for s in handler.seen if s[0] in (request_id, marker.envelope.request_id)]
    assert mine == [(request_id, 1), (request_id, 2), (marker.envelope.request_id, 1)]


async def test_malformed_records_go_to_the_dlq_and_the_consumer_goes_on(
    producer: AIOKafkaProducer, topics_ready: str
) -> None:
    dlq_start = await end_offsets(topics_ready, topics.DLQ)
    key = uuid.uuid4().hex
    await producer.send_and_wait(topics.REDACTED, b"\x08\x96\x01garbage\xff", key=key.encode())
    no_envelope = events_pb2.RequestRedacted(model="m")  # decodes, but cannot be trusted
    await send(producer, "test", Output(topics.REDACTED, no_envelope, key))
    failing = sample(topics.REDACTED, uuid.uuid4().hex)
    failing.reply_to.CopyFrom(envelope_pb2.ReplyTo(topic=topics.TOKENS, partition=3))
    await send(producer, "test", Output(topics.REDACTED, failing, key))
    good = sample(topics.REDACTED, uuid.uuid4().hex)
    await send(producer, "test", Output(topics.REDACTED, good, key))

    handler = Recorder()
    handler.fail_on.add(failing.envelope.request_id)
    tokens_start = await end_offsets(topics_ready, topics.TOKENS)
    await run_consumer(topics_ready, producer, handler, until=good.envelope.request_id)
    assert (good.envelope.request_id, 1) in handler.seen

    letters = [
        events_pb2.DeadLetter.FromString(r.value)
        for r in await read_new(topics_ready, topics.DLQ, dlq_start, 3)
    ]
    reasons = {
        letter.source_offset: letter.reason for letter in letters if letter.source_topic == topics.REDACTED
    }
    assert len(reasons) >= 3
    assert any("not a valid sluice.v1.RequestRedacted" in r for r in reasons.values())
    assert any("envelope.request_id is empty" in r for r in reasons.values())
    assert any("test failed: RuntimeError" in r for r in reasons.values())
    assert all(letter.payload_sha256 and letter.payload_size for letter in letters)

    # The caller waiting on the failed request is told, on its own reply partition.
    replies = await read_new(topics_ready, topics.TOKENS, {3: tokens_start[3]}, 1)
    failed = [events_pb2.ReplyEvent.FromString(r.value) for r in replies]
    assert any(
        e.envelope.request_id == failing.envelope.request_id and e.failed.code == "INTERNAL" for e in failed
    )
