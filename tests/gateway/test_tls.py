"""TLS and mutual TLS for the gRPC servers, with certificates made here by `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice import tls
from sluice.config import ConfigError, load_settings
from sluice.stack import Stack
from tests.conftest import free_ports
from tests.gateway.conftest import first_of, request


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("sluice test CA", ca_key, None)
    _write(directory, "ca", ca, ca_key)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, name, _issue(f"sluice {name}", key, (ca.subject, ca_key)), key)
    return directory


def test_half_a_tls_setup_is_refused_naming_the_setting(certs: Path) -> None:
    with pytest.raises(ConfigError, match="SLUICE_GRPC_TLS_KEY_FILE"):
        load_settings(grpc_tls_cert_file=certs / "server.crt")
    with pytest.raises(ConfigError, match="SLUICE_GRPC_TLS_CERT_FILE"):
        load_settings(grpc_tls_client_ca_file=certs / "ca.crt")


@pytest.fixture(scope="module")
def mtls_gateway(stack: Stack, certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway replica as a real process, serving only clients with a certificate from our CA."""
    (port,) = free_ports(1)
    settings = stack.settings.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("mtls"),
            "gateway_port": port,
            "gateway_reply_partition": 2,
            "grpc_tls_cert_file": certs / "server.crt",
            "grpc_tls_key_file": certs / "server.key",
            "grpc_tls_client_ca_file": certs / "ca.crt",
            "grpc_tls_ca_file": certs / "ca.crt",
            "grpc_tls_client_cert_file": certs / "client.crt",
            "grpc_tls_client_key_file": certs / "client.key",
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
    mtls_gateway: Stack, certs: Path, demo_key: str
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
    no_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    with grpc.secure_channel(target, no_cert) as anonymous:
        assert _health(anonymous) == grpc.StatusCode.UNAVAILABLE
