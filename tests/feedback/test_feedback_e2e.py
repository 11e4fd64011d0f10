"""Feedback on the real stack: owner-only ratings, a redacted comment, the audit trail, the
stats stream, and a second gateway replica (which also shows redaction failing closed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway import keys
from services.gateway.auth import demo_key_file
from sluice import envelope as envelopes
from sluice import topics
from sluice.identity import pseudonymous_user
from sluice.ports import free_ports
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
    prompts_pb2,
    prompts_pb2_grpc,
    templates_pb2,
)
from tests.conftest import service_logs
from tests.e2e.test_cli import sluice
from tests.e2e.test_request_path import _all_values

T = TypeVar("T")
THUMBS, STARS = feedback_pb2.RATING_SCALE_THUMBS, feedback_pb2.RATING_SCALE_STARS
MODEL = "smollm2-135m-instruct"
# Unique per run, so no other test's planted values can be mistaken for ours.
TAG = uuid.uuid4().hex[:10]
EMAIL = f"fb.{TAG}@example.org"
PHONE = f"+1 415 555 {int(TAG[:6], 16) % 10000:04d}"
COMMENT = f"Great answer! I am Marguerite Okonkwo, mail me at {EMAIL} or call {PHONE}."


def poll(what: str, attempts: int, check: Callable[[], T | None]) -> T:
    """The stream and the audit trail are asynchronous: retry until `check` gives something."""
    for _ in range(attempts):
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"gave up waiting for {what}")


def meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def demo(stack: Stack) -> str:
    return demo_key_file(stack.settings.state_dir).read_text().strip()


def new_key(stack: Stack, gateway: gateway_pb2_grpc.GatewayStub, tenant: str, role: str = "user") -> str:
    """A key put on sluice.keys.v1 like `sluice keys create` does, once the gateway knows it."""
    key_id, key = keys.new_key()
    record = keys.key_record(
        key_id=key_id, inner_digest=keys.digest(key), tenant=tenant, role=role, description="feedback e2e"
    )
    asyncio.run(keys.publish(stack.settings.bootstrap, [record]))

    def known() -> bool:
        try:
            gateway.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(), metadata=meta(key), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return False
        return True

    poll("the gateway to know the new key", 60, known)
    return key


@pytest.fixture(scope="module")
def rival(stack: Stack, gateway: gateway_pb2_grpc.GatewayStub) -> str:
    """A key of a second tenant."""
    return new_key(stack, gateway, f"rival-{TAG}")


def generate(gateway: gateway_pb2_grpc.GatewayStub, key: str, **fields: Any) -> str:
    request = gateway_pb2.GenerateRequest(max_tokens=4, temperature=0.0, **fields)
    if not request.messages and not request.HasField("template"):
        request.messages.append(envelope_pb2.ChatMessage(role="user", content="Say hi."))
    responses = list(gateway.Generate(request, metadata=meta(key), timeout=240))
    assert responses[-1].finish_reason, responses[-1]
    return responses[0].request_id


def rate(gateway: gateway_pb2_grpc.GatewayStub, key: str, request_id: str, **fields: Any) -> str:
    request = gateway_pb2.SubmitFeedbackRequest(request_id=request_id, **{"scale": THUMBS, **fields})
    reply = gateway.SubmitFeedback(request, metadata=meta(key), timeout=60)
    assert reply.accepted and reply.feedback_id
    return reply.feedback_id


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def feedback_events(stack: Stack) -> list[events_pb2.FeedbackSubmitted]:
    values = asyncio.run(_all_values(stack.settings.bootstrap, topics.FEEDBACK, 3))
    return [events_pb2.FeedbackSubmitted.FromString(v.split(b"|", 1)[1]) for v in values]


@pytest.fixture(scope="module")
def rated(stack: Stack, gateway: gateway_pb2_grpc.GatewayStub, demo: str) -> dict[str, str]:
    """A real answer, rated by its owner with PII planted in the comment."""
    request_id = generate(gateway, demo)
    feedback_id = rate(gateway, demo, request_id, rating=1, labels=["helpful"], comment=COMMENT)
    return {"request_id": request_id, "feedback_id": feedback_id}


def test_the_owner_rates_a_real_answer_and_its_comment_is_redacted(
    stack: Stack, rated: dict[str, str]
) -> None:
    event = next(e for e in feedback_events(stack) if e.feedback_id == rated["feedback_id"])
    assert event.envelope.request_id == rated["request_id"] and event.envelope.tenant == "demo"
    assert (event.scale, event.rating, list(event.labels)) == (THUMBS, 1, ["helpful"])
    assert event.comment.startswith("Great answer!")
    assert EMAIL not in event.comment and "Okonkwo" not in event.comment
    assert event.comment_entity_counts["EMAIL_ADDRESS"] >= 1 and event.policy_version
    assert event.key_id


def test_planted_pii_reaches_no_topic_no_log_and_no_audit_record(stack: Stack, rated: dict[str, str]) -> None:
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as channel:
        audit = audit_pb2_grpc.AuditStub(channel)

        def audited() -> list[Any] | None:
            trail = audit.GetTrail(audit_pb2.GetTrailRequest(request_id=rated["request_id"]), timeout=10)
            return [r for r in trail.records if r.stage == "feedback"] or None

        record = poll("the feedback in the audit trail", 90, audited)[0]
    assert record.tenant == "demo"
    assert record.details["rating"] == "1" and record.details["scale"] == "thumbs"
    assert record.details["feedback_id"] == rated["feedback_id"]
    assert int(record.details["entities.EMAIL_ADDRESS"]) >= 1

    needles = [EMAIL.encode(), PHONE.encode(), PHONE.replace(" ", "").encode(), b"Okonkwo, mail"]
    plan = load_plan(stack.settings.topics_file)
    for topic, spec in plan.topics.items():
        for value in asyncio.run(_all_values(stack.settings.bootstrap, topic, spec.partitions)):
            assert not [n for n in needles if n in value], f"planted PII on {topic}"
    for name, text in service_logs(stack).items():
        assert not [n for n in needles if n.decode() in text], f"planted PII in the {name} log"


def test_another_tenant_or_an_unknown_id_gets_the_same_not_found(
    gateway: gateway_pb2_grpc.GatewayStub, rival: str, rated: dict[str, str]
) -> None:
    request_id = rated["request_id"]
    theirs = refused(lambda: rate(gateway, rival, request_id, rating=-1, comment="spite"))
    assert theirs.code() == grpc.StatusCode.NOT_FOUND
    assert theirs.details() == f"request_id: no request {request_id}"
    unknown = uuid.uuid4().hex
    missing = refused(lambda: rate(gateway, rival, unknown, rating=1))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert missing.details() == f"request_id: no request {unknown}"

    other = refused(
        lambda: gateway.GetFeedbackStats(
            feedback_pb2.GetFeedbackStatsRequest(tenant="demo"), metadata=meta(rival), timeout=10
        )
    )
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert other.details().startswith("tenant: ")
    own = gateway.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(), metadata=meta(rival), timeout=10)
    assert list(own.stats) == []


def test_bad_fields_are_refused_invalid_argument_naming_the_field(
    gateway: gateway_pb2_grpc.GatewayStub, demo: str, rated: dict[str, str]
) -> None:
    request_id = rated["request_id"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"request_id": ""}, "request_id"),
        ({"scale": feedback_pb2.RATING_SCALE_UNSPECIFIED, "rating": 1}, "scale"),
        ({"rating": 5}, "rating"),
        ({"scale": STARS, "rating": 0}, "rating"),
        ({"rating": 1, "labels": ["a"] * 9}, "labels"),
        ({"rating": 1, "labels": ["my email is x@y.z"]}, "labels[0]"),
        ({"rating": 1, "comment": "x" * 2001}, "comment"),
    ]
    for fields, field in cases:
        request = gateway_pb2.SubmitFeedbackRequest(**{"request_id": request_id, "scale": THUMBS, **fields})
        error = refused(lambda r=request: gateway.SubmitFeedback(r, metadata=meta(demo), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, error)
        assert error.details().startswith(f"{field}: "), (fields, error.details())


async def _publish_unfinishable(bootstrap: str, request_id: str) -> None:
    """A request of tenant demo that can never finish: redaction dead-letters it (no messages)."""
    event = events_pb2.GenerationRequested(
        envelope=envelopes.new_envelope(request_id=request_id, tenant="demo", producer="e2e"),
        model=MODEL,
        params=events_pb2.GenerationParams(max_tokens=4),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.REQUESTS, event.SerializeToString(), key=request_id.encode())
    finally:
        await producer.stop()


def test_a_request_that_has_not_finished_is_refused_failed_precondition(
    stack: Stack, gateway: gateway_pb2_grpc.GatewayStub, demo: str, rival: str
) -> None:
    request_id = uuid.uuid4().hex
    asyncio.run(_publish_unfinishable(stack.settings.bootstrap, request_id))
    early = refused(lambda: rate(gateway, demo, request_id, rating=1))
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert early.details().startswith("request_id: ") and "has not finished" in early.details()
    # Another tenant still learns nothing, not even that the request is in progress.
    assert refused(lambda: rate(gateway, rival, request_id, rating=1)).code() == grpc.StatusCode.NOT_FOUND


def _arm_users(prompts: prompts_pb2_grpc.PromptsStub, ref: templates_pb2.TemplateRef) -> dict[str, str]:
    """One end-user per experiment arm (the arm is sticky per user).

    The pipeline assigns arms by the pseudonym redaction gives the user; an id
    already in pseudonym form passes unchanged, so Render predicts the arm.
    """
    users: dict[str, str] = {}
    for i in range(200):
        user = pseudonymous_user("demo", f"fb-user-{TAG}-{i}")
        request = prompts_pb2.RenderRequest(
            template=ref, variables={"question": "Hi?"}, tenant="demo", user=user
        )
        users.setdefault(prompts.Render(request, timeout=30).template_used.variant, user)
        if len(users) == 2:
            return users
    raise AssertionError(f"one arm never came up: {users}")


def test_stats_give_the_positive_ratio_per_model_template_version_and_variant(
    stack: Stack, gateway: gateway_pb2_grpc.GatewayStub, demo: str
) -> None:
    name = f"fb-{TAG}"
    with grpc.insecure_channel(stack.settings.grpc_target("prompts")) as channel:
        prompts = prompts_pb2_grpc.PromptsStub(channel)
        for system in ("Answer briefly.", "Answer in one word."):
            prompts.CreateVersion(
                prompts_pb2.CreateVersionRequest(
                    name=name,
                    messages=[
                        envelope_pb2.ChatMessage(role="system", content=system),
                        envelope_pb2.ChatMessage(role="user", content="{{ question }}"),
                    ],
                    author="e2e",
                ),
                timeout=30,
            )
        prompts.SetLabel(
            prompts_pb2.SetLabelRequest(
                name=name,
                label="production",
                variants=[
                    templates_pb2.Variant(version=1, weight=50),
                    templates_pb2.Variant(version=2, weight=50),
                ],
            ),
            timeout=30,
        )
        ref = templates_pb2.TemplateRef(name=name)
        users = _arm_users(prompts, ref)

    def ask(variant: str) -> str:
        return generate(gateway, demo, template=ref, variables={"question": "Hi?"}, user=users[variant])

    first, second, other = ask("v1"), ask("v1"), ask("v2")
    rate(gateway, demo, first, rating=1)
    rate(gateway, demo, second, rating=-1)
    rate(gateway, demo, other, scale=STARS, rating=2)
    # The CLI, and a change of mind: the newer rating replaces the older one.
    done = sluice(
        stack, "feedback", second, "--rating", "+1", "--label", "changed-mind", "--comment", "ok now"
    )
    assert done.returncode == 0, done.stderr

    def ours() -> dict[tuple[int, str], feedback_pb2.FeedbackStats] | None:
        reply = gateway.GetFeedbackStats(
            feedback_pb2.GetFeedbackStatsRequest(model=MODEL), metadata=meta(demo), timeout=10
        )
        found = {(s.template_version, s.variant): s for s in reply.stats if s.template_name == name}
        settled = found.get((1, "v1")) and found[(1, "v1")].positive == 2 and (2, "v2") in found
        return found if settled else None

    stats = poll("the stats stream to count every rating", 180, ours)
    v1, v2 = stats[(1, "v1")], stats[(2, "v2")]
    assert (v1.tenant, v1.model, v1.ratings, v1.positive, v1.negative) == ("demo", MODEL, 2, 2, 0)
    assert v1.positive_ratio == 1.0
    assert (v2.ratings, v2.positive, v2.negative, v2.positive_ratio) == (1, 0, 1, 0.0)

    listed = sluice(stack, "--json", "feedback", "stats", "--model", MODEL)
    assert listed.returncode == 0, listed.stderr
    rows = [r for r in json.loads(listed.stdout)["stats"] if r.get("template_name") == name]
    assert sorted((r["variant"], r["positive_ratio"]) for r in rows) == [("v1", 1.0), ("v2", 0.0)]

    # An auditor of another tenant may read demo's stats; a user key may not (see above).
    auditor = new_key(stack, gateway, f"audit-{TAG}", role="auditor")
    seen = gateway.GetFeedbackStats(
        feedback_pb2.GetFeedbackStatsRequest(tenant="demo", model=MODEL), metadata=meta(auditor), timeout=10
    )
    assert {(s.template_version, s.variant) for s in seen.stats if s.template_name == name} == {
        (1, "v1"),
        (2, "v2"),
    }


def _healthy(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def second_replica(stack: Stack) -> Iterator[str]:
    """Another gateway replica (reply partition 1) whose redaction address has nothing behind it."""
    gateway_port, dead_port = free_ports(2)
    env = {
        **stack.child_env(),
        "SLUICE_GATEWAY_PORT": str(gateway_port),
        "SLUICE_GATEWAY_REPLY_PARTITION": "1",
        "SLUICE_REDACTION_PORT": str(dead_port),
    }
    log = Path(stack.log_dir) / "gateway-feedback-replica.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "serve", "gateway"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"{stack.settings.host}:{gateway_port}"
    try:
        poll("the second gateway replica", 180, lambda: _healthy(target) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()[-2000:]
        yield target
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise AssertionError("the second gateway replica did not drain within 60 s of SIGTERM") from None


def test_any_replica_knows_the_owner_and_redaction_failure_fails_closed(
    stack: Stack, second_replica: str, demo: str, rival: str, rated: dict[str, str]
) -> None:
    with grpc.insecure_channel(second_replica) as channel:
        other = gateway_pb2_grpc.GatewayStub(channel)
        request_id = rated["request_id"]

        # Served by the first replica, rated through the second (once its index has read the
        # history: until then it answers UNAVAILABLE "catching up", as documented).
        def rated_there() -> str | None:
            try:
                return rate(other, demo, request_id, scale=STARS, rating=4)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "catching up" in (exc.details() or ""), exc
                return None

        feedback_id = poll("the second replica's request index", 120, rated_there)
        assert refused(lambda: rate(other, rival, request_id, rating=1)).code() == grpc.StatusCode.NOT_FOUND

        secret = f"closed.{TAG}@example.org"
        down = refused(lambda: rate(other, demo, request_id, rating=1, comment=f"mail {secret}"))
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert down.details().startswith("comment: redaction unavailable")
    events = feedback_events(stack)
    assert any(e.feedback_id == feedback_id for e in events)
    assert not [e for e in events if secret in e.comment]
