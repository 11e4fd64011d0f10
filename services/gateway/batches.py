"""Async batch mode: SubmitBatch queues low-priority requests; GetBatch answers from any replica.

Durable state lives on the compacted sluice.batches.v1, never in a replica:

- SubmitBatch writes the batch (`BatchOpened`: owner tenant, request ids) and
  publishes each request with `batch=true` and replies to sluice.batch-replies.v1
  (keyed by request_id, no gateway partition), so prompts routes them to
  sluice.prompts-batch.v1, which workers take only with spare capacity.
- Every replica runs a collector in one consumer group on the batch replies: it
  joins a request's chunks into its text and, on `finished` or `failed`, writes
  the request's `BatchItemResult`; a `charged` becomes a `BatchItemCost` (own
  key, so either may come first). Offsets are committed only up to the oldest
  request still being collected, so a replica that dies loses nothing: the next
  owner of the partition re-reads those requests' replies.
- Every replica folds sluice.batches.v1 from the start (`BatchBook`), so
  GetBatch answers anywhere and after restarts. A batch another tenant owns
  is NOT_FOUND, exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.ingress import send_signed
from services.gateway.validation import Invalid, validate
from services.metering.reader import topic_partitions
from sluice.config import Settings
from sluice.kafka import Output, send, started, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.service import Context
from sluice.topics import BATCH_REPLIES, BATCHES
from sluice.v1 import batches_pb2, envelope_pb2, events_pb2, gateway_pb2

log = get_logger()

MAX_BATCH_REQUESTS = 1000
COLLECTOR_GROUP = "sluice-gateway-batches"
# How long GetBatch waits to catch up with sluice.batches.v1 before saying UNAVAILABLE.
CATCH_UP_S = 10.0
Status = batches_pb2.BatchItemStatus


def item_request_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


def batch_of(request_id: str) -> tuple[str, int] | None:
    """(batch_id, index) named by a batch item's request id, or None."""
    batch_id, _, index = request_id.rpartition("-")
    return (batch_id, int(index)) if batch_id and index.isdigit() else None


