"""The gateway's reply router on a real broker: an open metering transaction on the reply
partition does not hold back token chunks, and only committed charges reach the caller."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from aiokafka import AIOKafkaProducer

from services.gateway.replies import ReplyRouter
from services.metering.pricer import PRODUCER as METERING
from sluice.topics import TOKENS
from sluice.v1 import envelope_pb2, events_pb2

PARTITION = 3


def reply(request_id: str, producer: str, **body: object) -> bytes:
    envelope = envelope_pb2.Envelope(request_id=request_id, tenant="demo", attempt=1, producer=producer)
    return events_pb2.ReplyEvent(envelope=envelope, **body).SerializeToString()  # type: ignore[arg-type]


def charged(request_id: str, nanos: int) -> bytes:
    return reply(request_id, METERING, charged=events_pb2.StreamCharged(cost=envelope_pb2.Cost(nanos=nanos)))


async def test_chunks_pass_an_open_charge_transaction_and_aborted_charges_never_arrive(
    topics_ready: str,
) -> None:
    router = ReplyRouter(topics_ready, PARTITION)
    task = asyncio.create_task(router.run())
    metering = AIOKafkaProducer(bootstrap_servers=topics_ready, transactional_id=f"test-{uuid.uuid4().hex}")
    inference = AIOKafkaProducer(bootstrap_servers=topics_ready, enable_idempotence=True)
    try:
        await asyncio.wait_for(router.ready.wait(), 60)
        await metering.start()
        await inference.start()
        request_id = uuid.uuid4().hex
        queue = router.register(request_id)
        await metering.begin_transaction()
        await metering.send_and_wait(TOKENS, charged(request_id, 7), partition=PARTITION)
        chunk = reply(request_id, "inference", chunk=events_pb2.TokenChunk(seq=0, delta="Hi", tokens=1))
        await inference.send_and_wait(TOKENS, chunk, partition=PARTITION)
        # The charge's transaction is still open: a read-committed reader would see nothing yet.
        first = await asyncio.wait_for(queue.get(), 30)
        assert first.WhichOneof("body") == "chunk" and first.chunk.delta == "Hi"
        await metering.abort_transaction()
        async with metering.transaction():
            await metering.send_and_wait(TOKENS, charged(request_id, 9), partition=PARTITION)
        # In partition order the aborted charge (7) came first: it must never be delivered.
        second = await asyncio.wait_for(queue.get(), 30)
        assert second.WhichOneof("body") == "charged" and second.charged.cost.nanos == 9
        assert queue.empty()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await metering.stop()
        await inference.stop()
