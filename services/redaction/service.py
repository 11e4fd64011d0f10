"""Redaction: the privacy boundary. Nothing leaves it holding raw personal data.

It fails closed: if analysis fails, times out or the model is not loaded, the
request is dead-lettered with the reason and the caller told; nothing is
published downstream. Pseudonyms leave only sealed (AES-GCM, tenant key), on
the caller's reply partition, for the caller's gateway.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from aiokafka import ConsumerRecord

from services.gateway.auth import KeyStore
from services.gateway.ingress import Ingress
from services.redaction import metrics
from services.redaction.analyzer import DeadlineExceeded, RedactionError, Redactor
from services.redaction.boundary import (
    Boundary,
    InvalidText,
    boundary_from_settings,
    output_redactor,
)
from services.redaction.policy import POLICIES, PolicyError
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.identity import pseudonymous_user
from sluice.kafka import EventConsumer, Output, RequestFailed
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import REDACTED, REQUESTS, TOKENS, BadEvent
from sluice.v1 import envelope_pb2, events_pb2, privacy_pb2, redaction_pb2, redaction_pb2_grpc

log = get_logger()

# Requests taken per poll and analyzed together (the micro-batcher splits at 128 texts).
POLL_BATCH = 64


def check_request(event: events_pb2.GenerationRequested) -> None:
    """Kafka producers skip the gateway's checks, so the boundary repeats the essential ones."""
    if not event.model:
        raise BadEvent("model: must not be empty")
    if not event.messages and not event.HasField("template"):
        raise BadEvent("messages: at least one message is required")
    for i, message in enumerate(event.messages):
        if not message.content.strip():
            raise BadEvent(f"messages[{i}].content: must not be empty")
    if event.params.max_tokens <= 0:
        raise BadEvent("params.max_tokens: must be greater than 0")


