"""Token chunks to the caller's reply partition: coalesced by count or time, redacted on the way."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from services.redaction.boundary import redact_chunk
from services.redaction.streaming import StreamRedactor
from sluice import envelope as envelopes
from sluice.kafka import reply_partition, wants_chunk
from sluice.v1 import envelope_pb2, events_pb2


@dataclass
class ChunkWriter:
    """Coalesces tokens into chunks: fewer Kafka records, still a live stream.

    `envelope` is the attempt's envelope (chunks carry its attempt, seq restarts
    at 0 per attempt). `gate`, when given, is awaited before the first chunk
    leaves: the attempt's "started" marker must be durable before the caller
    sees any of its tokens, or a crash could not be told apart from a duplicate.
    """

    producer: AIOKafkaProducer
    envelope: envelope_pb2.Envelope
    reply_to: envelope_pb2.ReplyTo
    max_tokens: int
    max_delay_s: float
    # Output redaction: model text reaches sluice.tokens.v1 only through this.
    redactor: StreamRedactor | None = None
    gate: asyncio.Future[object] | None = None
    seq: int = 0
    _text: list[str] = field(default_factory=list)
    _tokens: int = 0
    _since: float = field(default_factory=time.monotonic)
    _pending: list[asyncio.Future[object]] = field(default_factory=list)

    async def add(self, text: str, tokens: int) -> None:
        self._text.append(text)
        self._tokens += tokens
        if self._tokens >= self.max_tokens or time.monotonic() - self._since >= self.max_delay_s:
            await self.flush()

    async def flush(self, final: bool = False) -> None:
        delta = "".join(self._text)
        if self.redactor is not None:
            delta = await asyncio.to_thread(redact_chunk, self.redactor, delta, final)
        if not delta and not self._tokens:
            return
        if wants_chunk(self.reply_to):
            if self.gate is not None:
                await self.gate
                self.gate = None
            reply = events_pb2.ReplyEvent(
                envelope=envelopes.follow(self.envelope, "inference"),
                chunk=events_pb2.TokenChunk(seq=self.seq, delta=delta, tokens=self._tokens),
            )
            self._pending.append(
                await self.producer.send(
                    self.reply_to.topic,
                    reply.SerializeToString(),
                    key=self.envelope.request_id.encode(),
                    partition=reply_partition(self.reply_to),
                )
            )
            self.seq += 1
        self._text.clear()
        self._tokens = 0
        self._since = time.monotonic()

    async def close(self) -> None:
        """Flush what is held back and wait until every chunk is acknowledged."""
        await self.flush(final=True)
        for future in self._pending:
            await future
