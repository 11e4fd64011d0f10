"""Run-time policy changes reach output redaction too, not only the redaction service.

The inference worker redacts model output under each tenant's policy. Policies
change at run time on the compacted sluice.policies.v1, so the worker's
boundary folds that topic: all of it before the worker serves (a stricter policy
set earlier must hold after a restart), then every change as it is published.
It reads without a consumer group, because every process needs every update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.metering.reader import topic_partitions
from services.redaction.policy import POLICIES, PolicyError
from sluice.kafka import started, with_backoff
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.v1 import privacy_pb2

log = get_logger()


@dataclass
class PolicyFollower:
    """Applies every PolicyUpdate on sluice.policies.v1 with `apply`, from the first one on."""

    bootstrap: str
    apply: Callable[[privacy_pb2.PolicyUpdate], object]
    service: str = "inference"
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        consumer = await with_backoff("policy reader", self.service, self._start)
        try:
            ends = await consumer.end_offsets(list(consumer.assignment()))
            while True:
                for records in (await consumer.getmany(timeout_ms=200, max_records=500)).values():
                    for record in records:
                        self._apply(record)
                if not self.caught_up.is_set() and await _reached(consumer, ends):
                    self.caught_up.set()
                    log.info("redaction policies loaded", topic=POLICIES)
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id=f"sluice-{self.service}-policies",
                enable_auto_commit=False,
                fetch_max_wait_ms=100,
            )
        )
        try:
            partitions = await topic_partitions(consumer, POLICIES)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    def _apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A bad update keeps the policy in force (the redaction service dead-letters it)."""
        if record.value is None:
            return
        try:
            self.apply(privacy_pb2.PolicyUpdate.FromString(record.value))
        except (DecodeError, PolicyError) as exc:
            reason = str(exc) if isinstance(exc, PolicyError) else "undecodable PolicyUpdate"
            log.warning("policy update ignored", offset=record.offset, reason=reason)


async def _reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    return all([await consumer.position(tp) >= end for tp, end in ends.items()])
