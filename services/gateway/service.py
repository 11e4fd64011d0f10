"""Gateway: authenticates callers, publishes requests, streams back their replies."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.auth import KeyStore, Principal, seed_local_keys
from services.gateway.batches import Batches
from services.gateway.budgets import BudgetGuard
from services.gateway.feedback import Feedback
from services.gateway.ingress import IngressSigning, send_signed
from services.gateway.pseudonyms import Restoration
from services.gateway.replies import Replies, ReplyRouter, replay
from services.gateway.request_index import NO_OWNER, Known, RequestIndex
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
from sluice.v1.events_pb2 import FINISH_REASON_CANCELLED

log = get_logger()
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1d3c1e-9a8b-4c57-9a57-5c1ce0000001")
REPLAY_CACHE_SIZE = 1000
# The gRPC receive limit is this, or twice the configured request limit if that is more:
# a request up to it gets the product's own `request:` INVALID_ARGUMENT, one above it
# gRPC's RESOURCE_EXHAUSTED (docs/gateway.md).
RECEIVE_CEILING_BYTES = 16 * 1024 * 1024
# How long a call that published an idempotent request waits for the request index to
# show which record of that attempt came first (normally a fraction of a second).
OWNER_CHECK_S = 10.0
# Replies are produced after their request, but by other hosts' clocks: read back from
# a little before the request's timestamp (other requests' replies are skipped anyway).
CLOCK_SKEW_MS = 5000
CANCEL_POLL_S = 0.5


def receive_limit(settings: Settings) -> int:
    return max(RECEIVE_CEILING_BYTES, 2 * settings.gateway_max_request_bytes)


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
    attached: bool = False  # streams a request another call published (idempotent retry)
    cancel_sent: bool = False


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


def _cancelled_text(request_id: str) -> str:
    return (
        f"idempotency_key: request {request_id} was cancelled by the call that started it; "
        "retry to run it again"
    )


def _cancelled_event(request_id: str, attempt: int) -> events_pb2.ReplyEvent:
    event = events_pb2.ReplyEvent(
        failed=events_pb2.StreamFailed(
            code="UNAVAILABLE", message=_cancelled_text(request_id), stage="gateway"
        )
    )
    event.envelope.request_id, event.envelope.attempt = request_id, attempt
    return event


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
    signing: IngressSigning | None = None  # signs requests for the caller's key (ingress.py)
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
        attempt = self._attempts.get(request_id, 1)
        known = await self._known(request_id) if request.idempotency_key else None
        if known is not None and known.attempt:
            # Cancelled (seen in the index, or by this replica, which sent the cancel): run again.
            rerun = known.cancelled or self._attempts.get(request_id, 0) > known.attempt
            if not rerun or self.replies.in_flight(request_id):
                async for response in self._attach(request_id, known, tenant, valid.model, context):
                    yield response
                return
            attempt = max(attempt, known.attempt + 1)  # cancelled: a retry runs it again
        if self._streams >= self.settings.gateway_max_streams:
            await self._overloaded(context)
        if self.budgets:
            await self.budgets.enforce(context, caller)
        queue = self.replies.register(request_id)
        self._streams += 1
        call = Call(request_id, tenant, attempt, _deadline(context))
        sent: list[gateway_pb2.GenerateResponse] = []
        try:
            requested = self._requested(request, valid, call, caller.key_id, context.peer())
            # Signed for the caller's key, as every record on sluice.requests.v1 must be (ingress.py).
            assert self.signing is not None
            written = await send_signed(runtime.producer, "gateway", requested, caller.key_id, self.signing)
            call.published = True
            # A client that goes away while this generator waits at a `yield` (gRPC is
            # writing) does not interrupt it: its `finally` would run only when the
            # generator is collected. The RPC's end is the reliable signal.
            loop = asyncio.get_running_loop()

            def ended(_: Context) -> None:
                loop.call_soon_threadsafe(self._cancel_unfinished, runtime, call)

            # grpc-stubs declares DoneCallback a class rather than a Protocol.
            context.add_done_callback(ended)  # type: ignore[arg-type]
            self._attempts.pop(request_id, None)
            log.info("request published", model=valid.model, messages=len(request.messages))
            winner = None
            if request.idempotency_key:
                winner = await self._winner(request_id, written.partition, written.offset)
            if winner is not None:
                # The same key reached another call first: its record runs, ours is dropped
                # downstream as a duplicate. Stream that one's answer instead.
                call.published = False
                self.replies.unregister(request_id, queue)
                attach = self._attach(request_id, winner, tenant, valid.model, context, counted=True)
                async for response in attach:
                    yield response
                return
            first = gateway_pb2.GenerateResponse(request_id=request_id, model=valid.model)
            sent.append(first)
            yield first
            restore = Restoration(self.keyring, tenant, request_id)
            async for response in self._stream(queue, call, context, restore):
                sent.append(response)
                yield response
        finally:
            self._streams -= 1
            self.replies.unregister(request_id, queue)
            structlog.contextvars.unbind_contextvars("request_id", "tenant")
            self._cancel_unfinished(runtime, call)
        if self.budgets and call.tokens:
            self.budgets.record_tokens(caller.key_id, call.tokens, datetime.now(UTC))
        if request.idempotency_key:
            self._remember(request_id, sent)

    @property
    def index(self) -> RequestIndex | None:
        return self.feedback.index if self.feedback else None

    async def _known(self, request_id: str) -> Known | None:
        """What the request index knows of an idempotent request, if it was ever published.

        A retry of a call still streaming on this replica waits for the index to catch up
        (its record may be a moment old); any other miss is settled after publishing, by
        `_winner`, so a first call pays no wait here.
        """
        if self.index is None:
            return None
        known = self.index.lookup(request_id)
        if known is None and self.replies.in_flight(request_id):
            await self.index.caught_up(OWNER_CHECK_S)
            known = self.index.lookup(request_id)
        return known

    async def _winner(self, request_id: str, partition: int, offset: int) -> Known | None:
        """The attempt's owner if it is not the record we just wrote at `offset`, else None.

        Every replica folds sluice.requests.v1 in the same order, and the first record of
        an attempt is the one the pipeline runs, so two replicas that publish the same
        idempotent request at once agree on the winner without talking to each other.
        """
        if self.index is None:
            return None
        if not await self.index.indexed(REQUESTS, partition, offset, OWNER_CHECK_S):
            log.warning("request index lagging; assuming this call owns its request")
            return None
        known = self.index.lookup(request_id)
        if known is None or known.owner_offset == offset:
            return None
        return known

    async def _overloaded(self, context: Context) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"gateway overloaded: {self._streams} streams in flight on this replica; retry shortly",
        )

    async def _attach(
        self, request_id: str, known: Known, tenant: str, model: str, context: Context, counted: bool = False
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream a request another call published: its owner's replies, from the first token.

        The answer is read back from the owner's partition of sluice.tokens.v1, live if the
        request still runs, so it is never run twice. This call does not own the request:
        leaving it cancels nothing.
        """
        if known.owner == NO_OWNER:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"idempotency_key: request {request_id} was already submitted, and its answer goes "
                "to a Kafka reply topic or a batch; it is not run twice",
            )
        if not counted:
            if self._streams >= self.settings.gateway_max_streams:
                await self._overloaded(context)
            self._streams += 1
        queue: Replies = asyncio.Queue()
        call = Call(request_id, tenant, known.attempt, None, attached=True)
        since = known.owner_ms - CLOCK_SKEW_MS
        feed = asyncio.create_task(
            replay(
                self.settings.bootstrap, known.owner, request_id, known.attempt, since, known.finished, queue
            )
        )
        watch = asyncio.create_task(self._watch_cancel(request_id, known.attempt, queue))
        log.info("idempotent retry attached", owner_partition=known.owner, attempt=known.attempt)
        try:
            yield gateway_pb2.GenerateResponse(request_id=request_id, model=model)
            restore = Restoration(self.keyring, tenant, request_id)
            async for response in self._stream(queue, call, context, restore):
                yield response
        finally:
            if not counted:
                self._streams -= 1
            for task in (feed, watch):
                task.cancel()
            await asyncio.gather(feed, watch, return_exceptions=True)

    async def _watch_cancel(self, request_id: str, attempt: int, queue: Replies) -> None:
        """Tell an attached call when the attempt it follows is cancelled by its own caller."""
        assert self.index is not None
        while True:
            known = self.index.lookup(request_id)
            if known is not None and known.cancelled and known.attempt == attempt:
                queue.put_nowait(_cancelled_event(request_id, attempt))
                return
            await asyncio.sleep(CANCEL_POLL_S)

    def _cancel_unfinished(self, runtime: Runtime, call: Call) -> None:
        """Cancel downstream once, if the call published a request the pipeline has not ended."""
        if call.published and not call.ended and not call.cancel_sent:
            call.cancel_sent = True
            self._cancel(runtime, call)

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
        attempt = call.attempt
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
            elif (
                kind == "finished"
                and call.attached
                and event.finished.finish_reason == FINISH_REASON_CANCELLED
            ):
                await context.abort(grpc.StatusCode.UNAVAILABLE, _cancelled_text(request_id))
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
        self.servicer.signing = IngressSigning(self.servicer.keyring)
        self.servicer.feedback = Feedback(settings)
        self.servicer.budgets = BudgetGuard(
            settings.bootstrap, index=self.servicer.feedback.index, origin=settings.gateway_reply_partition
        )
        self.servicer.batches = Batches(settings)

    def server_options(self) -> Sequence[tuple[str, Any]]:
        # Above the request limit, so an oversize request gets the gateway's own answer.
        return [("grpc.max_receive_message_length", receive_limit(self.settings))]

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
