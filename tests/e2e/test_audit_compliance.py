"""What a compliance reviewer does with the CLI alone, against the real stack.

Reconstruct a request, list a user's requests with PII types and cost, prove the
chain intact, erase the user (content gone, proof intact), replay by time, and
catch tampering in the index and on the topic. The tests share one request and
run in file order; the forged-record test goes last because it breaks the chain.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from services.audit import chain
from services.audit.keys import KeyRing, load_master_key
from services.gateway.auth import demo_key_file
from sluice.identity import pseudonymous_user
from sluice.kafka import start_partition_reader
from sluice.stack import Stack
from sluice.topics import AUDIT, AUDIT_KEYS
from sluice.v1 import audit_pb2, audit_pb2_grpc, compliance_pb2, events_pb2

EMAIL = "jane.roe@example.com"
STAGES = ["received", "redacted", "assembled", "completed", "charged"]


def sluice(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def poll(what: str, attempts: int, check: Any) -> Any:
    """Audit is asynchronous: retry `check` until it returns something truthy."""
    for _ in range(attempts):
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def stub(stack: Stack) -> Iterator[audit_pb2_grpc.AuditStub]:
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as channel:
        yield audit_pb2_grpc.AuditStub(channel)


@pytest.fixture(scope="module")
def story(stack: Stack) -> Iterator[dict[str, str]]:
    """One request by a fresh user, for a tenant whose policy stores (redacted) content."""
    policy = Path(stack.settings.state_dir) / "audit" / "policies.yaml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text("tenants:\n  demo: {store_content: true}\n")
    user = f"alice-{uuid.uuid4().hex[:8]}"
    try:
        done = sluice(
            stack, "--json", "generate", "--user", user, "--max-tokens", "8", f"My email is {EMAIL}. Say hi."
        )
        request_id = lines(done)[0]["request_id"]

        def complete() -> bool:
            trail = sluice(stack, "audit", "trail", request_id, "--json")
            return trail.returncode == 0 and len(json.loads(trail.stdout)["records"]) == len(STAGES)

        poll("the full trail", 120, complete)
        yield {"user": user, "request_id": request_id}
    finally:
        policy.unlink()


def test_the_trail_tells_the_whole_story_with_redacted_content(stack: Stack, story: dict[str, str]) -> None:
    body = json.loads(sluice(stack, "audit", "trail", story["request_id"], "--json").stdout)
    assert body["chain_valid"] is True
    records = {r["stage"]: r for r in body["records"]}
    assert list(records) == STAGES
    # End-user ids are often emails: the trail keeps redaction's opaque id, never the raw one.
    assert records["received"]["user"] == pseudonymous_user("demo", story["user"]) != story["user"]
    assert story["user"] not in json.dumps(body)
    assert records["received"]["ingest_time"] and records["received"]["model"]
    key = demo_key_file(Path(stack.settings.state_dir)).read_text().strip()
    # The key id (a public part of the key) is recorded; the key and its secret part never are.
    assert records["received"]["api_key_id"] and key not in json.dumps(body)
    assert key.rsplit(".", 1)[-1] not in json.dumps(body)
    assert records["received"]["caller_address"].startswith(("ipv4:", "ipv6:"))  # the gateway's gRPC peer
    assert records["redacted"]["details"]["entities.EMAIL_ADDRESS"] == "1"
    assert records["redacted"]["content_state"] == "readable"
    content = records["redacted"]["content"]
    assert "Say hi." in content and EMAIL not in content
    assert int(records["charged"]["details"]["cost_nanos"]) > 0
    # The model's output, assembled from the (output-redacted) reply chunks, sealed with the completion.
    completed = records["completed"]
    assert completed["details"]["output"] == "stored" and completed["content_state"] == "readable"
    assert completed["content"].strip() and EMAIL not in completed["content"]
    assert completed["content_subject"] == records["redacted"]["content_subject"]


def test_query_lists_a_users_requests_with_pii_types_and_cost(stack: Stack, story: dict[str, str]) -> None:
    found = lines(sluice(stack, "--json", "audit", "query", "--user", story["user"], "--from", "2020-01-01"))
    assert [r["stage"] for r in found] == STAGES
    assert {r["request_id"] for r in found} == {story["request_id"]}
    by_entity = lines(
        sluice(stack, "--json", "audit", "query", "--user", story["user"], "--entity", "EMAIL_ADDRESS")
    )
    assert [r["stage"] for r in by_entity] == ["redacted"]
    paged = lines(sluice(stack, "--json", "audit", "query", "--user", story["user"], "--limit", "2", "--all"))
    assert paged == found
    first_page = sluice(stack, "--json", "audit", "query", "--user", story["user"], "--limit", "2")
    assert len(lines(first_page)) == 2 and "next page: --page-token " in first_page.stderr


def test_verify_proves_the_chain_from_the_index_and_from_the_topic(
    stack: Stack, story: dict[str, str]
) -> None:
    index = sluice(stack, "audit", "verify")
    assert index.returncode == 0, index.stdout + index.stderr
    assert "hash chain: valid" in index.stdout
    topic = json.loads(sluice(stack, "--json", "audit", "verify", "--source", "topic").stdout)
    assert topic["valid"] is True and int(topic["records_checked"]) >= len(STAGES)
    seq = json.loads(sluice(stack, "audit", "trail", story["request_id"], "--json").stdout)["records"][1][
        "seq"
    ]
    ranged = json.loads(
        sluice(stack, "--json", "audit", "verify", "--from-seq", str(seq), "--to-seq", str(seq)).stdout
    )
    assert ranged["valid"] is True and int(ranged["records_checked"]) == 1


def test_replay_from_a_timestamp_returns_exactly_the_records_from_then_on(
    stub: audit_pb2_grpc.AuditStub, story: dict[str, str]
) -> None:
    everything = [m.entry for m in stub.Replay(audit_pb2.ReplayRequest(from_offset=0))]
    assert len(everything) >= len(STAGES)
    middle = everything[len(everything) // 2]
    start = audit_pb2.ReplayRequest()
    start.from_time.FromMilliseconds(middle.timestamp_ms)
    replayed = [m.entry for m in stub.Replay(start)]
    last = everything[-1].offset
    expected = [(e.offset, e.record.hash) for e in everything if e.timestamp_ms >= middle.timestamp_ms]
    assert [(e.offset, e.record.hash) for e in replayed if e.offset <= last] == expected

    window = audit_pb2.ReplayRequest(request_id=story["request_id"])
    window.from_time.FromMilliseconds(0)
    mine = [m.entry for m in stub.Replay(window)]
    assert [e.record.stage for e in mine] == STAGES
    before_charge = audit_pb2.ReplayRequest(request_id=story["request_id"])
    before_charge.to_time.FromMilliseconds(mine[-1].timestamp_ms)
    assert [m.entry.record.stage for m in stub.Replay(before_charge)] == [
        e.record.stage for e in mine if e.timestamp_ms < mine[-1].timestamp_ms
    ]


def test_bad_filters_are_rejected_naming_the_field(stack: Stack, stub: audit_pb2_grpc.AuditStub) -> None:
    backwards = sluice(stack, "audit", "query", "--from", "2026-02-01", "--to", "2026-01-01")
    assert backwards.returncode == 1
    assert "INVALID_ARGUMENT: to_time: must be after from_time" in backwards.stderr
    assert (
        "INVALID_ARGUMENT: stage: unknown event type"
        in sluice(stack, "audit", "query", "--stage", "x").stderr
    )
    not_iso = sluice(stack, "audit", "query", "--from", "yesterday")
    assert "--from: 'yesterday' is not an ISO 8601 time" in not_iso.stderr
    for request, field in (
        (audit_pb2.QueryRequest(page_token="???"), "page_token: "),
        (audit_pb2.QueryRequest(page_size=5000), "page_size: "),
        (audit_pb2.QueryRequest(min_cost_nanos=5, max_cost_nanos=1), "max_cost_nanos: "),
        (audit_pb2.QueryRequest(finish_reason="exploded"), "finish_reason: "),
        (audit_pb2.QueryRequest(entity="email; drop"), "entity: "),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            stub.Query(request)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details().startswith(field)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Erase(audit_pb2.EraseRequest(tenant="demo"))
    assert failed.value.details() == "subject: must not be empty"


def test_completeness_reports_no_gap_for_a_finished_request(stack: Stack, story: dict[str, str]) -> None:
    done = sluice(stack, "--json", "audit", "verify", "--completeness", "--from", "2020-01-01")
    body = json.loads(done.stdout)
    assert int(body["requests_checked"]) >= 1
    assert story["request_id"] not in {i["request_id"] for i in body["incomplete"]}


def test_an_edited_index_row_is_found_and_reindex_repairs_it(stack: Stack, story: dict[str, str]) -> None:
    index = Path(stack.settings.state_dir) / "audit" / "index.sqlite"
    seq = json.loads(sluice(stack, "audit", "trail", story["request_id"], "--json").stdout)["records"][4][
        "seq"
    ]
    with sqlite3.connect(index) as db:
        body = db.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()[0]
        record = events_pb2.AuditRecord.FromString(body)
        record.details["cost_nanos"] = "1"  # someone makes a request look cheaper
        db.execute("UPDATE records SET body = ? WHERE seq = ?", (record.SerializeToString(), seq))
    broken = sluice(stack, "audit", "verify")
    assert broken.returncode == 5
    assert f"BROKEN at seq {seq}" in broken.stdout and "hash does not match its content" in broken.stdout

    rebuilt = sluice(stack, "audit", "reindex")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "index rebuilt from the topic" in rebuilt.stdout
    assert sluice(stack, "audit", "verify").returncode == 0


def test_erasure_shreds_content_everywhere_and_the_chain_still_verifies(
    stack: Stack, stub: audit_pb2_grpc.AuditStub, story: dict[str, str], tmp_path: Path
) -> None:
    user = story["user"]
    exported = tmp_path / "before.jsonl"
    assert sluice(stack, "audit", "export", "--user", user, "--output", str(exported)).returncode == 0
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    sealed = [row for row in rows if row.get("content")]
    assert [row["stage"] for row in sealed] == ["redacted", "completed"]  # the prompt and the output
    assert "Say hi." not in exported.read_text()  # exports hold ciphertext only
    assert "Say hi." in (open_exported(stack, sealed[0]) or "")
    assert open_exported(stack, sealed[1])

    erased = json.loads(sluice(stack, "--json", "audit", "erase", "--subject", user).stdout)
    assert erased["had_key"] is True

    def recorded() -> list[dict[str, Any]]:
        found = lines(sluice(stack, "--json", "audit", "query", "--user", user, "--stage", "compliance"))
        return found

    erasure = poll("the erasure record", 60, recorded)[0]
    assert erasure["details"] == {"action": "erased", "had_key": "true", "keys_destroyed": "1"}

    trail = json.loads(sluice(stack, "audit", "trail", story["request_id"], "--json").stdout)
    redacted = trail["records"][1]
    assert redacted["content_state"] == "erased" and "content" not in redacted
    assert trail["chain_valid"] is True
    queried = lines(sluice(stack, "--json", "audit", "query", "--user", user, "--stage", "redacted"))
    assert queried[0]["content_state"] == "erased" and "content" not in queried[0]
    replay = audit_pb2.ReplayRequest(request_id=story["request_id"], from_offset=0)
    assert {m.entry.content_state for m in stub.Replay(replay) if m.entry.record.content} == {
        audit_pb2.CONTENT_STATE_ERASED
    }
    assert open_exported(stack, sealed[0]) is None  # the export made before erasure is dead too
    assert open_exported(stack, sealed[1]) is None
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"export.{fmt}"
        done = sluice(stack, "audit", "export", "--user", user, "--format", fmt, "--output", str(out))
        assert done.returncode == 0, done.stderr
        assert b"Say hi." not in out.read_bytes()
    assert sluice(stack, "audit", "verify").returncode == 0
    assert sluice(stack, "audit", "verify", "--source", "topic").returncode == 0

    unknown = json.loads(
        sluice(stack, "--json", "audit", "erase", "--subject", f"nobody-{uuid.uuid4().hex}").stdout
    )
    assert unknown["had_key"] is False and unknown["erasure_id"]


def test_another_tenants_records_are_refused_and_the_attempt_audited(
    stack: Stack, stub: audit_pb2_grpc.AuditStub, story: dict[str, str]
) -> None:
    done = sluice(stack, "audit", "query", "--tenant", "acme")
    assert done.returncode == 1
    assert "PERMISSION_DENIED: tenant: a key of tenant 'demo' may not read tenant 'acme'" in done.stderr

    def audited() -> list[dict[str, Any]]:
        found = lines(sluice(stack, "--json", "audit", "query", "--stage", "compliance", "--all"))
        return [r for r in found if r["details"].get("requested_tenant") == "acme"]

    attempt = poll("the refused attempt in the chain", 60, audited)[0]
    assert attempt["tenant"] == "demo"
    assert attempt["details"] == {"action": "access_denied", "rpc": "Query", "requested_tenant": "acme"}
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetTrail(
            audit_pb2.GetTrailRequest(request_id=story["request_id"]),
            metadata=(("authorization", "Bearer sk-not-a-key"),),
        )
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert failed.value.details().startswith("authorization: ")


def test_zz_a_record_forged_onto_the_topic_is_pinpointed(
    stack: Stack, stub: audit_pb2_grpc.AuditStub, story: dict[str, str]
) -> None:
    """Last in the file: after this the session's chain is (rightly) broken."""
    genuine = stub.GetTrail(audit_pb2.GetTrailRequest(request_id=story["request_id"])).records[-1]
    forged = events_pb2.AuditRecord()
    forged.CopyFrom(genuine)
    forged.details["cost_nanos"] = "1"
    forged.hash = chain.record_hash(forged)  # self-consistent, so only the chain can tell
    offset = asyncio.run(_produce(stack.settings.bootstrap, forged))

    topic = sluice(stack, "audit", "verify", "--source", "topic")
    assert topic.returncode == 5
    assert f"BROKEN at seq {forged.seq} (offset {offset})" in topic.stdout

    def indexed() -> bool:
        return len(stub.GetTrail(audit_pb2.GetTrailRequest(request_id=story["request_id"])).records) > len(
            STAGES
        )

    poll("the forged record in the index", 60, indexed)
    trail = stub.GetTrail(audit_pb2.GetTrailRequest(request_id=story["request_id"]))
    assert not trail.chain_valid and "appears twice" in trail.chain_error
    assert f"(offset {offset})" in sluice(stack, "audit", "verify").stdout


