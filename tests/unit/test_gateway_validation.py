import grpc
import pytest

from services.gateway.auth import KeyStore, ensure_demo_key
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


def test_demo_key_is_seeded_once_and_authenticates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = ensure_demo_key(tmp_path)
    assert ensure_demo_key(tmp_path) == key
    store = KeyStore.load(tmp_path)
    assert store.tenant_for(f"Bearer {key}") == "demo"
    assert store.tenant_for(f"bearer {key}") == "demo"
    assert store.tenant_for("Bearer wrong") is None
    assert store.tenant_for(key) is None
    assert store.tenant_for(None) is None
    assert key not in (tmp_path / "tenants.json").read_text()
