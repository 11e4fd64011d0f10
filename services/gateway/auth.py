"""Who is calling: API keys from sluice.keys.v1, resolved to a tenant and a role.

Every process that authenticates (gateway replicas, redaction, audit) reads the
whole compacted topic at start and then follows it, so a key created or revoked
anywhere takes effect everywhere within a poll (well under 2 s). The check on
the request path is a dictionary lookup and two SHA-256s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf.message import DecodeError

from services.gateway import keys
from services.metering.reader import topic_partitions
from sluice.config import Settings
from sluice.kafka import started, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.service import Context
from sluice.topics import KEYS
from sluice.v1 import keys_pb2

log = get_logger()

DEMO_TENANT = "demo"
# How long a call waits for the key topic to be read at start before UNAVAILABLE.
READY_WAIT_S = 10.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    key_id: str
    role: str  # user | auditor | admin
    allowed_models: frozenset[str]  # empty: every model
    requests_per_minute: int  # 0: no limit
    tokens_per_minute: int

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    @property
    def reads_every_tenant(self) -> bool:
        """Auditors and admins see every tenant's trail; a user key only its own."""
        return self.role in ("auditor", "admin")


def _principal(record: keys_pb2.ApiKey) -> Principal:
    return Principal(
        tenant=record.tenant,
        key_id=record.key_id,
        role=keys.role_name(record.role),
        allowed_models=frozenset(record.allowed_models),
        requests_per_minute=record.rate_limit.requests_per_minute,
        tokens_per_minute=record.rate_limit.tokens_per_minute,
    )


class KeyStore:
    """The newest record of every key, kept current from sluice.keys.v1."""

    _shared: dict[str, KeyStore] = {}

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.records: dict[str, keys_pb2.ApiKey] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def shared(cls, settings: Settings) -> KeyStore:
        """The process's one store for this cluster, reading from the first call on."""
        store = cls._shared.get(settings.bootstrap)
        if store is None:
            store = cls._shared[settings.bootstrap] = cls(settings.bootstrap)
        store.start()
        return store

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="keys")

    async def run(self) -> None:
        consumer = await with_backoff("keys reader", "gateway", self._start)
        try:
            partitions = await topic_partitions(consumer, KEYS)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            while not self.ready.is_set():
                self._apply_batches(await consumer.getmany(timeout_ms=200, max_records=1000))
                if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                    self.ready.set()
                    log.info("api keys loaded", keys=len(self.records))
            while True:
                self._apply_batches(await consumer.getmany(timeout_ms=200, max_records=1000))
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        return await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id="sluice-keys-reader",
                enable_auto_commit=False,
                fetch_max_wait_ms=IDLE_POLL_MS,  # a long poll: answered as soon as a record arrives
            )
        )

    def _apply_batches(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for records in batches.values():
            for record in records:
                self.apply(record.value)

    def apply(self, value: bytes | None) -> None:
        if value is None:
            return  # a tombstone: nothing to forget that a revoked record would not say better
        try:
            record = keys_pb2.ApiKey.FromString(value)
        except DecodeError:
            log.warning("undecodable key record dropped", topic=KEYS)
            return
        if keys.KEY_ID.match(record.key_id):
            self.records[record.key_id] = record

    def lookup(self, authorization: str | None) -> Principal | None:
        """The caller for an `authorization: Bearer <key>` value, or None (unknown or revoked)."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        record = self.records.get(keys.key_id_of(key))
        if record is None or record.HasField("revoked_at") or not keys.matches(record, key):
            return None
        return _principal(record)

    async def principal(self, context: Context) -> Principal:
        """The caller, or abort with UNAUTHENTICATED (UNAVAILABLE while keys still load)."""
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), READY_WAIT_S)
            except TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "API keys are still loading; retry shortly")
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        caller = self.lookup(str(authorization) if authorization else None)
        if caller is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: missing, unknown or revoked API key (send 'authorization: Bearer <key>')",
            )
        assert caller is not None
        return caller

    async def authenticate(self, context: Context) -> str:
        """The caller's tenant, or abort the call with UNAUTHENTICATED."""
        return (await self.principal(context)).tenant

    def of_tenant(self, tenant: str) -> Iterable[keys_pb2.ApiKey]:
        return (r for r in self.records.values() if r.tenant == tenant)


# --- the local stack's demo tenant, and keys from before sluice.keys.v1 ---


def keys_file(state_dir: Path) -> Path:
    """Where keys were kept before sluice.keys.v1 (SHA-256 digest -> tenant)."""
    return state_dir / "tenants.json"


def demo_key_file(state_dir: Path) -> Path:
    return state_dir / "keys" / f"{DEMO_TENANT}.key"


def demo_key(state_dir: Path) -> str:
    """The demo key, made once per state dir (O_EXCL: concurrent replicas agree on one)."""
    key_path = demo_key_file(state_dir)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(keys.new_key()[1] + "\n")
    return key_path.read_text().strip()


async def seed_local_keys(store: KeyStore, state_dir: Path) -> None:
    """Put the demo key and any tenants.json keys on sluice.keys.v1, once.

    Runs at every gateway start but writes only what the topic lacks (judged by
    key id), so a revoked demo key stays revoked and replicas never duplicate it.
    """
    await store.ready.wait()
    missing: list[keys_pb2.ApiKey] = []
    key = demo_key(state_dir)
    if keys.key_id_of(key) not in store.records:
        missing.append(
            keys.key_record(
                key_id=keys.key_id_of(key),
                inner_digest=keys.digest(key),
                tenant=DEMO_TENANT,
                description="local demo tenant, seeded by the gateway",
            )
        )
    legacy = keys_file(state_dir)
    if legacy.exists():
        for hex_digest, tenant in json.loads(legacy.read_text()).items():
            if hex_digest[:12] not in store.records:
                missing.append(
                    keys.key_record(
                        key_id=hex_digest[:12],
                        inner_digest=bytes.fromhex(hex_digest),
                        tenant=tenant,
                        description="migrated from tenants.json",
                    )
                )
    if missing:
        await keys.publish(store.bootstrap, missing)
        for record in missing:
            store.records.setdefault(record.key_id, record)
        log.info("api keys seeded", keys=len(missing))
    if legacy.exists():
        with contextlib.suppress(FileNotFoundError):  # another replica moved it first
            legacy.rename(legacy.with_suffix(".json.migrated"))
