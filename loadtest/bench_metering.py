"""`make bench-metering`: ledger entries per second with exactly-once, on one core.

On a private local Kafka broker (a temp dir): N completions with known usage are
produced to sluice.completions.v1 while metering is stopped; then the real
metering service starts pinned to one core (`taskset -c 0`, its embedded budget
stream included) and prices them. Its input offsets commit in the same Kafka
transactions as the charges, so the committed offset of group `sluice-metering`
is exactly the number of committed ledger entries; the rate is measured on that
from the first commit to the last. Finally the ledger is read back and checked
for exact totals and no duplicates, so a fast but wrong run cannot report a number.
It also reports the metering process's CPU time (user + sys) per 1,000 entries over
the same window: on a machine shared with other work that, not the rate, compares runs.

Then, with the same process still running, it measures how soon a hard budget blocks
once crossed ("within one second", issue #6): for each of `--crossings` tenants with a
hard daily token budget, one completion that crosses it is produced to
sluice.completions.v1, and a gateway's own budget view (services/gateway/budgets.py,
reading sluice.budgets.v1 like every gateway) is watched until it rejects the tenant.
The time from the completion's acknowledged produce to that rejection spans the pricer's
transaction, the scoped budget deltas, the faust budget agent's transaction and the
gateway's read; p50, p99 and max are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer

from loadtest.process_cpu import cpu_seconds
from services.gateway.budgets import BudgetGuard
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, load_settings
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topics import COMPLETIONS
from sluice.v1 import billing_pb2
from tests.metering.helpers import (
    charges,
    committed,
    completion,
    kill_hard,
    produce,
    set_budget,
    start_metering,
    varied_completions,
    wait_until,
)


class WatchedGuard(BudgetGuard):
    """A gateway's budget view that notes when each tenant got a state, and when it blocked."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(bootstrap)
        self.known: set[str] = set()
        self.blocked_at: dict[str, float] = {}

    def apply(self, key: str, value: bytes | None) -> None:
        super().apply(key, value)
        tenant = key.split("/", 1)[0]
        self.known.add(tenant)
        if tenant not in self.blocked_at and self.check(tenant, "", datetime.now(UTC)) is not None:
            self.blocked_at[tenant] = time.perf_counter()


async def block_latencies(bootstrap: str, crossings: int) -> list[float]:
    """Seconds from producing a budget-crossing completion to a gateway's budget view blocking."""
    guard = WatchedGuard(bootstrap)
    reader = asyncio.create_task(guard.run())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    latencies = []
    try:
        await guard.ready.wait()
        for i in range(crossings):
            tenant = f"block-{i}"
            budget = billing_pb2.Budget(
                tenant=tenant,
                period=billing_pb2.BUDGET_PERIOD_DAY,
                currency="USD",
                limit_tokens=100,
                mode=billing_pb2.BUDGET_MODE_HARD,
            )
            await set_budget(bootstrap, budget)
            # The budget is in force (its first state reached the gateway): now cross it.
            await until(lambda t=tenant: t in guard.known, 60)  # type: ignore[misc]
            crossing = completion(tenant, 150, 50)
            await producer.send_and_wait(
                COMPLETIONS, crossing.SerializeToString(), key=crossing.envelope.request_id.encode()
            )
            produced = time.perf_counter()
            await until(lambda t=tenant: t in guard.blocked_at, 60)  # type: ignore[misc]
            latencies.append(guard.blocked_at[tenant] - produced)
    finally:
        await producer.stop()
        reader.cancel()
    return latencies


async def until(check: object, timeout: float) -> None:
    """Wait for `check` (the guard itself notes the moment of the block)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"no budget block within {timeout:.0f}s")
        await asyncio.sleep(0.01)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--crossings", type=int, default=20, help="budget crossings timed (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port, controller, grpc_port = free_ports(3)
        broker = LocalBroker(REPO_ROOT, Path(tmp) / "kafka", port=port, controller_port=controller)
        broker.start()
        try:
            broker.wait_ready(timeout=120)
            settings = load_settings(
                kafka_bootstrap=broker.bootstrap,
                state_dir=Path(tmp) / "state",
                metering_port=grpc_port,
                metrics_port_offset=free_offset([grpc_port]),
                log_level="warning",
            )
            stack = Stack(settings)
            stack.apply_topics()
            events = varied_completions("bench", args.count)
            asyncio.run(produce(broker.bootstrap, events))
            everywhere = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {0})  # the child inherits one core
            metering = start_metering(stack)
            # Our own offset polling must not steal the measured core from the service.
            os.sched_setaffinity(0, (everywhere - {0}) or everywhere)
            try:
                wait_until(
                    lambda: asyncio.run(committed(broker.bootstrap)) > 0, 120, "the first commit", 0.05
                )
                first, started = asyncio.run(committed(broker.bootstrap)), time.perf_counter()
                cpu_start = cpu_seconds(metering.pid)
                wait_until(
                    lambda: asyncio.run(committed(broker.bootstrap)) >= args.count, 600, "all entries", 0.05
                )
                elapsed = time.perf_counter() - started
                cpu = cpu_seconds(metering.pid) - cpu_start
                latencies = (
                    asyncio.run(block_latencies(broker.bootstrap, args.crossings)) if args.crossings else []
                )
            finally:
                kill_hard(metering)
            ledger = asyncio.run(charges(broker.bootstrap, "bench"))
            duplicates = sum(len(found) > 1 for found in ledger.values())
            assert len(ledger) == args.count and duplicates == 0, (len(ledger), duplicates)
            rate = (args.count - first) / elapsed
            print(
                f"metering ledger, exactly-once (Kafka transactions, up to "
                f"{settings.metering_transaction_records} entries each), one core "
                f"({platform.processor() or platform.machine()}, {os.cpu_count()} vCPU host):\n"
                f"  {args.count - first} entries in {elapsed:.2f}s = {rate:,.0f} entries/s"
                f"  (ledger checked: {len(ledger)} entries, 0 duplicates)\n"
                f"  metering process CPU {cpu:.2f}s = {cpu / (args.count - first) * 1000:.3f} CPU-s per 1,000"
                f" entries; load average {os.getloadavg()[0]:.1f}"
            )
            if latencies:
                p50, p99, worst = (percentile(latencies, 50), percentile(latencies, 99), max(latencies))
                print(
                    f"hard budget block, crossing completion produced -> gateway budget view blocks"
                    f" ({len(latencies)} crossings): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
                    f" max {worst * 1000:.0f} ms"
                )
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
