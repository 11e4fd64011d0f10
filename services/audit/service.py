"""Audit: the sole writer of the hash-chained trail, and the service that answers for it.

The writer appends one record per lifecycle event to sluice.audit.v1 inside a
Kafka transaction with its input offsets, under a fixed transactional id, so
there is only ever one chain head. The SQLite index is built from the topic,
never from the writer's memory, so it can be rebuilt at any time. RPCs that
must change the trail (Erase) ask the writer through sluice.compliance.v1, so
the writer stays the only producer of the chain.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Gauge

from services.audit import chain
from services.audit.access import Denied, identify, scoped_tenant
from services.audit.chain_watch import ChainWatch
from services.audit.filters import (
    InvalidArgument,
    check_stage,
    encode_page_token,
    query_filter,
    time_range,
    user_filter,
)
from services.audit.keys import KeyRing, key_topic_key, load_master_key, subject_of
from services.audit.outputs import AUDIT_READ_INTERVAL_S, OutputCollector
from services.audit.policy import Policies
from services.audit.records import STAGES, audit_record, checkpoint_record
from services.audit.store import AuditStore, Incomplete, Row, is_dsn
from services.audit.topic_reader import AUDIT_PARTITION, read_audit_topic
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.identity import pseudonymous_user
from sluice.kafka import EventConsumer, Output, send, start_partition_reader, start_producer
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import AUDIT, AUDIT_ALERTS, AUDIT_KEYS, COMPLIANCE, TOKENS, load_plan
from sluice.v1 import audit_pb2, audit_pb2_grpc, compliance_pb2, events_pb2

log = get_logger()
KEYS_PARTITION = TopicPartition(AUDIT_KEYS, 0)
INCOMPLETE = Gauge(
    "sluice_audit_incomplete_requests",
    "Requests in the last completeness window whose trail misses a stage",
)
# Requests whose user the writer remembers, to seal a completion's output under the user's key.
USERS_CACHE = 100_000


def entry(
    ring: KeyRing, offset: int, record: events_pb2.AuditRecord, timestamp_ms: int = 0
) -> audit_pb2.AuditEntry:
    """A record with its content decrypted when the subject's key still exists."""
    out = audit_pb2.AuditEntry(record=record, offset=offset, timestamp_ms=timestamp_ms)
    if not record.content:
        out.content_state = audit_pb2.CONTENT_STATE_NONE
        return out
    plain = ring.decrypt(record.content_subject, record.content_key_id, record.content)
    if plain is None:
        out.content_state = audit_pb2.CONTENT_STATE_ERASED
    else:
        out.content_state, out.content = audit_pb2.CONTENT_STATE_READABLE, plain
    return out


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, audit: AuditService) -> None:
        self.audit = audit
        self.store = audit.store
        self.ring = audit.ring

    async def GetTrail(
        self, request: audit_pb2.GetTrailRequest, context: Context
    ) -> audit_pb2.GetTrailResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        caller = await identify(context, self.audit.settings, self.audit.settings.audit_require_auth)
        rows = [
            (offset, r) for offset, r in self.store.trail(request.request_id) if caller.may_read(r.tenant)
        ]
        if not rows:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"request_id: no audit records for {request.request_id}"
            )
        records = [record for _, record in rows]
        fault = chain.verify(records, self.store.by_seq)
        return audit_pb2.GetTrailResponse(
            records=records,
            chain_valid=fault is None,
            chain_error=fault or "",
            entries=[entry(self.ring, offset, record) for offset, record in rows],
        )

    async def _scope(self, context: Context, requested: str, rpc: str) -> str:
        """The tenant this call may see; another tenant's is refused, and the attempt audited."""
        caller = await identify(context, self.audit.settings, self.audit.settings.audit_require_auth)
        try:
            return scoped_tenant(caller, requested)
        except Denied as exc:
            await self.audit.record_denied(exc.caller, exc.requested, rpc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # abort raises; this keeps type checkers informed

    async def Query(self, request: audit_pb2.QueryRequest, context: Context) -> audit_pb2.QueryResponse:
        request.tenant = await self._scope(context, request.tenant, "Query")
        try:
            flt = query_filter(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rows, cursor = self.store.query(flt)
        return audit_pb2.QueryResponse(
            entries=[entry(self.ring, offset, record) for offset, record in rows],
            next_page_token=encode_page_token(cursor),
        )

    async def Replay(
        self, request: audit_pb2.ReplayRequest, context: Context
    ) -> AsyncIterator[audit_pb2.ReplayResponse]:
        request.tenant = await self._scope(context, request.tenant, "Replay")
        try:
            start, end = time_range(request)
            check_stage(request.stage)
            user = user_filter(request.tenant, request.user)
            if request.HasField("from_offset") and request.from_offset < 0:
                raise InvalidArgument("from_offset: must not be negative")
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wanted = {
            "tenant": request.tenant,
            "stage": request.stage,
            "request_id": request.request_id,
            "user": user,
        }
        async for message in read_audit_topic(
            self.audit.settings.bootstrap, from_offset=request.from_offset, from_ms=start, to_ms=end
        ):
            record = events_pb2.AuditRecord.FromString(message.value or b"")
            if all(not value or getattr(record, name) == value for name, value in wanted.items()):
                yield audit_pb2.ReplayResponse(
                    entry=entry(self.ring, message.offset, record, message.timestamp)
                )

    async def Verify(self, request: audit_pb2.VerifyRequest, context: Context) -> audit_pb2.VerifyResponse:
        if request.to_seq and request.to_seq < request.from_seq:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "to_seq: must not be below from_seq")
        try:
            if request.source == audit_pb2.VERIFY_SOURCE_TOPIC:
                walk = await self._walk_topic(request.from_seq, request.to_seq)
            else:
                # A long walk must not stall the writer: its own connection, in a thread.
                walk = await asyncio.to_thread(walk_index, self.store.path, request.from_seq, request.to_seq)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return audit_pb2.VerifyResponse(
            valid=walk.valid,
            records_checked=walk.checked,
            checkpoints_checked=walk.checkpoints,
            broken_seq=walk.broken_seq,
            broken_offset=walk.broken_offset if not walk.valid else 0,
            error=walk.error,
            head_hash=walk.prev_hash or "",
        )

    async def _walk_topic(self, from_seq: int, to_seq: int) -> chain.ChainWalk:
        walk = chain.ChainWalk()
        previous: events_pb2.AuditRecord | None = None
        started = False
        async for message in read_audit_topic(self.audit.settings.bootstrap):
            record = events_pb2.AuditRecord.FromString(message.value or b"")
            if not started:
                if from_seq > 1 and record.seq < from_seq:
                    previous = record
                    continue
                if from_seq > 1 and (previous is None or previous.seq != from_seq - 1):
                    raise InvalidArgument(f"from_seq: no record seq={from_seq - 1} to start after")
                walk.start_after(previous)
                started = True
            if to_seq and walk.expected_seq and walk.expected_seq > to_seq:
                break
            if not walk.feed(record, message.offset):
                break
        return walk

    async def CheckCompleteness(
        self, request: audit_pb2.CheckCompletenessRequest, context: Context
    ) -> audit_pb2.CheckCompletenessResponse:
        request.tenant = await self._scope(context, request.tenant, "CheckCompleteness")
        try:
            start, end = time_range(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        checked, missing = await asyncio.to_thread(_completeness, self.store.path, request.tenant, start, end)
        return audit_pb2.CheckCompletenessResponse(
            requests_checked=checked,
            incomplete=[
                audit_pb2.IncompleteRequest(
                    request_id=m.request_id,
                    tenant=m.tenant,
                    stages=m.stages,
                    missing=m.missing,
                    first_event_time=_rfc3339(m.first_ms),
                )
                for m in missing
            ],
        )

    async def Erase(self, request: audit_pb2.EraseRequest, context: Context) -> audit_pb2.EraseResponse:
        request.tenant = await self._scope(context, request.tenant, "Erase")
        if not request.tenant:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tenant: must not be empty")
        if not request.subject:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subject: must not be empty")
        erasure_id = await self.audit.request_erasure(request.tenant, request.subject)
        return audit_pb2.EraseResponse(had_key=erasure_id[1], erasure_id=erasure_id[0])

    async def Reindex(self, request: audit_pb2.ReindexRequest, context: Context) -> audit_pb2.ReindexResponse:
        return audit_pb2.ReindexResponse(records=await self.audit.indexer.rebuild())


def walk_index(path: Path | str, from_seq: int, to_seq: int) -> chain.ChainWalk:
    """Verify the indexed chain from `from_seq` (after its predecessor) to `to_seq` (0: the end)."""
    store = AuditStore(path)
    try:
        walk = chain.ChainWalk()
        start = 0
        if from_seq > 1:
            before = store.offset_of_seq(from_seq - 1)
            if before is None:
                raise InvalidArgument(f"from_seq: no record seq={from_seq - 1} to start after")
            start = before[0] + 1
            walk.start_after(before[1])
        else:
            walk.start_after(None)
        for offset, record in store.walk(start):
            if to_seq and walk.expected_seq and walk.expected_seq > to_seq:
                break
            if not walk.feed(record, offset):
                break
        return walk
    finally:
        store.close()


def _rfc3339(ms: int) -> str:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp.ToJsonString()


def _completeness(
    path: Path | str, tenant: str, start: int | None, end: int | None
) -> tuple[int, list[Incomplete]]:
    store = AuditStore(path)
    try:
        return store.completeness(tenant, start, end)
    finally:
        store.close()


class Indexer:
    """Follows sluice.audit.v1 into SQLite, resuming after the last indexed offset."""

    def __init__(self, bootstrap: str, store: AuditStore) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.caught_up = asyncio.Event()
        self._rebuilds: list[asyncio.Future[int]] = []

    async def rebuild(self) -> int:
        """Drop the index and read the topic again from offset 0; returns the records indexed."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._rebuilds.append(done)
        return await done

    async def run(self) -> None:
        consumer = await start_partition_reader(
            self.bootstrap, "audit", "sluice-audit-indexer", AUDIT_PARTITION, self.store.next_offset()
        )
        waiting: list[asyncio.Future[int]] = []
        try:
            end = (await consumer.end_offsets([AUDIT_PARTITION]))[AUDIT_PARTITION]
            while True:
                if self._rebuilds:
                    waiting, self._rebuilds = waiting + self._rebuilds, []
                    self.store.clear()
                    consumer.seek(AUDIT_PARTITION, 0)
                    end = (await consumer.end_offsets([AUDIT_PARTITION]))[AUDIT_PARTITION]
                    log.info("index rebuild started", end_offset=end)
                batches = await consumer.getmany(AUDIT_PARTITION, timeout_ms=200, max_records=2000)
                rows: list[Row] = [
                    (r.offset, events_pb2.AuditRecord.FromString(r.value or b""))
                    for r in batches.get(AUDIT_PARTITION, [])
                ]
                if rows:
                    self.store.add_many(rows)
                if await consumer.position(AUDIT_PARTITION) >= end:
                    self.caught_up.set()
                    for done in waiting:
                        if not done.done():
                            done.set_result(self.store.count())
                    waiting = []
        finally:
            await consumer.stop()


class KeyReader:
    """Folds the compacted key topic into the ring, so keys survive restarts."""

    def __init__(self, bootstrap: str, ring: KeyRing) -> None:
        self.bootstrap = bootstrap
        self.ring = ring
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        consumer = await start_partition_reader(
            self.bootstrap, "audit", "sluice-audit-keys", KEYS_PARTITION, 0
        )
        try:
            end = (await consumer.end_offsets([KEYS_PARTITION]))[KEYS_PARTITION]
            while True:
                batches = await consumer.getmany(KEYS_PARTITION, timeout_ms=200, max_records=1000)
                for record in batches.get(KEYS_PARTITION, []):
                    if record.value is None:  # a tombstone: the key is gone
                        self.ring.apply_tombstone((record.key or b"").decode())
                    else:
                        self.ring.apply(compliance_pb2.SubjectKey.FromString(record.value))
                if await consumer.position(KEYS_PARTITION) >= end:
                    self.caught_up.set()
        finally:
            await consumer.stop()


class CompletenessWatch:
    """Every interval, finds requests from the window before the grace period with a missing stage.

    Sets the gauge to how many there are, and sends one CompletenessAlert per
    request the first time it is found (this process remembers which it sent).
    """

    def __init__(self, store: AuditStore, interval_s: float, window_s: float, grace_s: float) -> None:
        self.store, self.interval_s, self.window_s, self.grace_s = store, interval_s, window_s, grace_s
        self._alerted: OrderedDict[str, None] = OrderedDict()

    def check(self, now_ms: int) -> list[audit_pb2.CompletenessAlert]:
        """The alerts not sent before, for the window ending `grace` before `now_ms`."""
        end = now_ms - int(self.grace_s * 1000)
        _, missing = _completeness(self.store.path, "", end - int(self.window_s * 1000), end)
        INCOMPLETE.set(len(missing))
        alerts = []
        for gap in missing:
            if gap.request_id in self._alerted:
                continue
            self._alerted[gap.request_id] = None
            if len(self._alerted) > USERS_CACHE:
                self._alerted.popitem(last=False)
            first = Timestamp()
            first.FromMilliseconds(gap.first_ms)
            alerts.append(
                audit_pb2.CompletenessAlert(
                    envelope=envelopes.new_envelope(
                        request_id=gap.request_id, tenant=gap.tenant, producer="audit"
                    ),
                    stages=gap.stages,
                    missing=gap.missing,
                    first_event_time=first,
                    grace_s=int(self.grace_s),
                )
            )
        return alerts

    async def run(self, producer: Callable[[], AIOKafkaProducer | None]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            alerts = await asyncio.to_thread(self.check, int(time.time() * 1000))
            sender = producer()
            for alert in alerts:
                log.warning(
                    "audit completeness alert",
                    request_id=alert.envelope.request_id,
                    missing=list(alert.missing),
                )
                if sender is not None:
                    await send(sender, "audit", Output(AUDIT_ALERTS, alert, alert.envelope.request_id))


class RetentionSweep:
    """Every interval, asks the writer to shred the content keys past each tenant's retention."""

    def __init__(self, audit: AuditService, interval_s: float) -> None:
        self.audit, self.interval_s = audit, interval_s

    def due(self, now_s: float) -> list[compliance_pb2.ComplianceEvent]:
        """One expiry request per tenant that has expired keys at `now_s`."""
        as_of = Timestamp()
        as_of.FromMilliseconds(int(now_s * 1000))
        return [
            compliance_pb2.ComplianceEvent(
                envelope=envelopes.new_envelope(
                    request_id=f"expiry-{uuid.uuid4().hex}", tenant=tenant, producer="audit"
                ),
                expired=compliance_pb2.ContentExpired(retention_s=retention_s, as_of=as_of),
            )
            for tenant, retention_s in self.audit.policies.with_retention().items()
            if self.audit.ring.expired(tenant, retention_s, now_s)
        ]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            producer = self.audit._producer
            if producer is None:
                continue
            for event in self.due(self.audit.clock()):
                await send(producer, "audit", Output(COMPLIANCE, event, event.envelope.tenant))
                log.info("content retention passed; keys to shred", tenant=event.envelope.tenant)


class AuditService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "audit"
        self.transactional_id = "sluice-audit-writer"
        self.store = open_index(settings)
        self.indexer = Indexer(settings.bootstrap, self.store)
        self.ring = KeyRing(
            load_master_key(settings.audit_master_key, settings.state_dir), settings.audit_key_period_s
        )
        self.keys = KeyReader(settings.bootstrap, self.ring)
        self.policies = Policies(
            settings.audit_policies_file or settings.state_dir / "audit" / "policies.yaml"
        )
        self.outputs = OutputCollector(
            settings.bootstrap,
            load_plan(settings.topics_file).topics[TOKENS].partitions,
            lambda tenant: self.policies.for_tenant(tenant).store_content,
            settings.audit_output_lookback_s,
        )
        # The writer's clock: it decides a content key's period (tests move it).
        self.clock: Callable[[], float] = time.time
        self._users: OrderedDict[str, str] = OrderedDict()
        self._head: tuple[int, str] = (0, chain.GENESIS)
        self._since_checkpoint = 0
        self._producer: AIOKafkaProducer | None = None

    async def prepare(self) -> None:
        self.policies.check()

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
                AuditServicer(self),
                audit_pb2_grpc.add_AuditServicer_to_server,
            )
        ]

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        watch = CompletenessWatch(
            self.store,
            self.settings.audit_completeness_interval_s,
            self.settings.audit_completeness_window_s,
            self.settings.audit_completeness_grace_s,
        )
        sweep = RetentionSweep(self, self.settings.audit_retention_interval_s)
        return [
            self._indexer_task,
            self._keys_task,
            self._outputs_task,
            asyncio.create_task(watch.run(lambda: self._producer), name="audit-completeness"),
            asyncio.create_task(sweep.run(), name="audit-retention"),
            asyncio.create_task(
                ChainWatch(self.store.path, self.settings.audit_completeness_interval_s).run(),
                name="audit-chain-watch",
            ),
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        # The chain head must come from everything already committed before we append,
        # and the key ring from every key, so a subject never gets two live keys.
        self._indexer_task = asyncio.create_task(self.indexer.run(), name="audit-indexer")
        self._keys_task = asyncio.create_task(self.keys.run(), name="audit-keys")
        self._outputs_task = asyncio.create_task(self.outputs.run(), name="audit-outputs")
        await self.indexer.caught_up.wait()
        await self.keys.caught_up.wait()
        head = self.store.head()
        if head is not None:
            self._head = (head.seq, head.hash)
        self._producer = await start_producer(self.settings.bootstrap, "audit")
        log.info("chain head recovered", seq=self._head[0])
        # One transaction per poll, not per record: a transaction costs several broker round
        # trips (and aiokafka backs off 100 ms when the previous one's markers are still being
        # written), so per-record transactions held the writer to about ten records a second.
        # The chain is unchanged: records are sealed in poll order, and a failed poll's
        # transaction is retried with the same sealed records (EventConsumer._produce_batch).
        return [
            runtime.consumer(
                sorted(STAGES),
                self.append,
                transactional=True,
                batch_transactions=True,
                # Off the caller's path: a poll per 100 ms at most, not a fetch per record.
                poll_interval_s=AUDIT_READ_INTERVAL_S,
            )
        ]

    async def append(self, event: Message, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        outputs: list[Output] = []
        unsealed = audit_record(event, record)
        if unsealed.user and unsealed.request_id:
            self._remember_user(unsealed.request_id, unsealed.user)
        if isinstance(event, events_pb2.RequestRedacted):
            prompt = [{"role": m.role, "content": m.content} for m in event.messages]
            outputs.extend(
                self._store_content(unsealed, unsealed.user, json.dumps(prompt, ensure_ascii=False))
            )
        elif isinstance(event, events_pb2.CompletionFinished):
            outputs.extend(await self._store_output(unsealed, event))
        elif isinstance(event, compliance_pb2.ComplianceEvent):
            destroyed = self._shred(event)
            if destroyed is not None:
                unsealed.details["keys_destroyed"] = str(len(destroyed))
                outputs.extend(Output(AUDIT_KEYS, k, key_topic_key(k.subject, k.period)) for k in destroyed)
        outputs.append(self._seal(unsealed))
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.settings.audit_checkpoint_every:
            head = outputs[-1].event
            assert isinstance(head, events_pb2.AuditRecord)
            outputs.append(self._seal(checkpoint_record(head, self._since_checkpoint)))
            self._since_checkpoint = 0
        return outputs

    def _shred(self, event: compliance_pb2.ComplianceEvent) -> list[compliance_pb2.SubjectKey] | None:
        """Key-topic entries destroying what an erasure or an expiry names; None for other actions."""
        action = event.WhichOneof("action")
        if action == "erased":
            return self.ring.destroy(subject_of(event.envelope.tenant, event.erased.subject))
        if action == "expired":
            as_of_s = event.expired.as_of.ToMilliseconds() / 1000
            return self.ring.destroy_expired(event.envelope.tenant, event.expired.retention_s, as_of_s)
        return None

    def _seal(self, unsealed: events_pb2.AuditRecord) -> Output:
        seq, prev_hash = self._head
        sealed = chain.seal(unsealed, seq + 1, prev_hash)
        self._head = (sealed.seq, sealed.hash)
        return Output(AUDIT, sealed, sealed.request_id, AUDIT_PARTITION.partition)

    def _remember_user(self, request_id: str, user: str) -> None:
        self._users[request_id] = user
        self._users.move_to_end(request_id)
        if len(self._users) > USERS_CACHE:
            self._users.popitem(last=False)

    def _store_content(self, record: events_pb2.AuditRecord, user: str, plain: str) -> list[Output]:
        """Encrypt content under the user's key for this period, if the tenant's policy keeps content."""
        if not self.policies.for_tenant(record.tenant).store_content:
            return []
        subject = subject_of(record.tenant, user)
        key, new_entry = self.ring.key_for(subject, self.clock())
        record.content_subject = subject
        record.content_key_id, record.content = key.key_id, self.ring.encrypt(key, plain)
        return [] if new_entry is None else [Output(AUDIT_KEYS, new_entry, key.topic_key)]

    async def _store_output(
        self, record: events_pb2.AuditRecord, event: events_pb2.CompletionFinished
    ) -> list[Output]:
        """Seal the attempt's output-redacted text (from the reply chunks) with its completion."""
        if not self.policies.for_tenant(record.tenant).store_content:
            return []
        output = None
        if event.reply_to.topic:
            output = await self.outputs.take(
                event.envelope.request_id, event.envelope.attempt, event.reply_to.partition
            )
        if output is None:
            record.details["output"] = "unavailable"
            return []
        record.details["output"] = "stored"
        user = self._users.get(record.request_id)
        if user is None:
            user = self.store.user_of(record.request_id)
        return self._store_content(record, user, output)

    async def record_denied(self, caller: str, requested: str, rpc: str) -> None:
        """A refused cross-tenant read goes into the chain like any other event."""
        assert self._producer is not None, "a call before the service connected"
        event = compliance_pb2.ComplianceEvent(
            envelope=envelopes.new_envelope(
                request_id=f"denied-{uuid.uuid4().hex}", tenant=caller, producer="audit"
            ),
            denied=compliance_pb2.AccessDenied(rpc=rpc, requested_tenant=requested),
        )
        await send(self._producer, "audit", Output(COMPLIANCE, event, caller))
        log.warning("cross-tenant audit read refused", tenant=caller, requested_tenant=requested, rpc=rpc)

    async def request_erasure(self, tenant: str, user: str) -> tuple[str, bool]:
        """Forget the key here at once, then have the writer destroy it for good and chain the erasure."""
        assert self._producer is not None, "erasure before the service connected"
        user = pseudonymous_user(tenant, user)
        subject = subject_of(tenant, user)
        had_key = self.ring.forget(subject)
        erasure_id = f"erasure-{uuid.uuid4().hex}"
        event = compliance_pb2.ComplianceEvent(
            envelope=envelopes.new_envelope(
                request_id=erasure_id, tenant=tenant, attempt=1, producer="audit"
            ),
            erased=compliance_pb2.SubjectErased(subject=user, had_key=had_key),
        )
        await send(self._producer, "audit", Output(COMPLIANCE, event, subject))
        log.info("erasure requested", erasure_id=erasure_id, had_key=had_key)
        return erasure_id, had_key

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        self.store.close()


def open_index(settings: Settings) -> AuditStore:
    """SQLite under the state dir, or PostgreSQL when SLUICE_AUDIT_INDEX_DSN names one."""
    dsn = settings.audit_index_dsn
    if not dsn:
        return AuditStore(settings.state_dir / "audit" / "index.sqlite")
    if not is_dsn(dsn):
        raise SystemExit("SLUICE_AUDIT_INDEX_DSN: must be a postgresql:// DSN")
    try:
        return AuditStore(dsn)
    except Exception as exc:  # the driver's errors vary; the operator needs the setting and the reason
        raise SystemExit(f"SLUICE_AUDIT_INDEX_DSN: cannot open the index: {type(exc).__name__}") from None


def build(settings: Settings) -> Service:
    return AuditService(settings)
