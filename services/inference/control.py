"""Cancels from sluice.control.v1: abort the matching generation, or remember the cancel.

Every worker reads the whole topic without a group (each must see every cancel,
since it cannot know who runs the request). A cancel can overtake its prompt
(the caller gave up while the prompt was still queued), so one for a request
not running here is remembered for `memory_s`, and the prompt, when it comes,
is not started.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from sluice.kafka import started, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import CONTROL, BadEvent, Codec
from sluice.v1 import events_pb2

log = get_logger()

Abort = Callable[[], Awaitable[None]]


@dataclass
class CancelBoard:
    """Running requests' abort hooks, and cancels that came before their request."""

    memory_s: float = 300.0
    capacity: int = 100_000
    _running: dict[str, Abort] = field(default_factory=dict)
    _early: OrderedDict[str, tuple[float, str]] = field(default_factory=OrderedDict)

    def running(self, request_id: str, abort: Abort) -> None:
        self._running[request_id] = abort

    def done(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    async def cancel(self, request_id: str, reason: str) -> bool:
        """Abort `request_id` if it runs here (True); otherwise remember the cancel."""
        abort = self._running.get(request_id)
        if abort is not None:
            await abort()
            return True
        self._early[request_id] = (time.monotonic() + self.memory_s, reason)
        self._early.move_to_end(request_id)
        self._forget_expired()
        return False

    def cancelled_early(self, request_id: str) -> str | None:
        """The reason if a cancel for `request_id` arrived before it started here."""
        self._forget_expired()
        entry = self._early.get(request_id)
        return entry[1] if entry is not None else None

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._early:
            oldest = next(iter(self._early.values()))
            if oldest[0] > now and len(self._early) <= self.capacity:
                break
            self._early.popitem(last=False)


@dataclass
class ControlReader:
    """Reads every partition of sluice.control.v1 from `memory_s` ago and feeds the board."""

    bootstrap: str
    codec: Codec
    board: CancelBoard
    worker: str
    _consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        consumer = await with_backoff("control reader", "inference", self._start)
        self._consumer = consumer
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        await self._apply(record.value, record.partition, record.offset)
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **client_options(),
            client_id=f"sluice-inference-control-{self.worker}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            # A long poll: the broker answers as soon as a cancel arrives, so this only
            # sets how often an idle reader asks (10 ms cost a broker core share per worker).
            fetch_max_wait_ms=IDLE_POLL_MS,
        )
        await started(consumer)
        try:
            tps = [TopicPartition(CONTROL, p) for p in range(self.codec.plan.topics[CONTROL].partitions)]
            consumer.assign(tps)
            since = int((time.time() - self.board.memory_s) * 1000)
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since))
            for tp in tps:
                at = found.get(tp)
                if at is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, at.offset)
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        log.info("reading cancels", partitions=len(tps))
        return consumer

    async def _apply(self, value: bytes | None, partition: int, offset: int) -> None:
        try:
            event = self.codec.decode(CONTROL, value)
        except BadEvent as exc:  # every worker reads this topic: skip, never dead-letter N times
            log.warning(
                "unreadable control event skipped", partition=partition, offset=offset, reason=str(exc)
            )
            return
        assert isinstance(event, events_pb2.ControlEvent)
        request_id = event.envelope.request_id
        if event.WhichOneof("action") != "cancel" or not request_id:
            return
        try:
            aborted = await self.board.cancel(request_id, event.cancel.reason or "cancelled")
        except KafkaError:
            log.exception("cancel failed", request_id=request_id)
            return
        log.info("cancel applied" if aborted else "cancel remembered", request_id=request_id)
