"""Which attempts of a prompt were already started or closed, from sluice.inference-attempts.v1.

A worker that dies mid-stream leaves its prompt uncommitted, so the group hands
it to another worker. That worker must tell three cases apart: a first run, a
re-run after a crash (run attempt + 1 and tell the caller the stream
restarted), and a mere duplicate of an answered attempt (drop it). The prompt
itself cannot say which, so each worker writes small markers: STARTED before
the first token leaves, and FINISHED (answered) or HANDED_BACK (completion
published, request not answered) together with the attempt's completion.

A marker goes to the same partition number as its prompt, so checking a
redelivered prompt means reading one partition from shortly before the oldest
uncommitted prompt's timestamp: a bounded read, done once per assignment.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from sluice import envelope as envelopes
from sluice.kafka import Output, started, wants_chunk, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import INFERENCE_ATTEMPTS, TOKENS, BadEvent, Codec
from sluice.v1 import attempts_pb2, envelope_pb2, events_pb2

log = get_logger()

STARTED = attempts_pb2.ATTEMPT_STATE_STARTED
FINISHED = attempts_pb2.ATTEMPT_STATE_FINISHED
HANDED_BACK = attempts_pb2.ATTEMPT_STATE_HANDED_BACK


@dataclass
class History:
    """What the markers say about one request's attempts."""

    started: dict[int, str] = field(default_factory=dict)  # attempt -> worker
    started_ms: dict[int, int] = field(default_factory=dict)  # attempt -> when its STARTED was written
    closed: dict[int, int] = field(default_factory=dict)  # attempt -> FINISHED | HANDED_BACK

    @property
    def last_started(self) -> int:
        return max(self.started, default=0)

    def note(self, attempt: int, state: int, worker: str, at_ms: int) -> None:
        if state == STARTED:
            self.started[attempt] = worker
            self.started_ms[attempt] = at_ms
        else:
            self.started.setdefault(attempt, worker)
            self.closed[attempt] = state


