"""After a load run, prove on the real topics that Sluice lost, doubled and leaked nothing.

A latency number means little if requests went missing under load, so every
Sluice run of the benchmarks ends here. For the request ids the load generator
saw accepted, it checks:

- exactly one completion on sluice.completions.v1 per (request_id, attempt), and
  at least one per request (the final one);
- exactly one ledger charge (kind COMPLETION) on sluice.usage.v1 per completed
  (request_id, attempt), read committed, as metering's consumers read it;
- a complete audit trail per request (received, redacted, assembled, completed,
  charged) whose hash chain the Audit service reports valid, and the chain over
  the run's sequence range verified by the Audit service's Verify;
- no planted raw PII, as bytes, in any record (key, value, headers) of any topic
  other than sluice.requests.v1: DLQ, tokens, audit, reply and changelog topics too.

Everything is read from `since_ms` on, so a long-lived broker's history is not
rescanned. Findings name planted strings by index, never by their text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from sluice import tls
from sluice.config import Settings, load_settings
from sluice.kafka_security import client_options
from sluice.topics import COMPLETIONS, REQUESTS, USAGE, Codec, load_plan
from sluice.v1 import audit_pb2, audit_pb2_grpc, billing_pb2

# The stages a finished, charged request leaves in the audit trail.
TRAIL_STAGES = frozenset({"received", "redacted", "assembled", "completed", "charged"})
# Where raw prompt text may legitimately live (short retention, before redaction).
RAW_TOPICS = frozenset({REQUESTS})
# Listing the first few offenders is enough to start looking; counts carry the rest.
SHOWN = 20
# The audit writer's consumer group: trails are judged once it has consumed everything.
AUDIT_GROUP = "sluice-audit"
# After the writer caught up, how long its index (a reader of sluice.audit.v1) may take at least.
INDEX_GRACE_S = 10.0


@dataclass
class LossReport:
    """Counts of what was checked and every kind of loss found (empty lists = none)."""

    requests: int = 0
    completions: int = 0
    charges: int = 0
    trails_complete: int = 0
    planted: int = 0  # distinct planted strings searched for (0: no PII scan)
    records_scanned: int = 0
    topics_scanned: int = 0
    chain_records_checked: int = 0
    # Whether the audit writer's group had consumed every committed record of its topics when
    # the trails were judged (else an incomplete trail may only be late), and how long that took.
    audit_caught_up: bool = True
    audit_wait_s: float = 0.0
    audit_behind: dict[str, int] = field(default_factory=dict)  # topic -> records not yet consumed
    chain_valid: bool = True
    chain_error: str = ""
    missing_completion: list[str] = field(default_factory=list)
    duplicate_completion: list[str] = field(default_factory=list)
    missing_charge: list[str] = field(default_factory=list)
    duplicate_charge: list[str] = field(default_factory=list)
    incomplete_trail: list[str] = field(default_factory=list)
    broken_trail: list[str] = field(default_factory=list)
    pii_leaks: list[str] = field(default_factory=list)

    @property
    def losses(self) -> int:
        """Every problem counted once; zero means the run lost, doubled and leaked nothing."""
        return (
            len(self.missing_completion)
            + len(self.duplicate_completion)
            + len(self.missing_charge)
            + len(self.duplicate_charge)
            + len(self.incomplete_trail)
            + len(self.broken_trail)
            + len(self.pii_leaks)
            + (0 if self.chain_valid else 1)
        )

    @property
    def ok(self) -> bool:
        return self.losses == 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, list):
                out[key] = {"count": len(value), "first": value[:SHOWN]}
        return out | {"losses": self.losses, "ok": self.ok}

    def summary(self) -> str:
        verdict = "zero loss" if self.ok else f"{self.losses} PROBLEMS"
        parts = [
            f"{self.requests} requests",
            f"{self.completions} completions",
            f"{self.charges} charges",
            f"{self.trails_complete} complete trails",
            (
                f"audit writer caught up in {self.audit_wait_s:.1f} s"
                if self.audit_caught_up
                else f"audit writer STILL BEHIND when judged ({self._behind()}): "
                "incomplete trails may be late, not lost"
            ),
            f"chain {'valid' if self.chain_valid else 'BROKEN'} ({self.chain_records_checked} records)",
            f"{self.records_scanned} records on {self.topics_scanned} topics scanned for "
            f"{self.planted} planted PII strings",
        ]
        problems = [
            f"{name} {len(items)}"
            for name, items in (
                ("missing completion", self.missing_completion),
                ("duplicate completion", self.duplicate_completion),
                ("missing charge", self.missing_charge),
                ("duplicate charge", self.duplicate_charge),
                ("incomplete trail", self.incomplete_trail),
                ("broken trail", self.broken_trail),
                ("PII leak", self.pii_leaks),
            )
            if items
        ]
        return f"loss audit: {verdict}: " + ", ".join(parts + problems)

    def _behind(self) -> str:
        return ", ".join(f"{topic} {n}" for topic, n in sorted(self.audit_behind.items())) or "unknown"


async def audit_run(
    settings: Settings,
    request_ids: Collection[str],
    planted: Sequence[str],
    *,
    since_ms: int,
    settle_s: float = 120.0,
    api_key: str | None = None,
) -> LossReport:
    """Check a finished run; waits up to `settle_s` for the pipeline to catch up."""
    wanted = set(request_ids)
    report = LossReport(requests=len(wanted), planted=len({text for text in planted if text}))
    deadline = time.monotonic() + settle_s
    codec = Codec(load_plan(settings.topics_file))
    completions, charges = await _ledger(settings, codec, wanted, since_ms, deadline)
    _judge_ledger(report, wanted, completions, charges)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    waited = time.monotonic()
    report.audit_behind = await audit_backlog(settings, deadline)
    report.audit_caught_up = not report.audit_behind
    report.audit_wait_s = time.monotonic() - waited
    if report.audit_caught_up:
        deadline = max(deadline, time.monotonic() + INDEX_GRACE_S)
    seqs = await _trails(settings, wanted, report, deadline, metadata)
    await _verify_chain(settings, seqs, report, metadata)
    await _scan_for_pii(settings, planted, since_ms, report)
    return report


# --- completions and ledger ---------------------------------------------------------


Key = tuple[str, int]


async def _ledger(
    settings: Settings, codec: Codec, wanted: set[str], since_ms: int, deadline: float
) -> tuple[Counter[Key], Counter[Key]]:
    """Completions and charges of `wanted` per (request_id, attempt), read committed."""
    completions: Counter[Key] = Counter()
    charges: Counter[Key] = Counter()
    consumer = committed_reader(settings, "sluice-loss-audit")
    await consumer.start()
    try:
        await assign_from(consumer, (COMPLETIONS, USAGE), since_ms)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    _count(codec, record, wanted, completions, charges)
            caught_up = await reached(consumer, ends)
            if caught_up and (_settled(wanted, completions, charges) or time.monotonic() > deadline):
                return completions, charges
            if caught_up:
                ends = await consumer.end_offsets(list(consumer.assignment()))
    finally:
        await consumer.stop()


def _count(
    codec: Codec,
    record: ConsumerRecord[bytes, bytes],
    wanted: set[str],
    completions: Counter[Key],
    charges: Counter[Key],
) -> None:
    event: Any = codec.decode(record.topic, record.value, content_type(record))
    env = event.envelope
    if env.request_id not in wanted:
        return
    if record.topic == COMPLETIONS:
        completions[(env.request_id, env.attempt)] += 1
    elif event.kind in (billing_pb2.CHARGE_KIND_COMPLETION, billing_pb2.CHARGE_KIND_UNSPECIFIED):
        charges[(env.request_id, env.attempt)] += 1


def _settled(wanted: set[str], completions: Counter[Key], charges: Counter[Key]) -> bool:
    finished = {rid for rid, _ in completions}
    return finished >= wanted and all(key in charges for key in completions)


def _judge_ledger(
    report: LossReport, wanted: set[str], completions: Counter[Key], charges: Counter[Key]
) -> None:
    report.completions = sum(completions.values())
    report.charges = sum(charges.values())
    finished = {rid for rid, _ in completions}
    report.missing_completion = sorted(wanted - finished)
    report.duplicate_completion = sorted(f"{r}#{a}" for (r, a), n in completions.items() if n > 1)
    report.missing_charge = sorted(f"{r}#{a}" for (r, a) in completions if (r, a) not in charges)
    report.duplicate_charge = sorted(f"{r}#{a}" for (r, a), n in charges.items() if n > 1)
    # A charge for an attempt that never completed is money without a cause.
    report.missing_completion += sorted(
        f"{r}#{a} (charged)" for (r, a) in charges if (r, a) not in completions
    )


def content_type(record: ConsumerRecord[bytes, bytes]) -> bytes | None:
    for name, value in record.headers or ():
        if name.lower() == "content-type":
            return bytes(value)
    return None


# --- audit trail ----------------------------------------------------------------------


async def audit_backlog(settings: Settings, deadline: float, group: str = AUDIT_GROUP) -> dict[str, int]:
    """Wait (until `deadline`) for the audit writer's group to consume every committed record.

    Returns what it has not consumed yet per topic ({} once caught up). A plain lag
    (end offset minus committed offset) cannot say this alone: on transactional topics
    a commit marker follows the last record, so a group that is done still shows a lag
    of one. Partitions that lag are therefore read from the group's offset on, read
    committed, and only real records count.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap, client_id="sluice-loss-audit-lag", **client_options(settings)
    )
    probe = committed_reader(settings, "sluice-loss-audit-lag")
    await admin.start()
    try:
        await probe.start()
        while True:
            behind = await _unconsumed(admin, probe, group)
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(1.0)
    finally:
        await probe.stop()
        await admin.close()


