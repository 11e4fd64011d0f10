"""Token chunks to the caller's reply partition: coalesced by count or time, redacted on the way.

Output redaction is the costly step, so it never holds up the generation: a
flush runs as its own task while the token loop goes on reading the engine,
and tokens that arrive meanwhile join the next chunk. The chunk size therefore
grows with load by itself (one token per chunk when redaction is quick, many
when analyses queue behind other streams' in the shared batch), and an idle
stream still releases each token as it comes.

While every slot of the worker is busy (prompts are waiting in Kafka), the
time bound widens to `busy_delay_s`: the engine is then the bottleneck, and on a
machine where it shares the CPU every record's produce, store and fetch is taken
from the generation the waiting prompts need (docs/inference.md, bench-inference).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from services.redaction.boundary import redact_chunk_async
from services.redaction.streaming import StreamRedactor
from sluice import envelope as envelopes
from sluice.kafka import reply_partition, wants_chunk
from sluice.v1 import envelope_pb2, events_pb2

# Text the writer may hold while a flush runs before the token loop waits for it:
# bounds memory and keeps a chunk's analysis short enough to share a batch.
MAX_HELD_CHARS = 768


@dataclass
class ChunkWriter:
    """Coalesces tokens into chunks: fewer Kafka records, still a live stream.

    `envelope` is the attempt's envelope (chunks carry its attempt, seq restarts
    at 0 per attempt). `gate`, when given, is awaited before the first chunk
    leaves: the attempt's "started" marker must be durable before the caller
    sees any of its tokens, or a crash could not be told apart from a duplicate.

    add() starts a flush when `max_tokens` tokens or `max_delay_s` have gathered
    (only `busy_delay_s` while `busy()` says the worker is full; checked as
    tokens arrive; the first token goes at once) and returns without waiting
    for it; only one flush runs at a time, so chunks keep their order.
    A flush's failure (output redaction fails closed: RequestFailed) is raised
    by the next add() or by close().
    """

    producer: AIOKafkaProducer
    envelope: envelope_pb2.Envelope
    reply_to: envelope_pb2.ReplyTo
    max_tokens: int
    max_delay_s: float
    # Output redaction: model text reaches sluice.tokens.v1 only through this.
    redactor: StreamRedactor | None = None
    gate: asyncio.Future[object] | None = None
    busy: Callable[[], bool] | None = None
    busy_delay_s: float = 0.0
    max_held_chars: int = MAX_HELD_CHARS
    seq: int = 0
    _text: list[str] = field(default_factory=list)
    _chars: int = 0
    _tokens: int = 0
    _since: float = field(default_factory=time.monotonic)
    _pending: list[asyncio.Future[object]] = field(default_factory=list)
    _flusher: asyncio.Task[None] | None = None
    # The generation's task: once it is cancelled (hand-back), no chunk may leave.
    _owner: asyncio.Task[object] | None = None

    async def add(self, text: str, tokens: int) -> None:
        self._raise_failure()
        if self._owner is None:
            self._owner = asyncio.current_task()
        self._text.append(text)
        self._chars += len(text)
        self._tokens += tokens
        if self._flushing():
            if self._chars > self.max_held_chars:
                await self._settle()  # back-pressure, only when far behind; that flush took this text too
            return
        if self._due():
            self._flusher = asyncio.create_task(self._drain(), name=f"chunks-{self.envelope.request_id}")
            self._flusher.add_done_callback(_observed)

    async def flush(self, final: bool = False) -> None:
        """Sends what is gathered now (after any flush in progress); `final` releases the held tail too."""
        await self._settle()
        if self._tokens or self._text or final:
            await self._send(final)

    async def close(self) -> None:
        """Flush what is held back and wait until every chunk is acknowledged."""
        await self.flush(final=True)
        for future in self._pending:
            await future

    def abandon(self) -> None:
        """The generation stops without finishing (hand-back, failure): stop any flush in progress."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()

    def _due(self) -> bool:
        if self._flusher is None:
            return True  # the first token
        waited = time.monotonic() - self._since
        if self.busy is not None and self.busy():
            return waited >= self.busy_delay_s  # only time: the count bound is for idle fast engines
        return self._tokens >= self.max_tokens or waited >= self.max_delay_s

    def _flushing(self) -> bool:
        return self._flusher is not None and not self._flusher.done()

    def _raise_failure(self) -> None:
        if self._flusher is not None and self._flusher.done() and not self._flusher.cancelled():
            failure = self._flusher.exception()
            if failure is not None:
                raise failure

    async def _settle(self) -> None:
        """Waits for the flush in progress; raises its failure."""
        if self._flusher is not None and not self._flusher.cancelled():
            await self._flusher

    async def _drain(self) -> None:
        """One flush after another while tokens keep arriving: each takes all that gathered meanwhile."""
        while self._tokens or self._text:
            await self._send(final=False)

    async def _send(self, final: bool) -> None:
        text, tokens = "".join(self._text), self._tokens
        self._text.clear()
        self._chars = 0
        self._tokens = 0
        delta = await redact_chunk_async(self.redactor, text, final) if self.redactor is not None else text
        if not delta and not tokens:
            return
        if wants_chunk(self.reply_to):
            if self.gate is not None:
                await self.gate
                self.gate = None
            if self._owner is not None and (self._owner.cancelling() or self._owner.done()):
                raise asyncio.CancelledError  # handed back meanwhile: the next attempt answers
            reply = events_pb2.ReplyEvent(
                envelope=envelopes.follow(self.envelope, "inference"),
                chunk=events_pb2.TokenChunk(seq=self.seq, delta=delta, tokens=tokens),
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
        self._since = time.monotonic()


def _observed(task: asyncio.Task[None]) -> None:
    """Marks a flush's failure as seen: the next add() or close() raises it, or the generation is over."""
    if not task.cancelled():
        task.exception()
