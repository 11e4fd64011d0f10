"""The per-hop breakdown and the audit catch-up wait against the real stack (real Kafka, services)."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from loadtest.loadgen import GrpcTarget, PromptMix, RunResult, run_load
from loadtest.loss_audit import audit_backlog, audit_run
from loadtest.stage_latency import AUDIT_APPEND, HOPS, TTFT, lag_peaks, stage_breakdown, summary_lines
from services.gateway.auth import demo_key_file
from sluice import tls
from sluice.stack import Stack

# Seed 3 at 1 rps for 3.5 s: three requests.
LOAD = {"rps": 1.0, "duration_s": 3.5, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
async def run(stack: Stack) -> tuple[RunResult, int, dict[str, int]]:
    """Three Generate calls (lag sampled meanwhile), audited to zero loss, and the run's start."""
    since_ms = int(time.time() * 1000) - 1000
    key = demo_key_file(stack.settings.state_dir).read_text().strip()
    target = GrpcTarget(
        stack.settings.grpc_target("gateway"), key, credentials=tls.channel_credentials(stack.settings)
    )
    async with lag_peaks(stack.settings.bootstrap, every_s=0.5) as peaks, target:
        result = await run_load(target, mix=PromptMix(max_tokens=6), **LOAD)  # type: ignore[arg-type]
    report = await audit_run(stack.settings, result.request_ids, [], since_ms=since_ms, settle_s=120)
    assert report.ok and report.audit_caught_up, report.as_dict()
    return result, since_ms, peaks


async def test_every_hop_of_every_request_is_measured(
    stack: Stack, run: tuple[RunResult, int, dict[str, int]]
) -> None:
    result, since_ms, peaks = run
    stages = await stage_breakdown(stack.settings, result, since_ms)
    assert stages["requests"] == 3 and stages["timestamp_types"] == ["CreateTime"]
    for name, *_ in HOPS:
        assert stages["hops"][name]["count"] == 3, name
    # Five audited stages per request, each matched to its source record.
    assert stages["hops"][AUDIT_APPEND]["count"] == 15
    # Whole TTFT = the sum of the hops before the client's first token (same records, same clock).
    ttft, hops = stages["hops"][TTFT], stages["hops"]
    assert ttft["count"] == 3 and ttft["max"] >= hops["inference first chunk"]["max"]
    assert stages["slowest_hop_p99"] in hops
    # The sampler saw the services' own groups (lag may well be 0 at this load).
    assert any(key.startswith("sluice-redaction / ") for key in peaks)
    text = "\n".join(summary_lines(stages, peaks))
    assert "redaction" in text and "consumer lag peaks" in text


async def test_a_request_the_topics_never_saw_counts_in_no_hop(
    stack: Stack, run: tuple[RunResult, int, dict[str, int]]
) -> None:
    result, since_ms, _ = run
    ghost = RunResult.from_dict(result.to_dict())
    ghost.records = ghost.records[:1]
    ghost.records[0].request_id = f"never-sent-{uuid.uuid4().hex}"
    stages = await stage_breakdown(stack.settings, ghost, since_ms)
    assert stages["requests"] == 1
    assert all(hop["count"] == 0 for name, hop in stages["hops"].items() if name != TTFT)


async def test_audit_backlog_counts_records_not_commit_markers(stack: Stack) -> None:
    """A group is caught up once it committed past its last record, though a marker follows it."""
    bootstrap = stack.settings.bootstrap
    topic, group = f"loadtest.backlog.{uuid.uuid4().hex[:8]}", f"loadtest-backlog-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"t-{group}")
    await producer.start()
    try:
        async with producer.transaction():
            sent = [await producer.send_and_wait(topic, b"x", partition=0) for _ in range(2)]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: sent[0].offset + 1})
        assert await audit_backlog(stack.settings, time.monotonic(), group=group) == {topic: 1}
        await consumer.commit({tp: sent[1].offset + 1})  # the commit marker is still after it
        assert await audit_backlog(stack.settings, time.monotonic(), group=group) == {}
    finally:
        await consumer.stop()
    missing = await audit_backlog(stack.settings, time.monotonic(), group=f"no-such-group-{uuid.uuid4().hex}")
    assert missing  # never judged caught up without evidence
