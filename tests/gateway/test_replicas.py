"""Reply routing across gateway replicas: 3 processes, each owning one partition of
sluice.tokens.v1, behind one client pool; 200 concurrent streams, none may cross or lose tokens."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.gateway.auth import demo_key_file
from sluice.stack import Stack
from sluice.topics import TOKENS, load_plan
from sluice.v1 import envelope_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.replica_pool import Replica, ReplicaPool

STREAMS = 200
MAX_TOKENS = 4
PARTITIONS = (1, 2, 3)  # the stack's own gateway reads 0; these replicas take the others


@pytest.fixture(scope="module")
def replicas(stack: Stack) -> Iterator[list[Replica]]:
    pool = ReplicaPool(stack)
    try:
        # The last of 200 queued requests waits for all the others (about 16 minutes on the
        # 2-core machine under other jobs' load): the gateway must not give up on it first.
        yield [pool.start(p, gateway_reply_timeout_s="3600") for p in PARTITIONS]
    finally:
        pool.stop_all()


async def _stream(stub: gateway_pb2_grpc.GatewayStub, key: str, n: int) -> list[gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(
        messages=[envelope_pb2.ChatMessage(role="user", content=f"Count from {n} to {n + 5}.")],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    call = stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=3600)
    return [response async for response in call]


async def _run_streams(targets: list[str], key: str) -> list[tuple[str, list[gateway_pb2.GenerateResponse]]]:
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        stubs = itertools.cycle(
            [(t, gateway_pb2_grpc.GatewayStub(c)) for t, c in zip(targets, channels, strict=True)]
        )
        calls = []
        for n, (target, stub) in zip(range(STREAMS), stubs, strict=False):
            calls.append((target, asyncio.ensure_future(_stream(stub, key, n))))
        return [(target, await call) for target, call in calls]
    finally:
        for channel in channels:
            await channel.close()


async def _replies_on_tokens(
    bootstrap: str, request_ids: set[str], partitions: int
) -> dict[str, list[tuple[int, events_pb2.ReplyEvent]]]:
    """Every reply event of `request_ids` on sluice.tokens.v1, with the partition it was on."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[str, list[tuple[int, events_pb2.ReplyEvent]]] = defaultdict(list)
    try:
        tps = [TopicPartition(TOKENS, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 120
        while any([await consumer.position(tp) < ends[tp] for tp in tps]) and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    event = events_pb2.ReplyEvent.FromString(record.value)
                    if event.envelope.request_id in request_ids:
                        found[event.envelope.request_id].append((tp.partition, event))
        return found
    finally:
        await consumer.stop()


@pytest.mark.timeout(3600)  # 200 generations on a shared 2-core machine; nothing here is timed
def test_200_concurrent_streams_over_3_replicas_never_cross_or_lose_tokens(
    stack: Stack, replicas: list[Replica]
) -> None:
    key = demo_key_file(stack.settings.state_dir).read_text().strip()
    partition_of = {r.target: r.partition for r in replicas}
    results = asyncio.run(_run_streams([r.target for r in replicas], key))
    assert len(results) == STREAMS

    served: dict[str, tuple[int, str, envelope_pb2.Usage]] = {}
    for target, responses in results:
        request_id = responses[0].request_id
        assert request_id, "the stream opens with its request_id"
        crossed = {r.request_id for r in responses} - {request_id}
        assert not crossed, f"stream {request_id} received another request's messages: {crossed}"
        last = responses[-1]
        assert last.finish_reason != events_pb2.FINISH_REASON_UNSPECIFIED, "every stream ends with its finish"
        assert 0 < last.usage.completion_tokens <= MAX_TOKENS
        served[request_id] = (partition_of[target], "".join(r.delta for r in responses), last.usage)
    assert len(served) == STREAMS, "every stream is its own request"

    partitions = load_plan(stack.settings.topics_file).topics[TOKENS].partitions
    replies = asyncio.run(_replies_on_tokens(stack.settings.bootstrap, set(served), partitions))
    for request_id, (partition, text, usage) in served.items():
        events = replies[request_id]
        # Every reply went to the partition of the replica holding the stream ...
        assert {p for p, _ in events} == {partition}, (request_id, {p for p, _ in events}, partition)
        chunks = {e.chunk.seq: e.chunk for _, e in events if e.WhichOneof("body") == "chunk"}
        # ... and the caller got exactly the tokens its own completion counted, in order.
        assert sum(c.tokens for c in chunks.values()) == usage.completion_tokens, request_id
        assert "".join(chunks[s].delta for s in sorted(chunks)) == text, request_id
