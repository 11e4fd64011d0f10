"""Reading committed records of a topic back, from a point in time to its current end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from sluice.kafka import started, with_backoff
from sluice.kafka_security import client_options

SERVICE = "metering"


async def read_committed(
    bootstrap: str, topic: str, since: datetime | None = None
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every committed record of `topic` (from `since`, if given) written before this call.

    Reads up to the high watermark, not the last stable offset: a read-committed end
    stops before any still-open transaction, which would hide records committed after
    it. Waiting for those transactions to finish makes the read complete.
    """

    async def start() -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **client_options(),
            client_id="sluice-metering-replay",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        return await started(consumer)

    consumer = await with_backoff(f"replay {topic}", SERVICE, start)
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign(partitions)
        ends = await high_watermarks(bootstrap, partitions)
        todo: dict[TopicPartition, int] = {}
        starts = (
            await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in partitions})
            if since is not None
            else {}
        )
        for tp in partitions:
            if since is None:
                await consumer.seek_to_beginning(tp)
            elif starts.get(tp) is None:
                continue  # nothing at or after `since`
            else:
                consumer.seek(tp, starts[tp].offset)  # type: ignore[union-attr]
            if await consumer.position(tp) < ends[tp]:
                todo[tp] = ends[tp]
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=1000, max_records=5000)
            for records in batches.values():
                for record in records:
                    if record.offset < todo.get(TopicPartition(record.topic, record.partition), 0):
                        yield record
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await consumer.stop()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`. Asking for partition 0's end loads the topic's metadata,
    which `partitions_for_topic` only reads from the cache."""
    await consumer.end_offsets([TopicPartition(topic, 0)])
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


async def high_watermarks(bootstrap: str, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Where each partition ends, open transactions included."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **client_options(), isolation_level="read_uncommitted"
    )
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()
