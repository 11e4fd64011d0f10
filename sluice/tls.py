"""Optional TLS and mutual TLS for every gRPC server, and the matching client channels.

Off unless SLUICE_GRPC_TLS_CERT_FILE and SLUICE_GRPC_TLS_KEY_FILE are set. With
SLUICE_GRPC_TLS_CLIENT_CA_FILE as well, a client must present a certificate
signed by that CA (mTLS). Clients of our own (CLI, stack health checks, one
service calling another) trust SLUICE_GRPC_TLS_CA_FILE (default: the system
roots) and present SLUICE_GRPC_TLS_CLIENT_CERT_FILE / _KEY_FILE when set.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from sluice.config import ConfigError, Settings


def _read(path: Path | None, setting: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    cert = _read(settings.grpc_tls_cert_file, "SLUICE_GRPC_TLS_CERT_FILE")
    key = _read(settings.grpc_tls_key_file, "SLUICE_GRPC_TLS_KEY_FILE")
    if cert is None or key is None:
        return None
    client_ca = _read(settings.grpc_tls_client_ca_file, "SLUICE_GRPC_TLS_CLIENT_CA_FILE")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def open_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    """Listen on `address` with TLS when configured; 0 when the port cannot be bound."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if settings.grpc_tls_cert_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.grpc_tls_ca_file, "SLUICE_GRPC_TLS_CA_FILE"),
        private_key=_read(settings.grpc_tls_client_key_file, "SLUICE_GRPC_TLS_CLIENT_KEY_FILE"),
        certificate_chain=_read(settings.grpc_tls_client_cert_file, "SLUICE_GRPC_TLS_CLIENT_CERT_FILE"),
    )


def channel(settings: Settings, target: str) -> grpc.Channel:
    """A blocking channel to one of our servers, with TLS when the servers use it."""
    credentials = channel_credentials(settings)
    return grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)


def aio_channel(settings: Settings, target: str) -> grpc.aio.Channel:
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)
