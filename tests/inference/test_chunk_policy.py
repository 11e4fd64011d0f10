"""When the inference worker's ChunkWriter cuts a chunk, on a real broker (no redaction).

The first token always goes at once. With spare slots a chunk closes at
`max_tokens` tokens or `max_delay_s`; while the worker is full (`busy`) only
the wider `busy_delay_s` closes it, so a saturated engine pays for fewer
records. Time bounds here are far out of reach (60 s), so the tests are
decided by token counts and the busy flag alone, never by timing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaProducer

from services.inference.chunks import ChunkWriter
from sluice.kafka import start_producer
from sluice.topics import TOKENS
from sluice.v1 import envelope_pb2
from tests.token_chunks import chunks_of

NEVER_S = 60.0


@pytest.fixture
async def producer(topics_ready: str) -> AsyncIterator[AIOKafkaProducer]:
    made = await start_producer(topics_ready, "test")
    yield made
    await made.stop()


def writer(
    producer: AIOKafkaProducer, max_tokens: int, max_delay_s: float, busy: Callable[[], bool] | None = None
) -> ChunkWriter:
    envelope = envelope_pb2.Envelope(request_id=uuid.uuid4().hex, tenant="demo", attempt=1)
    return ChunkWriter(
        producer,
        envelope,
        envelope_pb2.ReplyTo(topic=TOKENS, partition=0),
        max_tokens,
        max_delay_s,
        busy=busy,
        busy_delay_s=NEVER_S,
    )


async def sent_count(chunks: ChunkWriter, expected: int) -> None:
    """Waits for flushes already started (they run beside the token loop)."""
    async with asyncio.timeout(10):
        while chunks.seq < expected:
            await asyncio.sleep(0.01)


async def add_all(chunks: ChunkWriter, tokens: list[str]) -> None:
    for token in tokens:
        await chunks.add(token, 1)
        await asyncio.sleep(0)


async def test_the_first_token_leaves_at_once_even_with_a_long_time_bound(
    topics_ready: str, producer: AIOKafkaProducer
) -> None:
    chunks = writer(producer, max_tokens=100, max_delay_s=NEVER_S)
    await chunks.add("Hello", 1)
    await sent_count(chunks, 1)
    await add_all(chunks, [" there", ",", " friend"])
    await asyncio.sleep(0.1)
    assert chunks.seq == 1  # the rest waits for a bound (none is reached) or the end
    await chunks.close()
    sent = (await chunks_of(topics_ready, {chunks.envelope.request_id}))[chunks.envelope.request_id]
    assert [(c.seq, c.delta, c.tokens) for c in sent] == [(0, "Hello", 1), (1, " there, friend", 3)]


async def test_a_full_worker_gathers_past_the_count_bound_and_flushes_when_a_slot_frees(
    topics_ready: str, producer: AIOKafkaProducer
) -> None:
    full = {"now": False}
    chunks = writer(producer, max_tokens=2, max_delay_s=NEVER_S, busy=lambda: full["now"])
    await chunks.add("a", 1)
    await sent_count(chunks, 1)
    await add_all(chunks, [" b", " c"])  # spare slots: the count bound (2) closes a chunk
    await sent_count(chunks, 2)
    full["now"] = True
    await add_all(chunks, [" d", " e", " f", " g", " h"])  # full: past the count bound, still held
    await asyncio.sleep(0.1)
    assert chunks.seq == 2
    full["now"] = False
    await chunks.add(" i", 1)  # a slot freed: the gathered tokens go with this one
    await sent_count(chunks, 3)
    await chunks.close()
    sent = (await chunks_of(topics_ready, {chunks.envelope.request_id}))[chunks.envelope.request_id]
    assert [(c.delta, c.tokens) for c in sent] == [("a", 1), (" b c", 2), (" d e f g h i", 6)]
