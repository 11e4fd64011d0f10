"""Kafka I/O every service shares: resilient start-up, produce, and the consume loop.

The loop gives every consumer the same guarantees: offsets are committed only
after a record's outputs are produced (in one transaction where the service is
transactional), duplicates of (request_id, attempt) are dropped, and a record
that can never be processed goes to the dead-letter topic instead of stopping
the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import random
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from google.protobuf.message import Message

from sluice import envelope as envelopes
from sluice import metrics, tracing
from sluice.config import ConfigError
from sluice.kafka_security import client_options, refusal
from sluice.logs import get_logger
from sluice.topics import DLQ, TOKENS, BadEvent, Codec
from sluice.v1 import events_pb2

log = get_logger()

T = TypeVar("T")
_MURMUR_M = 0x5BD1E995
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's (Java client's) murmur2 of a key, bit for bit, cheaper than aiokafka's.

    aiokafka's default partitioner hashes every keyed send byte by byte in pure Python;
    reading the key's 32-bit words at once is about twice as cheap (a unit test checks
    it against aiokafka's for many keys), so a key still lands where a Java or
    librdkafka producer would put it.
    """
    length = len(data)
    h = 0x9747B28C ^ length
    base = length & ~3
    for k in memoryview(data)[:base].cast("I"):  # little-endian words (checked at import)
        k = (k * _MURMUR_M) & _MASK32
        k ^= k >> 24
        h = ((h * _MURMUR_M) & _MASK32) ^ ((k * _MURMUR_M) & _MASK32)
    tail = length & 3
    if tail >= 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail:
        h = ((h ^ data[base]) * _MURMUR_M) & _MASK32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _MASK32
    return h ^ (h >> 15)


if sys.byteorder != "little" or struct.calcsize("I") != 4:  # the word reads above assume both
    from aiokafka.partitioner import murmur2  # type: ignore[no-redef]


def partition_for(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's DefaultPartitioner (Java-compatible: murmur2 of the key), with the fast murmur2."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


@cache
def _consumed(service: str, topic: str, outcome: str) -> Any:
    """Labelled children are looked up once: a label lookup costs as much as a small handler."""
    return metrics.EVENTS_CONSUMED.labels(service, topic, outcome)


@cache
def _handler_seconds(service: str, topic: str) -> Any:
    return metrics.HANDLER_SECONDS.labels(service, topic)


@cache
def _produced(service: str, topic: str) -> Any:
    return metrics.EVENTS_PRODUCED.labels(service, topic)


async def with_backoff(
    what: str,
    service: str,
    start: Callable[[], Awaitable[T]],
    *,
    first_delay: float = 0.5,
    max_delay: float = 15.0,
) -> T:
    """Retry `start` while the cluster is unreachable: one clear line per try, no traceback.

    A cluster that refuses our credentials (or whose certificate we refuse) is not
    unreachable: that stops the caller with a ConfigError naming the settings to fix.
    """
    delay = first_delay
    while True:
        try:
            return await start()
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if isinstance(exc, KafkaConnectionError) and (why := await refusal()) is not None:
                log.error("kafka refused this client", what=what, reason=why)
                raise ConfigError(why) from None
            metrics.KAFKA_CONNECT_RETRIES.labels(service).inc()
            log.warning(
                "kafka unreachable, retrying",
                what=what,
                error=type(exc).__name__,
                retry_in_s=round(delay, 1),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def start_producer(
    bootstrap: str, service: str, transactional_id: str | None = None
) -> AIOKafkaProducer:
    async def start() -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **client_options(),
            client_id=f"sluice-{service}",
            enable_idempotence=True,
            acks="all",
            linger_ms=1,
            transactional_id=transactional_id,
            partitioner=partition_for,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    return await with_backoff("producer", service, start)


async def started(consumer: AIOKafkaConsumer) -> AIOKafkaConsumer:
    """Start `consumer`, closing it when start fails so that retries leak no connections."""
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def pace(taken: float, interval_s: float) -> None:
    """Wait until `interval_s` after `taken` (time.monotonic) before the next getmany.

    For readers off the caller's path that see every token chunk (the audit
    trail; the charge a stream ends with). A long poll returns as soon as one
    record arrives, so such a reader would fetch once per chunk, a few ms
    apart. aiokafka fetches a partition again only once its buffered records
    are taken, so waiting here paces the fetches themselves: under load one per
    interval, carrying what arrived meanwhile; idle, one long poll that returns
    at the first record. (The broker spends about 1.2 CPU-ms per record
    produced and fetched on the 2-vCPU dev box: BENCHMARKS.md, bench-overhead.)
    """
    await asyncio.sleep(interval_s - (time.monotonic() - taken))


async def start_partition_reader(
    bootstrap: str,
    service: str,
    client_id: str,
    tp: TopicPartition,
    offset: int | None = None,
    isolation_level: str = "read_committed",
) -> AIOKafkaConsumer:
    """A group-less reader of one partition, from `offset` or else the end.

    For readers that own their position (a gateway's reply partition, the audit
    indexer), so group rebalances and committed offsets would only get in the way.
    Read committed unless a caller filters what it trusts itself (the gateway's
    reply router takes only non-transactional writers' replies uncommitted).
    """

    async def start() -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **client_options(),
            client_id=client_id,
            enable_auto_commit=False,
            isolation_level=isolation_level,
            fetch_max_wait_ms=500,  # a long poll: the broker answers as soon as a record arrives
        )
        try:
            await consumer.start()
            consumer.assign([tp])
            if offset is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, offset)
            await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    return await with_backoff(client_id, service, start)


