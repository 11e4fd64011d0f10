"""Kafka security against a real broker: SASL (SCRAM and PLAIN) over mutual TLS.

A private broker serves only a SASL_SSL listener to clients, with client certificates
required, and certificates made at test time. Sluice's own clients (topic admin,
producers incl. transactional, readers, the lag reader), `sluice topics apply` and the
metering service (its consumers, ledger transactions and the embedded faust app) work
through it; a wrong password or an untrusted broker certificate stops with the setting
to fix instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka import TopicPartition

from sluice import kafka_security
from sluice.broker import ListenerSecurity, LocalBroker
from sluice.config import REPO_ROOT, ConfigError, Settings, load_settings
from sluice.kafka import start_partition_reader, start_producer
from sluice.lag import LagReader
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topic_admin import apply
from sluice.topics import DLQ, load_plan
from tests.tls_material import TlsMaterial, make_tls_material

USER, PASSWORD = "sluice", "s3cret-Pw"
# Bounds on waits that must end (refusals, start-up); exceeding one fails the test instead of hanging.
GUARD_S = 180


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("kafka-tls"))


@pytest.fixture(scope="module")
def secure_broker(tls: TlsMaterial, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    port, controller, internal = free_ports(3)
    listener = ListenerSecurity(
        protocol="SASL_SSL",
        key_file=tls.broker.key,
        cert_file=tls.broker.cert,
        internal_port=internal,
        users={USER: PASSWORD},
        client_ca_file=tls.ca,  # mutual TLS as well: clients must present a certificate
    )
    broker = LocalBroker(
        REPO_ROOT,
        tmp_path_factory.mktemp("kafka-secure"),
        port=port,
        controller_port=controller,
        security=listener,
    )
    broker.start()
    try:
        broker.wait_ready(timeout=GUARD_S)
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "sasl-password"
    path.write_text(PASSWORD + "\n")  # as a mounted Kubernetes Secret may have it
    return path


def secure(broker: LocalBroker, tls: TlsMaterial, **overrides: Any) -> dict[str, Any]:
    """Settings for `broker`: SCRAM-SHA-512 over mutual TLS unless overridden."""
    values: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap,
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": USER,
        "kafka_ssl_ca_file": tls.ca,
        "kafka_ssl_cert_file": tls.client.cert,
        "kafka_ssl_key_file": tls.client.key,
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def settings(
    secure_broker: LocalBroker,
    tls: TlsMaterial,
    password_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Settings]:
    port = free_ports(1)[0]
    settings = load_settings(
        **secure(secure_broker, tls, kafka_sasl_password_file=password_file),
        state_dir=tmp_path_factory.mktemp("state"),
        metering_port=port,
        metrics_port_offset=free_offset([port]),
    )
    with profile(settings):
        yield settings


@contextmanager
def profile(settings: Settings) -> Iterator[None]:
    """This process's Kafka clients use `settings` for the duration (then the environment again)."""
    kafka_security.configure(settings)
    try:
        yield
    finally:
        kafka_security.configure(None)


def sluice(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        cwd=REPO_ROOT,
    )


