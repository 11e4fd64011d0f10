"""Inference: runs assembled prompts on the model's engine and streams tokens back.

Each model pool has its own consumer group on sluice.prompts.v1 and takes only
its own model's prompts. Token chunks go to the caller's reply partition as
they are made; the completion (with exact usage) is produced before the
prompt's offset is committed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.inference.llamacpp_engine import LlamaCppEngine
from services.redaction.boundary import Boundary, load_output_boundary, redact_chunk, stream_redactor_for
from services.redaction.streaming import StreamRedactor
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output
from sluice.logs import get_logger
from sluice.models import resolve_model_path
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import COMPLETIONS, PROMPTS, BadEvent
from sluice.v1 import envelope_pb2, events_pb2, inference_pb2, inference_pb2_grpc

log = get_logger()
FINISH = {
    "stop": events_pb2.FINISH_REASON_STOP,
    "length": events_pb2.FINISH_REASON_LENGTH,
    "cancelled": events_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class ChunkWriter:
    """Coalesces tokens into chunks: fewer Kafka records, still a live stream."""

    producer: AIOKafkaProducer
    event: events_pb2.PromptAssembled
    max_tokens: int
    max_delay_s: float
    seq: int = 0
    _text: list[str] = field(default_factory=list)
    _tokens: int = 0
    _since: float = field(default_factory=time.monotonic)
    _pending: list[asyncio.Future[object]] = field(default_factory=list)
    # Output redaction: model text reaches sluice.tokens.v1 only through this.
    redactor: StreamRedactor | None = None

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
        reply_to = self.event.reply_to
        if reply_to.topic:
            reply = events_pb2.ReplyEvent(
                envelope=envelopes.follow(self.event.envelope, "inference"),
                chunk=events_pb2.TokenChunk(seq=self.seq, delta=delta, tokens=self._tokens),
            )
            self._pending.append(
                await self.producer.send(
                    reply_to.topic,
                    reply.SerializeToString(),
                    key=self.event.envelope.request_id.encode(),
                    partition=reply_to.partition,
                )
            )
            self.seq += 1
        self._text.clear()
        self._tokens = 0
        self._since = time.monotonic()

    async def close(self) -> None:
        await self.flush(final=True)
        for future in self._pending:
            await future


@dataclass
class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    settings: Settings
    engines: dict[str, LlamaCppEngine]

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    name=name, engine="llamacpp", context_tokens=engine.n_ctx, slots=engine.num_slots
                )
                for name, engine in self.engines.items()
            ]
        )


class InferenceService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "inference"
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.engines: dict[str, LlamaCppEngine] = {}
        self.output_boundary: Boundary | None = None

    async def prepare(self) -> None:
        self.output_boundary = await load_output_boundary(self.settings)
        for name, spec in self.settings.catalog.models.items():
            self.engines[name] = await asyncio.to_thread(
                LlamaCppEngine,
                resolve_model_path(spec.source),
                n_ctx=spec.context_tokens,
                n_threads=self.settings.inference_threads,
                slots=self.settings.inference_slots,
            )
            log.info("model loaded", model=name, slots=self.settings.inference_slots)

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                InferenceServicer(self.settings, self.engines),
                inference_pb2_grpc.add_InferenceServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        self.producer = runtime.producer
        return [
            runtime.consumer([PROMPTS], self._pool_handler(model), group_id=f"sluice-inference-{model}")
            for model in self.engines
        ]

    def _pool_handler(self, model: str):  # type: ignore[no-untyped-def]
        async def handle(
            event: events_pb2.PromptAssembled, record: ConsumerRecord[bytes, bytes]
        ) -> Sequence[Output]:
            if event.model != model:
                return ()  # another pool's prompt
            return await self.generate(self.engines[model], event)

        return handle

    async def generate(self, engine: LlamaCppEngine, event: events_pb2.PromptAssembled) -> Sequence[Output]:
        params = event.params
        request_id = event.envelope.request_id
        try:
            stream = engine.stream(
                event.prompt, params.max_tokens, params.temperature, params.top_p or 1.0, params.stop
            )
        except ValueError as exc:
            raise BadEvent(f"params: {exc}") from None
        writer = ChunkWriter(
            self.producer,
            event,
            self.settings.token_flush_tokens,
            self.settings.token_flush_ms / 1000,
            redactor=stream_redactor_for(self.output_boundary, event.envelope.tenant, self.settings),
        )
        started = time.monotonic()
        first_token: float | None = None
        async with stream:
            async for token in stream:
                if first_token is None and token.token_id is not None:
                    first_token = time.monotonic()
                await writer.add(token.text, 1 if token.token_id is not None else 0)
        await writer.close()
        result = stream.result
        ended = time.monotonic()
        usage = envelope_pb2.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.total_tokens,
        )
        finish = FINISH[result.finish_reason]
        completion = events_pb2.CompletionFinished(
            envelope=envelopes.follow(event.envelope, self.name),
            model=event.model,
            finish_reason=finish,
            usage=usage,
            time_to_first_token_ms=round(((first_token or ended) - started) * 1000),
            duration_ms=round((ended - started) * 1000),
            worker=self.worker,
            reply_to=event.reply_to,
        )
        log.info(
            "completed",
            request_id=request_id,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        outputs = [Output(COMPLETIONS, completion, request_id)]
        if event.reply_to.topic:
            finished = events_pb2.ReplyEvent(
                envelope=envelopes.follow(event.envelope, self.name),
                finished=events_pb2.StreamFinished(finish_reason=finish, usage=usage),
            )
            outputs.append(Output(event.reply_to.topic, finished, request_id, event.reply_to.partition))
        return outputs

    async def close(self) -> None:
        for engine in self.engines.values():
            await asyncio.to_thread(engine.close)


def build(settings: Settings) -> Service:
    return InferenceService(settings)
