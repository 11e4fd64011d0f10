"""Gateway: authenticates callers, publishes requests, streams back their replies."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.auth import KeyStore, Principal, seed_local_keys
from services.gateway.batches import Batches
from services.gateway.budgets import BudgetGuard
from services.gateway.feedback import Feedback
from services.gateway.ingress import send_signed
from services.gateway.pseudonyms import Restoration
from services.gateway.replies import ReplyRouter
from services.gateway.validation import Invalid, ValidRequest, validate
from services.metering.pricing import format_amount
from services.redaction.vault import Keyring, keyring_from_settings
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import Output, send
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import CONTROL, REQUESTS, TOKENS
from sluice.v1 import envelope_pb2, events_pb2, feedback_pb2, gateway_pb2, gateway_pb2_grpc

log = get_logger()
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1d3c1e-9a8b-4c57-9a57-5c1ce0000001")
REPLAY_CACHE_SIZE = 1000


def _request_id(tenant: str, idempotency_key: str) -> str:
    """The same key from the same tenant always names the same request."""
    if idempotency_key:
        return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{tenant}\0{idempotency_key}").hex
    return envelopes.new_request_id()


@dataclass
class Call:
    """One Generate call's progress, so its unwinding knows whether to cancel downstream."""

    request_id: str
    tenant: str
    attempt: int
    deadline: Timestamp | None
    published: bool = False
    ended: bool = False  # the pipeline finished or refused it: nothing left to cancel
    tokens: int = 0
    reason: str = ""


def total_cost(costs: Iterable[envelope_pb2.Cost]) -> envelope_pb2.Cost | None:
    """The caller's cost: every attempt's charge, since a re-run bills each attempt's tokens."""
    charged = list(costs)
    if len(charged) <= 1:
        return charged[0] if charged else None
    nanos = sum(cost.nanos for cost in charged)
    last = charged[-1]
    return envelope_pb2.Cost(
        nanos=nanos, currency=last.currency, amount=format_amount(nanos), price_version=last.price_version
    )


