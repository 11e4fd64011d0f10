"""Prompts: turns redacted chat messages into the exact prompt each model expects."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from aiokafka import ConsumerRecord

from services.prompts.chat_template import ChatTemplate
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output
from sluice.logs import get_logger
from sluice.models import resolve_model_path
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import PROMPTS, REDACTED, BadEvent
from sluice.v1 import events_pb2, prompts_pb2, prompts_pb2_grpc

log = get_logger()


@dataclass(frozen=True)
class Assembled:
    prompt: str
    prompt_tokens: int
    template: str


@dataclass
class Assembler:
    """One chat template per served model, loaded from the model's own metadata."""

    settings: Settings
    templates: dict[str, ChatTemplate] = field(default_factory=dict)

    def load(self) -> None:
        for name, spec in self.settings.catalog.models.items():
            self.templates[name] = ChatTemplate(resolve_model_path(spec.source))

    def assemble(self, model: str, messages: Sequence[tuple[str, str]], max_tokens: int) -> Assembled:
        canonical = self.settings.catalog.resolve(model)
        if canonical is None:
            raise BadEvent(f"model: unknown model {model!r}")
        template = self.templates[canonical]
        prompt = template.render(messages)
        tokens = template.count_tokens(prompt)
        context = self.settings.catalog.models[canonical].context_tokens
        if tokens + max_tokens > context:
            raise BadEvent(
                f"max_tokens: prompt of {tokens} tokens plus max_tokens {max_tokens} "
                f"exceeds the {context}-token context of {canonical}"
            )
        return Assembled(prompt, tokens, template.name)


@dataclass
class PromptsServicer(prompts_pb2_grpc.PromptsServicer):
    assembler: Assembler

    async def Render(
        self, request: prompts_pb2.RenderRequest, context: Context
    ) -> prompts_pb2.RenderResponse:
        if not request.messages:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "messages: at least one message is required"
            )
        if not self.assembler.templates:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prompts is loading its templates")
        try:
            done = self.assembler.assemble(
                request.model, [(m.role, m.content) for m in request.messages], max_tokens=0
            )
        except BadEvent as exc:
            code = (
                grpc.StatusCode.NOT_FOUND
                if str(exc).startswith("model:")
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            await context.abort(code, str(exc))
        return prompts_pb2.RenderResponse(
            prompt=done.prompt, prompt_tokens=done.prompt_tokens, template=done.template
        )


class PromptsService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "prompts"
        self.assembler = Assembler(settings)

    async def prepare(self) -> None:
        await asyncio.to_thread(self.assembler.load)
        log.info("templates loaded", models=sorted(self.assembler.templates))

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                prompts_pb2.DESCRIPTOR.services_by_name["Prompts"].full_name,
                PromptsServicer(self.assembler),
                prompts_pb2_grpc.add_PromptsServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        return [runtime.consumer([REDACTED], self.handle)]

    async def handle(
        self, event: events_pb2.RequestRedacted, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        if not event.messages:
            raise BadEvent("messages: at least one message is required")
        done = self.assembler.assemble(
            event.model, [(m.role, m.content) for m in event.messages], event.params.max_tokens
        )
        assembled = events_pb2.PromptAssembled(
            envelope=envelopes.follow(event.envelope, self.name),
            model=self.settings.catalog.resolve(event.model) or event.model,
            prompt=done.prompt,
            prompt_tokens=done.prompt_tokens,
            params=event.params,
            reply_to=event.reply_to,
            template=done.template,
        )
        log.info("assembled", request_id=event.envelope.request_id, prompt_tokens=done.prompt_tokens)
        return [Output(PROMPTS, assembled, event.envelope.request_id)]


def build(settings: Settings) -> Service:
    return PromptsService(settings)