def open_exported(stack: Stack, row: dict[str, Any]) -> str | None:
    """Decrypt an exported record as anyone holding the master key and the key topic could."""
    ring = KeyRing(load_master_key(None, Path(stack.settings.state_dir)))
    for value in asyncio.run(_key_topic(stack.settings.bootstrap)):
        ring.apply(compliance_pb2.SubjectKey.FromString(value))
    return ring.decrypt(row["content_subject"], row["content_key_id"], base64.b64decode(row["content"]))


async def _key_topic(bootstrap: str) -> list[bytes]:
    reader = await start_partition_reader(bootstrap, "audit", "test-keys", TopicPartition(AUDIT_KEYS, 0), 0)
    try:
        end = (await reader.end_offsets([TopicPartition(AUDIT_KEYS, 0)]))[TopicPartition(AUDIT_KEYS, 0)]
        values: list[bytes] = []
        while await reader.position(TopicPartition(AUDIT_KEYS, 0)) < end:
            for records in (await reader.getmany(timeout_ms=500)).values():
                values.extend(r.value for r in records if r.value is not None)
        return values
    finally:
        await reader.stop()


async def _produce(bootstrap: str, record: events_pb2.AuditRecord) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(AUDIT, record.SerializeToString(), key=record.request_id.encode())
        return int(sent.offset)
    finally:
        await producer.stop()
