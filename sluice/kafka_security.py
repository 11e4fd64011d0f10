"""How every Kafka client of a process authenticates: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.

One set of SLUICE_KAFKA_* settings becomes both the aiokafka keyword arguments
(`client_options`) and faust's `broker_credentials` (`faust_credentials`), so the
services, the stream processors, `sluice topics apply` and the lag reader all
connect the same way.

A process talks to one cluster, and most Kafka clients are built deep inside a
service from nothing but a bootstrap string; so the options come from a
process-wide profile (`configure`, or else the process's own settings read on
first use) instead of being threaded through every constructor.

Mistakes surface early and by name: `check` (run by Settings validation) refuses
a bad combination or an unreadable file, and `refusal` turns a broker's "wrong
password" or an untrusted certificate into one clear error instead of endless
"kafka unreachable" retries.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

if TYPE_CHECKING:
    import faust

    from sluice.config import Settings

SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")


class KafkaRefused(Exception):
    """The cluster refused our credentials or we refused its certificate: retrying cannot help."""


@dataclass(frozen=True)
class KafkaSecurity:
    """The security part of the settings, hashable so its SSL context is built once."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    @property
    def sasl(self) -> bool:
        return self.protocol in SASL_PROTOCOLS

    @property
    def tls(self) -> bool:
        return self.protocol in TLS_PROTOCOLS

    def __repr__(self) -> str:  # never show the password
        return f"KafkaSecurity(protocol={self.protocol}, mechanism={self.mechanism}, user={self.username})"


def security_of(settings: Settings) -> KafkaSecurity:
    """The validated security profile of `settings` (ValueError naming the setting otherwise)."""
    protocol = settings.kafka_security_protocol
    named = f"SLUICE_KAFKA_SECURITY_PROTOCOL is {protocol}"
    sasl_set = {
        "SLUICE_KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
        "SLUICE_KAFKA_SASL_PASSWORD": settings.kafka_sasl_password,
        "SLUICE_KAFKA_SASL_PASSWORD_FILE": settings.kafka_sasl_password_file,
    }
    tls_set = {
        "SLUICE_KAFKA_SSL_CA_FILE": settings.kafka_ssl_ca_file,
        "SLUICE_KAFKA_SSL_CERT_FILE": settings.kafka_ssl_cert_file,
        "SLUICE_KAFKA_SSL_KEY_FILE": settings.kafka_ssl_key_file,
    }
    # A credential given for a protocol that would not send it is a mistake, not a default.
    if protocol not in SASL_PROTOCOLS:
        for name, value in sasl_set.items():
            if value is not None:
                raise ValueError(f"{name} is set but {named} (use SASL_*)")
    if protocol not in TLS_PROTOCOLS:
        for name, value in tls_set.items():
            if value is not None:
                raise ValueError(f"{name} is set but {named} (use SSL or SASL_SSL)")
    if (settings.kafka_ssl_cert_file is None) != (settings.kafka_ssl_key_file is None):
        raise ValueError("SLUICE_KAFKA_SSL_CERT_FILE and SLUICE_KAFKA_SSL_KEY_FILE go together (mutual TLS)")
    password = None
    if protocol in SASL_PROTOCOLS:
        if not settings.kafka_sasl_username:
            raise ValueError(f"SLUICE_KAFKA_SASL_USERNAME is required: {named}")
        password = _password(settings)
    for name, path in tls_set.items():
        if path is not None and not _readable(path):
            raise ValueError(f"{name}: cannot read {path}")
    security = KafkaSecurity(
        protocol=protocol,
        mechanism=settings.kafka_sasl_mechanism,
        username=settings.kafka_sasl_username if protocol in SASL_PROTOCOLS else None,
        password=password,
        ca_file=settings.kafka_ssl_ca_file,
        cert_file=settings.kafka_ssl_cert_file,
        key_file=settings.kafka_ssl_key_file,
        check_hostname=settings.kafka_ssl_check_hostname,
    )
    if security.tls:
        _ssl_context(security)  # bad PEM fails here, named, not as an endless connect retry
    return security


def _password(settings: Settings) -> str:
    given, path = settings.kafka_sasl_password, settings.kafka_sasl_password_file
    if (given is None) == (path is None):
        raise ValueError("set exactly one of SLUICE_KAFKA_SASL_PASSWORD and SLUICE_KAFKA_SASL_PASSWORD_FILE")
    if given is not None:
        secret = given.get_secret_value()
    else:
        assert path is not None
        try:
            # A mounted Kubernetes Secret often ends with a newline the password does not have.
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"SLUICE_KAFKA_SASL_PASSWORD_FILE: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError("SLUICE_KAFKA_SASL_PASSWORD(_FILE) is empty")
    return secret


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