def plain_env() -> dict[str, str]:
    """The test process's environment without any SLUICE_* setting of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}


# --- settings: refused at start, by name ------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "SLUICE_KAFKA_SASL_USERNAME is required"),
        (
            {"kafka_sasl_username": "u"},
            "SLUICE_KAFKA_SASL_USERNAME is set but SLUICE_KAFKA_SECURITY_PROTOCOL",
        ),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"},
            "exactly one of SLUICE_KAFKA_SASL_PASSWORD and SLUICE_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_username": "u",
                "kafka_sasl_password_file": "/nonexistent/sasl-password",
            },
            "SLUICE_KAFKA_SASL_PASSWORD_FILE: cannot read",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.crt"},
            "SLUICE_KAFKA_SSL_CA_FILE",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": "/etc/hostname"},
            "SLUICE_KAFKA_SSL_KEY_FILE",
        ),
        ({"kafka_ssl_ca_file": "/etc/hostname"}, "SLUICE_KAFKA_SSL_CA_FILE is set but"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/etc/hostname"}, "not usable PEM"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "SLUICE_KAFKA_SASL_MECHANISM"),
    ],
)
def test_bad_security_settings_are_refused_by_name(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


def test_a_service_will_not_start_with_half_a_sasl_setup() -> None:
    env = plain_env() | {
        "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SLUICE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    }
    done = sluice("serve", "metering", env=env)
    assert done.returncode == 2, done.stderr
    assert "SLUICE_KAFKA_SASL_USERNAME is required" in done.stderr


def test_aiokafka_options_and_faust_credentials_come_from_the_same_settings(settings: Settings) -> None:
    options = kafka_security.client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("SCRAM-SHA-512", USER)
    assert options["sasl_plain_password"] == PASSWORD  # the file's trailing newline is not part of it
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    credentials = kafka_security.faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == (
        USER,
        PASSWORD,
        "SCRAM-SHA-512",
    )
    assert credentials.protocol.value == "SASL_SSL" and credentials.ssl_context is context
    assert kafka_security.client_options(load_settings()) == {"security_protocol": "PLAINTEXT"}
    assert kafka_security.faust_credentials(load_settings()) is None


# --- against the broker -----------------------------------------------------------------


def test_topics_apply_command_creates_the_topics_over_sasl_ssl(settings: Settings) -> None:
    done = sluice("topics", "apply", env=plain_env() | Stack(settings).child_env())
    assert done.returncode == 0, done.stderr
    # In-process, through the same settings: everything is there and matches the plan.
    report = asyncio.run(
        asyncio.wait_for(apply(settings.bootstrap, load_plan(settings.topics_file)), GUARD_S)
    )
    assert report.created == [] and report.drift == []
    assert set(report.unchanged) == set(load_plan(settings.topics_file).topics)


def test_transactional_produce_and_read_committed_round_trip(settings: Settings) -> None:
    async def round_trip() -> tuple[bytes | None, list[str]]:
        await apply(settings.bootstrap, load_plan(settings.topics_file))
        producer = await start_producer(settings.bootstrap, "ops-test", transactional_id="ops-security-tx")
        try:
            async with producer.transaction():
                sent = await (await producer.send(DLQ, b"over-sasl-ssl", key=b"k", partition=0))
        finally:
            await producer.stop()
        tp = TopicPartition(DLQ, 0)
        reader = await start_partition_reader(settings.bootstrap, "ops-test", "ops-reader", tp, sent.offset)
        try:
            batch = await reader.getmany(tp, timeout_ms=10_000)
        finally:
            await reader.stop()
        lag = LagReader(settings.bootstrap, client_id="ops-lag")
        await lag.start()
        try:
            groups = await lag.groups()
        finally:
            await lag.close()
        records = batch.get(tp, [])
        return (records[0].value if records else None), groups

    value, groups = asyncio.run(asyncio.wait_for(round_trip(), GUARD_S))
    assert value == b"over-sasl-ssl"
    assert isinstance(groups, list)


def test_metering_service_runs_over_sasl_ssl(settings: Settings) -> None:
    """A real service process: producer, ledger transactions, consumers and its faust app."""
    asyncio.run(asyncio.wait_for(apply(settings.bootstrap, load_plan(settings.topics_file)), GUARD_S))
    stack = Stack(settings)
    stack.start_service("metering")
    try:
        try:
            stack.wait_healthy(("metering",), timeout=GUARD_S)  # SERVING only once the faust app is ready
        except Exception:
            log = (stack.log_dir / "metering.log").read_text(errors="replace")
            pytest.fail(f"metering did not become healthy:\n{log[-4000:]}")

        async def groups() -> list[str]:
            reader = LagReader(settings.bootstrap, client_id="ops-lag")
            await reader.start()
            try:
                return await reader.groups()
            finally:
                await reader.close()

        joined = asyncio.run(asyncio.wait_for(groups(), GUARD_S))
        assert any(g.startswith("sluice-metering") for g in joined), joined
    finally:
        stack.stop_services(names=("metering",))


def test_a_wrong_password_is_refused_naming_the_settings(
    secure_broker: LocalBroker, tls: TlsMaterial
) -> None:
    for mechanism in ("SCRAM-SHA-512", "PLAIN"):
        wrong = load_settings(
            **secure(secure_broker, tls, kafka_sasl_mechanism=mechanism, kafka_sasl_password="nope")
        )
        with profile(wrong), pytest.raises(ConfigError) as refused:
            asyncio.run(asyncio.wait_for(start_producer(wrong.bootstrap, "ops-test"), GUARD_S))
        message = str(refused.value)
        assert f"refused SASL {mechanism} login of user '{USER}'" in message
        assert "SLUICE_KAFKA_SASL_PASSWORD" in message


def test_the_cli_exits_on_a_refused_login_instead_of_retrying(
    secure_broker: LocalBroker, tls: TlsMaterial, tmp_path: Path
) -> None:
    wrong = tmp_path / "sasl-password"
    wrong.write_text("not-the-password")
    env = plain_env() | {
        f"SLUICE_{k.upper()}": str(v)
        for k, v in secure(secure_broker, tls, kafka_sasl_password_file=wrong).items()
    }
    done = sluice("topics", "apply", env=env)
    assert done.returncode == 2
    assert "refused SASL SCRAM-SHA-512 login" in done.stderr and "SLUICE_KAFKA_SASL_PASSWORD" in done.stderr


def test_an_untrusted_broker_certificate_is_refused(
    secure_broker: LocalBroker, tls: TlsMaterial, password_file: Path, tmp_path: Path
) -> None:
    stranger = make_tls_material(tmp_path / "other", ca_name="some other CA")
    wrong = load_settings(
        **secure(secure_broker, tls, kafka_sasl_password_file=password_file, kafka_ssl_ca_file=stranger.ca)
    )
    with profile(wrong), pytest.raises(ConfigError, match=r"not trusted .*SLUICE_KAFKA_SSL_CA_FILE"):
        asyncio.run(asyncio.wait_for(start_producer(wrong.bootstrap, "ops-test"), GUARD_S))


def test_a_missing_client_certificate_is_refused_when_the_broker_requires_one(
    secure_broker: LocalBroker, tls: TlsMaterial, password_file: Path
) -> None:
    values = secure(secure_broker, tls, kafka_sasl_password_file=password_file)
    del values["kafka_ssl_cert_file"], values["kafka_ssl_key_file"]
    anonymous = load_settings(**values)
    with profile(anonymous), pytest.raises(ConfigError, match="SLUICE_KAFKA_SSL_CERT_FILE"):
        asyncio.run(asyncio.wait_for(start_producer(anonymous.bootstrap, "ops-test"), GUARD_S))