@dataclass
class BatchBook:
    """This replica's fold of sluice.batches.v1: the newest of every batch's parts."""

    bootstrap: str
    opened: dict[str, batches_pb2.BatchOpened] = field(default_factory=dict)
    results: dict[str, batches_pb2.BatchItemResult] = field(default_factory=dict)
    costs: dict[str, batches_pb2.BatchItemCost] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        consumer = await with_backoff("batches reader", "gateway", self._start)
        self._consumer = consumer
        await self.caught_up()
        self.ready.set()
        log.info("batches loaded", batches=len(self.opened))
        try:
            while True:
                await self._poll(consumer)
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id="sluice-gateway-batches-reader",
                enable_auto_commit=False,
                fetch_max_wait_ms=IDLE_POLL_MS,  # a long poll: answered as soon as a record arrives
            )
        )
        partitions = await topic_partitions(consumer, BATCHES)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        return consumer

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        for records in (await consumer.getmany(timeout_ms=200, max_records=1000)).values():
            for record in records:
                self.apply(record.value)

    async def caught_up(self) -> None:
        """Read until everything written before this call is folded (read-your-writes)."""
        consumer = self._consumer
        if consumer is None:
            await self.ready.wait()
            return
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            await asyncio.sleep(0.05)
            if not self.ready.is_set():
                await self._poll(consumer)

    def apply(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            record = batches_pb2.BatchRecord.FromString(value)
        except DecodeError:
            log.warning("undecodable batch record dropped", topic=BATCHES)
            return
        kind = record.WhichOneof("body")
        if kind == "opened":
            self.opened[record.opened.batch_id] = record.opened
        elif kind == "result":
            self.results[record.result.request_id] = record.result
        elif kind == "cost":
            self.costs[record.cost.request_id] = record.cost

    def view(self, tenant: str, batch_id: str) -> gateway_pb2.GetBatchResponse | None:
        """The batch as its owner sees it; None when absent or another tenant's."""
        opened = self.opened.get(batch_id)
        if opened is None or opened.tenant != tenant:
            return None
        response = gateway_pb2.GetBatchResponse(batch_id=batch_id, size=opened.size)
        for index, request_id in enumerate(opened.request_ids):
            item = batches_pb2.BatchItemResult(
                batch_id=batch_id, request_id=request_id, index=index, status=Status.BATCH_ITEM_STATUS_PENDING
            )
            result = self.results.get(request_id)
            if result is not None and result.tenant == tenant:  # a forged reply names another tenant
                item.CopyFrom(result)
            cost = self.costs.get(request_id)
            if cost is not None and cost.tenant == tenant:
                item.cost.CopyFrom(cost.cost)
            response.done += item.status != Status.BATCH_ITEM_STATUS_PENDING
            response.failed += item.status == Status.BATCH_ITEM_STATUS_FAILED
            response.results.append(item)
        done = response.done == opened.size
        response.status = gateway_pb2.BATCH_STATUS_DONE if done else gateway_pb2.BATCH_STATUS_RUNNING
        return response


@dataclass
class _Collecting:
    """One batch request's replies so far."""

    tenant: str
    first: tuple[TopicPartition, int]
    chunks: dict[int, str] = field(default_factory=dict)


@dataclass
class BatchCollector:
    """Turns batch requests' reply streams into results on sluice.batches.v1 (one group for all replicas)."""

    bootstrap: str
    producer: AIOKafkaProducer
    _open: dict[tuple[str, str], _Collecting] = field(default_factory=dict)

    async def run(self) -> None:
        consumer = await with_backoff("batch collector", "gateway", self._start)
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    outputs: list[Output] = []
                    for record in records:
                        outputs.extend(self.collect(record))
                    for output in outputs:
                        await with_backoff(
                            "produce", "gateway", partial(send, self.producer, "gateway", output)
                        )
                    try:
                        await consumer.commit({tp: self._safe_offset(tp, records[-1].offset + 1)})
                    except (CommitFailedError, IllegalStateError) as exc:
                        # Rebalanced away: the partition's new owner re-reads from the last commit.
                        log.info(
                            "batch collector commit skipped", partition=tp.partition, error=type(exc).__name__
                        )
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        return await started(
            AIOKafkaConsumer(
                BATCH_REPLIES,
                bootstrap_servers=self.bootstrap,
                **client_options(),
                group_id=COLLECTOR_GROUP,
                client_id="sluice-gateway-batch-collector",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
        )

    def _safe_offset(self, tp: TopicPartition, next_offset: int) -> int:
        """Commit no further than the first reply of a request still being collected."""
        pending = [c.first[1] for c in self._open.values() if c.first[0] == tp]
        return min([next_offset, *pending])

    def collect(self, record: ConsumerRecord[bytes, bytes]) -> list[Output]:
        try:
            event = events_pb2.ReplyEvent.FromString(record.value or b"")
        except DecodeError:
            log.warning("undecodable batch reply dropped", partition=record.partition, offset=record.offset)
            return []
        env = event.envelope
        named = batch_of(env.request_id)
        if named is None or not env.tenant:
            return []
        batch_id, index = named
        tp = TopicPartition(record.topic, record.partition)
        kind = event.WhichOneof("body")
        key = (env.tenant, env.request_id)
        if kind == "charged":
            cost = batches_pb2.BatchItemCost(
                batch_id=batch_id, request_id=env.request_id, tenant=env.tenant, cost=event.charged.cost
            )
            return [Output(BATCHES, batches_pb2.BatchRecord(cost=cost), f"{batch_id}/{env.request_id}/cost")]
        if kind not in ("chunk", "restarted", "finished", "failed"):
            return []
        state = self._open.setdefault(key, _Collecting(env.tenant, (tp, record.offset)))
        if kind == "chunk":
            state.chunks[event.chunk.seq] = event.chunk.delta
            return []
        if kind == "restarted":
            state.chunks.clear()  # a re-run starts its chunks again at seq 0
            return []
        del self._open[key]
        result = batches_pb2.BatchItemResult(
            batch_id=batch_id, request_id=env.request_id, index=index, tenant=env.tenant
        )
        if kind == "finished":
            result.status = Status.BATCH_ITEM_STATUS_SUCCEEDED
            result.text = "".join(state.chunks[seq] for seq in sorted(state.chunks))
            result.finish_reason = event.finished.finish_reason
            result.usage.CopyFrom(event.finished.usage)
        else:
            result.status = Status.BATCH_ITEM_STATUS_FAILED
            result.error_code = event.failed.code
            result.error_message = event.failed.message
        return [Output(BATCHES, batches_pb2.BatchRecord(result=result), f"{batch_id}/{env.request_id}")]


@dataclass
class Batches:
    """SubmitBatch and GetBatch for the gateway servicer (which handles keys, budgets and requests)."""

    settings: Settings
    book: BatchBook = field(init=False)

    def __post_init__(self) -> None:
        self.book = BatchBook(self.settings.bootstrap)

    def tasks(self, producer: AIOKafkaProducer) -> list[asyncio.Task[None]]:
        collector = BatchCollector(self.settings.bootstrap, producer)
        return [
            asyncio.create_task(self.book.run(), name="batches"),
            asyncio.create_task(collector.run(), name="batch-collector"),
        ]

    async def submit(
        self, servicer: Any, request: gateway_pb2.SubmitBatchRequest, context: Context
    ) -> gateway_pb2.SubmitBatchResponse:
        caller = await servicer.keys.principal(context)
        if caller.role == "auditor":
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "authorization: an auditor key may not submit"
            )
        size, limit = request.ByteSize(), self.settings.gateway_max_request_bytes
        if size > limit:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"requests: {size} bytes is over the limit of {limit} bytes"
            )
        if not request.requests:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "requests: at least one request is required"
            )
        if len(request.requests) > MAX_BATCH_REQUESTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"requests: at most {MAX_BATCH_REQUESTS} requests per batch"
            )
        valid = []
        for i, item in enumerate(request.requests):
            try:
                checked = validate(item, self.settings.catalog)
            except Invalid as exc:
                await context.abort(exc.code, f"requests[{i}].{exc.message}")
            if not caller.may_use(checked.model):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"requests[{i}].model: this API key may not use model {checked.model!r}",
                )
            valid.append(checked)
        runtime = await servicer._runtime(context)
        if servicer.budgets:
            await servicer.budgets.enforce(context, caller)
        batch_id = uuid.uuid4().hex
        request_ids = [item_request_id(batch_id, i) for i in range(len(valid))]
        created = Timestamp()
        created.GetCurrentTime()
        opened = batches_pb2.BatchOpened(
            batch_id=batch_id,
            tenant=caller.tenant,
            size=len(valid),
            created_at=created,
            request_ids=request_ids,
            model=valid[0].model,
        )
        # The batch exists before any of its requests, so no result is ever orphaned.
        await send(
            runtime.producer, "gateway", Output(BATCHES, batches_pb2.BatchRecord(opened=opened), batch_id)
        )
        self.book.opened[batch_id] = opened
        for item, checked, request_id in zip(request.requests, valid, request_ids, strict=True):
            output = servicer.request_output(item, checked, request_id, caller, context.peer())
            output.event.batch = True
            output.event.batch_id = batch_id
            output.event.reply_to.CopyFrom(envelope_pb2.ReplyTo(topic=BATCH_REPLIES))
            await send_signed(runtime.producer, "gateway", output, caller.key_id, servicer.signing)
        log.info("batch submitted", batch_id=batch_id, tenant=caller.tenant, requests=len(valid))
        return gateway_pb2.SubmitBatchResponse(batch_id=batch_id, request_ids=request_ids)

    async def get(
        self, servicer: Any, request: gateway_pb2.GetBatchRequest, context: Context
    ) -> gateway_pb2.GetBatchResponse:
        caller = await servicer.keys.principal(context)
        if not request.batch_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch_id: must not be empty")
        view = self.book.view(caller.tenant, request.batch_id)
        if view is None:
            try:
                await asyncio.wait_for(self.book.caught_up(), CATCH_UP_S)
            except TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "batches are still loading; retry shortly")
            view = self.book.view(caller.tenant, request.batch_id)
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"batch_id: no batch {request.batch_id!r}")
        assert view is not None
        return view