@lru_cache(maxsize=8)
def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """One context per profile, shared by every client (it only holds trust and our certificate)."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=str(security.ca_file) if security.ca_file else None,
            certfile=str(security.cert_file) if security.cert_file else None,
            keyfile=str(security.key_file) if security.key_file else None,
        )
    except ssl.SSLError as exc:
        names = "SLUICE_KAFKA_SSL_CA_FILE / SLUICE_KAFKA_SSL_CERT_FILE / SLUICE_KAFKA_SSL_KEY_FILE"
        raise ValueError(f"{names}: not usable PEM ({exc.reason or exc})") from None
    # create_ssl_context leaves hostname checking on; some private clusters' certificates
    # name no host we dial (SLUICE_KAFKA_SSL_CHECK_HOSTNAME=false keeps the chain check).
    context.check_hostname = security.check_hostname
    return context


@lru_cache(maxsize=8)
def _options(security: KafkaSecurity) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        options["ssl_context"] = _ssl_context(security)
    if security.sasl:
        options["sasl_mechanism"] = security.mechanism
        options["sasl_plain_username"] = security.username
        options["sasl_plain_password"] = security.password
    return options


@dataclass(frozen=True)
class _Profile:
    bootstrap: str
    security: KafkaSecurity


_process: _Profile | None = None


def configure(settings: Settings | None) -> None:
    """Make `settings` this process's Kafka profile (None: read the environment again on next use)."""
    global _process
    _process = None if settings is None else _Profile(settings.bootstrap, security_of(settings))


def _profile() -> _Profile:
    global _process
    if _process is None:
        from sluice.config import Settings  # the process's own settings: environment and SLUICE_CONFIG

        settings = Settings()
        _process = _Profile(settings.bootstrap, security_of(settings))
    return _process


def client_options(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient.

    Without `settings`, the process profile. Returns a fresh dict each call (callers may
    add to it); the SSL context inside is shared.
    """
    security = security_of(settings) if settings is not None else _profile().security
    return dict(_options(security))


def faust_credentials(settings: Settings | None = None) -> faust.types.auth.CredentialsT | None:
    """`broker_credentials` for faust.App from the same settings (None for PLAINTEXT)."""
    import faust

    security = security_of(settings) if settings is not None else _profile().security
    if security.sasl:
        return faust.SASLCredentials(
            username=security.username,
            password=security.password,
            mechanism=security.mechanism,
            ssl_context=_ssl_context(security) if security.tls else None,
        )
    if security.tls:
        return faust.SSLCredentials(_ssl_context(security))
    return None


_REFUSALS = (SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError)


async def refusal(timeout_s: float = 10.0) -> str | None:
    """Why the cluster refuses this process, if it does; None when it is merely unreachable.

    aiokafka reports a failed login only as "Unable to bootstrap", which looks like
    an outage and would be retried forever; one direct connection tells them apart.
    """
    profile = _profile()
    security = profile.security
    if security.protocol == "PLAINTEXT":
        return None
    host, _, port = profile.bootstrap.split(",")[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000), **_options(security)),
            timeout_s,
        )
    except _REFUSALS as exc:
        return (
            f"Kafka at {profile.bootstrap} refused SASL {security.mechanism} login of user "
            f"{security.username!r} (check SLUICE_KAFKA_SASL_USERNAME, SLUICE_KAFKA_SASL_PASSWORD"
            f"[_FILE], SLUICE_KAFKA_SASL_MECHANISM): {exc}"
        )
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the certificate of Kafka at {profile.bootstrap} is not trusted (check "
            f"SLUICE_KAFKA_SSL_CA_FILE, SLUICE_KAFKA_SSL_CHECK_HOSTNAME): {exc.verify_message}"
        )
    except Exception as exc:  # unreachable, timed out, or anything else: the caller keeps retrying
        tls_error = _tls_error(exc)
        if tls_error is None:
            return None
        return (
            f"TLS with Kafka at {profile.bootstrap} failed (check SLUICE_KAFKA_SECURITY_PROTOCOL, "
            f"SLUICE_KAFKA_SSL_CERT_FILE/KEY_FILE for mutual TLS): {tls_error.reason or tls_error}"
        )
    conn.close()
    return None


def _tls_error(exc: BaseException | None) -> ssl.SSLError | None:
    """A TLS refusal in `exc` or its causes (under TLS 1.3 a broker's "certificate required"
    alert arrives after the handshake, as the cause of a closed connection)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLEOFError):
            return None  # a broker going down mid-handshake: an outage, not a refusal
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
