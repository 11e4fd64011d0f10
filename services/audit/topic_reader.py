"""Reads sluice.audit.v1 straight from Kafka: for replay and for verifying the topic itself."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiokafka import ConsumerRecord, TopicPartition

from sluice.kafka import start_partition_reader
from sluice.topics import AUDIT

AUDIT_PARTITION = TopicPartition(AUDIT, 0)


async def read_audit_topic(
    bootstrap: str, *, from_offset: int = 0, from_ms: int | None = None, to_ms: int | None = None
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Records from `from_ms` (by timestamp lookup) or `from_offset`, up to the end at call time.

    Stops before the first record stamped at or after `to_ms`. The end is fixed
    when the call starts, so a replay terminates while the writer keeps appending.
    """
    consumer = await start_partition_reader(bootstrap, "audit", "sluice-audit-replay", AUDIT_PARTITION, 0)
    try:
        end = (await consumer.end_offsets([AUDIT_PARTITION]))[AUDIT_PARTITION]
        start = from_offset
        if from_ms is not None:
            found = (await consumer.offsets_for_times({AUDIT_PARTITION: from_ms}))[AUDIT_PARTITION]
            if found is None:
                return
            start = max(start, found.offset)
        if start >= end:
            return
        consumer.seek(AUDIT_PARTITION, start)
        while True:
            batches = await consumer.getmany(AUDIT_PARTITION, timeout_ms=500, max_records=1000)
            for record in batches.get(AUDIT_PARTITION, []):
                if record.offset >= end or (to_ms is not None and record.timestamp >= to_ms):
                    return
                yield record
            # Transaction markers occupy offsets too, so compare positions, not record offsets.
            if await consumer.position(AUDIT_PARTITION) >= end:
                return
    finally:
        await consumer.stop()
