"""The inference worker's output redaction follows run-time policy changes on a real broker.

`load_output_boundary` (what the worker calls) reads sluice.policies.v1 to the end
before it returns, then keeps following it: an update published while the worker
runs applies to the next generation's output without a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from services.redaction import boundary as boundary_module
from services.redaction.analyzer import Redactor
from services.redaction.boundary import Boundary, load_output_boundary, redact_chunk, stream_redactor_for
from services.redaction.policy import POLICIES
from sluice.config import Settings, load_settings
from sluice.kafka import start_producer
from sluice.v1 import privacy_pb2

TEXT = "Write to jane.roe@example.org today."


def policy(version: str, operator: str) -> str:
    return f"version: {version}\nentities:\n  EMAIL_ADDRESS: {{operator: {operator}}}\n"


async def publish(producer: AIOKafkaProducer, tenant: str, policy_yaml: str) -> None:
    update = privacy_pb2.PolicyUpdate(tenant=tenant, policy_yaml=policy_yaml)
    await producer.send_and_wait(POLICIES, update.SerializeToString(), key=tenant.encode())


async def until_version(boundary: Boundary, tenant: str, version: str) -> None:
    """Wait (bounded, for a loaded machine) until the follower has applied `version`."""
    for _ in range(600):
        if boundary.policy(tenant).version == version:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"policy {version} never applied; in force: {boundary.policy(tenant).version}")


def redact(boundary: Boundary, tenant: str, settings: Settings, text: str = TEXT) -> str:
    stream = stream_redactor_for(boundary, tenant, settings)
    assert stream is not None
    return redact_chunk(stream, text, final=True)


@pytest.fixture
async def producer(topics_ready: str) -> AsyncIterator[AIOKafkaProducer]:
    made = await start_producer(topics_ready, "test")
    yield made
    await made.stop()


async def test_output_redaction_follows_policy_changes_without_a_restart(
    topics_ready: str,
    tmp_path: Path,
    loaded_redactor: Redactor,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker loads its own analyzer; this module's already-loaded one stands in (same class).
    monkeypatch.setattr(boundary_module, "Redactor", lambda: loaded_redactor)
    settings = load_settings(kafka_bootstrap=topics_ready, state_dir=tmp_path, output_redaction=True)
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    # Set before the worker starts: in force from its first generation (read to the end at load).
    await publish(producer, tenant, policy("masked-1", "mask"))

    boundary = await load_output_boundary(settings)
    assert boundary is not None and boundary.following is not None
    try:
        assert boundary.policy(tenant).version == "masked-1"
        masked = "Write to " + "*" * len("jane.roe@example.org") + " today."
        assert redact(boundary, tenant, settings) == masked
        in_flight = stream_redactor_for(boundary, tenant, settings)
        assert in_flight is not None

        await publish(producer, tenant, policy("hashed-2", "hash"))
        await until_version(boundary, tenant, "hashed-2")
        hashed = redact(boundary, tenant, settings)
        assert hashed.startswith("Write to <EMAIL_ADDRESS:") and "jane.roe" not in hashed
        # A stream that started under the old policy finishes under it: one answer, one way.
        assert "*" * 10 in redact_chunk(in_flight, TEXT, final=True)

        # An invalid update is ignored (logged, never applied) and the follower goes on.
        await publish(producer, tenant, "version: bad-3\nentities: {NOT_A_THING: {}}\n")
        await publish(producer, tenant, policy("hashed-4", "hash"))
        await until_version(boundary, tenant, "hashed-4")

        # An empty policy drops the override: the start-up file's "*" policy applies again.
        await publish(producer, tenant, "")
        await until_version(boundary, tenant, "default-1")
        assert redact(boundary, tenant, settings) == "Write to <EMAIL_ADDRESS> today."
    finally:
        boundary.following.cancel()
        await asyncio.gather(boundary.following, return_exceptions=True)
