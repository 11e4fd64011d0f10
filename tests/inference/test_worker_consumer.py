"""InFlightConsumer on a real broker: bounded in-flight work, pausing, out-of-order commits, priority, DLQ.

The handler here is the test's own (it holds each record until released), so
the consumer's decisions can be observed exactly: how many records it took,
whether it paused, and which offsets it committed. No wall-time assertions:
"it did not take more" is checked after the consumer went round its loop
several times while full.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from google.protobuf.message import Message

from services.metering.reader import read_committed
from sluice import envelope as envelopes
from sluice.kafka import Output
from sluice.kafka_inflight import InFlightConsumer, PartitionProgress, release_capacity
from sluice.topics import DLQ, Codec, TopicPlan, TopicSpec
from sluice.v1 import events_pb2

pytestmark = pytest.mark.timeout(600)  # the session broker may start inside it, slowly on a busy machine


def test_commit_point_is_the_lowest_open_offset() -> None:
    progress = PartitionProgress()
    for offset in (5, 6, 7):
        progress.take(offset)
    progress.finish(6)
    assert progress.commit_point() == 5  # 5 still runs: nothing below 6 is safe yet
    progress.finish(5)
    assert progress.commit_point() == 7
    progress.committed = 7
    assert progress.commit_point() is None
    progress.finish(7)
    assert progress.commit_point() == 8


class Gate:
    """A handler that holds every record until the test releases its offset."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.release: dict[tuple[str, int], asyncio.Event] = {}

    def event(self, topic: str, offset: int) -> asyncio.Event:
        return self.release.setdefault((topic, offset), asyncio.Event())

    async def handle(self, event: Message, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        self.started.append((record.topic, record.offset))
        await self.event(record.topic, record.offset).wait()
        return ()

    def let_go(self, topic: str, offset: int) -> None:
        self.event(topic, offset).set()


class EarlyGate(Gate):
    """Like Gate, but a record gives its capacity back (as a finished generation does) when told."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_done: dict[int, asyncio.Event] = {}

    def finish_engine(self, offset: int) -> None:
        self.engine_done.setdefault(offset, asyncio.Event()).set()

    async def handle(self, event: Message, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        self.started.append((record.topic, record.offset))
        await self.engine_done.setdefault(record.offset, asyncio.Event()).wait()
        release_capacity()
        release_capacity()  # twice: must not free a second slot
        await self.event(record.topic, record.offset).wait()
        return ()


async def _topics(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, count: int, poison_at: int | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            env = envelopes.new_envelope(request_id=uuid.uuid4().hex, tenant="t", producer="test")
            value = (
                b"\xff not a protobuf"
                if i == poison_at
                else events_pb2.PromptAssembled(envelope=env).SerializeToString()
            )
            await producer.send_and_wait(topic, value, key=env.request_id.encode(), partition=0)
    finally:
        await producer.stop()


async def _topic_with(bootstrap: str, kind: str, count: int) -> tuple[str, TopicPartition]:
    """A fresh one-partition topic holding `count` prompts."""
    topic = f"test.{kind}.{uuid.uuid4().hex[:8]}"
    await _topics(bootstrap, topic)
    await _produce(bootstrap, topic, count)
    return topic, TopicPartition(topic, 0)


async def _committed(bootstrap: str, group: str, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # a fresh broker's coordinator is not up yet: nothing committed
        return 0
    finally:
        await admin.close()
    meta = offsets.get(tp)
    return meta.offset if meta is not None and meta.offset >= 0 else 0


def _consumer(
    bootstrap: str,
    producer: AIOKafkaProducer,
    gate: Gate,
    topics: list[str],
    background: list[str],
    capacity: int,
) -> InFlightConsumer:
    plan = TopicPlan(
        topics={
            t: TopicSpec(
                partitions=1,
                key="request_id",
                value="sluice.v1.PromptAssembled",
                retention_ms=-1,
                cleanup_policy="delete",
            )
            for t in [*topics, *background]
        }
    )
    return InFlightConsumer(
        service="inference",
        group_id=f"test-inflight-{uuid.uuid4().hex[:8]}",
        topics=topics,
        background_topics=background,
        handler=gate.handle,
        codec=Codec(plan),
        bootstrap=bootstrap,
        producer=producer,
        capacity=lambda: capacity,
        session_timeout_ms=6000,
    )


@contextlib.asynccontextmanager
async def _consuming(
    bootstrap: str, gate: Gate, topics: list[str], background: list[str], capacity: int
) -> AsyncIterator[InFlightConsumer]:
    """The consumer running over `topics` with `gate` as its handler; stopped (drained) on exit."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    consumer = _consumer(bootstrap, producer, gate, topics, background, capacity)
    running = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        await consumer.stop()
        await running
        await producer.stop()


async def _wait(check: object, what: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_full_consumer_pauses_and_commits_only_finished_prefixes(kafka_bootstrap: str) -> None:
    async def scenario() -> None:
        topic, tp = await _topic_with(kafka_bootstrap, "inflight", 6)
        gate = Gate()
        async with _consuming(kafka_bootstrap, gate, [topic], [], capacity=2) as consumer:
            await _wait(lambda: len(gate.started) == 2, "two records in flight")
            rounds = consumer.full_rounds
            await _wait(lambda: consumer.full_rounds >= rounds + 3, "the loop to go round while full")
            assert gate.started == [(topic, 0), (topic, 1)], "a full consumer must not take more"
            assert consumer._consumer is not None and tp in consumer._consumer.paused()
            assert await _committed(kafka_bootstrap, consumer.group_id, tp) == 0  # lag: all 6 still in Kafka

            gate.let_go(topic, 1)  # finishes out of order
            await _wait(lambda: len(gate.started) == 3, "a freed slot to take the next record")
            assert await _committed(kafka_bootstrap, consumer.group_id, tp) == 0, "offset 0 still runs"

            gate.let_go(topic, 0)
            await _wait(lambda: len(gate.started) == 4, "the next record")
            await _wait_committed(kafka_bootstrap, consumer.group_id, tp, 2)

            for offset in range(2, 6):
                gate.let_go(topic, offset)
            await _wait(lambda: len(gate.started) == 6, "every record")
            await _wait_committed(kafka_bootstrap, consumer.group_id, tp, 6)
            assert [o for _, o in gate.started] == [0, 1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_a_released_record_frees_its_capacity_but_keeps_its_offset_open(kafka_bootstrap: str) -> None:
    async def scenario() -> None:
        topic, tp = await _topic_with(kafka_bootstrap, "release", 4)
        gate = EarlyGate()
        async with _consuming(kafka_bootstrap, gate, [topic], [], capacity=1) as consumer:
            await _wait(lambda: len(gate.started) == 1, "one record in flight")
            gate.finish_engine(0)  # its generation ended; its outputs are not acknowledged yet
            await _wait(lambda: len(gate.started) == 2, "the released slot to take the next record")
            rounds = consumer.full_rounds
            await _wait(lambda: consumer.full_rounds >= rounds + 3, "the loop to go round while full")
            assert [o for _, o in gate.started] == [0, 1], "one release frees one slot, once"
            assert consumer.in_flight == 2
            assert await _committed(kafka_bootstrap, consumer.group_id, tp) == 0, "record 0 is not done"

            gate.let_go(topic, 0)
            await _wait_committed(kafka_bootstrap, consumer.group_id, tp, 1)
            assert len(gate.started) == 2, "record 1 still holds the only slot"
            for offset in (1, 2, 3):
                gate.finish_engine(offset)
                gate.let_go(topic, offset)
            await _wait_committed(kafka_bootstrap, consumer.group_id, tp, 4)

    asyncio.run(scenario())


async def _wait_committed(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    deadline = asyncio.get_running_loop().time() + 180  # generous: joining a group is slow on a busy machine
    while asyncio.get_running_loop().time() < deadline:
        if await _committed(bootstrap, group, tp) == offset:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"committed offset never reached {offset} (is {await _committed(bootstrap, group, tp)})"
    )


def test_background_work_waits_for_interactive_work(kafka_bootstrap: str) -> None:
    async def scenario() -> None:
        interactive, batch = f"test.live.{uuid.uuid4().hex[:8]}", f"test.batch.{uuid.uuid4().hex[:8]}"
        await _topics(kafka_bootstrap, interactive, batch)
        await _produce(kafka_bootstrap, batch, 2)
        await _produce(kafka_bootstrap, interactive, 2)
        gate = Gate()
        async with _consuming(kafka_bootstrap, gate, [interactive], [batch], capacity=1):
            for step in range(4):
                await _wait(lambda step=step: len(gate.started) == step + 1, f"record {step + 1}")
                gate.let_go(*gate.started[-1])
            assert [t for t, _ in gate.started] == [interactive, interactive, batch, batch]

    asyncio.run(scenario())


def test_a_poison_record_goes_to_the_dlq_and_the_rest_flows(kafka_bootstrap: str) -> None:
    async def scenario() -> None:
        topic = f"test.poison.{uuid.uuid4().hex[:8]}"
        await _topics(kafka_bootstrap, topic, DLQ)
        await _produce(kafka_bootstrap, topic, 3, poison_at=1)
        gate = Gate()
        for offset in range(3):
            gate.let_go(topic, offset)
        async with _consuming(kafka_bootstrap, gate, [topic], [], capacity=2) as consumer:
            await _wait_committed(kafka_bootstrap, consumer.group_id, TopicPartition(topic, 0), 3)
            assert [o for _, o in gate.started] == [0, 2]
        letters = [
            events_pb2.DeadLetter.FromString(r.value or b"")
            async for r in read_committed(kafka_bootstrap, DLQ)
        ]
        mine = [d for d in letters if d.source_topic == topic]
        assert len(mine) == 1 and mine[0].source_offset == 1 and mine[0].consumer_group == consumer.group_id
        assert "PromptAssembled" in mine[0].reason

    asyncio.run(scenario())
