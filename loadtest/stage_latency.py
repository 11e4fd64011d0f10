"""Where a Sluice request's time goes: per-hop delays from Kafka record timestamps, and consumer lag.

Added latency says how much Sluice costs, not which stage costs it. Every stage
writes its output record with the producer's timestamp (CreateTime), so one
request's records on sluice.requests.v1, sluice.redacted.v1, sluice.prompts.v1,
its first token chunk on sluice.tokens.v1, sluice.completions.v1,
sluice.usage.v1 and sluice.audit.v1, plus the load generator's own send and
first-token times (same machine, same clock), give the delay of each hop: the
consuming stage's poll wait, its work, and its produce. Percentiles per hop
point at the stage that limits the run; the peak lag of each consumer group,
sampled while the load runs, says whether a stage was merely slow or fell behind.

Timestamps are milliseconds, so a hop of a few ms is near the resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord

from loadtest.loadgen.records import RunResult
from loadtest.loss_audit import assign_from, committed_reader, content_type, reached
from loadtest.report import percentiles
from sluice.config import Settings
from sluice.lag import LagReader
from sluice.topics import (
    AUDIT,
    COMPLETIONS,
    PROMPTS,
    REDACTED,
    REQUESTS,
    TOKENS,
    USAGE,
    BadEvent,
    Codec,
    load_plan,
)
from sluice.v1 import billing_pb2, events_pb2

# Marks a request passes; Kafka topics are marked by the first record of the request on them.
SENT = "client send"
FIRST_CHUNK = "first token chunk"
FIRST_TOKEN = "client first token"
CHARGE_AUDITED = "charge audited"
# (hop, from mark, to mark, what the hop covers)
HOPS: tuple[tuple[str, str, str, str], ...] = (
    ("gateway", SENT, REQUESTS, "gRPC call, auth, validation, publish of the request"),
    ("redaction", REQUESTS, REDACTED, "redaction's poll wait, analysis (none when off), publish"),
    ("prompts", REDACTED, PROMPTS, "prompts' poll wait, template and token budget, publish"),
    ("inference first chunk", PROMPTS, FIRST_CHUNK, "worker's poll wait, upstream TTFT, first chunk"),
    ("reply to client", FIRST_CHUNK, FIRST_TOKEN, "gateway's reply reader and the gRPC stream"),
    ("stream to completion", FIRST_CHUNK, COMPLETIONS, "the rest of the answer (upstream spacing)"),
    ("metering", COMPLETIONS, USAGE, "metering's poll wait, pricing, ledger transaction"),
    ("audit of the charge", USAGE, CHARGE_AUDITED, "audit writer's wait and transaction"),
)
# Every audit record against its own source record (all stages of the run's requests).
AUDIT_APPEND = "audit append (every stage)"
TTFT = "TTFT (client)"
TIMESTAMP_TYPES = {0: "CreateTime", 1: "LogAppendTime"}
TOPICS = (REQUESTS, REDACTED, PROMPTS, TOKENS, COMPLETIONS, USAGE, AUDIT)


@dataclass
class _Marks:
    """What the topics told us, collected in any order and joined at the end."""

    wanted: set[str]
    at: dict[str, dict[str, int]] = field(default_factory=dict)  # request_id -> mark -> ms
    sources: dict[tuple[str, int, int], int] = field(default_factory=dict)  # coordinates -> ms
    audited: list[tuple[tuple[str, int, int], int]] = field(default_factory=list)
    timestamp_types: set[str] = field(default_factory=set)

    def mark(self, request_id: str, name: str, ms: int) -> None:
        self.at.setdefault(request_id, {}).setdefault(name, ms)  # the first record counts

    def take(self, codec: Codec, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event: Any = codec.decode(record.topic, record.value, content_type(record))
        except BadEvent:
            return
        self.timestamp_types.add(TIMESTAMP_TYPES.get(record.timestamp_type, str(record.timestamp_type)))
        if isinstance(event, events_pb2.AuditRecord):
            if event.request_id in self.wanted:
                source = (event.source_topic, event.source_partition, event.source_offset)
                self.audited.append((source, record.timestamp))
                if event.stage == "charged":
                    self.mark(event.request_id, CHARGE_AUDITED, record.timestamp)
            return
        request_id = event.envelope.request_id
        if request_id not in self.wanted:
            return
        if record.topic == TOKENS:
            if event.WhichOneof("body") == "chunk":
                self.mark(request_id, FIRST_CHUNK, record.timestamp)
            return
        if record.topic == USAGE and event.kind not in (
            billing_pb2.CHARGE_KIND_COMPLETION,
            billing_pb2.CHARGE_KIND_UNSPECIFIED,
        ):
            return
        self.sources[(record.topic, record.partition, record.offset)] = record.timestamp
        self.mark(request_id, record.topic, record.timestamp)


async def stage_breakdown(settings: Settings, result: RunResult, since_ms: int) -> dict[str, Any]:
    """Per-hop delay percentiles (ms) of `result`'s requests, read from the topics from `since_ms` on.

    Run it after the pipeline has caught up (after the loss audit), or late hops are short of samples.
    """
    client = {
        r.request_id: (result.started_unix + r.sent_s, r.ttft_s)
        for r in result.records
        if r.request_id and r.ok
    }
    marks = _Marks(set(client))
    for request_id, (sent_unix, ttft_s) in client.items():
        marks.mark(request_id, SENT, round(sent_unix * 1000))
        if ttft_s is not None:
            marks.mark(request_id, FIRST_TOKEN, round((sent_unix + ttft_s) * 1000))
    await _read(settings, marks, since_ms)
    hops: dict[str, dict[str, Any]] = {}
    for name, start, end, covers in HOPS:
        delays = [m[end] - m[start] for m in marks.at.values() if start in m and end in m]
        hops[name] = {"from": start, "to": end, "covers": covers, **percentiles(delays)}
    appended = [ms - marks.sources[src] for src, ms in marks.audited if src in marks.sources]
    hops[AUDIT_APPEND] = {"from": "each source record", "to": AUDIT, "covers": "", **percentiles(appended)}
    ttft = [m[FIRST_TOKEN] - m[SENT] for m in marks.at.values() if FIRST_TOKEN in m]
    hops[TTFT] = {"from": SENT, "to": FIRST_TOKEN, "covers": "the whole TTFT", **percentiles(ttft)}
    return {
        "requests": len(client),
        "timestamp_types": sorted(marks.timestamp_types),
        "hops": hops,
        "slowest_hop_p99": _slowest(hops),
    }


def _slowest(hops: dict[str, dict[str, Any]]) -> str | None:
    """The Sluice hop with the highest p99 (the whole TTFT and the upstream-bound stream left out)."""
    own = {
        name: h["p99"]
        for name, h in hops.items()
        if name not in (TTFT, "stream to completion") and h["p99"] is not None
    }
    return max(own, key=lambda n: own[n]) if own else None


async def _read(settings: Settings, marks: _Marks, since_ms: int) -> None:
    codec = Codec(load_plan(settings.topics_file))
    consumer = committed_reader(settings, "sluice-loadtest-stages", max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        await assign_from(consumer, TOPICS, since_ms)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while not await reached(consumer, ends):
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                for record in records:
                    marks.take(codec, record)
    finally:
        await consumer.stop()


# --- consumer lag ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lag_peaks(bootstrap: str | None, every_s: float = 1.0) -> AsyncIterator[dict[str, int]]:
    """Samples every consumer group's lag while the block runs; yields the peaks, filled in as it goes.

    Keys are "group / topic". On transactional topics a lag of one per partition is
    only a commit marker, not a record waiting. Without a `bootstrap` nothing is sampled.
    """
    peaks: dict[str, int] = {}
    if bootstrap is None:
        yield peaks
        return
    stop = asyncio.Event()
    task = asyncio.create_task(_sample(bootstrap, every_s, peaks, stop))
    try:
        yield peaks
    finally:
        stop.set()
        await task


async def _sample(bootstrap: str, every_s: float, peaks: dict[str, int], stop: asyncio.Event) -> None:
    reader = LagReader(bootstrap, client_id="sluice-bench-lag")
    await reader.start()
    try:
        while not stop.is_set():
            for group in await reader.groups():
                for row in await reader.lag(group):
                    key = f"{row.group} / {row.topic}"
                    peaks[key] = max(peaks.get(key, 0), row.lag)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    finally:
        await reader.close()


def top_lags(peaks: dict[str, int], n: int = 6) -> list[tuple[str, int]]:
    return sorted(((k, v) for k, v in peaks.items() if v > 0), key=lambda kv: kv[1], reverse=True)[:n]


# --- terminal -------------------------------------------------------------------------


def summary_lines(stages: dict[str, Any], peaks: dict[str, int] | None = None) -> list[str]:
    """The breakdown as terminal lines: one per hop, then the lag peaks."""
    kinds = "/".join(stages["timestamp_types"]) or "no records"
    lines = [f"per-hop delay, ms (p50 / p99 / n), from Kafka {kinds} timestamps:"]
    width = max(len(name) for name in stages["hops"])
    for name, hop in stages["hops"].items():
        lines.append(
            f"  {name:<{width}}  {_ms(hop['p50'])} / {_ms(hop['p99'])} / {int(hop['count'])}"
            f"   ({hop['from']} -> {hop['to']})"
        )
    if stages.get("slowest_hop_p99"):
        lines.append(f"  slowest Sluice hop at p99: {stages['slowest_hop_p99']}")
    if peaks is not None:
        top = top_lags(peaks)
        lags = ", ".join(f"{k} {v}" for k, v in top) if top else "none above 0"
        lines.append(f"  consumer lag peaks (group / topic): {lags}")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
