"""Other systems on Kafka: a foreign producer (aiokafka here) sends requests straight to
sluice.requests.v1 and reads its answers on its own reply topic. Real stack, real model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.gateway import keys as key_material
from services.gateway.ingress import (
    REPLY_MODE,
    REPLY_TO,
    IngressSigning,
    ReplyTopics,
    key_ref_header,
    signature_header,
)
from sluice import topics
from sluice.stack import Stack
from sluice.v1 import audit_pb2, audit_pb2_grpc, envelope_pb2, events_pb2, keys_pb2
from tests.ingress.conftest import IngressKey, make_key

REPLY_TOPIC = "replies.demo.ingress-test"
OTHER_TENANT_TOPIC = "replies.acme.ingress-test"
JSON = ("content-type", b"application/json")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def reply_topics(pipeline: Stack) -> Iterator[None]:
    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=pipeline.settings.bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(t, 1, 1) for t in (REPLY_TOPIC, OTHER_TENANT_TOPIC) if t not in existing]
            if new:
                await admin.create_topics(new)
        finally:
            await admin.close()

    async def led() -> None:
        """Until every partition has a leader, as the ingress requires of a reply topic."""
        topics_ = ReplyTopics(pipeline.settings.bootstrap, refresh_s=0)
        for topic in (REPLY_TOPIC, OTHER_TENANT_TOPIC):
            deadline = time.monotonic() + 60
            while not await topics_.exists(topic):
                assert time.monotonic() < deadline, f"{topic} has no leader"
                await asyncio.sleep(0.2)

    run(create())
    run(led())
    yield


def signing_secret(stack: Stack, key: IngressKey) -> bytes:
    """The key's signing secret, derived from the stack's server master key."""
    return IngressSigning.from_settings(stack.settings).secret(key.key_id)


def request_json(request_id: str, text: str = "Say hello.", tenant: str = "demo", **extra: object) -> bytes:
    body: dict[str, object] = {
        "envelope": {"requestId": request_id, "attempt": 1, "tenant": tenant, "schemaVersion": 1},
        "model": "smollm2",
        "messages": [{"role": "user", "content": text}],
        "params": {"maxTokens": 6, "temperature": 0},
        **extra,
    }
    return json.dumps(body).encode()


async def produce(bootstrap: str, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topics.REQUESTS, value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def replies_for(
    bootstrap: str,
    topic: str,
    request_ids: set[str],
    timeout: float = 240,
    need: frozenset[str] = frozenset({"finished", "charged"}),
) -> dict[str, list[events_pb2.ReplyEvent]]:
    """Every reply on `topic` for `request_ids`, until each has all of `need` (or `failed`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[str, list[events_pb2.ReplyEvent]] = {r: [] for r in request_ids}
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout

        def complete(events: list[events_pb2.ReplyEvent]) -> bool:
            kinds = {e.WhichOneof("body") for e in events}
            return "failed" in kinds or need <= kinds

        while not all(complete(v) for v in found.values()) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = events_pb2.ReplyEvent.FromString(record.value)
                    assert record.key == event.envelope.request_id.encode(), "replies are keyed by request_id"
                    if event.envelope.request_id in found:
                        found[event.envelope.request_id].append(event)
        return found
    finally:
        await consumer.stop()


async def dead_letters(bootstrap: str) -> list[events_pb2.DeadLetter]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topics.DLQ, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        letters = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                letters += [events_pb2.DeadLetter.FromString(r.value) for r in records]
        return letters
    finally:
        await consumer.stop()


def audited_reason(stack: Stack, request_id: str) -> str:
    """The audit trail's dead-letter reason for `request_id` (audit is asynchronous)."""
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as channel:
        stub = audit_pb2_grpc.AuditStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                trail = stub.GetTrail(audit_pb2.GetTrailRequest(request_id=request_id), timeout=5)
                for record in trail.records:
                    if (
                        record.stage == "dead_lettered"
                        and record.details["consumer_group"] == "sluice-redaction"
                    ):
                        return record.details["reason"]
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            time.sleep(0.5)
    raise AssertionError(f"no dead_lettered audit record for {request_id}")


def test_signed_json_request_streams_tokens_and_completion_to_its_reply_topic(
    pipeline: Stack, demo: IngressKey, reply_topics: None
) -> None:
    stack = pipeline
    key_id, secret = demo.key_id, signing_secret(stack, demo)  # what `sluice ingress secret` prints
    request_id = uuid.uuid4().hex
    value = request_json(request_id, "Write one short sentence about rivers.")
    headers = [JSON, (REPLY_TO, REPLY_TOPIC.encode())]
    headers.append(signature_header(key_id, secret, request_id, value, REPLY_TOPIC))
    run(produce(stack.settings.bootstrap, [(request_id, value, headers)]))

    events = run(replies_for(stack.settings.bootstrap, REPLY_TOPIC, {request_id}))[request_id]
    kinds = [e.WhichOneof("body") for e in events]
    assert "failed" not in kinds, events
    chunks = [e.chunk for e in events if e.WhichOneof("body") == "chunk"]
    finished = next(e.finished for e in events if e.WhichOneof("body") == "finished")
    charged = next(e.charged for e in events if e.WhichOneof("body") == "charged")
    assert chunks and "".join(c.delta for c in chunks).strip()
    assert sum(c.tokens for c in chunks) == finished.usage.completion_tokens > 0
    assert charged.cost.nanos > 0 and charged.cost.currency == "USD"
    assert all(e.envelope.tenant == "demo" for e in events)


def test_key_reference_protobuf_request_in_completion_mode_gets_only_the_completion(
    pipeline: Stack, demo: IngressKey, reply_topics: None
) -> None:
    stack = pipeline
    request_id = uuid.uuid4().hex
    event = events_pb2.GenerationRequested(
        envelope=envelope_pb2.Envelope(request_id=request_id, attempt=1, tenant="demo", schema_version=1),
        model="smollm2",
        messages=[envelope_pb2.ChatMessage(role="user", content="Name a color.")],
        params=events_pb2.GenerationParams(max_tokens=5),
    )
    headers = [
        (REPLY_TO, REPLY_TOPIC.encode()),
        (REPLY_MODE, b"completion"),
        key_ref_header(demo.key_id, demo.key),
    ]
    run(produce(stack.settings.bootstrap, [(request_id, event.SerializeToString(), headers)]))
    events = run(replies_for(stack.settings.bootstrap, REPLY_TOPIC, {request_id}))[request_id]
    kinds = {e.WhichOneof("body") for e in events}
    assert kinds == {"finished", "charged"}, kinds
    finished = next(e.finished for e in events if e.WhichOneof("body") == "finished")
    assert 0 < finished.usage.completion_tokens <= 5


def test_each_bad_record_is_dead_lettered_with_its_reason_audited_and_the_consumer_goes_on(
    pipeline: Stack, demo: IngressKey, reply_topics: None
) -> None:
    stack = pipeline
    key_id, secret = demo.key_id, signing_secret(stack, demo)
    limited = make_key(stack.settings.bootstrap, "demo", models=["some-other-model"])
    revoked = make_key(stack.settings.bootstrap, "demo")
    gone = keys_pb2.ApiKey()
    gone.CopyFrom(revoked.record)
    gone.revoked_at.CopyFrom(key_material.now_stamp())
    asyncio.run(key_material.publish(stack.settings.bootstrap, [gone]))
    bootstrap = stack.settings.bootstrap

    def signed(request_id: str, value: bytes, reply: str = REPLY_TOPIC) -> list[tuple[str, bytes]]:
        return [JSON, (REPLY_TO, reply.encode()), signature_header(key_id, secret, request_id, value, reply)]

    cases: dict[str, tuple[bytes, list[tuple[str, bytes]], str]] = {}

    def case(name: str, value: bytes, headers: list[tuple[str, bytes]], reason: str) -> str:
        request_id = f"{name}-{uuid.uuid4().hex[:8]}"
        cases[request_id] = (value.replace(b"RID", request_id.encode()), headers, reason)
        return request_id

    rid = case(
        "unsigned", request_json("RID"), [JSON, (REPLY_TO, REPLY_TOPIC.encode())], "authentication: no "
    )
    value = request_json("RID")
    bad_sig = case("badsig", value, [], "sluice-signature: signature does not match")
    # Whoever can read sluice.keys.v1 sees the stored hash; it is not a signing secret.
    hash_signed = case("hashsigned", request_json("RID"), [], "sluice-signature: signature does not match")
    unknown = case("unknowntopic", request_json("RID"), [], "sluice-reply-to: unknown topic")
    other = case("othertenant", request_json("RID"), [], "sluice-reply-to: topic 'replies.acme")
    internal = case("internal", request_json("RID"), [], "sluice-reply-to: topic 'sluice.tokens.v1'")
    forged = case("forged", request_json("RID", tenant="acme"), [], "envelope.tenant: does not match")
    revoked_ref = case("badref", request_json("RID"), [], "authentication: unknown or revoked API key")
    bad_model = case("model", request_json("RID", model="gpt-99"), [], "model: unknown model")
    other_key = case("keyid", request_json("RID", keyId="0123456789ab"), [], "key_id: must be empty")
    not_allowed = case("notallowed", request_json("RID"), [], "model: this API key may not use model")
    revoked_key = case("revoked", request_json("RID"), [], "authentication: unknown or revoked API key")
    bad_tokens = case(
        "maxtokens", request_json("RID", params={"maxTokens": 100000}), [], "params.max_tokens:"
    )
    # headers that depend on the final value (signatures cover the payload)
    for request_id, (val, headers, reason) in list(cases.items()):
        if request_id == bad_sig:
            headers = signed(request_id, val)
            val = val.replace(b"Say hello.", b"Say hullo.")  # tampered after signing
        elif request_id == hash_signed:
            stored = bytes(demo.record.key_hash)
            headers = [JSON, (REPLY_TO, REPLY_TOPIC.encode())]
            headers.append(signature_header(key_id, stored, request_id, val, REPLY_TOPIC))
        elif request_id == unknown:
            headers = signed(request_id, val, "replies.demo.never-created")
        elif request_id == other:
            headers = signed(request_id, val, OTHER_TENANT_TOPIC)
        elif request_id == internal:
            headers = signed(request_id, val, topics.TOKENS)
        elif request_id in (forged, bad_model, bad_tokens, other_key):
            headers = signed(request_id, val)
        elif request_id == not_allowed:
            headers = [JSON, (REPLY_TO, REPLY_TOPIC.encode()), key_ref_header(limited.key_id, limited.key)]
        elif request_id == revoked_key:
            headers = [JSON, key_ref_header(revoked.key_id, revoked.key)]
        elif request_id == revoked_ref:
            wrong = hashlib.sha256(b"not the key").hexdigest()
            headers = [JSON, ("sluice-key-ref", f"{key_id}:{wrong}".encode())]
        cases[request_id] = (val, headers, reason)
    malformed_key = f"malformed-{uuid.uuid4().hex[:8]}"
    good = uuid.uuid4().hex
    good_value = request_json(good, "Say hi.")
    records = [(r, v, h) for r, (v, h, _) in cases.items()]
    records.append((malformed_key, b'{"envelope": {"requestId": ', [JSON]))
    records.append((good, good_value, signed(good, good_value)))
    run(produce(bootstrap, records))

    # The consumer went on: the good record after all the bad ones is answered.
    answer = run(replies_for(bootstrap, REPLY_TOPIC, {good}, need=frozenset({"finished"})))[good]
    assert "finished" in {e.WhichOneof("body") for e in answer}

    letters = [
        letter
        for letter in run(dead_letters(bootstrap))
        if letter.source_topic == topics.REQUESTS and letter.consumer_group == "sluice-redaction"
    ]
    by_id = {letter.envelope.request_id: letter for letter in letters}
    for request_id, (_, _, reason) in cases.items():
        assert request_id in by_id, f"{request_id} was not dead-lettered"
        assert by_id[request_id].reason.startswith(reason), (request_id, by_id[request_id].reason)
        assert audited_reason(stack, request_id) == by_id[request_id].reason
    # Unauthenticated records are not filed under the tenant they claim.
    assert by_id[rid].envelope.tenant == by_id[forged].envelope.tenant == "unknown"
    malformed = [x for x in letters if "not a valid sluice.v1.GenerationRequested" in x.reason]
    assert malformed, "malformed JSON must be dead-lettered"
    assert audited_reason(stack, malformed[-1].envelope.request_id).startswith("not a valid")
    # A refused record never gets an answer on the topic it named.
    stray = run(replies_for(bootstrap, OTHER_TENANT_TOPIC, {other}, timeout=3))[other]
    assert stray == []
