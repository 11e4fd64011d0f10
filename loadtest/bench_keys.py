"""`make bench-keys`: what API keys cost on the request path, and how fast a revocation lands.

On a private local Kafka broker (a temp dir):
- lookup: `KeyStore.lookup` (parse, dict lookup, two SHA-256s, constant-time
  compare) for valid keys among `--keys` stored records, in microseconds per call;
- revocation: a follower store reads sluice.keys.v1 live, as every gateway,
  redaction and audit process does; each of `--revocations` keys is revoked by
  producing its record with `revoked_at` (as `sluice keys revoke` does), and the
  time from the broker's ack to the follower refusing the key is recorded.
  The issue's bound is 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from services.gateway import keys
from services.gateway.auth import KeyStore
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, load_settings
from sluice.kafka import start_producer
from sluice.ports import free_ports
from sluice.stack import Stack


def bench_lookup(count: int, calls: int) -> float:
    store = KeyStore("unused:9092")
    made = []
    for i in range(count):
        key_id, key = keys.new_key()
        store.apply(
            keys.key_record(
                key_id=key_id, inner_digest=keys.digest(key), tenant=f"t{i % 50}"
            ).SerializeToString()
        )
        made.append(f"Bearer {key}")
    started = time.perf_counter()
    for i in range(calls):
        assert store.lookup(made[i % count]) is not None
    return (time.perf_counter() - started) / calls * 1e6


async def bench_revocation(bootstrap: str, count: int) -> list[float]:
    producer = await start_producer(bootstrap, "gateway")
    follower = KeyStore(bootstrap)
    task = asyncio.create_task(follower.run())
    try:
        made = []
        for i in range(count):
            key_id, key = keys.new_key()
            record = keys.key_record(key_id=key_id, inner_digest=keys.digest(key), tenant=f"t{i}")
            await keys.publish(bootstrap, [record], producer)
            made.append((record, f"Bearer {key}"))
        await follower.ready.wait()
        while any(follower.lookup(auth) is None for _, auth in made):
            await asyncio.sleep(0.01)
        delays = []
        for record, auth in made:
            record.revoked_at.CopyFrom(keys.now_stamp())
            await keys.publish(bootstrap, [record], producer)
            acked = time.perf_counter()
            while follower.lookup(auth) is not None:
                await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - acked)
        return delays
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--revocations", type=int, default=30)
    args = parser.parse_args()
    micros = bench_lookup(args.keys, args.calls)
    print(f"lookup: {micros:.1f} us per authenticated call ({args.keys} keys stored)", flush=True)
    port, controller = free_ports(2)
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(REPO_ROOT, Path(tmp) / "kafka", port=port, controller_port=controller)
        broker.start()
        try:
            broker.wait_ready(timeout=120)
            Stack(
                load_settings(kafka_bootstrap=broker.bootstrap, state_dir=Path(tmp) / "state")
            ).apply_topics()
            delays = asyncio.run(bench_revocation(broker.bootstrap, args.revocations))
        finally:
            broker.stop()
    delays.sort()
    print(
        f"revocation: effective on a follower after p50 {statistics.median(delays) * 1000:.0f} ms, "
        f"max {delays[-1] * 1000:.0f} ms over {len(delays)} revocations (bound: 2000 ms)"
    )


if __name__ == "__main__":
    main()
