"""One model pool's worker: assembled prompts in, token chunks and one completion per attempt out.

The consumer (sluice/kafka_inflight.py) runs several of these handlers at once,
up to the engine's capacity. A handler decides, before taking engine time,
whether the prompt is this pool's, a duplicate, a re-run after a crash,
cancelled or expired; then it streams the generation to the caller's reply
partition and returns the completion (published before the offset commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, ConsumerRecord
from google.protobuf.message import Message

from services.inference import metrics
from services.inference.attempts import FINISHED, HANDED_BACK, AttemptBook, History
from services.inference.chunks import ChunkWriter
from services.inference.control import CancelBoard
from services.inference.engine import Engine, GenerationResult, PromptTooLong, Sampling, TokenStream
from services.redaction.boundary import Boundary, stream_redactor_for
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import Output, RequestFailed, reply_partition, send_all
from sluice.kafka_inflight import release_capacity
from sluice.logs import get_logger
from sluice.topics import COMPLETIONS
from sluice.v1 import envelope_pb2, events_pb2

log = get_logger()

FINISH = {
    "stop": events_pb2.FINISH_REASON_STOP,
    "length": events_pb2.FINISH_REASON_LENGTH,
    "cancelled": events_pb2.FINISH_REASON_CANCELLED,
}
NO_USAGE = envelope_pb2.Usage()

EngineRestart = Callable[[Engine], Awaitable[Engine]]


@dataclass
class Attempt:
    """One run of one prompt: its envelope (with the attempt number) and where it came from."""

    event: events_pb2.PromptAssembled
    envelope: envelope_pb2.Envelope
    record: ConsumerRecord[bytes, bytes]
    queue_wait_s: float

    @property
    def request_id(self) -> str:
        return self.envelope.request_id


@dataclass
class Progress:
    """What a generation produced so far; kept outside the loop so a failure can still bill it."""

    began: float = field(default_factory=time.monotonic)
    tokens: int = 0
    first: float | None = None
    last: float | None = None
    aborted: bool = False

    def token(self, count: int) -> None:
        if count:
            now = time.monotonic()
            self.tokens += count
            self.first = self.first or now
            self.last = now


@dataclass
class PoolWorker:
    pool: str
    settings: Settings
    engine: Engine
    producer: AIOKafkaProducer
    worker_id: str
    board: CancelBoard
    attempts: AttemptBook
    output_boundary: Boundary | None = None
    restart_engine: EngineRestart | None = None
    _running: dict[str, int] = field(default_factory=dict)
    # Generation ended, outputs still on their way: not running, but not a redelivery to re-run.
    _finishing: set[str] = field(default_factory=set)
    _restarting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def capacity(self) -> int:
        return self.engine.capacity

    def full(self) -> bool:
        """Every slot is generating: the consumer has stopped fetching and prompts wait in Kafka."""
        return len(self._running) >= self.capacity()

    async def handle(self, event: Message, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        assert isinstance(event, events_pb2.PromptAssembled)
        catalog = self.settings.catalog
        model = catalog.resolve(event.model)
        if model is None:
            if self.pool != catalog.default_model:
                return ()  # the default pool answers for unknown models, once
            attempt = self._attempt(event, record, event.envelope.attempt)
            reason = f"model: {event.model!r} is not a served model or alias (see ListModels)"
            return self._refused(attempt, "NOT_FOUND", reason)
        if model != self.pool:
            return ()  # another pool's prompt
        request_id = event.envelope.request_id
        if request_id in self._running or request_id in self._finishing:
            log.info("duplicate dropped", request_id=request_id, reason="running here")
            return ()
        number = await self._attempt_number(event, record)
        if number is None:
            return ()
        attempt = self._attempt(event, record, number)
        early = self.board.cancelled_early(request_id)
        if early is not None:
            metrics.ABORTED.labels(self.pool).inc()
            log.info("cancelled before start", request_id=request_id)
            return self._not_started(attempt, events_pb2.FINISH_REASON_CANCELLED, f"cancelled: {early}")
        if (
            event.envelope.HasField("deadline")
            and event.envelope.deadline.ToMicroseconds() < time.time() * 1e6
        ):
            metrics.EXPIRED.labels(self.pool).inc()
            log.info("expired while queued", request_id=request_id)
            return self._not_started(
                attempt, events_pb2.FINISH_REASON_EXPIRED, "deadline passed while queued"
            )
        return await self._generate(attempt, restarted=number > event.envelope.attempt)

    # -- which attempt ---------------------------------------------------------------------------

    async def _attempt_number(
        self, event: events_pb2.PromptAssembled, record: ConsumerRecord[bytes, bytes]
    ) -> int | None:
        """The attempt to run, or None for a duplicate; closes an attempt whose worker died."""
        history = await self.attempts.history(record, event.envelope.request_id)
        last = history.last_started
        if last < event.envelope.attempt:
            return event.envelope.attempt
        state = history.closed.get(last)
        if state == FINISHED:
            log.info(
                "duplicate dropped", request_id=event.envelope.request_id, attempt=last, reason="answered"
            )
            return None
        if state is None:  # its worker died mid-stream: close that attempt for metering first
            delivered = await self.attempts.delivered_tokens(
                event.reply_to, event.envelope.request_id, last, history.started_ms.get(last, 0)
            )
            await send_all(
                self.producer, "inference", self._dead_attempt(event, record, history, last, delivered)
            )
        metrics.RESTARTED.labels(self.pool).inc()
        log.info("re-running", request_id=event.envelope.request_id, attempt=last + 1)
        return last + 1

    def _dead_attempt(
        self,
        event: events_pb2.PromptAssembled,
        record: ConsumerRecord[bytes, bytes],
        history: History,
        number: int,
        delivered: int,
    ) -> list[Output]:
        """The completion a dead worker could not publish: its prompt and the tokens its caller got."""
        attempt = self._attempt(event, record, number)
        prompt = event.prompt_tokens
        usage = envelope_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=delivered, total_tokens=prompt + delivered
        )
        completion = self._completion(
            attempt,
            events_pb2.FINISH_REASON_ERROR,
            usage,
            error=f"worker {history.started.get(number, '?')} died mid-stream; re-run as {number + 1}",
        )
        completion.worker = history.started.get(number, "")
        return [
            Output(COMPLETIONS, completion, attempt.request_id),
            self.attempts.marker(event.envelope, number, HANDED_BACK, record),
        ]

    def _attempt(
        self, event: events_pb2.PromptAssembled, record: ConsumerRecord[bytes, bytes], number: int
    ) -> Attempt:
        env = envelopes.follow(event.envelope, "inference")
        env.attempt = number
        assembled = event.envelope.event_time
        waited = time.time() - (assembled.seconds + assembled.nanos / 1e9) if assembled.seconds else 0.0
        return Attempt(event, env, record, max(0.0, waited))

    # -- generation -------------------------------------------------------------------------------

    async def _generate(self, attempt: Attempt, restarted: bool) -> Sequence[Output]:
        event = attempt.event
        spec = self.settings.catalog.models[self.pool]
        params = event.params
        sampling = Sampling(
            max_tokens=params.max_tokens or spec.max_output_tokens,
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            stop=tuple(params.stop),
        )
        engine = self.engine
        try:
            stream = engine.stream(attempt.request_id, event.prompt, sampling)
        except PromptTooLong as exc:
            return self._refused(attempt, "INVALID_ARGUMENT", f"prompt: {exc}")
        except ValueError as exc:
            return self._refused(attempt, "INVALID_ARGUMENT", f"params: {exc}")
        metrics.QUEUE_WAIT.labels(self.pool).observe(attempt.queue_wait_s)
        if restarted and event.reply_to.topic:
            restart = events_pb2.ReplyEvent(
                envelope=attempt.envelope,
                restarted=events_pb2.StreamRestarted(attempt=attempt.envelope.attempt),
            )
            await send_all(self.producer, "inference", self._reply(attempt, restart))
        gate = await self.attempts.mark_started(event.envelope, attempt.envelope.attempt, attempt.record)
        writer = ChunkWriter(
            self.producer,
            attempt.envelope,
            event.reply_to,
            self.settings.token_flush_tokens,
            self.settings.token_flush_ms / 1000,
            redactor=stream_redactor_for(self.output_boundary, event.envelope.tenant, self.settings),
            gate=gate,
            busy=self.full,
            busy_delay_s=self.settings.token_flush_busy_ms / 1000,
        )
        progress = Progress()

        async def abort() -> None:
            progress.aborted = True
            await engine.abort(attempt.request_id)

        self._enter(attempt.request_id, attempt.envelope.attempt, abort)
        try:
            async for token in stream:
                progress.token(token.tokens)
                await writer.add(token.text, token.tokens)
            self._engine_done(attempt.request_id)
            await writer.close()
            await gate
        except asyncio.CancelledError:  # the consumer hands this prompt back (drain, rebalance)
            writer.abandon()
            await self._hand_back(attempt, engine, stream, progress)
            raise
        except RequestFailed as exc:  # output redaction could not be guaranteed: fail closed
            await _stop(engine, stream, attempt.request_id)
            return self._failed(attempt, progress, exc.code, str(exc))
        except Exception as exc:
            writer.abandon()
            log.exception("engine failed mid-stream", request_id=attempt.request_id)
            await _stop(engine, stream, attempt.request_id)
            metrics.FAILED.labels(self.pool).inc()
            outputs = self._failed(attempt, progress, "INTERNAL", f"inference failed: {type(exc).__name__}")
            await self._restart_if_unhealthy(engine)
            return outputs
        finally:
            self._leave(attempt.request_id)
            self._finishing.discard(attempt.request_id)
        return self._finished(attempt, stream.result, progress)

    def _finished(self, attempt: Attempt, result: GenerationResult, progress: Progress) -> list[Output]:
        finish = FINISH[result.finish_reason]
        if finish == events_pb2.FINISH_REASON_CANCELLED or progress.aborted:
            metrics.ABORTED.labels(self.pool).inc()
        usage = envelope_pb2.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
            total_tokens=result.total_tokens,
        )
        self._observe(progress, result.completion_tokens)
        completion = self._completion(attempt, finish, usage, progress=progress)
        log.info(
            "completed",
            request_id=attempt.request_id,
            attempt=attempt.envelope.attempt,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
        )
        finished = events_pb2.ReplyEvent(
            envelope=attempt.envelope, finished=events_pb2.StreamFinished(finish_reason=finish, usage=usage)
        )
        return self._closing(attempt, completion, self._reply(attempt, finished))

    async def _hand_back(
        self, attempt: Attempt, engine: Engine, stream: TokenStream, progress: Progress
    ) -> None:
        """Publish what this attempt consumed; the next owner re-runs it as attempt + 1."""
        await _stop(engine, stream, attempt.request_id)
        try:
            result = stream.result
            prompt, output = result.prompt_tokens, result.completion_tokens
        except RuntimeError:  # never started: nothing but what the prompt would have cost
            prompt, output = 0, progress.tokens
        usage = envelope_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output
        )
        completion = self._completion(
            attempt,
            events_pb2.FINISH_REASON_ERROR,
            usage,
            progress=progress,
            error=f"handed back by worker {self.worker_id} (stopping or rebalanced); re-run as next attempt",
        )
        outputs = [
            Output(COMPLETIONS, completion, attempt.request_id),
            self.attempts.marker(
                attempt.event.envelope, attempt.envelope.attempt, HANDED_BACK, attempt.record
            ),
        ]
        with contextlib.suppress(Exception):
            await send_all(self.producer, "inference", outputs)
        log.warning("handed back", request_id=attempt.request_id, attempt=attempt.envelope.attempt)

    async def _restart_if_unhealthy(self, failed: Engine) -> None:
        async with self._restarting:
            if self.engine is not failed or self.restart_engine is None:
                return  # already restarted by another failed request
            health = await failed.health()
            if health.ok:
                return
            log.warning("engine unhealthy, restarting", model=self.pool, detail=health.detail)
            self.engine = await self.restart_engine(failed)

    # -- outcomes without (or after) a generation ---------------------------------------------------

    def _not_started(self, attempt: Attempt, finish: int, note: str) -> list[Output]:
        completion = self._completion(attempt, finish, NO_USAGE, error=note)
        finished = events_pb2.ReplyEvent(
            envelope=attempt.envelope,
            finished=events_pb2.StreamFinished(finish_reason=finish, usage=NO_USAGE),  # type: ignore[arg-type]
        )
        return self._closing(attempt, completion, self._reply(attempt, finished))

    def _refused(self, attempt: Attempt, code: str, reason: str) -> list[Output]:
        log.warning("refused", request_id=attempt.request_id, code=code, reason=reason)
        return self._failed(attempt, Progress(), code, reason)

    def _failed(self, attempt: Attempt, progress: Progress, code: str, reason: str) -> list[Output]:
        """Error completion (billing what was produced) and a clear status for the caller."""
        prompt = attempt.event.prompt_tokens if progress.first is not None else 0
        usage = envelope_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=progress.tokens, total_tokens=prompt + progress.tokens
        )
        completion = self._completion(
            attempt, events_pb2.FINISH_REASON_ERROR, usage, progress=progress, error=reason
        )
        failed = events_pb2.ReplyEvent(
            envelope=attempt.envelope,
            failed=events_pb2.StreamFailed(code=code, message=reason, stage="inference"),
        )
        return self._closing(attempt, completion, self._reply(attempt, failed))

    def _closing(
        self, attempt: Attempt, completion: events_pb2.CompletionFinished, replies: list[Output]
    ) -> list[Output]:
        """Completion, the caller's reply, and the FINISHED marker: produced together, then committed."""
        marker = self.attempts.marker(
            attempt.event.envelope, attempt.envelope.attempt, FINISHED, attempt.record
        )
        return [Output(COMPLETIONS, completion, attempt.request_id), *replies, marker]

    def _reply(self, attempt: Attempt, reply: events_pb2.ReplyEvent) -> list[Output]:
        reply_to = attempt.event.reply_to
        if not reply_to.topic:
            return []
        return [Output(reply_to.topic, reply, attempt.request_id, reply_partition(reply_to))]

    def _completion(
        self,
        attempt: Attempt,
        finish: int,
        usage: envelope_pb2.Usage,
        *,
        progress: Progress | None = None,
        error: str = "",
    ) -> events_pb2.CompletionFinished:
        ended = time.monotonic()
        completion = events_pb2.CompletionFinished(
            envelope=attempt.envelope,
            model=self.pool,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=usage,
            worker=self.worker_id,
            reply_to=attempt.event.reply_to,
            error=error,
            queue_wait_ms=round(attempt.queue_wait_s * 1000),
            engine=self.engine.kind,
            model_version=self.engine.model_version,
        )
        if progress is not None:
            completion.duration_ms = round((ended - progress.began) * 1000)
            if progress.first is not None:
                completion.time_to_first_token_ms = round((progress.first - progress.began) * 1000)
            if progress.first is not None and progress.last is not None and progress.tokens > 1:
                completion.inter_token_ms = (progress.last - progress.first) * 1000 / (progress.tokens - 1)
        return completion

    def _observe(self, progress: Progress, tokens: int) -> None:
        labels = self.pool
        metrics.OUTPUT_TOKENS.labels(labels).inc(tokens)
        if progress.first is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(labels).observe(progress.first - progress.began)
        if progress.first is not None and progress.last is not None and progress.tokens > 1:
            spent = progress.last - progress.first
            metrics.TIME_PER_OUTPUT_TOKEN.labels(labels).observe(spent / (progress.tokens - 1))
            if spent > 0:
                metrics.REQUEST_TOKENS_PER_SECOND.labels(labels).observe((progress.tokens - 1) / spent)

    # -- in-flight bookkeeping ------------------------------------------------------------------------

    def _enter(self, request_id: str, attempt: int, abort: Callable[[], Awaitable[None]]) -> None:
        self._running[request_id] = attempt
        self.board.running(request_id, abort)
        self._gauges()

    def _engine_done(self, request_id: str) -> None:
        """The slot is free: take the next prompt while this one's last outputs are acknowledged."""
        self._finishing.add(request_id)
        self._leave(request_id)
        release_capacity()

    def _leave(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self.board.done(request_id)
        self._gauges()

    def _gauges(self) -> None:
        metrics.IN_FLIGHT.labels(self.pool).set(len(self._running))
        metrics.BATCH_OCCUPANCY.labels(self.pool).set(len(self._running) / max(1, self.engine.capacity))


async def _stop(engine: Engine, stream: TokenStream, request_id: str) -> None:
    """Stop a generation whatever state it is in; never raises (we are already failing)."""
    with contextlib.suppress(Exception):
        await engine.abort(request_id)
    with contextlib.suppress(Exception):
        await stream.aclose()
