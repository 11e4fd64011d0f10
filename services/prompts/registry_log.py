"""sluice.templates.v1: the registry's only source of truth, read and written here.

Each replica replays the topic from offset 0 with a group-less reader before it
reports SERVING, then keeps following it, so a label moved through any replica
applies on every replica without a restart.

Writes are optimistic: a replica proposes `latest + 1`, produces, and waits
until its own reader has applied that offset. The registry keeps the first
event for a (name, version) in log order, so if another replica proposed the
same number first, this one sees it lost and retries with the next number.
One partition gives the single total order this needs; keys carry the event id
so compaction never replaces a winning version with a losing one.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.message import DecodeError

from services.prompts import metrics
from services.prompts.registry import Registry
from sluice import envelope as envelopes
from sluice import metrics as sluice_metrics
from sluice.config import Settings
from sluice.kafka import RequestFailed, start_partition_reader, with_backoff
from sluice.logs import get_logger
from sluice.v1 import templates_pb2

log = get_logger()

TEMPLATES = "sluice.templates.v1"
PARTITION = TopicPartition(TEMPLATES, 0)
MAX_WRITE_RACES = 8
# Registry writes belong to no tenant: operators manage templates for all.
OPERATOR = "operator"


def version_key(version: templates_pb2.TemplateVersion) -> str:
    return f"version/{version.name}/{version.version}/{version.event_id}"


def label_key(pointer: templates_pb2.LabelPointer) -> str:
    return f"label/{pointer.name}/{pointer.label}"


class RegistryLog:
    """Keeps a Registry equal to the fold of sluice.templates.v1."""

    def __init__(self, settings: Settings, registry: Registry, client_id: str = "sluice-prompts-registry"):
        self.settings = settings
        self.registry = registry
        self.client_id = client_id
        self.ready = asyncio.Event()
        self._applied = asyncio.Condition()
        self._reader: AIOKafkaConsumer | None = None
        self._write_lock = asyncio.Lock()

    async def catch_up(self) -> None:
        """Replay everything up to the end offset seen now; SERVING waits for this."""
        self._reader = await start_partition_reader(
            self.settings.bootstrap, "prompts", self.client_id, PARTITION, offset=0
        )
        reader = self._reader
        # Right after a broker restart the partition may have no leader yet: retry, don't die.
        ends = await with_backoff("templates end offset", "prompts", lambda: reader.end_offsets([PARTITION]))
        end = ends[PARTITION]
        while self.registry.position < end and await self._reader.position(PARTITION) < end:
            await self._poll(500)
        self.ready.set()
        metrics.REGISTRY_TEMPLATES.set(len(self.registry.versions))
        log.info("template registry loaded", templates=len(self.registry.versions), offset=end)

    async def follow(self) -> None:
        """Apply new events as they arrive, for as long as the service runs."""
        try:
            while True:
                await self._poll(1000)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.stop()

    async def _poll(self, timeout_ms: int) -> None:
        assert self._reader is not None
        batches = await self._reader.getmany(PARTITION, timeout_ms=timeout_ms)
        records = batches.get(PARTITION, [])
        for record in records:
            if record.value is None:
                self.registry.position = record.offset + 1
                continue
            try:
                event = templates_pb2.TemplateEvent.FromString(record.value)
            except DecodeError:
                log.warning("template event ignored: undecodable", offset=record.offset)
                self.registry.position = record.offset + 1
                continue
            self.registry.apply(event, record.offset)
        if records:
            metrics.REGISTRY_TEMPLATES.set(len(self.registry.versions))
            async with self._applied:
                self._applied.notify_all()

    async def _wait_applied(self, offset: int) -> None:
        async def applied() -> None:
            async with self._applied:
                await self._applied.wait_for(lambda: self.registry.position > offset)

        try:
            await asyncio.wait_for(applied(), self.settings.prompts_registry_write_timeout_s)
        except TimeoutError:
            raise RequestFailed(
                "UNAVAILABLE", "registry: the write is stored but not yet read back; list again shortly"
            ) from None

    async def _produce(self, producer: AIOKafkaProducer, key: str, event: templates_pb2.TemplateEvent) -> int:
        event.envelope.CopyFrom(
            envelopes.new_envelope(request_id=uuid.uuid4().hex, tenant=OPERATOR, producer="prompts")
        )
        metadata = await producer.send_and_wait(
            TEMPLATES, event.SerializeToString(), key=key.encode(), partition=0
        )
        sluice_metrics.EVENTS_PRODUCED.labels("prompts", TEMPLATES).inc()
        offset: int = metadata.offset
        return offset

    async def create_version(
        self, producer: AIOKafkaProducer, draft: templates_pb2.TemplateVersion
    ) -> templates_pb2.TemplateVersion:
        """Store `draft` as the next version of its template; returns it with its number."""
        async with self._write_lock:
            for _ in range(MAX_WRITE_RACES):
                version = templates_pb2.TemplateVersion()
                version.CopyFrom(draft)
                version.version = self.registry.latest(draft.name) + 1
                version.event_id = uuid.uuid4().hex
                version.created_at.GetCurrentTime()
                offset = await self._produce(
                    producer, version_key(version), templates_pb2.TemplateEvent(version=version)
                )
                await self._wait_applied(offset)
                stored = self.registry.versions.get(version.name, {}).get(version.version)
                if stored is not None and stored.version.event_id == version.event_id:
                    return stored.version
                log.info("version number taken by another writer; retrying", template=version.name)
        raise RequestFailed("ABORTED", f"name: too many concurrent writers for {draft.name}; retry")

    async def set_label(
        self, producer: AIOKafkaProducer, pointer: templates_pb2.LabelPointer
    ) -> templates_pb2.LabelPointer:
        async with self._write_lock:
            stored = templates_pb2.LabelPointer()
            stored.CopyFrom(pointer)
            stored.set_at.GetCurrentTime()
            offset = await self._produce(
                producer, label_key(stored), templates_pb2.TemplateEvent(label=stored)
            )
            await self._wait_applied(offset)
            return self.registry.pointer(stored.name, stored.label)
