"""Prompts: the template registry and assembly of the exact prompt each model expects."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.prompts.assembly import Assembled, Assembler, PromptRequest
from services.prompts.registry import DEFAULT_LABEL, LATEST, Registry, describe
from services.prompts.registry_log import OPERATOR, TEMPLATES, RegistryLog
from services.prompts.template_body import TemplateBody, TemplateRejected, check_name
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output, RequestFailed, send
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import DLQ, PROMPTS, PROMPTS_BATCH, REDACTED
from sluice.v1 import envelope_pb2, events_pb2, prompts_pb2, prompts_pb2_grpc, templates_pb2

log = get_logger()
T = TypeVar("T")


def experiment_subject(tenant: str, user: str, request_id: str) -> str:
    """Arms are sticky per end user; a request without one is assigned on its own."""
    return f"{tenant}\0{user}" if user else f"request\0{request_id}"


def from_redacted(event: events_pb2.RequestRedacted) -> PromptRequest:
    return PromptRequest(
        model=event.model,
        messages=tuple((m.role, m.content) for m in event.messages),
        template=event.template if event.HasField("template") else None,
        variables=tuple(sorted(event.variables.items())),
        context=tuple(event.context),
        max_tokens=event.params.max_tokens,
        max_tokens_defaulted=event.max_tokens_defaulted,
        stop=tuple(event.params.stop),
        subject=experiment_subject(event.envelope.tenant, event.user, event.envelope.request_id),
    )


@dataclass
class PromptsServicer(prompts_pb2_grpc.PromptsServicer):
    settings: Settings
    assembler: Assembler
    registry_log: RegistryLog
    producer: AIOKafkaProducer | None = None

    @property
    def registry(self) -> Registry:
        return self.assembler.registry

    async def _ready(self, context: Context) -> None:
        if not self.registry_log.ready.is_set() or not self.assembler.templates:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prompts is loading; retry shortly")

    async def _writer(self, context: Context) -> AIOKafkaProducer:
        await self._ready(context)
        if self.producer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prompts is connecting to Kafka; retry shortly")
        assert self.producer is not None
        return self.producer

    async def Render(
        self, request: prompts_pb2.RenderRequest, context: Context
    ) -> prompts_pb2.RenderResponse:
        await self._ready(context)
        canonical = self.settings.catalog.resolve(request.model)
        default_max = self.settings.catalog.models[canonical].max_output_tokens // 4 if canonical else 0
        prompt_request = PromptRequest(
            model=request.model,
            messages=tuple((m.role, m.content) for m in request.messages),
            template=request.template if request.HasField("template") else None,
            variables=tuple(sorted(request.variables.items())),
            context=tuple(request.context),
            max_tokens=request.max_tokens if request.HasField("max_tokens") else default_max,
            max_tokens_defaulted=not request.HasField("max_tokens"),
            subject=experiment_subject(request.tenant, request.user, "render"),
        )
        done = await guarded(context, lambda: self.assembler.assemble(prompt_request))
        return prompts_pb2.RenderResponse(
            prompt=done.fitted.prompt,
            prompt_tokens=done.fitted.prompt_tokens,
            template=done.chat_template,
            messages=[envelope_pb2.ChatMessage(role=r, content=c) for r, c in done.fitted.messages],
            template_used=done.used,
            max_tokens=done.max_tokens,
            model=done.model,
        )

    async def CreateVersion(
        self, request: prompts_pb2.CreateVersionRequest, context: Context
    ) -> prompts_pb2.CreateVersionResponse:
        producer = await self._writer(context)
        draft = templates_pb2.TemplateVersion(
            name=request.name,
            messages=request.messages,
            variables_schema=request.variables_schema,
            constraints=request.constraints,
            author=request.author,
            note=request.note,
        )
        try:
            TemplateBody.compile(draft)
        except TemplateRejected as exc:
            message = str(exc)
            if exc.escape:
                message += f" (audited as {await self._audit_refusal(producer, draft, message)})"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        for i, model in enumerate(request.constraints.allowed_models):
            if self.settings.catalog.resolve(model) is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"constraints.allowed_models[{i}]: unknown model {model!r}",
                )
        stored = await guarded_io(context, self.registry_log.create_version(producer, draft))
        log.info("template version created", template=stored.name, version=stored.version)
        return prompts_pb2.CreateVersionResponse(version=stored)

    async def _audit_refusal(
        self, producer: AIOKafkaProducer, draft: templates_pb2.TemplateVersion, reason: str
    ) -> str:
        """A sandbox escape attempt is a security event: dead-letter it, which the audit trail records."""
        payload = draft.SerializeToString()
        letter = events_pb2.DeadLetter(
            envelope=envelopes.new_envelope(
                request_id=f"template-refused-{uuid.uuid4().hex}", tenant=OPERATOR, producer="prompts"
            ),
            source_topic=TEMPLATES,
            consumer_group="sluice-prompts",
            reason=reason,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_size=len(payload),
        )
        await send(producer, "prompts", Output(DLQ, letter, letter.envelope.request_id))
        log.warning(
            "template refused by the sandbox", template=draft.name, audit_id=letter.envelope.request_id
        )
        return letter.envelope.request_id

    async def GetTemplate(
        self, request: prompts_pb2.GetTemplateRequest, context: Context
    ) -> prompts_pb2.GetTemplateResponse:
        await self._ready(context)
        version = await guarded(context, lambda: self._get(request.ref))
        return prompts_pb2.GetTemplateResponse(
            version=version, labels=self.registry.labels_of(version.name, version.version)
        )

    def _get(self, ref: templates_pb2.TemplateRef) -> templates_pb2.TemplateVersion:
        """By number, `latest`, or a label (an experiment label shows its first arm)."""
        if not ref.name:
            raise RequestFailed("INVALID_ARGUMENT", "ref.name: must not be empty")
        if ref.version:
            return self.registry.version(ref.name, ref.version).version
        label = ref.label or DEFAULT_LABEL
        if label == LATEST:
            return self.registry.version(ref.name, self.registry.latest(ref.name)).version
        pointer = self.registry.pointer(ref.name, label)
        return self.registry.version(ref.name, pointer.variants[0].version).version

    async def ListTemplates(
        self, request: prompts_pb2.ListTemplatesRequest, context: Context
    ) -> prompts_pb2.ListTemplatesResponse:
        await self._ready(context)
        return prompts_pb2.ListTemplatesResponse(
            templates=[
                prompts_pb2.TemplateSummary(
                    name=name,
                    latest_version=self.registry.latest(name),
                    labels=[p for _, p in sorted(self.registry.labels.get(name, {}).items())],
                )
                for name in sorted(self.registry.versions)
            ]
        )

    async def ListVersions(
        self, request: prompts_pb2.ListVersionsRequest, context: Context
    ) -> prompts_pb2.ListVersionsResponse:
        await self._ready(context)
        versions = await guarded(context, lambda: self.registry.history(request.name))
        labels = self.registry.labels.get(request.name, {})
        return prompts_pb2.ListVersionsResponse(
            versions=versions, labels=[p for _, p in sorted(labels.items())]
        )

    async def SetLabel(
        self, request: prompts_pb2.SetLabelRequest, context: Context
    ) -> prompts_pb2.SetLabelResponse:
        producer = await self._writer(context)
        pointer = await guarded(context, lambda: self._pointer(request))
        stored = await guarded_io(context, self.registry_log.set_label(producer, pointer))
        log.info(
            "template label set",
            template=stored.name,
            label=stored.label,
            versions=[v.version for v in stored.variants],
        )
        return prompts_pb2.SetLabelResponse(label=stored)

    def _pointer(self, request: prompts_pb2.SetLabelRequest) -> templates_pb2.LabelPointer:
        try:
            check_name("label", request.label)
        except TemplateRejected as exc:
            raise RequestFailed("INVALID_ARGUMENT", str(exc)) from None
        if request.label == LATEST:
            raise RequestFailed("INVALID_ARGUMENT", f"label: {LATEST!r} is reserved for the newest version")
        if not request.variants:
            raise RequestFailed("INVALID_ARGUMENT", "variants: name at least one version")
        seen: set[int] = set()
        pointer = templates_pb2.LabelPointer(name=request.name, label=request.label, author=request.author)
        for i, variant in enumerate(request.variants):
            self.registry.version(request.name, variant.version)  # NOT_FOUND naming it
            if variant.version in seen:
                raise RequestFailed("INVALID_ARGUMENT", f"variants[{i}].version: {variant.version} repeated")
            seen.add(variant.version)
            if len(request.variants) > 1 and variant.weight == 0:
                raise RequestFailed("INVALID_ARGUMENT", f"variants[{i}].weight: must be greater than 0")
            pointer.variants.add(version=variant.version, weight=variant.weight or 100, name=variant.name)
        return pointer


async def _abort(context: Context, exc: RequestFailed) -> NoReturn:
    await context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), str(exc))
    raise AssertionError("abort returned")  # context.abort always raises


async def guarded(context: Context, work: Callable[[], T]) -> T:
    """Run registry/assembly work; its RequestFailed becomes the gRPC status it names."""
    try:
        return work()
    except RequestFailed as exc:
        await _abort(context, exc)


async def guarded_io(context: Context, work: Awaitable[T]) -> T:
    try:
        return await work
    except RequestFailed as exc:
        await _abort(context, exc)


class PromptsService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "prompts"
        self.assembler = Assembler(settings, Registry())
        self.registry_log = RegistryLog(settings, self.assembler.registry)
        self.servicer = PromptsServicer(settings, self.assembler, self.registry_log)

    async def prepare(self) -> None:
        await asyncio.to_thread(self.assembler.load)
        log.info("chat templates loaded", models=sorted(self.assembler.templates))
        await self.registry_log.catch_up()

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                prompts_pb2.DESCRIPTOR.services_by_name["Prompts"].full_name,
                self.servicer,
                prompts_pb2_grpc.add_PromptsServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        self.servicer.producer = runtime.producer
        return [runtime.consumer([REDACTED], self.handle)]

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        return [asyncio.create_task(self.registry_log.follow(), name="templates-follower")]

    async def close(self) -> None:
        await self.registry_log.close()
        self.assembler.close()

    async def handle(
        self, event: events_pb2.RequestRedacted, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        done = self.assembler.assemble(from_redacted(event))
        params = events_pb2.GenerationParams()
        params.CopyFrom(event.params)
        params.max_tokens = done.max_tokens
        del params.stop[:]
        params.stop.extend(done.stop)
        assembled = events_pb2.PromptAssembled(
            envelope=envelopes.follow(event.envelope, self.name),
            model=done.model,
            prompt=done.fitted.prompt,
            prompt_tokens=done.fitted.prompt_tokens,
            params=params,
            reply_to=event.reply_to,
            template=done.chat_template,
            template_used=done.used,
            batch=event.batch,
            batch_id=event.batch_id,
        )
        _log_assembled(event.envelope.request_id, done)
        # Async batch work has its own topic, which workers take only with spare capacity.
        topic = PROMPTS_BATCH if event.batch else PROMPTS
        return [Output(topic, assembled, event.envelope.request_id)]


def _log_assembled(request_id: str, done: Assembled) -> None:
    used = done.used
    log.info(
        "assembled",
        request_id=request_id,
        prompt_tokens=done.fitted.prompt_tokens,
        max_tokens=done.max_tokens,
        template=describe(templates_pb2.TemplateRef(name=used.name, version=used.version)) if used else None,
        variant=used.variant if used else None,
        dropped_turns=done.fitted.dropped_turns,
    )


def build(settings: Settings) -> Service:
    return PromptsService(settings)
