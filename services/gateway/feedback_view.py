"""The gateway's copy of sluice.feedback-stats.v1, so GetFeedbackStats is a lookup on any replica.

The feedback stream (streams/feedback_stats.py) publishes each group's totals
to that compacted topic; every replica reads it from the start, no group.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from google.protobuf.message import DecodeError

from services.metering.reader import topic_partitions
from sluice.kafka import started, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.v1 import feedback_pb2
from streams.feedback_stats import FEEDBACK_STATS

log = get_logger()


@dataclass
class FeedbackView:
    bootstrap: str
    # group key -> newest totals
    _stats: dict[str, feedback_pb2.FeedbackStats] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        consumer = await with_backoff("feedback stats reader", "gateway", self._start)
        self.ready.set()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batches.values():
                    for record in records:
                        self.apply(bytes(record.key or b"").decode(errors="replace"), record.value)
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id="sluice-gateway-feedback-stats",
                enable_auto_commit=False,
                isolation_level="read_committed",
                fetch_max_wait_ms=IDLE_POLL_MS,  # a long poll: answered as soon as a record arrives
            )
        )
        try:
            partitions = await topic_partitions(consumer, FEEDBACK_STATS)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    def apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._stats.pop(key, None)
            return
        try:
            self._stats[key] = feedback_pb2.FeedbackStats.FromString(value)
        except DecodeError:
            log.warning("undecodable feedback stats dropped", key=key)

    def query(self, tenant: str, model: str = "") -> list[feedback_pb2.FeedbackStats]:
        """One tenant's groups (optionally one model's), in a stable order."""
        found = [s for s in self._stats.values() if s.tenant == tenant and (not model or s.model == model)]
        return sorted(found, key=lambda s: (s.model, s.template_name, s.template_version, s.variant))
