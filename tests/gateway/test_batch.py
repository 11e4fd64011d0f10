"""Async batches: submitted on one replica, read on any other and after a restart, only by
their owner; batch work goes to sluice.prompts-batch.v1. Real stack, real model."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.gateway.batches import BatchBook, BatchCollector
from sluice.kafka import Output
from sluice.stack import Stack
from sluice.topics import BATCH_REPLIES, BATCHES, PROMPTS, PROMPTS_BATCH
from sluice.v1 import batches_pb2, envelope_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.replica_pool import Replica, ReplicaPool
from tests.ingress.conftest import make_key

PROMPTS_TEXT = ["Name a fruit.", "Name a color.", "Name an animal."]
Item = batches_pb2.BatchItemStatus


def call(replica: Replica, method: str, request: object, key: str) -> object:
    with grpc.insecure_channel(replica.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)


def batch_request(*texts: str) -> gateway_pb2.SubmitBatchRequest:
    return gateway_pb2.SubmitBatchRequest(
        requests=[
            gateway_pb2.GenerateRequest(
                messages=[envelope_pb2.ChatMessage(role="user", content=t)], max_tokens=4, temperature=0.0
            )
            for t in texts
        ]
    )


def finished(replica: Replica, key: str, batch_id: str, seconds: float = 600) -> gateway_pb2.GetBatchResponse:
    """GetBatch until done with every cost in (batch work waits for spare capacity)."""
    deadline = time.monotonic() + seconds
    while True:
        got = call(replica, "GetBatch", gateway_pb2.GetBatchRequest(batch_id=batch_id), key)
        assert isinstance(got, gateway_pb2.GetBatchResponse)
        if got.status == gateway_pb2.BATCH_STATUS_DONE and all(r.cost.nanos for r in got.results):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"batch not finished: {got}")
        time.sleep(1)


async def _prompt_topics(bootstrap: str, request_ids: set[str]) -> dict[str, str]:
    """Which prompts topic each request's assembled prompt went to."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    where: dict[str, str] = {}
    try:
        tps = [TopicPartition(t, p) for t in (PROMPTS, PROMPTS_BATCH) for p in range(6)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    event = events_pb2.PromptAssembled.FromString(record.value)
                    if event.envelope.request_id in request_ids:
                        where[event.envelope.request_id] = tp.topic
                        assert event.batch and event.batch_id
        return where
    finally:
        await consumer.stop()


@pytest.mark.timeout(1200)  # batch work waits for spare capacity; nothing here is timed
def test_a_batch_is_served_and_readable_from_any_replica_and_after_a_restart(
    stack: Stack, pool: ReplicaPool, demo_key: str
) -> None:
    first, second = pool.replicas
    submitted = call(first, "SubmitBatch", batch_request(*PROMPTS_TEXT), demo_key)
    assert isinstance(submitted, gateway_pb2.SubmitBatchResponse)
    assert submitted.batch_id and len(submitted.request_ids) == len(PROMPTS_TEXT)

    # Readable at once on another replica (it catches up with sluice.batches.v1 first).
    early = call(second, "GetBatch", gateway_pb2.GetBatchRequest(batch_id=submitted.batch_id), demo_key)
    assert isinstance(early, gateway_pb2.GetBatchResponse)
    assert early.size == len(PROMPTS_TEXT) and [r.request_id for r in early.results] == list(
        submitted.request_ids
    )

    done = finished(second, demo_key, submitted.batch_id)
    assert done.done == len(PROMPTS_TEXT) and done.failed == 0
    for index, result in enumerate(done.results):
        assert result.index == index and result.status == Item.BATCH_ITEM_STATUS_SUCCEEDED
        assert result.text.strip(), result
        assert 0 < result.usage.completion_tokens <= 4
        assert result.finish_reason in (events_pb2.FINISH_REASON_STOP, events_pb2.FINISH_REASON_LENGTH)
        assert result.cost.nanos > 0 and result.cost.currency == "USD"

    where = asyncio.run(_prompt_topics(stack.settings.bootstrap, set(submitted.request_ids)))
    assert where == {r: PROMPTS_BATCH for r in submitted.request_ids}, "batch work is low priority"

    # Results live on Kafka, not in a replica: a restarted replica has them all.
    pool.stop(first)
    fresh = pool.start(3)
    again = call(fresh, "GetBatch", gateway_pb2.GetBatchRequest(batch_id=submitted.batch_id), demo_key)
    assert again == done


def test_only_the_owner_can_read_a_batch(stack: Stack, pool: ReplicaPool, demo_key: str) -> None:
    replica = pool.replicas[0]
    submitted = call(replica, "SubmitBatch", batch_request("Say one word."), demo_key)
    assert isinstance(submitted, gateway_pb2.SubmitBatchResponse)
    other = make_key(stack.settings.bootstrap, "acme").key
    time.sleep(1)  # the new key reaches the replica's key store within a poll
    errors = []
    for batch_id in (submitted.batch_id, "0" * 32):
        with pytest.raises(grpc.RpcError) as caught:
            call(replica, "GetBatch", gateway_pb2.GetBatchRequest(batch_id=batch_id), other)
        errors.append(caught.value)
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND] * 2
    # Nothing tells another tenant's batch apart from one that does not exist.
    assert errors[0].details().replace(submitted.batch_id, "X") == errors[1].details().replace("0" * 32, "X")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (gateway_pb2.SubmitBatchRequest(), "requests:"),
        (batch_request("fine", " "), "requests[1].messages[0].content:"),
    ],
)
def test_bad_batches_are_invalid_argument_naming_the_field(
    pool: ReplicaPool, demo_key: str, request_: gateway_pb2.SubmitBatchRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(pool.replicas[0], "SubmitBatch", request_, demo_key)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


def test_get_batch_without_a_key_is_unauthenticated(pool: ReplicaPool) -> None:
    with grpc.insecure_channel(pool.replicas[0].target) as channel, pytest.raises(grpc.RpcError) as caught:
        gateway_pb2_grpc.GatewayStub(channel).GetBatch(gateway_pb2.GetBatchRequest(batch_id="x"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- the collector and the fold on their own (no broker): ordering, restarts, tenants ---


def _reply(
    offset: int, request_id: str, tenant: str = "demo", **body: object
) -> ConsumerRecord[bytes, bytes]:
    event = events_pb2.ReplyEvent(
        envelope=envelope_pb2.Envelope(request_id=request_id, tenant=tenant, attempt=1), **body
    )
    value = event.SerializeToString()
    return ConsumerRecord(BATCH_REPLIES, 0, offset, 0, 0, request_id.encode(), value, None, 0, len(value), ())


def _results(outputs: list[Output]) -> list[batches_pb2.BatchRecord]:
    assert all(o.topic == BATCHES for o in outputs)
    return [o.event for o in outputs]  # type: ignore[misc]


def test_collector_joins_chunks_in_seq_order_and_starts_over_on_a_restart() -> None:
    collector = BatchCollector("unused:9092", producer=None)  # type: ignore[arg-type]
    rid = "b1-0"
    chunk = events_pb2.TokenChunk
    assert collector.collect(_reply(10, rid, chunk=chunk(seq=0, delta="stale", tokens=1))) == []
    collector.collect(_reply(11, rid, restarted=events_pb2.StreamRestarted(attempt=2)))
    collector.collect(_reply(12, rid, chunk=chunk(seq=1, delta=" world", tokens=1)))
    collector.collect(_reply(13, rid, chunk=chunk(seq=0, delta="hello", tokens=1)))
    tp = TopicPartition(BATCH_REPLIES, 0)
    assert collector._safe_offset(tp, 14) == 10, "never commit past a request still being collected"
    usage = envelope_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    finished = events_pb2.StreamFinished(finish_reason=events_pb2.FINISH_REASON_LENGTH, usage=usage)
    (record,) = _results(list(collector.collect(_reply(14, rid, finished=finished))))
    assert record.result.text == "hello world" and record.result.batch_id == "b1" and record.result.index == 0
    assert record.result.status == Item.BATCH_ITEM_STATUS_SUCCEEDED and record.result.usage == usage
    assert collector._safe_offset(tp, 15) == 15
    cost = envelope_pb2.Cost(nanos=42, currency="USD")
    (charged,) = _results(
        list(collector.collect(_reply(15, rid, charged=events_pb2.StreamCharged(cost=cost))))
    )
    assert charged.cost.cost == cost and charged.cost.tenant == "demo"
    failed = events_pb2.StreamFailed(code="INVALID_ARGUMENT", message="prompt: too long", stage="prompts")
    (bad,) = _results(list(collector.collect(_reply(16, "b1-1", failed=failed))))
    assert bad.result.status == Item.BATCH_ITEM_STATUS_FAILED and bad.result.error_code == "INVALID_ARGUMENT"
    assert collector.collect(_reply(17, "not-a-batch-item", finished=finished)) == []


def test_book_shows_a_batch_only_to_its_owner_and_ignores_other_tenants_results() -> None:
    book = BatchBook("unused:9092")
    opened = batches_pb2.BatchOpened(batch_id="b2", tenant="demo", size=2, request_ids=["b2-0", "b2-1"])
    book.apply(batches_pb2.BatchRecord(opened=opened).SerializeToString())
    ok = batches_pb2.BatchItemResult(
        batch_id="b2",
        request_id="b2-0",
        index=0,
        tenant="demo",
        status=Item.BATCH_ITEM_STATUS_SUCCEEDED,
        text="hi",
    )
    forged = batches_pb2.BatchItemResult(
        batch_id="b2", request_id="b2-1", index=1, tenant="acme", status=Item.BATCH_ITEM_STATUS_SUCCEEDED
    )
    for result in (ok, forged):
        book.apply(batches_pb2.BatchRecord(result=result).SerializeToString())
    book.apply(b"\xff not a record")  # dropped, not fatal
    assert book.view("acme", "b2") is None and book.view("demo", "nope") is None
    view = book.view("demo", "b2")
    assert view is not None and view.status == gateway_pb2.BATCH_STATUS_RUNNING and view.done == 1
    assert [r.status for r in view.results] == [
        Item.BATCH_ITEM_STATUS_SUCCEEDED,
        Item.BATCH_ITEM_STATUS_PENDING,
    ]
    assert view.results[0].text == "hi"
