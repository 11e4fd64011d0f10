"""Reading back what ChunkWriters sent: every chunk of some requests, in partition order."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from sluice.topics import TOKENS
from sluice.v1 import events_pb2


async def chunks_of(
    bootstrap: str, request_ids: set[str], partition: int = 0
) -> dict[str, list[events_pb2.TokenChunk]]:
    """Every chunk sent to `partition` of sluice.tokens.v1 for `request_ids` (all acknowledged first)."""
    tp = TopicPartition(TOKENS, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found: dict[str, list[events_pb2.TokenChunk]] = {r: [] for r in request_ids}
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                for record in records:
                    reply = events_pb2.ReplyEvent.FromString(record.value or b"")
                    if reply.envelope.request_id in request_ids:
                        found[reply.envelope.request_id].append(reply.chunk)
        return found
    finally:
        await consumer.stop()
