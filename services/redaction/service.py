"""Redaction: the privacy boundary. Nothing leaves it holding raw personal data.

It fails closed: if analysis fails, the request is dead-lettered and the caller
told, and nothing is published downstream.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from aiokafka import ConsumerRecord

from services.redaction.analyzer import Redactor
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import REDACTED, REQUESTS, BadEvent
from sluice.v1 import envelope_pb2, events_pb2, redaction_pb2, redaction_pb2_grpc

log = get_logger()
POLICY_VERSION = "builtin-1"


def check_request(event: events_pb2.GenerationRequested) -> None:
    """Kafka producers skip the gateway's checks, so the boundary repeats the essential ones."""
    if not event.model:
        raise BadEvent("model: must not be empty")
    if not event.messages:
        raise BadEvent("messages: at least one message is required")
    for i, message in enumerate(event.messages):
        if not message.content.strip():
            raise BadEvent(f"messages[{i}].content: must not be empty")
    if event.params.max_tokens <= 0:
        raise BadEvent("params.max_tokens: must be greater than 0")


def pseudonymous_user(tenant: str, user: str) -> str:
    """End-user ids are often emails; downstream only needs a stable, opaque id."""
    if not user:
        return ""
    return "u-" + hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()[:20]


@dataclass
class RedactionServicer(redaction_pb2_grpc.RedactionServicer):
    redactor: Redactor | None = None

    async def Redact(
        self, request: redaction_pb2.RedactRequest, context: Context
    ) -> redaction_pb2.RedactResponse:
        if not request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: must not be empty")
        if self.redactor is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "redaction is loading its model")
        assert self.redactor is not None
        result = await asyncio.to_thread(self.redactor.redact, [request.text])
        return redaction_pb2.RedactResponse(text=result.texts[0], entity_counts=result.entity_counts)


class RedactionService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "redaction"
        self.servicer = RedactionServicer()

    async def prepare(self) -> None:
        threshold = self.settings.redaction_score_threshold
        self.servicer.redactor = await asyncio.to_thread(Redactor, score_threshold=threshold)
        log.info("presidio loaded")

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                redaction_pb2.DESCRIPTOR.services_by_name["Redaction"].full_name,
                self.servicer,
                redaction_pb2_grpc.add_RedactionServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        return [runtime.consumer([REQUESTS], self.handle)]

    async def handle(
        self, event: events_pb2.GenerationRequested, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        check_request(event)
        assert self.servicer.redactor is not None
        result = await asyncio.to_thread(self.servicer.redactor.redact, [m.content for m in event.messages])
        redacted = events_pb2.RequestRedacted(
            envelope=envelopes.follow(event.envelope, self.name),
            model=event.model,
            messages=[
                envelope_pb2.ChatMessage(role=m.role, content=text)
                for m, text in zip(event.messages, result.texts, strict=True)
            ],
            params=event.params,
            user=pseudonymous_user(event.envelope.tenant, event.user),
            reply_to=event.reply_to,
            entity_counts=result.entity_counts,
            policy_version=POLICY_VERSION,
        )
        log.info(
            "redacted",
            request_id=event.envelope.request_id,
            entities=sum(result.entity_counts.values()),
        )
        return [Output(REDACTED, redacted, event.envelope.request_id)]


def build(settings: Settings) -> Service:
    return RedactionService(settings)
