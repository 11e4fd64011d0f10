"""The privacy boundary on the real stack: planted PII of every type, in prompts and in model
output, reaches no topic after sluice.requests.v1, no log and no audit record; pseudonyms
come back to the caller who sent them; the Redactor API and `sluice redact`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from services.gateway.auth import demo_key_file
from sluice import envelope as envelopes
from sluice import topics
from sluice.kafka import start_partition_reader
from sluice.stack import Stack
from sluice.topics import load_plan
from sluice.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    envelope_pb2,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    redaction_pb2,
    redaction_pb2_grpc,
)
from tests.conftest import service_logs
from tests.e2e.test_cli import sluice
from tests.e2e.test_request_path import _all_values

# One planted value per supported type; none of them may travel past sluice.requests.v1.
PLANTED = {
    # Names and places in context: NER needs some (a bare "Reykjavik" line is missed).
    "PERSON": "My name is Marguerite Okonkwo.",
    "LOCATION": "I live in Reykjavik.",
    "EMAIL_ADDRESS": "m.okonkwo.planted@example.org",
    "PHONE_NUMBER": "+44 20 7946 0991",
    "US_SSN": "219-09-9999",
    "CREDIT_CARD": "4012 8888 8888 1881",
    "IP_ADDRESS": "203.0.113.77",
    "IBAN_CODE": "DE89370400440532013000",
    "US_BANK_NUMBER": "bank account 7301928374",
    "AWS_ACCESS_KEY": "AKIAZZPLANTED7EXAMPL",
    "API_KEY": "sk-proj-PlantedKey4fG7hJ2kL9mN3p",
    "BEARER_TOKEN": "Bearer PlantedBearerToken9x8Q2mN4vT7",
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwbGFudGVkIn0.cGxhbnRlZHNpZ25hdHVyZTEyMw",
    "PRIVATE_KEY": (
        "-----BEGIN PRIVATE KEY-----\nMIIEvPLANTEDQIBADANBgkqhkiG9w0BAQEF\n-----END PRIVATE KEY-----"
    ),
}
# What is searched for: the sensitive core of each value.
NEEDLES = [
    b"Okonkwo",
    b"Reykjavik",
    b"m.okonkwo.planted",
    b"7946 0991",
    b"219-09-9999",
    b"4012 8888 8888 1881",
    b"203.0.113.77",
    b"DE89370400440532013000",
    b"7301928374",
    b"AKIAZZPLANTED7EXAMPL",
    b"PlantedKey4fG7hJ2kL9mN3p",
    b"PlantedBearerToken9x8Q2mN4vT7",
    b"cGxhbnRlZHNpZ25hdHVyZTEyMw",
    b"MIIEvPLANTED",
]
OUTPUT_PARTITION = 3  # a reply partition no gateway in the test stack reads


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


@pytest.fixture(scope="module")
def redactor(stack: Stack) -> Iterator[redaction_pb2_grpc.RedactorStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("redaction")) as ch:
        yield redaction_pb2_grpc.RedactorStub(ch)


def metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def generate(stack: Stack, key: str, text: str, max_tokens: int) -> list[gateway_pb2.GenerateResponse]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as ch:
        request = gateway_pb2.GenerateRequest(
            messages=[envelope_pb2.ChatMessage(role="user", content=text)],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        return list(gateway_pb2_grpc.GatewayStub(ch).Generate(request, metadata=metadata(key), timeout=180))


def trail_text(stack: Stack, request_id: str, stages: int) -> str:
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as ch:
        stub = audit_pb2_grpc.AuditStub(ch)
        for _ in range(120):
            try:
                response = stub.GetTrail(audit_pb2.GetTrailRequest(request_id=request_id), timeout=5)
                if len(response.records) >= stages:
                    return str(response)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            time.sleep(0.5)
    raise AssertionError(f"audit trail of {request_id} never reached {stages} records")


async def _model_output_of_raw_prompt(bootstrap: str, request_id: str, prompt: str) -> str:
    """Put a prompt holding raw PII straight on sluice.prompts.v1 (as memorized or hallucinated
    output would arrive) and read what inference publishes to the reply partition."""
    tp = TopicPartition(topics.TOKENS, OUTPUT_PARTITION)
    reader = await start_partition_reader(bootstrap, "test", "test-output-redaction", tp)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        event = events_pb2.PromptAssembled(
            envelope=envelopes.new_envelope(request_id=request_id, tenant="demo", producer="test"),
            model="smollm2-135m-instruct",
            prompt=prompt,
            prompt_tokens=120,
            params=events_pb2.GenerationParams(max_tokens=160, temperature=0.0, top_p=1.0),
            reply_to=envelope_pb2.ReplyTo(topic=topics.TOKENS, partition=OUTPUT_PARTITION),
        )
        await producer.send_and_wait(topics.PROMPTS, event.SerializeToString(), key=request_id.encode())
        chunks: list[bytes] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for records in (await reader.getmany(timeout_ms=500)).values():
                for record in records:
                    chunks.append(record.value or b"")
                    reply = events_pb2.ReplyEvent.FromString(record.value or b"")
                    if reply.envelope.request_id == request_id and reply.WhichOneof("body") in (
                        "finished",
                        "failed",
                    ):
                        assert reply.WhichOneof("body") == "finished", reply
                        text = b"".join(chunks)
                        assert not [n for n in NEEDLES if n in text], "raw PII in a published chunk"
                        return "".join(
                            events_pb2.ReplyEvent.FromString(c).chunk.delta
                            for c in chunks
                            if events_pb2.ReplyEvent.FromString(c).envelope.request_id == request_id
                        )
        raise AssertionError("no finished reply from inference in time")
    finally:
        await producer.stop()
        await reader.stop()


def test_planted_pii_in_prompt_and_model_output_reaches_no_topic_log_or_audit_record(
    stack: Stack, key: str
) -> None:
    prompt = "Please note my details and reply with one short sentence: " + "; ".join(PLANTED.values())
    responses = generate(stack, key, prompt, max_tokens=24)
    prompt_request = responses[0].request_id
    # The model saw placeholders; the caller's answer never gets raw values back (only pseudonyms).
    answer = "".join(r.delta for r in responses)
    assert not [n for n in NEEDLES if n.decode() in answer and n != b"Okonkwo"]

    # Model output: a completion prompt that makes SmolLM2 copy the values back.
    output_request = uuid.uuid4().hex
    values = list(PLANTED.values())
    raw_prompt = (
        "The following list is copied twice.\nList:\n" + "\n".join(values) + "\nCopy:\n" + values[0] + "\n"
    )
    output = asyncio.run(_model_output_of_raw_prompt(stack.settings.bootstrap, output_request, raw_prompt))
    echoed = [kind for kind in PLANTED if f"<{kind}>" in output]
    # What SmolLM2 actually does here at temperature 0: it copies most of the list, and each
    # copied value arrives redacted as an unnumbered placeholder.
    assert len(echoed) >= 5, output

    trails = trail_text(stack, prompt_request, 5) + trail_text(stack, output_request, 3)
    assert not [n for n in NEEDLES if n.decode() in trails], "raw PII in an audit record"

    plan = load_plan(stack.settings.topics_file)
    found: dict[str, list[bytes]] = {}
    for topic, spec in plan.topics.items():
        if topic == topics.REQUESTS:
            continue
        values = asyncio.run(_all_values(stack.settings.bootstrap, topic, spec.partitions))
        if topic == topics.PROMPTS:  # the injected raw prompt is the test's own input
            values = [v for v in values if not v.startswith(output_request.encode() + b"|")]
        hits = [n for n in NEEDLES for v in values if n in v]
        if hits:
            found[topic] = sorted(set(hits))
    assert found == {}, f"raw PII downstream of redaction: {found}"
    for name, text in service_logs(stack).items():
        assert not [n for n in NEEDLES if n.decode() in text], f"raw PII in the {name} log"


def test_pseudonymized_name_comes_back_only_to_its_caller(stack: Stack, key: str) -> None:
    prompt = "My name is Jane Roe, write me a greeting. Start with: Dear Jane Roe,"
    responses = generate(stack, key, prompt, max_tokens=24)
    request_id = responses[0].request_id
    answer = "".join(r.delta for r in responses)
    # Without the "Start with" hint SmolLM2 (temperature 0) writes a greeting that names no one;
    # with it, it answers "Dear <PERSON_1>, I hope this greeting finds you well..." and the
    # gateway restores the name for this caller.
    assert answer.startswith("Dear Jane Roe,"), answer
    assert "<PERSON_1>" not in answer

    trail = trail_text(stack, request_id, 5)
    assert "Jane" not in trail and "Roe" not in trail
    for topic, spec in load_plan(stack.settings.topics_file).topics.items():
        if topic == topics.REQUESTS:
            continue
        values = asyncio.run(_all_values(stack.settings.bootstrap, topic, spec.partitions))
        mine = [v for v in values if v.startswith(request_id.encode() + b"|")]
        assert not [v for v in mine if b"Jane Roe" in v], f"the name in clear on {topic}"
        if topic == topics.REDACTED:
            assert any(
                b"My name is <PERSON_1>, write me a greeting. Start with: Dear <PERSON_1>," in v for v in mine
            )
        if topic == topics.TOKENS:
            assert any(b"<PERSON_1>" in v for v in mine), "the model saw and answered with the placeholder"
    for name, text in service_logs(stack).items():
        assert "Jane Roe" not in text, f"the name in the {name} log"


def test_redact_returns_text_and_entities_but_never_values(
    redactor: redaction_pb2_grpc.RedactorStub, key: str
) -> None:
    text = "Mail jane.roe@example.org or call +44 20 7946 0958, key AKIAIOSFODNN7EXAMPLE."
    response = redactor.Redact(redaction_pb2.RedactRequest(text=text), metadata=metadata(key), timeout=30)
    assert response.text == "Mail <EMAIL_ADDRESS_1> or call <PHONE_NUMBER_1>, key <AWS_ACCESS_KEY_1>."
    assert [(e.type, text[e.start : e.end]) for e in response.entities] == [
        ("EMAIL_ADDRESS", "jane.roe@example.org"),
        ("PHONE_NUMBER", "+44 20 7946 0958"),
        ("AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"),
    ]
    assert all(0 < e.score <= 1 for e in response.entities)
    assert response.policy_version == "demo-1"
    assert b"jane.roe" not in response.SerializeToString()


def test_redact_empty_text_gives_an_empty_result(redactor: redaction_pb2_grpc.RedactorStub, key: str) -> None:
    response = redactor.Redact(redaction_pb2.RedactRequest(text=""), metadata=metadata(key), timeout=30)
    assert response.text == "" and not response.entities and not response.entity_counts


@pytest.mark.parametrize(
    ("request_", "code", "prefix"),
    [
        (
            redaction_pb2.RedactRequest(text="a" * 262145),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text: 262145 bytes",
        ),
        (
            redaction_pb2.RedactRequest(text="Bonjour", language="fr"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "language:",
        ),
    ],
)
def test_redact_bad_input_names_the_field(
    redactor: redaction_pb2_grpc.RedactorStub,
    key: str,
    request_: redaction_pb2.RedactRequest,
    code: grpc.StatusCode,
    prefix: str,
) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        redactor.Redact(request_, metadata=metadata(key), timeout=30)
    assert failed.value.code() == code
    assert failed.value.details().startswith(prefix), failed.value.details()


def test_redact_needs_an_api_key(redactor: redaction_pb2_grpc.RedactorStub) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        redactor.Redact(redaction_pb2.RedactRequest(text="hi"), timeout=30)
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_redact_stream_redacts_entities_split_across_messages(
    redactor: redaction_pb2_grpc.RedactorStub, key: str
) -> None:
    text = "Contact jane.roe@example.org or 4111 1111 1111 1111 today please."
    deltas = [text[i : i + 3] for i in range(0, len(text), 3)]
    responses = list(
        redactor.RedactStream(
            (redaction_pb2.RedactStreamRequest(delta=d) for d in deltas), metadata=metadata(key), timeout=60
        )
    )
    assert "".join(r.delta for r in responses) == "Contact <EMAIL_ADDRESS> or <CREDIT_CARD> today please."
    assert len(responses) > 1, "released as it goes, not at the end"


def test_cli_redact_text_and_stdin_lines(stack: Stack) -> None:
    one = sluice(stack, "redact", "--json", "My name is Jane Roe, call me on 415-555-0132")
    assert one.returncode == 0, one.stderr
    body = json.loads(one.stdout)
    assert body["text"] == "My name is <PERSON_1>, call me on <PHONE_NUMBER_1>"
    assert {e["type"] for e in body["entities"]} == {"PERSON", "PHONE_NUMBER"}

    lines = ["mail x.planted@example.org", "", "nothing here", "ip 203.0.113.9"]
    done = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "redact", "-"],
        env=stack.child_env(),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in results] == ["mail <EMAIL_ADDRESS_1>", "", "nothing here", "ip <IP_ADDRESS_1>"]
