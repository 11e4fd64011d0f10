"""Generate done fully: deadlines reach every stage, a caller leaving cancels, retries attach."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import grpc

from sluice.stack import Stack
from sluice.topics import CONTROL, REDACTED, REQUESTS
from sluice.v1 import events_pb2
from tests.gateway.conftest import (
    create_key,
    eventually,
    first_of,
    generate,
    on_topic,
    request,
)


def test_the_client_deadline_travels_on_the_request_and_every_later_stage(
    stack: Stack, channel: grpc.Channel, demo_key: str
) -> None:
    sent_at = datetime.now(UTC)
    first, call = first_of(channel, demo_key, request(max_tokens=2), timeout=90)
    request_id = first.request_id
    requested = eventually(
        "the request", lambda: on_topic(stack, REQUESTS, request_id, events_pb2.GenerationRequested)
    )
    deadline = requested[0].envelope.deadline.ToDatetime(tzinfo=UTC)
    assert 80 < (deadline - sent_at).total_seconds() <= 91
    redacted = eventually(
        "the redacted request", lambda: on_topic(stack, REDACTED, request_id, events_pb2.RequestRedacted)
    )
    assert redacted[0].envelope.deadline == requested[0].envelope.deadline
    call.cancel()


def test_no_client_deadline_means_no_deadline(stack: Stack, channel: grpc.Channel, demo_key: str) -> None:
    first, call = first_of(channel, demo_key, request(max_tokens=2), timeout=None)
    call.cancel()
    requested = eventually(
        "the request", lambda: on_topic(stack, REQUESTS, first.request_id, events_pb2.GenerationRequested)
    )
    assert not requested[0].envelope.HasField("deadline")


def test_a_caller_who_goes_away_cancels_the_request_on_the_control_topic(
    stack: Stack, channel: grpc.Channel, demo_key: str
) -> None:
    first, call = first_of(channel, demo_key, request("Tell me a long story about rivers", max_tokens=300))
    call.cancel()
    cancels = eventually(
        "the cancel", lambda: on_topic(stack, CONTROL, first.request_id, events_pb2.ControlEvent), 60
    )
    assert len(cancels) == 1
    event = cancels[0]
    assert event.WhichOneof("action") == "cancel"
    assert event.cancel.reason == "client cancelled or disconnected"
    assert event.envelope.tenant == "demo" and event.envelope.attempt == 1


def test_an_idempotent_retry_attaches_and_a_cancelled_one_reruns_as_the_next_attempt(
    stack: Stack, channel: grpc.Channel, demo_key: str
) -> None:
    idem = uuid.uuid4().hex
    first, call = first_of(channel, demo_key, request(max_tokens=200, idempotency_key=idem))
    # While the first call streams, a retry attaches to the same request; leaving it cancels nothing.
    attached, retry = first_of(channel, demo_key, request(max_tokens=200, idempotency_key=idem))
    assert attached.request_id == first.request_id
    retry.cancel()
    call.cancel()
    cancels = eventually(
        "the cancel", lambda: on_topic(stack, CONTROL, first.request_id, events_pb2.ControlEvent), 60
    )
    assert len(cancels) == 1, "only the call that published the request cancels it"
    again, call = first_of(channel, demo_key, request(max_tokens=200, idempotency_key=idem))
    call.cancel()
    assert again.request_id == first.request_id
    attempts = eventually(
        "the retried request",
        lambda: [
            e.envelope.attempt
            for e in on_topic(stack, REQUESTS, first.request_id, events_pb2.GenerationRequested)
            if e.envelope.attempt == 2
        ],
    )
    assert attempts == [2]


def test_two_tenants_never_share_a_request(stack: Stack, channel: grpc.Channel, demo_key: str) -> None:
    other = create_key(stack, "tenant-b")["api_key"]
    idem = uuid.uuid4().hex
    mine, call = first_of(channel, demo_key, request(max_tokens=2, idempotency_key=idem))
    call.cancel()

    def theirs() -> str | None:
        try:
            response, their_call = first_of(channel, other, request(max_tokens=2, idempotency_key=idem))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # the new key is not seen yet
            return None
        their_call.cancel()
        return str(response.request_id)

    their_id = eventually("tenant-b's request", theirs)
    assert their_id != mine.request_id
    tenants = {e.envelope.tenant for e in on_topic(stack, REQUESTS, their_id, events_pb2.GenerationRequested)}
    assert tenants == {"tenant-b"}


def test_the_stream_opens_with_the_request_id_and_ends_with_usage_and_cost(
    channel: grpc.Channel, demo_key: str
) -> None:
    started = time.monotonic()
    responses = generate(channel, demo_key, request(max_tokens=8, temperature=0.0))
    assert responses[0].request_id and not responses[0].delta
    last = responses[-1]
    assert last.finish_reason and last.usage.total_tokens > 0
    assert last.cost.currency and last.cost.amount
    print(f"full stream in {time.monotonic() - started:.1f}s")