@dataclass
class AttemptBook:
    """Markers per request, loaded lazily per (prompt topic, partition) after each assignment."""

    bootstrap: str
    codec: Codec
    producer: AIOKafkaProducer
    worker: str
    # Clock skew allowed between the prompts service and workers when seeking by time.
    margin_ms: int = 60_000
    capacity: int = 200_000
    _histories: OrderedDict[str, History] = field(default_factory=OrderedDict)
    _loaded: set[tuple[str, int]] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _reader: AIOKafkaConsumer | None = None

    def check_partitions(self, *prompt_topics: str) -> None:
        """Markers share their prompt's partition number: refuse a plan where that cannot hold."""
        mine = self.codec.plan.topics[INFERENCE_ATTEMPTS].partitions
        for topic in prompt_topics:
            theirs = self.codec.plan.topics[topic].partitions
            if theirs > mine:
                raise ValueError(
                    f"topics.{INFERENCE_ATTEMPTS}.partitions ({mine}) must be at least "
                    f"topics.{topic}.partitions ({theirs})"
                )

    def reassigned(self, tps: set[TopicPartition]) -> None:
        """Another worker may have run these partitions' prompts meanwhile: read their markers again."""
        self._loaded -= {(tp.topic, tp.partition) for tp in tps}

    async def history(self, record: ConsumerRecord[bytes, bytes], request_id: str) -> History:
        key = (record.topic, record.partition)
        if key not in self._loaded:
            async with self._lock:
                if key not in self._loaded:
                    await self._load(record.partition, record.timestamp - self.margin_ms)
                    self._loaded.add(key)
        return self._histories.get(request_id) or History()

    def marker(
        self, envelope: envelope_pb2.Envelope, attempt: int, state: int, record: ConsumerRecord[bytes, bytes]
    ) -> Output:
        """The marker as an Output (produced with the attempt's completion), noted here at once."""
        env = envelopes.follow(envelope, "inference")
        env.attempt = attempt
        event = attempts_pb2.AttemptMarker(
            envelope=env,
            state=state,  # type: ignore[arg-type]
            worker=self.worker,
            source_topic=record.topic,
            source_offset=record.offset,
        )
        self._note(env.request_id, attempt, state, self.worker, int(time.time() * 1000))
        return Output(INFERENCE_ATTEMPTS, event, env.request_id, record.partition)

    async def mark_started(
        self, envelope: envelope_pb2.Envelope, attempt: int, record: ConsumerRecord[bytes, bytes]
    ) -> asyncio.Future[object]:
        """Send STARTED now; the returned future resolves once it is durable."""
        output = self.marker(envelope, attempt, STARTED, record)
        future: asyncio.Future[object] = await self.producer.send(
            output.topic,
            output.event.SerializeToString(),
            key=output.key.encode(),
            partition=output.partition,
        )
        return future

    def _note(self, request_id: str, attempt: int, state: int, worker: str, at_ms: int) -> None:
        history = self._histories.get(request_id)
        if history is None:
            history = self._histories[request_id] = History()
            if len(self._histories) > self.capacity:
                self._histories.popitem(last=False)
        history.note(attempt, state, worker, at_ms)

    async def _load(self, partition: int, since_ms: int) -> None:
        count = 0
        async for record in self._read_since(TopicPartition(INFERENCE_ATTEMPTS, partition), since_ms):
            try:
                marker = self.codec.decode(INFERENCE_ATTEMPTS, record.value)
            except BadEvent as exc:
                log.warning("unreadable attempt marker skipped", offset=record.offset, reason=str(exc))
                continue
            assert isinstance(marker, attempts_pb2.AttemptMarker)
            env = marker.envelope
            self._note(env.request_id, env.attempt, marker.state, marker.worker, record.timestamp)
            count += 1
        log.info("attempt markers read", partition=partition, markers=count)

    async def delivered_tokens(
        self, reply_to: envelope_pb2.ReplyTo, request_id: str, attempt: int, since_ms: int
    ) -> int:
        """Output tokens a dead attempt had streamed to its caller: the sum of that attempt's
        chunk `tokens` on the reply partition since its STARTED marker. Read only after a crash."""
        if not wants_chunk(reply_to) or reply_to.topic != TOKENS:
            return 0  # no chunks were sent, or not to a partition we can name: nothing knowable
        tokens, wanted = 0, request_id.encode()
        async with self._lock:
            tp = TopicPartition(reply_to.topic, reply_to.partition)
            async for record in self._read_since(tp, since_ms - self.margin_ms):
                if record.key != wanted:
                    continue
                reply = events_pb2.ReplyEvent.FromString(record.value or b"")
                if reply.WhichOneof("body") == "chunk" and reply.envelope.attempt == attempt:
                    tokens += reply.chunk.tokens
        return tokens

    async def _read_since(
        self, tp: TopicPartition, since_ms: int
    ) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
        """Records of `tp` from `since_ms` to its end as of now (callers hold the lock)."""
        if self._reader is None:
            self._reader = await with_backoff("attempt reader", "inference", self._start_reader)
        reader: AIOKafkaConsumer = self._reader
        reader.assign([tp])
        try:
            found = (await reader.offsets_for_times({tp: max(0, since_ms)})).get(tp)
            if found is None:
                return  # nothing that new
            reader.seek(tp, found.offset)
            end = (await reader.end_offsets([tp]))[tp]
            while await reader.position(tp) < end:
                for record in (await reader.getmany(tp, timeout_ms=500)).get(tp, []):
                    if record.offset < end:
                        yield record
        finally:
            # An assigned reader keeps fetching in the background; this one is used
            # once per assignment, so leave nothing assigned between reads.
            reader.unsubscribe()

    async def _start_reader(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **client_options(),
            client_id=f"sluice-inference-attempts-{self.worker}",
            enable_auto_commit=False,
            fetch_max_wait_ms=IDLE_POLL_MS,
        )
        return await started(consumer)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