def _deadline(context: Context) -> Timestamp | None:
    """The client's deadline as a timestamp every stage can compare with its clock."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:  # grpc reports "none" as a huge value
        return None
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=remaining))
    return stamp


@dataclass
class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    settings: Settings
    keys: KeyStore
    replies: ReplyRouter
    runtime: Runtime | None = None
    keyring: Keyring | None = None  # opens sealed pseudonyms for the caller
    budgets: BudgetGuard | None = None  # hard budgets and rate limits (metering area)
    feedback: Feedback | None = None  # SubmitFeedback and its stats (services/gateway/feedback.py)
    batches: Batches | None = None  # SubmitBatch and GetBatch (services/gateway/batches.py)
    # Finished idempotent requests, replayed instead of re-run.
    _replays: OrderedDict[str, list[gateway_pb2.GenerateResponse]] = field(default_factory=OrderedDict)
    # Idempotent requests whose last attempt was cancelled -> the attempt a retry runs as.
    _attempts: dict[str, int] = field(default_factory=dict)
    _streams: int = 0  # Generate calls in flight on this replica
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    async def _runtime(self, context: Context) -> Runtime:
        if self.runtime is None or not self.replies.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is starting; retry shortly")
        assert self.runtime is not None
        return self.runtime

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        caller = await self.keys.principal(context)
        if caller.role == "auditor":
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "authorization: an auditor key may not call Generate"
            )
        size, limit = request.ByteSize(), self.settings.gateway_max_request_bytes
        if size > limit:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: {size} bytes is over the limit of {limit} bytes"
            )
        try:
            valid = validate(request, self.settings.catalog)
        except Invalid as exc:
            await context.abort(exc.code, exc.message)
        if not caller.may_use(valid.model):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"model: this API key may not use model {valid.model!r}"
            )
        runtime = await self._runtime(context)
        tenant = caller.tenant
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
        if request.idempotency_key and self._submitted_elsewhere(request_id):
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"idempotency_key: request {request_id} was already submitted through another gateway "
                "replica or before a restart; it is not run twice",
            )
        if self._streams >= self.settings.gateway_max_streams:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"gateway overloaded: {self._streams} streams in flight on this replica; retry shortly",
            )
        if self.budgets:
            await self.budgets.enforce(context, caller)
        queue = self.replies.register(request_id)
        self._streams += 1
        call = Call(request_id, tenant, self._attempts.pop(request_id, 1), _deadline(context))
        sent: list[gateway_pb2.GenerateResponse] = []
        try:
            requested = self._requested(request, valid, call, caller.key_id, context.peer())
            # Signed for the caller's key, as every record on sluice.requests.v1 must be (ingress.py).
            await send_signed(runtime.producer, "gateway", requested, self.keys.records[caller.key_id])
            call.published = True
            log.info("request published", model=valid.model, messages=len(request.messages))
            first = gateway_pb2.GenerateResponse(request_id=request_id, model=valid.model)
            sent.append(first)
            yield first
            restore = Restoration(self.keyring, tenant, request_id)
            async for response in self._stream(queue, call, context, restore):
                sent.append(response)
                yield response
        finally:
            self._streams -= 1
            self.replies.unregister(request_id)
            structlog.contextvars.unbind_contextvars("request_id", "tenant")
            if call.published and not call.ended:
                self._cancel(runtime, call)
        if self.budgets and call.tokens:
            self.budgets.record_tokens(caller.key_id, call.tokens, datetime.now(UTC))
        if request.idempotency_key:
            self._remember(request_id, sent)

    def _submitted_elsewhere(self, request_id: str) -> bool:
        """Known on sluice.requests.v1 but neither replayable nor re-runnable here.

        Its answer went to another replica's reply partition, and re-publishing it would
        be dropped downstream as a duplicate (same request_id and attempt): say so at once
        instead of letting the retry wait for a reply that never comes.
        """
        if request_id in self._attempts or self.feedback is None:
            return False
        return self.feedback.index.lookup(request_id) is not None

    def _cancel(self, runtime: Runtime, call: Call) -> None:
        """Tell every stage the caller went away (sluice.control.v1), without blocking the unwind."""
        expired = call.deadline is not None and datetime.now(UTC) >= call.deadline.ToDatetime(tzinfo=UTC)
        reason = call.reason or ("client deadline passed" if expired else "client cancelled or disconnected")
        envelope = envelopes.new_envelope(
            request_id=call.request_id, tenant=call.tenant, producer="gateway", attempt=call.attempt
        )
        event = events_pb2.ControlEvent(envelope=envelope, cancel=events_pb2.CancelRequest(reason=reason))
        # A retry with the same idempotency key re-runs as the next attempt: the cancelled
        # attempt's events would be dropped downstream as duplicates.
        self._attempts[call.request_id] = call.attempt + 1
        cancel = Output(CONTROL, event, call.request_id)
        task = asyncio.get_running_loop().create_task(send(runtime.producer, "gateway", cancel))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info("request cancelled", reason=reason)

    def _requested(
        self,
        request: gateway_pb2.GenerateRequest,
        valid: ValidRequest,
        call: Call,
        key_id: str,
        caller_address: str = "",
    ) -> Output:
        envelope = envelopes.new_envelope(
            request_id=call.request_id, tenant=call.tenant, producer="gateway", attempt=call.attempt
        )
        if call.deadline is not None:
            envelope.deadline.CopyFrom(call.deadline)
        event = events_pb2.GenerationRequested(
            envelope=envelope,
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
        return Output(REQUESTS, event, call.request_id)

    async def _stream(
        self,
        queue: asyncio.Queue[events_pb2.ReplyEvent],
        call: Call,
        context: Context,
        restore: Restoration,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        request_id = call.request_id
        finished: events_pb2.StreamFinished | None = None
        costs: dict[int, envelope_pb2.Cost] = {}  # per attempt: a re-run bills each attempt
        attempt = 1
        next_seq = 0
        while finished is None or attempt not in costs:
            timeout = self.settings.gateway_cost_wait_s if finished else self.settings.gateway_reply_timeout_s
            try:
                event = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                if finished is not None:
                    log.warning("no charge arrived in time; ending stream without cost")
                    break
                call.reason = "no reply from the pipeline in time"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, call.reason)
            kind = event.WhichOneof("body")
            if kind != "charged" and event.envelope.attempt < attempt:
                continue  # late output of an attempt that was already replaced
            if kind == "restarted" and event.restarted.attempt > attempt:
                attempt, next_seq, finished = event.restarted.attempt, 0, None
                restore.restart()
                if self.settings.gateway_fail_on_restart:
                    call.reason = "the worker running this request died"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{call.reason}; retry the call")
                yield gateway_pb2.GenerateResponse(request_id=request_id, restarted_attempt=attempt)
            elif kind == "chunk":
                # Never show the caller a chunk twice (Kafka may redeliver one).
                if event.chunk.seq >= next_seq:
                    next_seq = event.chunk.seq + 1
                    delta = restore.push(event.chunk.delta)
                    if delta:
                        yield gateway_pb2.GenerateResponse(request_id=request_id, delta=delta)
            elif kind == "pseudonyms":
                restore.open(event.pseudonyms)
            elif kind == "finished":
                finished = event.finished
                call.ended, call.tokens = True, finished.usage.total_tokens
            elif kind == "charged":
                # May overtake `finished`: both come from different services.
                costs[event.envelope.attempt] = event.charged.cost
            elif kind == "failed":
                call.ended = True
                code = getattr(grpc.StatusCode, event.failed.code, grpc.StatusCode.INTERNAL)
                log.warning("request failed downstream", stage=event.failed.stage, code=event.failed.code)
                await context.abort(code, event.failed.message)
        assert finished is not None
        tail = restore.finish()
        if tail:
            yield gateway_pb2.GenerateResponse(request_id=request_id, delta=tail)
        yield gateway_pb2.GenerateResponse(
            request_id=request_id,
            finish_reason=finished.finish_reason,
            usage=finished.usage,
            cost=total_cost(costs.values()),
        )

    def _remember(self, request_id: str, responses: list[gateway_pb2.GenerateResponse]) -> None:
        if responses and responses[-1].finish_reason:
            self._replays[request_id] = responses
            if len(self._replays) > REPLAY_CACHE_SIZE:
                self._replays.popitem(last=False)

    async def SubmitFeedback(
        self, request: gateway_pb2.SubmitFeedbackRequest, context: Context
    ) -> gateway_pb2.SubmitFeedbackResponse:
        caller = await self.keys.principal(context)
        assert self.feedback is not None
        runtime = await self._runtime(context)
        return await self.feedback.submit(request, context, caller.tenant, caller.key_id, runtime)

    async def SubmitBatch(
        self, request: gateway_pb2.SubmitBatchRequest, context: Context
    ) -> gateway_pb2.SubmitBatchResponse:
        assert self.batches is not None
        return await self.batches.submit(self, request, context)

    async def GetBatch(
        self, request: gateway_pb2.GetBatchRequest, context: Context
    ) -> gateway_pb2.GetBatchResponse:
        assert self.batches is not None
        return await self.batches.get(self, request, context)

    def request_output(
        self,
        request: gateway_pb2.GenerateRequest,
        valid: ValidRequest,
        request_id: str,
        caller: Principal,
        caller_address: str,
    ) -> Output:
        """The GenerationRequested for a batch item (batches.py marks it and sets its reply topic)."""
        call = Call(request_id, caller.tenant, 1, None)
        return self._requested(request, valid, call, caller.key_id, caller_address)

    async def GetFeedbackStats(
        self, request: feedback_pb2.GetFeedbackStatsRequest, context: Context
    ) -> feedback_pb2.GetFeedbackStatsResponse:
        caller = await self.keys.principal(context)
        assert self.feedback is not None
        return await self.feedback.stats(request, context, caller.tenant, caller.reads_every_tenant)


class GatewayService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "gateway"
        self.replies = ReplyRouter(settings.bootstrap, settings.gateway_reply_partition)
        self.servicer = GatewayServicer(settings, KeyStore(settings.bootstrap), self.replies)
        self.servicer.keyring = keyring_from_settings(settings)
        self.servicer.budgets = BudgetGuard(settings.bootstrap)
        self.servicer.feedback = Feedback(settings)
        self.servicer.batches = Batches(settings)

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
        keys = asyncio.create_task(self.servicer.keys.run(), name="keys")
        if self.settings.gateway_seed_demo_key:
            await seed_local_keys(self.servicer.keys, self.settings.state_dir)
        task = asyncio.create_task(self.replies.run(), name="replies")
        assert self.servicer.budgets is not None
        budgets = asyncio.create_task(self.servicer.budgets.run(), name="budgets")
        await self.replies.ready.wait()
        await self.servicer.budgets.ready.wait()
        await self.servicer.keys.ready.wait()
        assert self.servicer.feedback is not None
        feedback = [asyncio.create_task(c, name="feedback") for c in self.servicer.feedback.background()]
        assert self.servicer.batches is not None
        batches = self.servicer.batches.tasks(runtime.producer)
        return [keys, task, budgets, *feedback, *batches]


def build(settings: Settings) -> Service:
    return GatewayService(settings)
