"""API keys on sluice.keys.v1: made once, stored only as salted hashes, revoked everywhere."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.gateway import keys
from services.gateway.auth import KeyStore, demo_key_file, seed_local_keys
from sluice.stack import Stack
from sluice.topics import KEYS
from sluice.v1 import audit_pb2, audit_pb2_grpc, redaction_pb2, redaction_pb2_grpc
from tests.gateway.conftest import create_key, eventually, first_of, generate, rejected, request, sluice


def test_a_key_names_its_id_and_only_a_salted_hash_is_kept() -> None:
    key_id, key = keys.new_key()
    assert keys.key_id_of(key) == key_id and len(key_id) == 12
    one = keys.key_record(key_id=key_id, inner_digest=keys.digest(key), tenant="acme")
    two = keys.key_record(key_id=key_id, inner_digest=keys.digest(key), tenant="acme")
    assert one.salt != two.salt and one.key_hash != two.key_hash  # per-key salt
    for record in (one, two):
        assert keys.matches(record, key)
        assert not keys.matches(record, key + "x")
        stored = record.SerializeToString()
        assert key.encode() not in stored
        assert key.split(".", 1)[1].encode() not in stored
        assert hashlib.sha256(key.encode()).digest() not in stored  # not even the unsalted digest


def test_an_older_key_is_named_by_its_digest_like_metering_did() -> None:
    legacy = "sk-sluice-demo-abcdefghijklmnopqrstuvwxyz"
    assert keys.key_id_of(legacy) == hashlib.sha256(legacy.encode()).hexdigest()[:12]


async def _records_on_topic(bootstrap: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(KEYS, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def _loaded_store(bootstrap: str) -> tuple[KeyStore, asyncio.Task[None]]:
    store = KeyStore(bootstrap)
    task = asyncio.create_task(store.run())
    await store.ready.wait()
    return store, task


def test_demo_seeding_writes_once_and_migrates_tenants_json(topics_ready: str, tmp_path: Path) -> None:
    legacy_key = "sk-sluice-acme-from-before-the-topic-0123456789"
    legacy_digest = hashlib.sha256(legacy_key.encode()).hexdigest()
    (tmp_path / "tenants.json").write_text(json.dumps({legacy_digest: "acme-legacy"}))

    async def scenario() -> None:
        store, task = await _loaded_store(topics_ready)
        await seed_local_keys(store, tmp_path)
        after_first = await _records_on_topic(topics_ready)
        demo = demo_key_file(tmp_path).read_text().strip()
        assert oct(demo_key_file(tmp_path).stat().st_mode)[-3:] == "600"
        # A restarted gateway (a fresh store reading the topic) writes nothing new.
        again, again_task = await _loaded_store(topics_ready)
        await seed_local_keys(again, tmp_path)
        assert await _records_on_topic(topics_ready) == after_first
        assert demo_key_file(tmp_path).read_text().strip() == demo
        for live in (store, again):
            demo_caller = eventually("demo key", lambda s=live: s.lookup(f"Bearer {demo}"), 10)
            assert demo_caller.tenant == "demo" and demo_caller.role == "user"
            migrated = live.lookup(f"Bearer {legacy_key}")
            assert migrated is not None and migrated.tenant == "acme-legacy"
            assert migrated.key_id == legacy_digest[:12]
        for t in (task, again_task):
            t.cancel()
        await asyncio.gather(task, again_task, return_exceptions=True)

    asyncio.run(scenario())
    assert not (tmp_path / "tenants.json").exists()
    assert (tmp_path / "tenants.json.migrated").exists()


def test_cli_creates_lists_and_revokes_and_every_service_follows(stack: Stack, channel: grpc.Channel) -> None:
    created = create_key(stack, "tenant-revoke", "--description", "for the revocation test")
    key, key_id = created["api_key"], created["key_id"]
    assert key.startswith("sk-sluice-") and keys.key_id_of(key) == key_id

    first, call = first_of(channel, key, request(max_tokens=3))
    assert first.request_id
    call.cancel()

    listed = sluice(stack, "--json", "keys", "list", "--tenant", "tenant-revoke")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["key_id"] for r in rows] == [key_id] and rows[0]["revoked_at"] is None
    secret = key.split(".", 1)[1]
    assert secret not in listed.stdout and "hash" not in listed.stdout and "salt" not in listed.stdout
    table = sluice(stack, "keys", "list")
    assert key_id in table.stdout and secret not in table.stdout

    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(stack.settings.grpc_target("redaction")) as ch:
        redactor = redaction_pb2_grpc.RedactorStub(ch)
        assert redactor.Redact(redaction_pb2.RedactRequest(text="hello"), metadata=metadata, timeout=30).text

        revoked = sluice(stack, "--json", "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()

        def gateway_refuses() -> bool:
            error = rejected(lambda: generate(channel, key, request(max_tokens=3), timeout=30))
            return error.code() == grpc.StatusCode.UNAUTHENTICATED

        eventually("the gateway to refuse the revoked key", gateway_refuses)
        print(f"revocation effective on the gateway after {time.monotonic() - started:.2f}s")

        def redaction_refuses() -> bool:
            error = rejected(
                lambda: redactor.Redact(redaction_pb2.RedactRequest(text="hi"), metadata=metadata)
            )
            return error.code() == grpc.StatusCode.UNAUTHENTICATED

        eventually("redaction to refuse the revoked key", redaction_refuses)
    listed = json.loads(sluice(stack, "--json", "keys", "list", "--tenant", "tenant-revoke").stdout)
    assert listed[0]["revoked_at"] is not None
    assert sluice(stack, "keys", "revoke", "000000000000").returncode != 0


def test_an_auditor_reads_every_tenant_and_a_user_key_only_its_own(
    stack: Stack, channel: grpc.Channel, demo_key: str
) -> None:
    first, call = first_of(channel, demo_key, request(max_tokens=3))
    request_id = first.request_id
    call.cancel()
    auditor = create_key(stack, "compliance", "--role", "auditor")["api_key"]
    other_user = create_key(stack, "tenant-other")["api_key"]
    with grpc.insecure_channel(stack.settings.grpc_target("audit")) as ch:
        audit = audit_pb2_grpc.AuditStub(ch)

        def trail(key: str) -> audit_pb2.GetTrailResponse:
            return audit.GetTrail(
                audit_pb2.GetTrailRequest(request_id=request_id),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=10,
            )

        def auditor_sees_it() -> bool:
            try:
                return bool(trail(auditor).records)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return False

        eventually("the demo request's trail", auditor_sees_it, 60)
        assert {r.tenant for r in trail(auditor).records} == {"demo"}
        assert trail(demo_key).records
        error = rejected(lambda: trail(other_user))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "demo" not in (error.details() or "")
    # An auditor key reads; it does not generate.
    denied = rejected(lambda: generate(channel, auditor, request(max_tokens=3)))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
