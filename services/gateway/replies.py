"""Routes reply events from this gateway's partition of sluice.tokens.v1 to waiting calls.

The reader has no consumer group: a gateway replica owns one partition and only
needs what arrives after it starts, so it seeks to the end once and never commits.
"""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from google.protobuf.message import DecodeError

from sluice.kafka import start_partition_reader
from sluice.logs import get_logger
from sluice.topics import TOKENS
from sluice.v1 import events_pb2

log = get_logger()


class ReplyRouter:
    def __init__(self, bootstrap: str, partition: int) -> None:
        self.bootstrap = bootstrap
        self.partition = partition
        self._waiting: dict[str, asyncio.Queue[events_pb2.ReplyEvent]] = {}
        self.ready = asyncio.Event()

    def register(self, request_id: str) -> asyncio.Queue[events_pb2.ReplyEvent]:
        """Register before publishing the request, so no reply can slip past."""
        queue: asyncio.Queue[events_pb2.ReplyEvent] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._waiting

    async def run(self) -> None:
        tp = TopicPartition(TOKENS, self.partition)
        consumer = await start_partition_reader(self.bootstrap, "gateway", "sluice-gateway-replies", tp)
        self.ready.set()
        log.info("reading replies", topic=TOKENS, partition=self.partition)
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                for records in batches.values():
                    for record in records:
                        self._dispatch(record.value)
        finally:
            await consumer.stop()

    def _dispatch(self, value: bytes | None) -> None:
        event = events_pb2.ReplyEvent()
        try:
            event.ParseFromString(value or b"")
        except DecodeError:
            log.warning("undecodable reply dropped", partition=self.partition)
            return
        queue = self._waiting.get(event.envelope.request_id)
        if queue is not None:
            queue.put_nowait(event)
