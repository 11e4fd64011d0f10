import grpc
import pytest

from services.gateway import keys
from services.gateway.auth import KeyStore
from services.gateway.validation import Invalid, validate
from sluice.config import load_settings
from sluice.v1 import envelope_pb2, gateway_pb2

CATALOG = load_settings().catalog


def request(**fields: object) -> gateway_pb2.GenerateRequest:
    base: dict[str, object] = {"messages": [envelope_pb2.ChatMessage(role="user", content="hi")]}
    base.update(fields)
    return gateway_pb2.GenerateRequest(**base)  # type: ignore[arg-type]


def test_defaults_are_applied() -> None:
    valid = validate(request(), CATALOG)
    assert valid.model == CATALOG.default_model
    assert valid.max_tokens > 0
    assert 0 <= valid.temperature <= 2


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (
            {"messages": [envelope_pb2.ChatMessage(role="user", content="  ")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].content",
        ),
        (
            {"messages": [envelope_pb2.ChatMessage(role="robot", content="x")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "model"),
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": -5}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
def test_bad_requests_name_the_field(fields: dict[str, object], code: grpc.StatusCode, field: str) -> None:
    with pytest.raises(Invalid) as caught:
        validate(request(**fields), CATALOG)
    assert caught.value.code == code
    assert caught.value.message.startswith(field + ":")


def test_key_lookup_accepts_only_a_known_active_bearer_key() -> None:
    key_id, key = keys.new_key()
    store = KeyStore("unused:9092")  # filled by hand: the topic reader is tested in tests/gateway
    record = keys.key_record(key_id=key_id, inner_digest=keys.digest(key), tenant="demo", models=["m"])
    store.apply(record.SerializeToString())
    caller = store.lookup(f"Bearer {key}")
    assert caller is not None and caller.tenant == "demo" and caller.key_id == key_id
    assert caller.may_use("m") and not caller.may_use("other")
    assert store.lookup(f"bearer {key}") is not None
    for bad in ("Bearer wrong", key, None, f"Basic {key}", f"Bearer {key}x"):
        assert store.lookup(bad) is None
    record.revoked_at.CopyFrom(keys.now_stamp())
    store.apply(record.SerializeToString())
    assert store.lookup(f"Bearer {key}") is None
    store.apply(b"not a protobuf \xff")  # dropped, never raised