@dataclass(frozen=True)
class Output:
    """One record a handler wants produced before its input is committed."""

    topic: str
    event: Message
    key: str
    partition: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


# A record may carry this header when one attempt legitimately has several events on
# one topic (e.g. a ledger charge and its later re-pricing corrections): its value
# joins the dedupe key, so consumers keep them apart instead of dropping them.
ENTRY_HEADER = "sluice-entry"


@dataclass
class RecentKeys:
    """Bounded memory of handled (topic, request_id, attempt) to drop redeliveries."""

    capacity: int = 100_000
    _seen: OrderedDict[tuple[str, str, int, str], None] = field(default_factory=OrderedDict)

    def seen(self, key: tuple[str, str, int, str]) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def remember(self, key: tuple[str, str, int, str]) -> None:
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


Handler = Callable[[Any, ConsumerRecord[bytes, bytes]], Awaitable[Sequence[Output]]]


class RequestFailed(Exception):
    """The request cannot proceed; the caller gets `code` (a gRPC status name) and the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def reply_partition(reply_to: Any) -> int | None:
    """The partition a reply goes to: a gateway's own on sluice.tokens.v1; elsewhere (a Kafka
    producer's reply topic, batch replies) none, so the record is keyed by request_id."""
    return int(reply_to.partition) if reply_to.topic == TOKENS else None


def wants_chunk(reply_to: Any) -> bool:
    """Token chunks go to the reply topic unless only the completion was asked for."""
    return bool(reply_to.topic) and not reply_to.completion_only


def failure_reply(event: Message, code: str, message: str, stage: str) -> list[Output]:
    """A StreamFailed for the gateway waiting on `event`'s request, if one is waiting."""
    reply_to = getattr(event, "reply_to", None)
    if reply_to is None or not reply_to.topic:
        return []
    reply = events_pb2.ReplyEvent(
        envelope=envelopes.follow(event.envelope, stage),  # type: ignore[attr-defined]
        failed=events_pb2.StreamFailed(code=code, message=message, stage=stage),
    )
    return [Output(reply_to.topic, reply, reply.envelope.request_id, reply_partition(reply_to))]


