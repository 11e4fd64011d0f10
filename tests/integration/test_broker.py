"""Integration tests for sluice.broker against a real Kafka started from Maven jars.

Each test uses its own state dir and free ports, so nothing here touches a
developer's long-lived broker on 9092.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sluice.broker import BrokerError, LocalBroker, port_in_use
from sluice.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]


def _new_broker(state_dir: Path) -> LocalBroker:
    port, controller_port = free_ports(2)
    return LocalBroker(REPO_ROOT, state_dir, port=port, controller_port=controller_port)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = _new_broker(tmp_path_factory.mktemp("kafka-shared"))
    try:
        b.start()
        b.wait_ready()
        yield b
    finally:
        b.stop()


async def _create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        errors = [err for _topic, err, *_ in resp.topic_errors if err != 0]
        assert not errors, resp
    finally:
        await admin.close()


async def _read_all(
    bootstrap: str,
    topic: str,
    expected: int,
    *,
    isolation_level: str = "read_uncommitted",
    group_id: str | None = None,
) -> list[bytes]:
    """Read from the start (or committed offset) until `expected` values or 15 s."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while len(values) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                values += [r.value for r in records if r.value is not None]
        if group_id is not None:
            await consumer.commit()
    finally:
        await consumer.stop()
    return values


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def test_lifecycle_restart_keeps_data(tmp_path: Path) -> None:
    b = _new_broker(tmp_path / "state")
    try:
        b.start()
        b.wait_ready()
        assert b.is_running()
        assert port_in_use(b.port)
        pid = b.pid_path.read_text()

        b.start()  # already running: must not launch a second JVM
        assert b.pid_path.read_text() == pid
        assert b.is_running()

        meta = (b.data_dir / "meta.properties").read_bytes()
        asyncio.run(_create_topic(b.bootstrap, "persist"))
        asyncio.run(_produce(b.bootstrap, "persist", [b"before-restart"]))

        b.stop()
        assert not b.is_running()
        assert not b.pid_path.exists()
        assert not port_in_use(b.port)
        b.stop()  # idempotent

        b.start()
        b.wait_ready()
        assert b.pid_path.read_text() != pid
        assert (b.data_dir / "meta.properties").read_bytes() == meta
        assert asyncio.run(_read_all(b.bootstrap, "persist", 1)) == [b"before-restart"]
    finally:
        b.stop()
    assert not b.is_running()


def test_consumer_group_commits_offsets(broker: LocalBroker) -> None:
    topic, group = f"grp-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_topic(broker.bootstrap, topic))
    asyncio.run(_produce(broker.bootstrap, topic, [b"a", b"b"]))
    first = asyncio.run(_read_all(broker.bootstrap, topic, 2, group_id=group))
    assert first == [b"a", b"b"]
    asyncio.run(_produce(broker.bootstrap, topic, [b"c"]))
    # Same group resumes from its committed offset, proving the group coordinator.
    assert asyncio.run(_read_all(broker.bootstrap, topic, 1, group_id=group)) == [b"c"]


def test_idempotent_producer(broker: LocalBroker) -> None:
    topic = f"idem-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        await _create_topic(broker.bootstrap, topic, partitions=3)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            futures = [await producer.send(topic, f"m{i}".encode(), key=b"k") for i in range(50)]
            offsets = [(await f).offset for f in futures]
        finally:
            await producer.stop()
        assert offsets == sorted(offsets) and len(set(offsets)) == 50

    asyncio.run(run())
    values = asyncio.run(_read_all(broker.bootstrap, topic, 50))
    assert values == [f"m{i}".encode() for i in range(50)]


def test_transactional_producer_commit_and_abort(broker: LocalBroker) -> None:
    topic = f"txn-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        await _create_topic(broker.bootstrap, topic)
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap,
            transactional_id=f"tx-{uuid.uuid4().hex[:8]}",
        )
        await producer.start()
        try:
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed-1")
                await producer.send_and_wait(topic, b"committed-2")
            with pytest.raises(RuntimeError, match="abort me"):
                async with producer.transaction():
                    await producer.send_and_wait(topic, b"aborted")
                    raise RuntimeError("abort me")
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed-3")
        finally:
            await producer.stop()

    asyncio.run(run())
    committed = asyncio.run(_read_all(broker.bootstrap, topic, 3, isolation_level="read_committed"))
    assert committed == [b"committed-1", b"committed-2", b"committed-3"]
    raw = asyncio.run(_read_all(broker.bootstrap, topic, 4))
    assert b"aborted" in raw  # really written, then hidden by the abort marker


def test_start_refuses_a_busy_port(broker: LocalBroker, tmp_path: Path) -> None:
    other = LocalBroker(
        REPO_ROOT,
        tmp_path / "other",
        port=broker.port,
        controller_port=free_ports(1)[0],
    )
    with pytest.raises(BrokerError, match="already in use"):
        other.start()
    assert not other.is_running()


def test_wait_ready_reports_a_crashed_broker(tmp_path: Path) -> None:
    b = _new_broker(tmp_path / "state")
    b.data_dir.mkdir(parents=True)
    # Looks formatted (so start skips formatting) but belongs to node 7:
    # a real misconfiguration Kafka refuses at boot.
    (b.data_dir / "meta.properties").write_text(
        "version=1\nnode.id=7\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\ndirectory.id=AAAAAAAAAAAAAAAAAAAAAQ\n"
    )
    try:
        b.start()
        with pytest.raises(BrokerError, match="exited during startup") as info:
            b.wait_ready(timeout=60)
        assert str(b.log_path) in str(info.value)
    finally:
        b.stop()
    assert not b.is_running()
