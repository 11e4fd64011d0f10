"""The inference worker's ChunkWriter with output redaction, on a real broker and the real analyzer.

Redaction runs beside the token loop: tokens arriving during a flush join the
next chunk, the loop waits only when the held text passes its bound, chunks
keep their order and token counts, the started gate holds the first chunk
back, and a failed analysis fails the generation closed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from services.inference.chunks import ChunkWriter
from services.redaction.analyzer import Job, RedactionError, Redactor
from services.redaction.boundary import Boundary, boundary_from_settings, output_redactor
from sluice.config import Settings
from sluice.kafka import RequestFailed, start_producer
from sluice.topics import TOKENS
from sluice.v1 import envelope_pb2
from tests.redaction.planted_answers import PEOPLE as ALL_PEOPLE
from tests.redaction.planted_answers import answer, pieces
from tests.token_chunks import chunks_of

PARTITION = 0
REPLY_TO = envelope_pb2.ReplyTo(topic=TOKENS, partition=PARTITION)
PEOPLE = ALL_PEOPLE[:4]


@pytest.fixture
async def producer(topics_ready: str) -> AsyncIterator[AIOKafkaProducer]:
    made = await start_producer(topics_ready, "test")
    yield made
    await made.stop()


@pytest.fixture
def fresh(settings: Settings, loaded_redactor: Redactor) -> Boundary:
    made = boundary_from_settings(settings)
    made.loaded(loaded_redactor)
    return made


@pytest.fixture
def batches(loaded_redactor: Redactor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Jobs per call of the real analyzer (one call = one shared nlp.pipe batch)."""
    real = loaded_redactor.find_many
    sizes: list[int] = []

    def counting(jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        sizes.append(len(jobs))
        return real(jobs, **kwargs)

    monkeypatch.setattr(loaded_redactor, "find_many", counting)
    return sizes


def writer_for(
    producer: AIOKafkaProducer, boundary: Boundary, gate: asyncio.Future[object] | None = None, **kw: Any
) -> ChunkWriter:
    envelope = envelope_pb2.Envelope(request_id=uuid.uuid4().hex, tenant="demo", attempt=1)
    return ChunkWriter(
        producer, envelope, REPLY_TO, 8, 0.0, redactor=output_redactor(boundary, "demo", 64), gate=gate, **kw
    )


async def generate(writer: ChunkWriter, tokens: list[str]) -> None:
    """An engine's token loop: one token per step of the event loop."""
    for token in tokens:
        await writer.add(token, 1)
        await asyncio.sleep(0)
    await writer.close()


async def test_concurrent_generations_keep_order_and_counts_share_batches_and_leak_nothing(
    topics_ready: str, producer: AIOKafkaProducer, fresh: Boundary, batches: list[int]
) -> None:
    writers = [writer_for(producer, fresh) for _ in PEOPLE]
    streams = [
        pieces(answer(name, email), size) for (name, email), size in zip(PEOPLE, [1, 2, 3, 2], strict=True)
    ]
    await asyncio.gather(*(generate(w, t) for w, t in zip(writers, streams, strict=True)))

    sent = await chunks_of(topics_ready, {w.envelope.request_id for w in writers})
    for writer, tokens, (name, email) in zip(writers, streams, PEOPLE, strict=True):
        chunks = sent[writer.envelope.request_id]
        assert [c.seq for c in chunks] == list(range(len(chunks))) and writer.seq == len(chunks)
        assert sum(c.tokens for c in chunks) == len(tokens)
        whole = "".join(c.delta for c in chunks)
        assert whole.startswith("Sure! I spoke with <PERSON> yesterday; write to <EMAIL_ADDRESS>")
        assert whole.endswith(", thanks.")
        for secret in (name, email, "7946 0958"):
            assert all(secret[: len(secret) // 2 + 1] not in c.delta for c in chunks)
        # Coalescing: tokens that arrived during a flush went out together.
        assert len(chunks) < len(tokens)
    assert max(batches) > 1  # the generations' analyses shared batches


async def test_the_token_loop_runs_on_during_a_flush_until_the_held_text_is_over_its_bound(
    topics_ready: str, producer: AIOKafkaProducer, fresh: Boundary
) -> None:
    gate: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    writer = writer_for(producer, fresh, gate, max_held_chars=40)
    text = "the quick brown fox jumps over the lazy dog and then runs far away into the woods. "
    tokens = pieces(text, 4)
    await writer.add(tokens[0], 1)  # starts the first flush, which will wait for the gate
    held = 0
    for n, token in enumerate(tokens[1:], start=2):  # noqa: B007 (n: where the rest starts)
        adding = asyncio.create_task(writer.add(token, 1))
        await asyncio.sleep(0.01)
        held += len(token)
        if held > 40:
            break
        # The first flush waits for the gate, yet the loop goes on: add() returned.
        assert adding.done()
    # Past the bound the loop waits for the flush, which waits for the gate: nothing left yet.
    assert not adding.done() and writer.seq == 0
    gate.set_result(None)
    await adding
    for token in tokens[n:]:
        await writer.add(token, 1)
    await writer.close()
    chunks = (await chunks_of(topics_ready, {writer.envelope.request_id}))[writer.envelope.request_id]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert sum(c.tokens for c in chunks) == len(tokens)
    assert "".join(c.delta for c in chunks) == text


async def test_a_failed_analysis_fails_the_generation_closed_and_sends_nothing_unanalysed(
    topics_ready: str,
    producer: AIOKafkaProducer,
    fresh: Boundary,
    loaded_redactor: Redactor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(jobs: Sequence[Job], **kwargs: Any) -> list[list[list[Any]]]:
        raise RedactionError("PII analysis failed: RuntimeError")

    monkeypatch.setattr(loaded_redactor, "find_many", failing)
    writer = writer_for(producer, fresh)
    with pytest.raises(RequestFailed) as failed:
        await generate(writer, pieces(answer("Jane Roe", "jane.roe@example.org"), 3))
    assert failed.value.code == "UNAVAILABLE"
    assert str(failed.value) == "output redaction: PII analysis failed: RuntimeError"
    # Only token counts went out before the failure (the first tokens hold no complete word): no text.
    sent = (await chunks_of(topics_ready, {writer.envelope.request_id}))[writer.envelope.request_id]
    assert len(sent) == writer.seq and all(c.delta == "" for c in sent)


async def test_no_chunk_leaves_after_the_generation_is_handed_back(
    topics_ready: str, producer: AIOKafkaProducer, fresh: Boundary
) -> None:
    gate: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    writer = writer_for(producer, fresh, gate)
    engine_waits = asyncio.Event()

    async def generation() -> None:
        for token in pieces("plain words that are safe to release ", 3):
            await writer.add(token, 1)
            await asyncio.sleep(0)
        await engine_waits.wait()  # cancelled here, as a drain or rebalance does

    running = asyncio.create_task(generation())
    await asyncio.sleep(0.2)
    running.cancel()
    gate.set_result(None)  # the started marker is acknowledged only now
    with pytest.raises(asyncio.CancelledError):
        await running
    flushes = [t for t in asyncio.all_tasks() if t.get_name() == f"chunks-{writer.envelope.request_id}"]
    await asyncio.gather(*flushes, return_exceptions=True)
    assert writer.seq == 0
    assert (await chunks_of(topics_ready, {writer.envelope.request_id}))[writer.envelope.request_id] == []
