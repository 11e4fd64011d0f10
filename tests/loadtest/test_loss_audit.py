"""The loss audit against the real stack: a clean run audits to zero; a loss or a leak does not."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaProducer

from loadtest.loss_audit import audit_run
from services.gateway.auth import demo_key_file
from sluice.stack import Stack
from sluice.topics import DLQ
from sluice.v1 import envelope_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc

PLANTED = ["mara.quill.planted@example.com", "415-555-0176"]


@pytest.fixture(scope="module")
def small_run(stack: Stack) -> Iterator[tuple[list[str], int]]:
    """Three requests with planted PII through the gateway; their ids and the run's start."""
    since_ms = int(time.time() * 1000) - 1000
    key = demo_key_file(stack.settings.state_dir).read_text().strip()
    ids = []
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for n in range(3):
            text = f"Reply to {PLANTED[0]} or call {PLANTED[1]} about order {n}."
            request = gateway_pb2.GenerateRequest(
                messages=[envelope_pb2.ChatMessage(role="user", content=text)], max_tokens=6
            )
            replies = list(
                stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=180)
            )
            ids.append(replies[0].request_id)
    yield ids, since_ms


async def test_a_clean_run_audits_to_zero_loss(stack: Stack, small_run: tuple[list[str], int]) -> None:
    ids, since_ms = small_run
    report = await audit_run(stack.settings, ids, PLANTED, since_ms=since_ms, settle_s=120)
    assert report.ok, report.as_dict()
    assert report.requests == 3 and report.completions == 3 and report.charges == 3
    assert report.trails_complete == 3 and report.chain_valid and report.chain_records_checked >= 15
    # The raw topic holds the PII (the scan skips it); the scan read every other topic's records.
    assert report.topics_scanned > 10 and report.records_scanned > 3 * 5 and report.planted == 2


async def test_a_request_that_never_finished_is_reported_missing(
    stack: Stack, small_run: tuple[list[str], int]
) -> None:
    ids, since_ms = small_run
    never_sent = f"never-sent-{uuid.uuid4().hex}"
    report = await audit_run(stack.settings, [*ids, never_sent], [], since_ms=since_ms, settle_s=3)
    assert not report.ok and report.losses == 2
    assert report.missing_completion == [never_sent] and report.incomplete_trail == [never_sent]
    assert report.trails_complete == 3 and not report.missing_charge


async def test_planted_pii_in_a_downstream_topic_is_found_and_not_repeated(
    stack: Stack, small_run: tuple[list[str], int]
) -> None:
    """A dead letter whose reason quotes the input is exactly the leak the scan exists for."""
    ids, since_ms = small_run
    leaked = f"leak.{uuid.uuid4().hex[:8]}@example.org"
    letter = events_pb2.DeadLetter(
        envelope=envelope_pb2.Envelope(request_id=f"probe-{uuid.uuid4().hex}", tenant="demo"),
        source_topic="sluice.redacted.v1",
        reason=f"field messages has an invalid value {leaked}",
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            DLQ, letter.SerializeToString(), key=letter.envelope.request_id.encode()
        )
    finally:
        await producer.stop()
    report = await audit_run(stack.settings, ids, [*PLANTED, leaked], since_ms=since_ms, settle_s=60)
    assert f"{DLQ}[{sent.partition}]@{sent.offset}: planted[2]" in report.pii_leaks
    # The report names the planted string by index: it must not spread the PII itself.
    assert leaked not in str(report.as_dict()) and leaked not in report.summary()
    assert not report.ok
