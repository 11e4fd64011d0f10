"""Audit: the sole writer of the hash-chained trail, and the service that answers for it.

The writer appends one record per lifecycle event to sluice.audit.v1 inside a
Kafka transaction with its input offsets, under a fixed transactional id, so
there is only ever one chain head. The SQLite index is built from the topic,
never from the writer's memory, so it can be rebuilt at any time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from aiokafka import ConsumerRecord, TopicPartition

from services.audit import chain
from services.audit.records import STAGES, audit_record
from services.audit.store import AuditStore
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output, start_partition_reader
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import AUDIT
from sluice.v1 import audit_pb2, audit_pb2_grpc, events_pb2

log = get_logger()
AUDIT_PARTITION = TopicPartition(AUDIT, 0)


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, store: AuditStore) -> None:
        self.store = store

    async def GetTrail(
        self, request: audit_pb2.GetTrailRequest, context: Context
    ) -> audit_pb2.GetTrailResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        records = self.store.trail(request.request_id)
        if not records:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"request_id: no audit records for {request.request_id}"
            )
        fault = chain.verify(records, self.store.by_seq)
        return audit_pb2.GetTrailResponse(records=records, chain_valid=fault is None, chain_error=fault or "")


class Indexer:
    """Follows sluice.audit.v1 into SQLite, resuming after the last indexed offset."""

    def __init__(self, bootstrap: str, store: AuditStore) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        consumer = await start_partition_reader(
            self.bootstrap, "audit", "sluice-audit-indexer", AUDIT_PARTITION, self.store.next_offset()
        )
        try:
            end = (await consumer.end_offsets([AUDIT_PARTITION]))[AUDIT_PARTITION]
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for record in batches.get(AUDIT_PARTITION, []):
                    self.store.add(events_pb2.AuditRecord.FromString(record.value or b""), record.offset)
                if not self.caught_up.is_set() and await consumer.position(AUDIT_PARTITION) >= end:
                    self.caught_up.set()
        finally:
            await consumer.stop()


class AuditService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "audit"
        self.transactional_id = "sluice-audit-writer"
        self.store = AuditStore(settings.state_dir / "audit" / "index.sqlite")
        self.indexer = Indexer(settings.bootstrap, self.store)
        self._head: tuple[int, str] = (0, chain.GENESIS)

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
                AuditServicer(self.store),
                audit_pb2_grpc.add_AuditServicer_to_server,
            )
        ]

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        return [self._indexer_task]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        # The chain head must come from everything already committed before we append.
        self._indexer_task = asyncio.create_task(self.indexer.run(), name="audit-indexer")
        await self.indexer.caught_up.wait()
        head = self.store.head()
        if head is not None:
            self._head = (head.seq, head.hash)
        log.info("chain head recovered", seq=self._head[0])
        return [runtime.consumer(sorted(STAGES), self.append, transactional=True)]

    async def append(self, event: object, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        seq, prev_hash = self._head
        sealed = chain.seal(audit_record(event, record), seq + 1, prev_hash)  # type: ignore[arg-type]
        self._head = (sealed.seq, sealed.hash)
        return [Output(AUDIT, sealed, sealed.request_id, AUDIT_PARTITION.partition)]

    async def close(self) -> None:
        self.store.close()


def build(settings: Settings) -> Service:
    return AuditService(settings)
