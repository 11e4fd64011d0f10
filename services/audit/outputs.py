"""Assembles each request's (output-redacted) model output from sluice.tokens.v1 for the trail.

The output text travels only as reply chunks on the caller's reply partition,
already passed through the inference worker's output redaction. The collector
follows every tokens partition and keeps the chunks of tenants whose policy
stores content, per (request_id, attempt). When the writer chains a
completion it asks for that attempt's output: the worker's chunks are acked
before its completion is produced, so once the collector has read the reply
partition up to its end offset at that moment, every chunk is in hand.

What it cannot know it says: an output whose chunks were never seen (the
service was down longer than the look-back, a completion-only batch reply
with no chunks) comes back as None and the record says `output=unavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError

from sluice.kafka import pace, started, with_backoff
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import TOKENS
from sluice.v1 import events_pb2

log = get_logger()
# Attempts whose chunks are held at once; the oldest are dropped past this.
CAPACITY = 20_000
# Longest a completion waits for the collector to reach its reply partition's end.
CATCH_UP_S = 30.0
# The audit's readers take a batch at most this often (sluice.kafka.pace).
AUDIT_READ_INTERVAL_S = 0.1

Attempt = tuple[str, int]


class OutputCollector:
    def __init__(
        self,
        bootstrap: str,
        partitions: int,
        stores_content: Callable[[str], bool],
        lookback_s: float,
        capacity: int = CAPACITY,
    ) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.stores_content = stores_content
        self.lookback_s = lookback_s
        self.capacity = capacity
        self._chunks: OrderedDict[Attempt, dict[int, str]] = OrderedDict()
        self._positions: dict[int, int] = {}
        self._moved = asyncio.Condition()
        self._consumer: AIOKafkaConsumer | None = None
        # End offsets come from a second client that never fetches: the broker answers one
        # connection's requests in order, so a ListOffsets sent on the collector's own
        # connection would wait behind its long poll (up to fetch_max_wait_ms per completion).
        self._offsets: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()

    def feed(self, value: bytes | None) -> None:
        """Keep one reply event's chunk if its tenant stores content (re-sent chunks replace)."""
        if not value:
            return
        try:
            reply = events_pb2.ReplyEvent.FromString(value)
        except DecodeError:  # the gateway reading this partition reports it; here it is no output
            return
        if reply.WhichOneof("body") != "chunk" or not self.stores_content(reply.envelope.tenant):
            return
        attempt = (reply.envelope.request_id, reply.envelope.attempt)
        chunks = self._chunks.get(attempt)
        if chunks is None:
            chunks = self._chunks[attempt] = {}
            if len(self._chunks) > self.capacity:
                dropped, _ = self._chunks.popitem(last=False)
                log.warning("audit output buffer full; oldest output dropped", request_id=dropped[0])
        chunks[reply.chunk.seq] = reply.chunk.delta

    def assembled(self, request_id: str, attempt: int) -> str | None:
        """The output of one attempt in chunk order, forgotten once taken; None if no chunk was seen."""
        chunks = self._chunks.pop((request_id, attempt), None)
        if chunks is None:
            return None
        return "".join(chunks[seq] for seq in sorted(chunks))

    async def take(self, request_id: str, attempt: int, partition: int) -> str | None:
        """The attempt's output once the reply partition is read to its current end."""
        await self.ready.wait()
        offsets = self._offsets
        assert offsets is not None
        tp = TopicPartition(TOKENS, partition)
        if partition not in self._positions:
            return self.assembled(request_id, attempt)
        end = (await offsets.end_offsets([tp]))[tp]
        try:
            async with self._moved:
                await asyncio.wait_for(
                    self._moved.wait_for(lambda: self._positions.get(partition, 0) >= end), CATCH_UP_S
                )
        except TimeoutError:
            log.warning("audit output collector is behind; recording what it has", request_id=request_id)
        return self.assembled(request_id, attempt)

    async def run(self) -> None:
        consumer = await with_backoff("tokens reader", "audit", self._start)
        self._consumer = consumer
        try:
            self._offsets = await with_backoff("tokens end offsets", "audit", self._start)
            tps = [TopicPartition(TOKENS, p) for p in range(self.partitions)]
            consumer.assign(tps)
            since = int((time.time() - self.lookback_s) * 1000)
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since))
            for tp in tps:
                if found.get(tp) is not None:
                    consumer.seek(tp, found[tp].offset)  # type: ignore[union-attr]
                else:
                    await consumer.seek_to_end(tp)
                self._positions[tp.partition] = await consumer.position(tp)
            self.ready.set()
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                taken = time.monotonic()
                for records in batches.values():
                    for record in records:
                        self.feed(record.value)
                async with self._moved:
                    for tp in tps:
                        self._positions[tp.partition] = await consumer.position(tp)
                    self._moved.notify_all()
                if batches:
                    # Chunks come a few ms apart: a batch per interval, not a fetch per chunk;
                    # `take` may wait that much longer for a reply partition.
                    await pace(taken, AUDIT_READ_INTERVAL_S)
        finally:
            await consumer.stop()
            if self._offsets is not None:
                await self._offsets.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **client_options(),
            client_id="sluice-audit-outputs",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        return await started(consumer)
