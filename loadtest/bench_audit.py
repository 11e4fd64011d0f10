"""`make bench-audit`: audit index query latency at 1,000,000 records, and indexer throughput.

1. Indexer: seal N audit records (a real hash chain), produce them to
   sluice.audit.v1 on a real local Kafka broker, then run the service's
   Indexer (one asyncio task, so one core) from offset 0 into a fresh SQLite
   file until it has caught up. Reported: records/s, Kafka fetch included.
2. Query: fill an index with 1,000,000 records (200,000 requests x 5 stages,
   20 tenants, 30 days), then time `AuditStore.query` by tenant and a random
   time range (one page of 100, as the Query RPC does), and by tenant + user.

`--backend postgres` runs both against a real PostgreSQL server (the pgserver
wheel of the dev extra) instead of SQLite files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from services.audit import chain
from services.audit.service import Indexer
from services.audit.store import AuditStore, QueryFilter, Row
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, load_settings
from sluice.kafka_security import client_options
from sluice.stack import Stack
from sluice.topics import AUDIT
from sluice.v1 import events_pb2

DAY_MS = 86_400_000
T0 = 1_790_000_000_000
TENANTS = [f"tenant{i:02d}" for i in range(20)]


def stamp(ms: int) -> str:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t.ToJsonString()


def records(count: int, seed: int = 7) -> Iterator[events_pb2.AuditRecord]:
    """A sealed chain of `count` records shaped like real lifecycles, spread over 30 days."""
    rng = random.Random(seed)
    prev, seq = chain.GENESIS, 0
    requests = count // 5
    for i in range(requests):
        tenant = rng.choice(TENANTS)
        user = f"u-{rng.randrange(5000):020x}"
        ms = T0 + i * (30 * DAY_MS // requests)
        stages = (
            ("received", {"model": "smollm2", "messages": "1", "max_tokens": "64"}),
            ("redacted", {"policy_version": "builtin-1", "entities.EMAIL_ADDRESS": "1"}),
            ("assembled", {"model": "smollm2", "prompt_tokens": "40", "template": "gguf:1"}),
            (
                "completed",
                {"model": "smollm2", "finish_reason": "FINISH_REASON_STOP", "completion_tokens": "30"},
            ),
            (
                "charged",
                {"model": "smollm2", "cost_nanos": str(rng.randrange(1000, 9000)), "currency": "USD"},
            ),
        )
        for n, (stage, details) in enumerate(stages):
            seq += 1
            record = events_pb2.AuditRecord(
                request_id=f"req{i:08d}",
                attempt=1,
                tenant=tenant,
                stage=stage,
                event_time=stamp(ms + n * 50),
                ingest_time=stamp(ms + n * 50 + 5),
                source_topic=f"sluice.{stage}.v1",
                source_offset=i,
                details=details,
                user=user if stage in ("received", "redacted") else "",
                model="smollm2",
            )
            chain.seal(record, seq, prev)
            prev = record.hash
            yield record


async def produce(bootstrap: str, batch: list[events_pb2.AuditRecord]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, **client_options(), linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        pending = [
            await producer.send(AUDIT, r.SerializeToString(), key=r.request_id.encode(), partition=0)
            for r in batch
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def index_all(bootstrap: str, store: AuditStore) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process until the indexer has caught up."""
    indexer = Indexer(bootstrap, store)
    started, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(indexer.run())
    await indexer.caught_up.wait()
    elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return elapsed, cpu_used


def index_location(backend: str, work: Path, name: str) -> Path | str:
    """A fresh index: a SQLite file, or a new database on a local PostgreSQL server."""
    if backend == "sqlite":
        return work / f"{name}.sqlite"
    import pgserver  # type: ignore[import-not-found,unused-ignore]  # dev extra
    import psycopg

    server = pgserver.get_server(work / "pg", cleanup_mode="stop")  # type: ignore[attr-defined,unused-ignore]
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return str(server.get_uri(name))


def bench_indexer(count: int, work: Path, backend: str = "sqlite") -> dict[str, float]:
    batch = list(records(count, seed=1))
    broker = LocalBroker(REPO_ROOT, work / "kafka", port=_free(), controller_port=_free())
    broker.start()
    try:
        broker.wait_ready(timeout=120)
        Stack(load_settings(kafka_bootstrap=broker.bootstrap, state_dir=work / "state")).apply_topics()
        asyncio.run(produce(broker.bootstrap, batch))
        store = AuditStore(index_location(backend, work, "indexer"))
        seconds, cpu = asyncio.run(index_all(broker.bootstrap, store))
        assert store.count() == count, (store.count(), count)
        store.close()
    finally:
        broker.stop()
    return {"records": count, "seconds": seconds, "records_per_s": count / seconds, "per_cpu_s": count / cpu}


def bench_query(count: int, queries: int, work: Path, backend: str = "sqlite") -> dict[str, float]:
    store = AuditStore(index_location(backend, work, "query"))
    started = time.perf_counter()
    batch: list[Row] = []
    for offset, record in enumerate(records(count)):
        batch.append((offset, record))
        if len(batch) == 20_000:
            store.add_many(batch)
            batch = []
    store.add_many(batch)
    fill = time.perf_counter() - started
    assert store.count() == count
    rng = random.Random(3)
    tenant_time, tenant_user = [], []
    for _ in range(queries):
        start = T0 + rng.randrange(29) * DAY_MS
        f = QueryFilter(tenant=rng.choice(TENANTS), from_ms=start, to_ms=start + DAY_MS, page_size=100)
        t = time.perf_counter()
        rows, _ = store.query(f)
        tenant_time.append((time.perf_counter() - t) * 1000)
        assert rows
        t = time.perf_counter()
        store.query(QueryFilter(tenant=f.tenant, user=rows[0][1].user or "u-0", from_ms=T0, page_size=100))
        tenant_user.append((time.perf_counter() - t) * 1000)
    store.close()
    return {
        "records": count,
        "fill_records_per_s": count / fill,
        "tenant_time_p50_ms": statistics.median(tenant_time),
        "tenant_time_max_ms": max(tenant_time),
        "tenant_user_p50_ms": statistics.median(tenant_user),
        "tenant_user_max_ms": max(tenant_user),
    }


def _free() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index-records", type=int, default=200_000)
    parser.add_argument("--query-records", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    print(f"index backend: {args.backend}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        indexer = bench_indexer(args.index_records, work, args.backend)
        print(
            f"indexer: {indexer['records']:,} records from Kafka in {indexer['seconds']:.1f} s = "
            f"{indexer['records_per_s']:,.0f} records/s wall, "
            f"{indexer['per_cpu_s']:,.0f} records per CPU-second (target >= 5,000)",
            flush=True,
        )
        if not args.query_records:
            return
        query = bench_query(args.query_records, args.queries, work, args.backend)
        print(
            f"query over {query['records']:,} indexed records ({args.queries} queries, page of 100):\n"
            f"  tenant + 1-day range: p50 {query['tenant_time_p50_ms']:.2f} ms, "
            f"max {query['tenant_time_max_ms']:.2f} ms (target < 200 ms)\n"
            f"  tenant + user:        p50 {query['tenant_user_p50_ms']:.2f} ms, "
            f"max {query['tenant_user_max_ms']:.2f} ms\n"
            f"  (generating, sealing and indexing them ran at {query['fill_records_per_s']:,.0f} records/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
