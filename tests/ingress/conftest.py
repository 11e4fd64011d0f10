"""The pipeline behind the gateway (redaction to audit) as real processes, and API keys.

Kafka producers never touch the gateway, so these tests start without it and
publish their own keys to sluice.keys.v1, as `sluice keys create` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.gateway import keys as key_material
from sluice.config import Settings
from sluice.stack import Stack
from sluice.v1 import keys_pb2

PIPELINE = ("redaction", "prompts", "inference", "metering", "audit")


@dataclass(frozen=True)
class IngressKey:
    key: str
    record: keys_pb2.ApiKey

    @property
    def key_id(self) -> str:
        return self.record.key_id


def make_key(bootstrap: str, tenant: str, **options: object) -> IngressKey:
    key_id, key = key_material.new_key()
    record = key_material.key_record(
        key_id=key_id,
        inner_digest=key_material.digest(key),
        tenant=tenant,
        **options,  # type: ignore[arg-type]
    )
    asyncio.run(key_material.publish(bootstrap, [record]))
    return IngressKey(key, record)


@pytest.fixture(scope="session")
def pipeline(stack_settings: Settings) -> Iterator[Stack]:
    running = Stack(stack_settings)
    try:
        for name in PIPELINE:
            running.start_service(name)
        running.wait_healthy(PIPELINE, timeout=300)
        yield running
    finally:
        running.stop_services()


@pytest.fixture(scope="session")
def demo(stack_settings: Settings) -> IngressKey:
    return make_key(stack_settings.bootstrap, "demo")


@pytest.fixture(scope="session")
def acme(stack_settings: Settings) -> IngressKey:
    return make_key(stack_settings.bootstrap, "acme")
