"""One test per row of the status table in docs/gateway.md, against the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from services.gateway import keys
from services.gateway.service import receive_limit
from services.redaction.vault import MASTER_KEY_FILE, load_master_key
from sluice.ports import free_ports
from sluice.stack import Stack
from sluice.v1 import audit_pb2, audit_pb2_grpc, envelope_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import (
    admission,
    create_key,
    eventually,
    first_of,
    generate,
    rejected,
    request,
    sluice,
)


@pytest.mark.parametrize(
    "auth", [None, "sk-sluice-demo-not-a-real-key", "sk-sluice-0123456789ab.notarealsecretatall0"]
)
def test_missing_or_unknown_key_is_unauthenticated(channel: grpc.Channel, auth: str | None) -> None:
    error = rejected(lambda: generate(channel, auth, request()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (error.details() or "").startswith("authorization:")


def test_a_revoked_key_is_unauthenticated(stack: Stack, channel: grpc.Channel) -> None:
    created = create_key(stack, "tenant-revoked")
    assert sluice(stack, "keys", "revoke", created["key_id"]).returncode == 0

    def refused() -> bool:
        error = admission(channel, created["api_key"], request(max_tokens=2))
        return error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED

    eventually("the revocation to reach the gateway", refused)


def test_a_model_outside_the_keys_allow_list_is_permission_denied(
    stack: Stack, channel: grpc.Channel
) -> None:
    key_id, key = keys.new_key()
    record = keys.key_record(
        key_id=key_id, inner_digest=keys.digest(key), tenant="tenant-narrow", models=["other"]
    )
    asyncio.run(keys.publish(stack.settings.bootstrap, [record]))

    def denied() -> grpc.RpcError | None:
        error = rejected(lambda: generate(channel, key, request(max_tokens=2)))
        return error if error.code() != grpc.StatusCode.UNAUTHENTICATED else None  # not yet seen

    error = eventually("the new key to reach the gateway", denied)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (error.details() or "").startswith("model:")


def test_another_tenants_request_id_is_not_found(stack: Stack, channel: grpc.Channel, demo_key: str) -> None:
    first, call = first_of(channel, demo_key, request(max_tokens=2))
    call.cancel()
    stranger = create_key(stack, "tenant-stranger")["api_key"]
    meta = (("authorization", f"Bearer {stranger}"),)
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as ch:
        audit = audit_pb2_grpc.AuditStub(ch)

        def owner_sees_it() -> bool:
            try:
                owner = (("authorization", f"Bearer {demo_key}"),)
                return bool(
                    audit.GetTrail(audit_pb2.GetTrailRequest(request_id=first.request_id), metadata=owner)
                )
            except grpc.RpcError:
                return False

        eventually("the owner's trail", owner_sees_it, 60)
        trail = rejected(
            lambda: audit.GetTrail(audit_pb2.GetTrailRequest(request_id=first.request_id), metadata=meta)
        )
        unknown = rejected(
            lambda: audit.GetTrail(audit_pb2.GetTrailRequest(request_id="f" * 32), metadata=meta)
        )
    assert trail.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
    # Same answer as for an id that never existed, apart from the id itself: nothing leaks.
    assert trail.details().replace(first.request_id, "ID") == unknown.details().replace("f" * 32, "ID")
    feedback = rejected(
        lambda: gateway_pb2_grpc.GatewayStub(channel).SubmitFeedback(
            gateway_pb2.SubmitFeedbackRequest(request_id=first.request_id, rating=1, scale=1), metadata=meta
        )
    )
    assert feedback.code() == grpc.StatusCode.NOT_FOUND


def test_over_the_keys_rate_limit_is_resource_exhausted_with_retry_after(
    stack: Stack, channel: grpc.Channel
) -> None:
    key = create_key(stack, "tenant-limited", "--rpm", "1")["api_key"]
    eventually("the new key to be admitted", lambda: admission(channel, key, request(max_tokens=2)) is None)
    # The first call was admitted; at most one more minute boundary can pass in two tries.
    for _ in range(2):
        error = admission(channel, key, request(max_tokens=2))
        if error is not None:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (error.details() or "").startswith("rate limit:")
            retry_after = dict(error.trailing_metadata() or ())["retry-after"]
            assert 1 <= int(retry_after) <= 60
            return
    raise AssertionError("a key limited to 1 request per minute was admitted three times")


def test_a_malformed_request_is_invalid_argument_naming_the_field(
    channel: grpc.Channel, demo_key: str
) -> None:
    bad = gateway_pb2.GenerateRequest(messages=[envelope_pb2.ChatMessage(role="robot", content="hi")])
    error = rejected(lambda: generate(channel, demo_key, bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("messages[0].role:")


def test_an_oversize_request_is_invalid_argument(stack: Stack, channel: grpc.Channel, demo_key: str) -> None:
    big = request("river " * (stack.settings.gateway_max_request_bytes // 6 + 1))
    error = rejected(lambda: generate(channel, demo_key, big))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("request:")
    assert "river" not in (error.details() or "")


def test_a_request_over_grpcs_default_4_mib_still_gets_the_products_answer(
    channel: grpc.Channel, demo_key: str
) -> None:
    """The gateway raises gRPC's receive limit above its own, so its check names the field."""
    big = request("x" * (5 * 1024 * 1024))  # over gRPC's 4 MiB default, under the 16 MiB ceiling
    error = rejected(lambda: generate(channel, demo_key, big))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("request:")


def test_a_request_over_the_receive_ceiling_is_refused_by_grpc(
    stack: Stack, channel: grpc.Channel, demo_key: str
) -> None:
    ceiling = receive_limit(stack.settings)
    huge = request("x" * (ceiling + 1024))
    error = rejected(lambda: generate(channel, demo_key, huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def narrow_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second gateway replica that serves one stream at a time (own port and reply partition)."""
    (port,) = free_ports(1)
    settings = stack.settings.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("narrow"),
            "gateway_port": port,
            "gateway_reply_partition": 1,
            "gateway_max_streams": 1,
        }
    )
    # Every gateway signs with the same server master key (docs/ingress.md).
    (settings.state_dir / MASTER_KEY_FILE).write_bytes(load_master_key(None, stack.settings.state_dir))
    replica = Stack(settings)
    try:
        replica.start_service("gateway")
        replica.wait_healthy(("gateway",), timeout=180)
        yield replica
    finally:
        replica.stop_services()


def test_an_overloaded_gateway_is_unavailable_at_once(narrow_gateway: Stack, demo_key: str) -> None:
    with grpc.insecure_channel(narrow_gateway.settings.grpc_target("gateway")) as ch:
        first, call = first_of(ch, demo_key, request(max_tokens=200), timeout=120)
        assert first.request_id  # one stream is in flight: the replica is full
        error = rejected(lambda: generate(ch, demo_key, request(max_tokens=2), timeout=30))
        call.cancel()
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert (error.details() or "").startswith("gateway overloaded:")
