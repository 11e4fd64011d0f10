"""Gateway: authenticates callers, publishes requests, streams back their replies."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import structlog

from services.gateway.auth import KeyStore, ensure_demo_key
from services.gateway.budgets import BudgetGuard
from services.gateway.pseudonyms import Restoration
from services.gateway.replies import ReplyRouter
from services.gateway.validation import Invalid, ValidRequest, validate
from services.redaction.vault import Keyring, keyring_from_settings
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import Output, send
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import FEEDBACK, REQUESTS, TOKENS
from sluice.v1 import envelope_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc

log = get_logger()
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1d3c1e-9a8b-4c57-9a57-5c1ce0000001")
REPLAY_CACHE_SIZE = 1000


def _request_id(tenant: str, idempotency_key: str) -> str:
    """The same key from the same tenant always names the same request."""
    if idempotency_key:
        return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{tenant}\0{idempotency_key}").hex
    return envelopes.new_request_id()


@dataclass
class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    settings: Settings
    keys: KeyStore
    replies: ReplyRouter
    runtime: Runtime | None = None
    keyring: Keyring | None = None  # opens sealed pseudonyms for the caller
    budgets: BudgetGuard | None = None  # hard budgets and rate limits (metering area)
    # Finished idempotent requests, replayed instead of re-run.
    _replays: OrderedDict[str, list[gateway_pb2.GenerateResponse]] = field(default_factory=OrderedDict)

    async def _runtime(self, context: Context) -> Runtime:
        if self.runtime is None or not self.replies.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is starting; retry shortly")
        assert self.runtime is not None
        return self.runtime

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        tenant = await self.keys.authenticate(context)
        try:
            valid = validate(request, self.settings.catalog)
        except Invalid as exc:
            await context.abort(exc.code, exc.message)
        runtime = await self._runtime(context)
        request_id = _request_id(tenant, request.idempotency_key)
        structlog.contextvars.bind_contextvars(request_id=request_id, tenant=tenant)
        if request_id in self._replays:
            for response in self._replays[request_id]:
                yield response
            return
        if self.replies.in_flight(request_id):
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                "idempotency_key: a request with this key is still in progress",
            )
        key_id = await self.budgets.enforce(context, tenant) if self.budgets else ""
        queue = self.replies.register(request_id)
        sent: list[gateway_pb2.GenerateResponse] = []
        try:
            requested = self._requested(request, valid, tenant, request_id, key_id, context.peer())
            await send(runtime.producer, "gateway", requested)
            log.info("request published", model=valid.model, messages=len(request.messages))
            first = gateway_pb2.GenerateResponse(request_id=request_id, model=valid.model)
            sent.append(first)
            yield first
            restore = Restoration(self.keyring, tenant, request_id)
            async for response in self._stream(queue, request_id, context, restore):
                sent.append(response)
                yield response
        finally:
            self.replies.unregister(request_id)
            structlog.contextvars.unbind_contextvars("request_id", "tenant")
        if request.idempotency_key:
            self._remember(request_id, sent)

    def _requested(
        self,
        request: gateway_pb2.GenerateRequest,
        valid: ValidRequest,
        tenant: str,
        request_id: str,
        key_id: str,
        caller_address: str = "",
    ) -> Output:
        event = events_pb2.GenerationRequested(
            envelope=envelopes.new_envelope(request_id=request_id, tenant=tenant, producer="gateway"),
            model=valid.model,
            messages=request.messages,
            params=events_pb2.GenerationParams(
                max_tokens=valid.max_tokens,
                temperature=valid.temperature,
                top_p=valid.top_p,
                stop=request.stop,
            ),
            user=request.user,
            idempotency_key=request.idempotency_key,
            reply_to=envelope_pb2.ReplyTo(topic=TOKENS, partition=self.replies.partition),
            template=request.template if request.HasField("template") else None,
            variables=request.variables,
            context=request.context,
            max_tokens_defaulted=not request.HasField("max_tokens"),
            key_id=key_id,
            caller_address=caller_address,
        )
        return Output(REQUESTS, event, request_id)

    async def _stream(
        self,
        queue: asyncio.Queue[events_pb2.ReplyEvent],
        request_id: str,
        context: Context,
        restore: Restoration,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        finished: events_pb2.StreamFinished | None = None
        cost: envelope_pb2.Cost | None = None
        next_seq = 0
        while finished is None or cost is None:
            timeout = self.settings.gateway_cost_wait_s if finished else self.settings.gateway_reply_timeout_s
            try:
                event = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                if finished is not None:
                    log.warning("no charge arrived in time; ending stream without cost")
                    break
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no reply from the pipeline in time")
            kind = event.WhichOneof("body")
            if kind == "chunk":
                # A re-run attempt restarts at seq 0: never show the caller a chunk twice.
                if event.chunk.seq >= next_seq:
                    next_seq = event.chunk.seq + 1
                    delta = restore.push(event.chunk.delta)
                    if delta:
                        yield gateway_pb2.GenerateResponse(request_id=request_id, delta=delta)
            elif kind == "pseudonyms":
                restore.open(event.pseudonyms)
            elif kind == "finished":
                finished = event.finished
            elif kind == "charged":
                cost = event.charged.cost  # may overtake `finished`: both come from different services
            elif kind == "failed":
                code = getattr(grpc.StatusCode, event.failed.code, grpc.StatusCode.INTERNAL)
                log.warning("request failed downstream", stage=event.failed.stage, code=event.failed.code)
                await context.abort(code, event.failed.message)
        assert finished is not None
        tail = restore.finish()
        if tail:
            yield gateway_pb2.GenerateResponse(request_id=request_id, delta=tail)
        yield gateway_pb2.GenerateResponse(
            request_id=request_id, finish_reason=finished.finish_reason, usage=finished.usage, cost=cost
        )

    def _remember(self, request_id: str, responses: list[gateway_pb2.GenerateResponse]) -> None:
        if responses and responses[-1].finish_reason:
            self._replays[request_id] = responses
            if len(self._replays) > REPLAY_CACHE_SIZE:
                self._replays.popitem(last=False)

    async def SubmitFeedback(
        self, request: gateway_pb2.SubmitFeedbackRequest, context: Context
    ) -> gateway_pb2.SubmitFeedbackResponse:
        tenant = await self.keys.authenticate(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        if request.score not in (-1, 0, 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "score: must be -1, 0 or 1")
        runtime = await self._runtime(context)
        event = events_pb2.FeedbackSubmitted(
            envelope=envelopes.new_envelope(request_id=request.request_id, tenant=tenant, producer="gateway"),
            score=request.score,
            label=request.label,
        )
        await send(runtime.producer, "gateway", Output(FEEDBACK, event, request.request_id))
        return gateway_pb2.SubmitFeedbackResponse(accepted=True)


class GatewayService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "gateway"
        ensure_demo_key(settings.state_dir)
        self.replies = ReplyRouter(settings.bootstrap, settings.gateway_reply_partition)
        self.servicer = GatewayServicer(settings, KeyStore.load(settings.state_dir), self.replies)
        self.servicer.keyring = keyring_from_settings(settings)
        self.servicer.budgets = BudgetGuard(settings.bootstrap)

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
                self.servicer,
                gateway_pb2_grpc.add_GatewayServicer_to_server,
            )
        ]

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        self.servicer.runtime = runtime
        task = asyncio.create_task(self.replies.run(), name="replies")
        assert self.servicer.budgets is not None
        budgets = asyncio.create_task(self.servicer.budgets.run(), name="budgets")
        await self.replies.ready.wait()
        await self.servicer.budgets.ready.wait()
        return [task, budgets]


def build(settings: Settings) -> Service:
    return GatewayService(settings)