@dataclass
class EventConsumer:
    """Consume `topics` in `group_id`, run `handler`, produce its outputs, then commit."""

    service: str
    group_id: str
    topics: Sequence[str]
    handler: Handler
    codec: Codec
    bootstrap: str
    producer: AIOKafkaProducer
    transactional: bool = False
    # With `transactional`: one transaction per poll (up to `max_records` records) instead of
    # one per record, for consumers whose throughput matters (the metering ledger).
    batch_transactions: bool = False
    max_records: int = 100
    # Run the handlers of one poll concurrently, for handlers that batch their work (redaction
    # joins the poll's texts into one nlp.pipe batch). Outputs are still produced in poll order,
    # each record dead-letters on its own, and a redelivery within the poll is still dropped.
    concurrent: bool = False
    # With `batch_transactions`: called once a poll's records are handled; the outputs it
    # returns join that poll's transaction, after the records' own. For outputs about the
    # poll as a whole (metering's budget sums), which then commit exactly when its records do.
    poll_outputs: Callable[[], Sequence[Output]] | None = None
    # Called once a poll's records are handled, before their offsets commit: for handlers that
    # write a local store, to make the poll durable in one write (metering's SQLite ledger view
    # commits once per poll instead of once per row).
    after_poll: Callable[[], None] | None = None
    # Readers off the caller's path take a poll at most this often (see `pace`).
    poll_interval_s: float = 0.0
    _consumer: AIOKafkaConsumer | None = None
    _pending: list[Output] = field(default_factory=list)
    _pending_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    _recent: RecentKeys = field(default_factory=RecentKeys)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _own_producer: bool = False  # replaced the runtime's broken producer, so we must stop ours
    _commit_unsure: bool = False  # a commit failed, but the broker may have committed it anyway

    async def run(self) -> None:
        consumer = await with_backoff(f"consumer {self.group_id}", self.service, self._start)
        self._consumer = consumer
        log.info("consuming", group=self.group_id, topics=list(self.topics))
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                taken = time.monotonic()
                # Across partitions, handle in event-time order (each partition's order kept),
                # so a request's stages are seen in the order they happened.
                records = list(heapq.merge(*batches.values(), key=lambda r: r.timestamp))
                if self.concurrent:
                    await self._handle_together(records)
                else:
                    for record in records:
                        await self._handle(record)
                if records and self.after_poll is not None:
                    self.after_poll()
                handled = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
                # One commit per poll, after every record's outputs are acknowledged: a crash
                # re-delivers at most this poll, which the (request_id, attempt) dedupe absorbs.
                await self._commit(handled)
                if self._pending_offsets:
                    if self.poll_outputs is not None:
                        self._pending.extend(self.poll_outputs())  # once: retries resend the same
                    await with_backoff("produce", self.service, self._produce_batch)
                if records and self.poll_interval_s:
                    await pace(taken, self.poll_interval_s)
        finally:
            await consumer.stop()
            if self._own_producer:
                await self.producer.stop()

    async def stop(self) -> None:
        """Finish the record in hand, commit it, and leave the group."""
        self._stopping.set()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            **client_options(),
            group_id=self.group_id,
            client_id=f"sluice-{self.service}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        return await started(consumer)

    async def _handle_together(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Every handler at once; each record's outputs wait for the previous record's."""
        produced = [asyncio.Event() for _ in records]

        async def handle(i: int, record: ConsumerRecord[bytes, bytes]) -> None:
            try:
                await self._handle(record, produced[i - 1].wait if i else None)
            finally:
                produced[i].set()

        await asyncio.gather(*(handle(i, record) for i, record in enumerate(records)))

    def _duplicate(self, record: ConsumerRecord[bytes, bytes], env: Any) -> bool:
        if not self._recent.seen(dedupe_key(record, env)):
            return False
        _consumed(self.service, record.topic, "duplicate").inc()
        log.info("duplicate dropped", request_id=env.request_id, attempt=env.attempt)
        return True

    async def _handle(
        self,
        record: ConsumerRecord[bytes, bytes],
        turn: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        started = time.perf_counter()
        outputs: Sequence[Output]
        event: Message | None = None
        outcome = "ok"
        # The span opens once the record is decoded (its context may be in the envelope).
        with contextlib.ExitStack() as scope:
            try:
                event = self.codec.decode(record.topic, record.value, _content_type(record))
                scope.enter_context(tracing.consume_span(self.service, record, event))
                env = getattr(event, "envelope", None)
                if env is not None:
                    try:
                        envelopes.validate(env)
                    except ValueError as exc:
                        raise BadEvent(str(exc)) from None
                    if self._duplicate(record, env):
                        return
                outputs = await self.handler(event, record)
            except BadEvent as exc:
                outcome = "dead_letter"
                outputs = self._dead_letter(record, event, str(exc), "INVALID_ARGUMENT")
            except RequestFailed as exc:
                outcome = "dead_letter"
                outputs = self._dead_letter(record, event, str(exc), exc.code)
            except Exception as exc:  # a bug or a broken dependency must not stop the consumer
                outcome = "dead_letter"
                log.exception("handler failed", topic=record.topic, offset=record.offset)
                reason = f"{self.service} failed: {type(exc).__name__}"
                outputs = self._dead_letter(record, event, reason, "INTERNAL")
            outputs = tracing.traced_outputs(outputs, outcome)
            env = getattr(event, "envelope", None)
            if turn is not None:
                await turn()  # handled concurrently: produce in poll order
                if env is not None and env.request_id and self._duplicate(record, env):
                    return  # the same event came twice in one poll
            if outputs or self.transactional:  # (a transaction commits the offset even of no outputs)
                await with_backoff("produce", self.service, lambda: self._produce(outputs, record))
            if env is not None and env.request_id:
                self._recent.remember(dedupe_key(record, env))
            _consumed(self.service, record.topic, outcome).inc()
            _handler_seconds(self.service, record.topic).observe(time.perf_counter() - started)

    def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], event: Message | None, reason: str, code: str
    ) -> list[Output]:
        return dead_letter(self.service, self.group_id, record, event, reason, code)

    async def _produce(self, outputs: Sequence[Output], record: ConsumerRecord[bytes, bytes]) -> None:
        if self.transactional and self.batch_transactions:
            self._pending.extend(outputs)  # produced with the rest of the poll in `_produce_batch`
            self._pending_offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        elif self.transactional:
            offsets = {TopicPartition(record.topic, record.partition): record.offset + 1}
            if await self._committed_after_all(offsets):
                return
            async with self._transaction():
                await self._send_all(outputs)
                await self.producer.send_offsets_to_transaction(offsets, self.group_id)
        else:
            await self._send_all(outputs)

    async def _produce_batch(self) -> None:
        """One transaction for a whole poll: every output and every input offset, or none."""
        if not await self._committed_after_all(self._pending_offsets):
            async with self._transaction():
                await self._send_all(self._pending)
                await self.producer.send_offsets_to_transaction(self._pending_offsets, self.group_id)
        self._pending.clear()
        self._pending_offsets.clear()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """A transaction; a producer that a failure left unusable is replaced before the retry.

        aiokafka can leave a transactional producer failing every later transaction (e.g.
        OutOfOrderSequenceNumber after a leader change), so retrying with it would stall the
        consumer for good. A new producer with the same transactional id fences the old one
        and settles its last transaction: the broker aborts an open one, but completes one
        whose commit it had begun (its EndTxn was written, and only the answer failed). So
        after a failed commit the retry first asks the group whether the offsets committed
        (`_committed_after_all`): redoing a transaction that did commit would produce its
        outputs twice.
        """
        committing = False
        try:
            async with self.producer.transaction():
                yield
                committing = True  # the body is done; leaving the block commits
        except KafkaError as exc:
            if committing:
                self._commit_unsure = True
                await self._renew_producer(exc)  # settles the transaction before we ask
            elif not isinstance(exc, KafkaConnectionError):
                await self._renew_producer(exc)
            raise

    async def _committed_after_all(self, offsets: dict[TopicPartition, int]) -> bool:
        """After a failed commit: did that transaction (which ended at `offsets`) commit anyway?

        The input offsets commit in the transaction itself, so the group's committed offsets
        say exactly whether it did, once a new producer has settled it.
        """
        if not self._commit_unsure or self._consumer is None:
            return False
        consumer = self._consumer
        committed = {tp: await consumer.committed(tp) for tp in offsets}  # a failure retries
        self._commit_unsure = False
        if any((committed[tp] or 0) < offset for tp, offset in offsets.items()):
            return False
        log.warning("a commit reported as failed had committed; not redoing it", group=self.group_id)
        return True

    async def _renew_producer(self, exc: KafkaError) -> None:
        manager = getattr(self.producer, "_txn_manager", None)  # aiokafka keeps the id only there
        if manager is None or not manager.transactional_id:
            return
        log.warning("transactional producer failed; starting a fresh one", error=type(exc).__name__)
        broken, self.producer = (
            self.producer,
            await start_producer(self.bootstrap, self.service, manager.transactional_id),
        )
        self._own_producer = True
        with contextlib.suppress(Exception):
            await broken.stop()

    async def _send_all(self, outputs: Sequence[Output]) -> None:
        await send_all(self.producer, self.service, outputs)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.transactional or self._consumer is None or not offsets:
            return  # committed inside the transaction
        await self._consumer.commit(offsets)


async def send_all(producer: AIOKafkaProducer, service: str, outputs: Sequence[Output]) -> None:
    """Produce `outputs` together and return once the broker has acknowledged every one."""
    pending = [
        await producer.send(
            o.topic,
            o.event.SerializeToString(),
            key=o.key.encode(),
            partition=o.partition,
            headers=list(o.headers) or None,
        )
        for o in outputs
    ]
    for future in pending:
        await future
    for o in outputs:
        _produced(service, o.topic).inc()


def dead_letter(
    service: str,
    group_id: str,
    record: ConsumerRecord[bytes, bytes],
    event: Message | None,
    reason: str,
    code: str,
) -> list[Output]:
    """The DLQ record for `record` (coordinates and digest, never the payload) and the caller's failure."""
    env = getattr(event, "envelope", None)
    request_id = env.request_id if env is not None and env.request_id else ""
    log.warning(
        "dead-lettered",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason,
        request_id=request_id,
    )
    if record.topic == DLQ:
        return []  # never dead-letter a dead letter: that could loop forever
    payload = record.value or b""
    letter = events_pb2.DeadLetter(
        envelope=envelopes.new_envelope(
            # Several groups may dead-letter one record: the group keeps their ids (and audit) apart.
            request_id=request_id or f"dlq-{group_id}-{record.topic}-{record.partition}-{record.offset}",
            tenant=env.tenant if env is not None and env.tenant else "unknown",
            attempt=max(env.attempt, 1) if env is not None else 1,
            producer=service,
        ),
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        consumer_group=group_id,
        reason=reason,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
    )
    outputs = [Output(DLQ, letter, letter.envelope.request_id)]
    if env is not None and env.request_id:
        outputs.extend(failure_reply(event, code, reason, service))  # type: ignore[arg-type]
    return outputs


async def send(producer: AIOKafkaProducer, service: str, output: Output) -> None:
    output = tracing.with_trace_headers(output)
    await producer.send_and_wait(
        output.topic,
        output.event.SerializeToString(),
        key=output.key.encode(),
        partition=output.partition,
        headers=list(output.headers) or None,
    )
    _produced(service, output.topic).inc()


def _content_type(record: ConsumerRecord[bytes, bytes]) -> bytes | None:
    return _header(record, "content-type")


def _header(record: ConsumerRecord[bytes, bytes], wanted: str) -> bytes | None:
    for name, value in record.headers or ():
        if name.lower() == wanted:
            return bytes(value)
    return None


def dedupe_key(record: ConsumerRecord[bytes, bytes], env: Any) -> tuple[str, str, int, str]:
    """What identifies one event for redelivery checks: topic, request, attempt (and entry)."""
    entry = _header(record, ENTRY_HEADER) or b""
    return (record.topic, env.request_id, env.attempt, entry.decode(errors="replace"))