def status_for(exc: Exception) -> grpc.StatusCode:
    """The gRPC status a failed redaction call answers with (RPCs only; Kafka fails closed)."""
    if isinstance(exc, InvalidText | PolicyError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE


@dataclass
class RedactorServicer(redaction_pb2_grpc.RedactorServicer):
    settings: Settings
    boundary: Boundary

    async def Redact(
        self, request: redaction_pb2.RedactRequest, context: Context
    ) -> redaction_pb2.RedactResponse:
        tenant = await KeyStore.shared(self.settings).authenticate(context)
        try:
            self.boundary.check([request.text], "text")
            applied, policy = await self.boundary.redact(tenant, [request.text], request.language)
        except (InvalidText, PolicyError, DeadlineExceeded, RedactionError) as exc:
            await context.abort(status_for(exc), str(exc))
        return redaction_pb2.RedactResponse(
            text=applied.texts[0],
            entity_counts=applied.entity_counts,
            entities=[
                redaction_pb2.Entity(type=f.entity_type, start=f.start, end=f.end, score=f.score)
                for f in applied.findings[0]
            ],
            policy_version=policy.version,
        )

    async def RedactStream(
        self, request_iterator: AsyncIterator[redaction_pb2.RedactStreamRequest], context: Context
    ) -> AsyncIterator[redaction_pb2.RedactStreamResponse]:
        tenant = await KeyStore.shared(self.settings).authenticate(context)
        try:
            stream = output_redactor(self.boundary, tenant, self.settings.output_redaction_holdback_chars)
            async for request in request_iterator:
                self.boundary.check([request.delta], "delta")
                released = await asyncio.to_thread(stream.push, request.delta)
                if released:
                    yield redaction_pb2.RedactStreamResponse(delta=released)
                if stream.held > self.settings.redaction_max_text_bytes:
                    raise InvalidText("delta: held-back text is over the size limit")
            rest = await asyncio.to_thread(stream.finish)
        except (InvalidText, PolicyError, DeadlineExceeded, RedactionError) as exc:
            await context.abort(status_for(exc), str(exc))
        if rest:
            yield redaction_pb2.RedactStreamResponse(delta=rest)


class RedactionService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "redaction"
        self.boundary = boundary_from_settings(settings)
        self.servicer = RedactorServicer(settings, self.boundary)

    async def prepare(self) -> None:
        redactor = await asyncio.to_thread(Redactor)
        self.boundary.loaded(redactor)
        log.info("presidio loaded")

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                redaction_pb2.DESCRIPTOR.services_by_name["Redactor"].full_name,
                self.servicer,
                redaction_pb2_grpc.add_RedactorServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        # Every replica must see every policy update: one group per process, from the start.
        policy_group = f"sluice-redaction-policies-{socket.gethostname()}-{os.getpid()}"
        return [
            # Kafka ingress: only authenticated, checked requests reach `handle` (docs/ingress.md).
            # One poll's requests are handled together, so their texts share one nlp.pipe batch.
            runtime.consumer(
                [REQUESTS],
                Ingress.from_settings(self.settings).guard(self.handle),
                concurrent=True,
                max_records=POLL_BATCH,
            ),
            runtime.consumer([POLICIES], self.handle_policy, group_id=policy_group),
        ]

    async def handle_policy(
        self, event: privacy_pb2.PolicyUpdate, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        try:
            policy = self.boundary.apply_update(event)
        except PolicyError as exc:
            raise BadEvent(str(exc)) from None
        if policy is None:
            log.info("policy override removed", tenant=event.tenant)
        elif not policy.redact:
            log.warning("policy applied: opts out of redaction", tenant=event.tenant, version=policy.version)
        else:
            log.info("policy applied", tenant=event.tenant, version=policy.version)
        return ()

    async def handle(
        self, event: events_pb2.GenerationRequested, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        check_request(event)
        tenant = event.envelope.tenant
        request_id = event.envelope.request_id
        texts = [m.content for m in event.messages]
        # Template variables and context documents are redacted with the messages (prompts area).
        names, n = list(event.variables), len(event.messages)
        extra = [event.variables[k] for k in names] + [*event.context]
        try:
            self.boundary.check(texts, "messages[{i}].content")
            self.boundary.check(extra, "variables/context[{i}]")
            applied, policy = await self.boundary.redact(tenant, texts + extra)
        except (InvalidText, PolicyError) as exc:
            raise BadEvent(str(exc)) from None
        except DeadlineExceeded as exc:
            raise RequestFailed("DEADLINE_EXCEEDED", f"redaction: {exc}") from None
        except RedactionError as exc:
            raise RequestFailed("UNAVAILABLE", f"redaction: {exc}") from None
        outputs: list[Output] = []
        if applied.originals and event.reply_to.topic == TOKENS:  # only a gateway can open the vault
            vault = self.boundary.keyring.seal(tenant, request_id, applied.originals, policy.pseudonym_ttl_s)
            sealed = events_pb2.ReplyEvent(
                envelope=envelopes.follow(event.envelope, self.name), pseudonyms=vault
            )
            outputs.append(Output(event.reply_to.topic, sealed, request_id, event.reply_to.partition))
        outputs.append(
            Output(
                REDACTED,
                events_pb2.RequestRedacted(
                    envelope=envelopes.follow(event.envelope, self.name),
                    model=event.model,
                    messages=[
                        envelope_pb2.ChatMessage(role=m.role, content=text)
                        for m, text in zip(event.messages, applied.texts[:n], strict=True)
                    ],
                    params=event.params,
                    user=pseudonymous_user(tenant, event.user),
                    reply_to=event.reply_to,
                    entity_counts=applied.entity_counts,
                    policy_version=policy.version,
                    template=event.template if event.HasField("template") else None,
                    variables=dict(zip(names, applied.texts[n : n + len(names)], strict=True)),
                    context=applied.texts[n + len(names) :],
                    max_tokens_defaulted=event.max_tokens_defaulted,
                    batch=event.batch,
                    batch_id=event.batch_id,
                ),
                request_id,
            )
        )
        for entity_type, count in applied.entity_counts.items():
            metrics.ENTITIES.labels(entity_type).inc(count)
        log.info("redacted", request_id=request_id, entities=sum(applied.entity_counts.values()))
        return outputs


def build(settings: Settings) -> Service:
    return RedactionService(settings)