async def _unconsumed(admin: AIOKafkaAdminClient, probe: AIOKafkaConsumer, group: str) -> dict[str, int]:
    committed = {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
    if not committed:
        return {"(group has no committed offsets)": 1}
    ends = await probe.end_offsets(list(committed))  # read committed: the last stable offset
    lagging = {tp: ends[tp] for tp, offset in committed.items() if 0 <= offset < ends[tp]}
    behind: dict[str, int] = {}
    if not lagging:
        return behind
    probe.assign(list(lagging))
    for tp in lagging:
        probe.seek(tp, committed[tp])
    while not await reached(probe, lagging):
        for tp, records in (await probe.getmany(timeout_ms=500, max_records=5000)).items():
            waiting = sum(r.offset < lagging[tp] for r in records)
            if waiting:
                behind[tp.topic] = behind.get(tp.topic, 0) + waiting
    return behind


async def _trails(
    settings: Settings,
    wanted: set[str],
    report: LossReport,
    deadline: float,
    metadata: tuple[tuple[str, str], ...],
) -> list[int]:
    """GetTrail for every request until complete (or the deadline); returns the seqs seen."""
    pending = set(wanted)
    broken: dict[str, str] = {}
    seqs: list[int] = []
    gate = asyncio.Semaphore(16)
    async with tls.aio_channel(settings, settings.grpc_target("audit")) as channel:
        stub = audit_pb2_grpc.AuditStub(channel)

        async def check(request_id: str) -> None:
            async with gate:
                try:
                    trail = await stub.GetTrail(
                        audit_pb2.GetTrailRequest(request_id=request_id), metadata=metadata, timeout=30
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        return
                    raise
            stages = {record.stage for record in trail.records}
            if not trail.chain_valid:
                broken[request_id] = trail.chain_error
            if stages >= TRAIL_STAGES:
                pending.discard(request_id)
                seqs.extend(record.seq for record in trail.records)

        while pending:
            await asyncio.gather(*(check(rid) for rid in sorted(pending)))
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    report.trails_complete = len(wanted) - len(pending)
    report.incomplete_trail = sorted(pending)
    report.broken_trail = sorted(f"{rid}: {error}" for rid, error in broken.items())
    return seqs


async def _verify_chain(
    settings: Settings, seqs: list[int], report: LossReport, metadata: tuple[tuple[str, str], ...]
) -> None:
    """The Audit service re-hashes the run's span of the chain (from its index)."""
    if not seqs:
        return
    async with tls.aio_channel(settings, settings.grpc_target("audit")) as channel:
        result = await audit_pb2_grpc.AuditStub(channel).Verify(
            audit_pb2.VerifyRequest(
                from_seq=min(seqs), to_seq=max(seqs), source=audit_pb2.VERIFY_SOURCE_INDEX
            ),
            metadata=metadata,
            timeout=300,
        )
    report.chain_valid = result.valid
    report.chain_records_checked = result.records_checked
    report.chain_error = "" if result.valid else f"seq {result.broken_seq}: {result.error}"


# --- PII scan -------------------------------------------------------------------------


async def _scan_for_pii(
    settings: Settings, planted: Sequence[str], since_ms: int, report: LossReport
) -> None:
    """Every record of every topic but the raw one, up to the current end, as raw bytes."""
    needles = [(i, text.encode(), text.lower().encode()) for i, text in enumerate(planted) if text]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        **client_options(settings),
        enable_auto_commit=False,
        isolation_level="read_uncommitted",  # aborted transactions' records are on disk too
        client_id="sluice-loss-audit-pii",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        topics = sorted(t for t in await consumer.topics() if t not in RAW_TOPICS and not t.startswith("__"))
        report.topics_scanned = len(topics)
        await assign_from(consumer, topics, since_ms)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while not await reached(consumer, ends):
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    report.records_scanned += 1
                    report.pii_leaks.extend(_leaks(record, needles))
    finally:
        await consumer.stop()


def _leaks(record: ConsumerRecord[bytes, bytes], needles: Iterable[tuple[int, bytes, bytes]]) -> list[str]:
    parts = [record.key or b"", record.value or b"", *(bytes(v or b"") for _, v in record.headers or ())]
    blob = b"\x00".join(parts)
    lowered = blob.lower()
    return [
        f"{record.topic}[{record.partition}]@{record.offset}: planted[{i}]"
        for i, exact, folded in needles
        if exact in blob or folded in lowered
    ]


# --- shared consumer helpers ----------------------------------------------------------


def committed_reader(settings: Settings, client_id: str, **options: Any) -> AIOKafkaConsumer:
    """A group-less, read-committed consumer (not started): what Sluice's own consumers see."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        **client_options(settings),
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=client_id,
        **options,
    )


async def assign_from(consumer: AIOKafkaConsumer, topics: Iterable[str], since_ms: int) -> None:
    """Assign every partition of `topics` and seek to the first record at or after `since_ms`."""
    partitions = [
        TopicPartition(topic, p) for topic in topics for p in sorted(await _partitions(consumer, topic))
    ]
    consumer.assign(partitions)
    if not partitions:
        return
    found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
    ends = await consumer.end_offsets(partitions)
    for tp in partitions:
        at = found.get(tp)
        consumer.seek(tp, at.offset if at is not None else ends[tp])


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    known = consumer.partitions_for_topic(topic)
    if known is None:
        await consumer._client.force_metadata_update()  # first sight of a topic: fetch its metadata
        known = consumer.partitions_for_topic(topic)
    return set(known or ())


async def reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


# --- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=Path, required=True, help="file with one accepted request id a line")
    parser.add_argument("--pii", type=Path, help="file with one planted PII string a line")
    parser.add_argument("--since-ms", type=int, required=True, help="run start, Unix milliseconds")
    parser.add_argument("--settle-s", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]
    planted = [line.strip() for line in args.pii.read_text().splitlines()] if args.pii else []
    report = asyncio.run(
        audit_run(load_settings(), ids, planted, since_ms=args.since_ms, settle_s=args.settle_s)
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
