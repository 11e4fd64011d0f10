"""A transactional consumer never redoes a transaction whose failed commit had in fact committed.

The broker can complete a commit whose answer the client never gets right (the EndTxn
was written; the response failed). The consumer then replaces its producer and retries
the poll; redone blindly, the poll's outputs (for metering: charges) would be produced
twice. Here a real producer commits for real and then reports a failure, once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import InvalidTxnState

from services.metering.reader import read_committed
from sluice.kafka import EventConsumer, Output
from sluice.topics import Codec, TopicPlan, TopicSpec
from sluice.v1 import events_pb2
from tests.metering.helpers import completion

COUNT = 40


class CommitsThenFails(AIOKafkaProducer):  # type: ignore[misc]
    """Commits its first transaction on the broker, then raises as if the commit had failed."""

    failed = False

    async def commit_transaction(self) -> None:
        await super().commit_transaction()
        if not CommitsThenFails.failed:
            CommitsThenFails.failed = True
            raise InvalidTxnState("commit answer lost (test)")


def codec(inputs: str, outputs: str) -> Codec:
    spec: dict[str, Any] = {"partitions": 1, "key": "request_id", "retention_ms": 3_600_000}
    spec["cleanup_policy"] = "delete"
    return Codec(
        TopicPlan(
            topics={
                inputs: TopicSpec(value="sluice.v1.CompletionFinished", **spec),
                outputs: TopicSpec(value="sluice.v1.CompletionFinished", **spec),
            }
        )
    )


async def run_once(bootstrap: str, batch: bool) -> list[str]:
    run = uuid.uuid4().hex[:8]
    inputs, outputs = f"sluice.test-retry-in-{run}", f"sluice.test-retry-out-{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(inputs, 1, 1), NewTopic(outputs, 1, 1)])
    finally:
        await admin.close()
    events = [completion("retry", 10, 5) for _ in range(COUNT)]
    await produce_to(bootstrap, inputs, events)

    async def echo(
        event: events_pb2.CompletionFinished, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        return [Output(outputs, event, event.envelope.request_id)]

    CommitsThenFails.failed = False
    producer = CommitsThenFails(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", transactional_id=f"retry-{run}"
    )
    await producer.start()
    consumer = EventConsumer(
        service="metering",
        group_id=f"retry-{run}",
        topics=[inputs],
        handler=echo,
        codec=codec(inputs, outputs),
        bootstrap=bootstrap,
        producer=producer,
        transactional=True,
        batch_transactions=batch,
        max_records=10,
    )
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(600):
            found = [r async for r in read_committed(bootstrap, outputs)]
            if len(found) >= COUNT and CommitsThenFails.failed:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a redone transaction would land by now
    finally:
        await consumer.stop()
        await task
        await producer.stop()
    assert CommitsThenFails.failed, "the failing commit never happened: nothing was tested"
    return [events_pb2.CompletionFinished.FromString(r.value or b"").envelope.request_id for r in found]


async def produce_to(bootstrap: str, topic: str, events: list[events_pb2.CompletionFinished]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for e in events:
            await producer.send_and_wait(topic, e.SerializeToString(), key=e.envelope.request_id.encode())
    finally:
        await producer.stop()


def test_a_batch_transaction_that_committed_despite_a_failed_commit_is_not_redone(topics_ready: str) -> None:
    ids = asyncio.run(run_once(topics_ready, batch=True))
    assert len(ids) == COUNT and len(set(ids)) == COUNT


def test_a_record_transaction_that_committed_despite_a_failed_commit_is_not_redone(topics_ready: str) -> None:
    ids = asyncio.run(run_once(topics_ready, batch=False))
    assert len(ids) == COUNT and len(set(ids)) == COUNT
