"""TLS and mutual TLS for the gRPC servers, with certificates made here by `cryptography`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice import tls
from sluice.config import ConfigError, load_settings
from sluice.ports import free_ports
from sluice.stack import Stack
from tests.gateway.conftest import first_of, request
from tests.tls_material import TlsMaterial, make_tls_material


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    return make_tls_material(tmp_path_factory.mktemp("certs"))


def test_half_a_tls_setup_is_refused_naming_the_setting(certs: TlsMaterial) -> None:
    with pytest.raises(ConfigError, match="SLUICE_GRPC_TLS_KEY_FILE"):
        load_settings(grpc_tls_cert_file=certs.broker.cert)
    with pytest.raises(ConfigError, match="SLUICE_GRPC_TLS_CERT_FILE"):
        load_settings(grpc_tls_client_ca_file=certs.ca)


@pytest.fixture(scope="module")
def mtls_gateway(
    stack: Stack, certs: TlsMaterial, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A gateway replica as a real process, serving only clients with a certificate from our CA."""
    (port,) = free_ports(1)
    settings = stack.settings.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("mtls"),
            "gateway_port": port,
            "gateway_reply_partition": 2,
            "grpc_tls_cert_file": certs.broker.cert,
            "grpc_tls_key_file": certs.broker.key,
            "grpc_tls_client_ca_file": certs.ca,
            "grpc_tls_ca_file": certs.ca,
            "grpc_tls_client_cert_file": certs.client.cert,
            "grpc_tls_client_key_file": certs.client.key,
        }
    )
    replica = Stack(settings)
    try:
        replica.start_service("gateway")
        replica.wait_healthy(("gateway",), timeout=180)  # health checks go over mTLS too
        yield replica
    finally:
        replica.stop_services()


def _health(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_gateway_with_mtls_serves_only_certified_clients(
    mtls_gateway: Stack, certs: TlsMaterial, demo_key: str
) -> None:
    settings = mtls_gateway.settings
    target = settings.grpc_target("gateway")
    with tls.channel(settings, target) as channel:
        assert _health(channel) == grpc.StatusCode.OK
        first, call = first_of(channel, demo_key, request(max_tokens=2))
        call.cancel()
        assert first.request_id
    with grpc.insecure_channel(target) as plain:
        assert _health(plain) == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(target, no_cert) as anonymous:
        assert _health(anonymous) == grpc.StatusCode.UNAVAILABLE
