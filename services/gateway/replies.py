"""Routes reply events from this gateway's partition of sluice.tokens.v1 to waiting calls.

The reader has no consumer group: a gateway replica owns one partition and only
needs what arrives after it starts, so it seeks to the end once and never commits.

It is two readers of that partition. Metering writes its replies (the charge, or a
failure) inside its ledger transaction, and a read-committed reader sees nothing
past an open transaction: every token chunk written after a charge's transaction
began would wait for metering to commit, and under load metering's transactions
are open most of the time. So a read-uncommitted reader delivers the replies of
the non-transactional writers (pseudonyms, chunks, finished, restarts, failures
of the other stages) as soon as they are written, and a read-committed reader
delivers only metering's, once committed (an aborted charge is never seen).

`replay` is the other way in, for an idempotent retry that attaches to a request
already running or done (maybe on another replica): it reads the owner's reply
partition from the time the request was published, so the retry gets the whole
answer from its first token, live if it is still running.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError

from sluice.kafka import pace, start_partition_reader
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.logs import get_logger
from sluice.topics import TOKENS
from sluice.v1 import events_pb2

log = get_logger()
Replies = asyncio.Queue[events_pb2.ReplyEvent]
# Writers whose replies are transactional; the read-committed reader delivers only theirs.
TRANSACTIONAL_WRITERS = frozenset({"metering"})
# Replies that come before a request's first chunk (or instead of chunks): seeing one
# first means the replay starts at the beginning of the answer.
WHOLE_FROM = ("pseudonyms", "restarted", "finished", "failed")
# The committed reader (charges) takes a batch at most this often. It sees every token
# chunk on the partition too, so unpaced it would fetch once per chunk under load; a
# stream's end may wait this long for its charge. Idle, it long-polls (IDLE_POLL_MS).
CHARGE_READ_INTERVAL_S = 0.02


class ReplyRouter:
    def __init__(self, bootstrap: str, partition: int) -> None:
        self.bootstrap = bootstrap
        self.partition = partition
        # Usually one call per request; two when the same idempotency key arrives twice at once.
        self._waiting: dict[str, list[Replies]] = {}
        self.ready = asyncio.Event()

    def register(self, request_id: str) -> Replies:
        """Register before publishing the request, so no reply can slip past."""
        queue: Replies = asyncio.Queue()
        self._waiting.setdefault(request_id, []).append(queue)
        return queue

    def unregister(self, request_id: str, queue: Replies) -> None:
        queues = self._waiting.get(request_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._waiting.pop(request_id, None)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._waiting

    async def run(self) -> None:
        tp = TopicPartition(TOKENS, self.partition)
        committed = await start_partition_reader(self.bootstrap, "gateway", "sluice-gateway-replies", tp)
        try:
            live = await start_partition_reader(
                self.bootstrap,
                "gateway",
                "sluice-gateway-replies-live",
                tp,
                isolation_level="read_uncommitted",
            )
        except BaseException:
            await committed.stop()
            raise
        self.ready.set()
        log.info("reading replies", topic=TOKENS, partition=self.partition)
        try:
            await asyncio.gather(
                self._follow(committed, transactional=True, interval_s=CHARGE_READ_INTERVAL_S),
                self._follow(live, transactional=False),
            )
        finally:
            await committed.stop()
            await live.stop()

    async def _follow(self, consumer: AIOKafkaConsumer, transactional: bool, interval_s: float = 0.0) -> None:
        """Deliver what `consumer` reads; with `interval_s`, take a batch at most that often."""
        while True:
            batches = await consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=500)
            taken = time.monotonic()
            for records in batches.values():
                for record in records:
                    self._dispatch(record.value, transactional)
            if batches and interval_s:
                await pace(taken, interval_s)

    def _dispatch(self, value: bytes | None, transactional: bool) -> None:
        event = events_pb2.ReplyEvent()
        try:
            event.ParseFromString(value or b"")
        except DecodeError:
            if not transactional:  # both readers see it; one warning is enough
                log.warning("undecodable reply dropped", partition=self.partition)
            return
        if (event.envelope.producer in TRANSACTIONAL_WRITERS) != transactional:
            return  # the other reader delivers it
        for queue in self._waiting.get(event.envelope.request_id, ()):
            queue.put_nowait(event)


def gone(request_id: str, attempt: int) -> events_pb2.ReplyEvent:
    """What `replay` reports when a finished request's replies have left sluice.tokens.v1."""
    event = events_pb2.ReplyEvent(
        failed=events_pb2.StreamFailed(
            code="ALREADY_EXISTS",
            message=f"idempotency_key: request {request_id} already ran, and its answer is no longer "
            "kept on sluice.tokens.v1 (retention); it is not run twice",
            stage="gateway",
        )
    )
    event.envelope.request_id, event.envelope.attempt = request_id, attempt
    return event


async def replay(
    bootstrap: str,
    partition: int,
    request_id: str,
    attempt: int,
    since_ms: int,
    finished: bool,
    queue: Replies,
) -> None:
    """Put every reply of `request_id` on `partition` from `since_ms` on into `queue`, then follow.

    If the request had `finished` before this started and its replies are no longer
    there (sluice.tokens.v1 keeps them an hour), `gone` is put in instead.
    """
    tp = TopicPartition(TOKENS, partition)
    consumer = await start_partition_reader(bootstrap, "gateway", "sluice-gateway-attach", tp)
    try:
        end = await consumer.position(tp)
        found = (await consumer.offsets_for_times({tp: since_ms})).get(tp)
        consumer.seek(tp, found.offset if found is not None else end)
        whole = not finished  # a running request's replies are all still to come or kept
        while True:
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=500)
            for record in batches.get(tp, ()):
                event = events_pb2.ReplyEvent()
                try:
                    event.ParseFromString(record.value or b"")
                except DecodeError:
                    continue
                if event.envelope.request_id != request_id:
                    continue
                kind = event.WhichOneof("body")
                # The answer is whole if its first chunk (or its end) is still on the partition.
                whole = whole or kind in WHOLE_FROM or (kind == "chunk" and event.chunk.seq == 0)
                if whole:
                    queue.put_nowait(event)
            if not whole and await consumer.position(tp) >= end:
                queue.put_nowait(gone(request_id, attempt))
                return
    finally:
        await consumer.stop()
