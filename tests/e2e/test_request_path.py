"""One request through the real stack: gateway -> redaction -> prompts -> inference
-> metering, with audit watching every topic. Real Kafka, Presidio and model."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gateway.auth import demo_key_file
from services.gateway.ingress import key_ref_header
from services.gateway.keys import key_id_of
from sluice import topics
from sluice.stack import Stack
from sluice.topics import load_plan
from sluice.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    envelope_pb2,
    events_pb2,
    feedback_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)
from tests.conftest import service_logs

STAGES = ["received", "redacted", "assembled", "completed", "charged"]
EMAIL = "jane.doe.planted@example.com"
PHONE = "415-555-0132"


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as ch:
        yield ch


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


def ask(
    channel: grpc.Channel, key: str | None, text: str = "Write a haiku about rivers", **fields: object
) -> list[gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(
        messages=[envelope_pb2.ChatMessage(role="user", content=text)],
        **fields,  # type: ignore[arg-type]
    )
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, metadata=metadata, timeout=180))


def trail(stack: Stack, request_id: str, stages: int = len(STAGES)) -> audit_pb2.GetTrailResponse:
    """The audit trail once it holds `stages` records (audit is asynchronous)."""
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as ch:
        stub = audit_pb2_grpc.AuditStub(ch)
        deadline = time.monotonic() + 60
        while True:
            try:
                response = stub.GetTrail(audit_pb2.GetTrailRequest(request_id=request_id), timeout=5)
                if len(response.records) >= stages or time.monotonic() > deadline:
                    return response
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


def test_generate_streams_real_model_text_with_usage_and_cost(channel: grpc.Channel, key: str) -> None:
    responses = ask(channel, key, max_tokens=40, temperature=0.0)
    first, last = responses[0], responses[-1]
    assert first.request_id and first.model == "smollm2-135m-instruct"
    assert {r.request_id for r in responses} == {first.request_id}
    text = "".join(r.delta for r in responses)
    assert len(text.split()) >= 3, text
    assert len([r for r in responses if r.delta]) > 1, "answer must arrive as a stream, not one blob"
    assert last.finish_reason in (events_pb2.FINISH_REASON_STOP, events_pb2.FINISH_REASON_LENGTH)
    assert 0 < last.usage.completion_tokens <= 40
    assert last.usage.prompt_tokens > 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.cost.nanos > 0 and last.cost.currency == "USD" and last.cost.amount


def test_audit_trail_holds_every_stage_in_order_with_a_valid_chain(
    channel: grpc.Channel, key: str, stack: Stack
) -> None:
    request_id = ask(channel, key, max_tokens=8)[0].request_id
    response = trail(stack, request_id)
    assert [r.stage for r in response.records] == STAGES
    assert response.chain_valid, response.chain_error
    seqs = [r.seq for r in response.records]
    assert seqs == sorted(seqs)
    charged = response.records[-1]
    assert int(charged.details["cost_nanos"]) > 0


async def _all_values(bootstrap: str, topic: str, partitions: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        values: list[bytes] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend((r.key or b"") + b"|" + (r.value or b"") for r in records)
        return values
    finally:
        await consumer.stop()


def test_planted_pii_never_leaves_the_requests_topic(channel: grpc.Channel, key: str, stack: Stack) -> None:
    prompt = f"Hi, I am Jane. Email me at {EMAIL} or call {PHONE}. Reply with one short sentence."
    request_id = ask(channel, key, text=prompt, max_tokens=16, user=EMAIL)[0].request_id
    assert len(trail(stack, request_id).records) == len(STAGES)

    plan = load_plan(stack.settings.topics_file)
    needles = [EMAIL.encode(), PHONE.encode(), b"4155550132", b"jane.doe.planted"]
    found: dict[str, list[bytes]] = {}
    redacted_seen = False
    for topic, spec in plan.topics.items():
        values = asyncio.run(_all_values(stack.settings.bootstrap, topic, spec.partitions))
        hits = [n for n in needles for v in values if n in v]
        if topic == topics.REQUESTS:
            assert EMAIL.encode() in b"".join(values), "the plant must reach sluice.requests.v1"
            continue
        if topic == topics.REDACTED:
            redacted_seen = any(b"<EMAIL_ADDRESS_1>" in v and b"<PHONE_NUMBER_1>" in v for v in values)
        if hits:
            found[topic] = hits
    assert found == {}, f"raw PII found downstream of redaction: {found}"
    assert redacted_seen, "the redacted request should carry typed placeholders"

    for name, text in service_logs(stack).items():
        for needle in needles:
            assert needle.decode() not in text, f"raw PII in the {name} log"
    for name in ("gateway", "redaction", "prompts", "inference", "metering", "audit"):
        metrics = _metrics(stack, name)
        assert "sluice_" in metrics or name == "gateway"
        assert EMAIL not in metrics and PHONE not in metrics


def _metrics(stack: Stack, service: str) -> str:
    import urllib.request

    port = stack.settings.metrics_port(service)  # type: ignore[arg-type]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (
            {"messages": [envelope_pb2.ChatMessage(role="user", content="")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].content",
        ),
        ({"model": "gpt-99-imaginary"}, grpc.StatusCode.NOT_FOUND, "model"),
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": -3}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ],
)
def test_bad_requests_get_a_precise_status_naming_the_field(
    channel: grpc.Channel, key: str, fields: dict[str, object], code: grpc.StatusCode, field: str
) -> None:
    request = gateway_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    if "messages" not in fields:
        request.messages.append(envelope_pb2.ChatMessage(role="user", content="hello"))
    with pytest.raises(grpc.RpcError) as caught:
        list(
            gateway_pb2_grpc.GatewayStub(channel).Generate(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=30
            )
        )
    assert caught.value.code() == code
    assert caught.value.details().startswith(field)


@pytest.mark.parametrize("auth", [None, "sk-sluice-demo-not-a-real-key"])
def test_missing_or_unknown_key_is_unauthenticated(channel: grpc.Channel, auth: str | None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        ask(channel, auth)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_prompt_too_long_for_the_model_fails_downstream_with_the_field_named(
    channel: grpc.Channel, key: str
) -> None:
    # max_tokens is clamped to what the context leaves; a prompt that alone overflows it cannot run.
    long_text = "river " * 2100
    with pytest.raises(grpc.RpcError) as caught:
        ask(channel, key, text=long_text, max_tokens=1000)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("prompt: ")


def test_idempotency_key_returns_the_same_request(channel: grpc.Channel, key: str) -> None:
    idem = uuid.uuid4().hex
    first = ask(channel, key, max_tokens=6, idempotency_key=idem)
    again = ask(channel, key, max_tokens=6, idempotency_key=idem)
    assert first[0].request_id == again[0].request_id
    assert "".join(r.delta for r in first) == "".join(r.delta for r in again)


def test_feedback_is_validated_and_needs_a_known_request(channel: grpc.Channel, key: str) -> None:
    """The rest of feedback (ownership, redaction, stats) is in tests/feedback/."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    meta = (("authorization", f"Bearer {key}"),)
    thumbs = feedback_pb2.RATING_SCALE_THUMBS
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitFeedback(
            gateway_pb2.SubmitFeedbackRequest(request_id="r-1", scale=thumbs, rating=7), metadata=meta
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("rating: ")
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitFeedback(
            gateway_pb2.SubmitFeedbackRequest(request_id="r-1", scale=thumbs, rating=1), metadata=meta
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_gateway(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"sluice.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_kafka_producers_can_send_json_and_malformed_records_are_dead_lettered(
    stack: Stack, channel: grpc.Channel, key: str
) -> None:
    """Other systems produce straight into sluice.requests.v1; bad records must not stop the pipeline."""
    request_id = uuid.uuid4().hex
    external = {
        "envelope": {"requestId": request_id, "attempt": 1, "tenant": "demo", "schemaVersion": 1},
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hello."}],
        "params": {"maxTokens": 8, "temperature": 0},
    }
    missing_messages = {
        "envelope": {"requestId": uuid.uuid4().hex, "attempt": 1, "tenant": "demo", "schemaVersion": 1},
        "model": "smollm2",
        "params": {"maxTokens": 8},
    }

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
        await producer.start()
        try:
            json_header = [("content-type", b"application/json")]
            await producer.send_and_wait(topics.REQUESTS, b"\x00\xffnot protobuf", key=b"junk")
            # Kafka producers authenticate too (docs/ingress.md): here by the key's hash reference.
            auth = key_ref_header(key_id_of(key), key)
            await producer.send_and_wait(
                topics.REQUESTS, json.dumps(missing_messages).encode(), key=b"m", headers=[*json_header, auth]
            )
            value = json.dumps(external).encode()
            await producer.send_and_wait(
                topics.REQUESTS, value, key=request_id.encode(), headers=[*json_header, auth]
            )
        finally:
            await producer.stop()

    asyncio.run(produce())
    response = trail(stack, request_id)
    assert [r.stage for r in response.records] == STAGES
    assert response.chain_valid
    dlq = asyncio.run(_all_values(stack.settings.bootstrap, topics.DLQ, 1))
    letters = [events_pb2.DeadLetter.FromString(v.split(b"|", 1)[1]) for v in dlq]
    reasons = [
        letter.reason
        for letter in letters
        if letter.source_topic == topics.REQUESTS and letter.consumer_group == "sluice-redaction"
    ]
    assert any("not a valid sluice.v1.GenerationRequested" in r for r in reasons)
    assert any(r == "messages: at least one message is required" for r in reasons)
    # ... and the gateway path still works afterwards.
    assert "".join(r.delta for r in ask(channel, key, max_tokens=6))
