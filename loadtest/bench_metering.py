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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, load_settings
from sluice.kafka_security import client_options
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topics import COMPLETIONS
from tests.metering.helpers import charges, kill_hard, produce, start_metering, varied_completions, wait_until


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def committed(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets("sluice-metering")
    except KafkaError:  # no group yet: nothing committed
        return 0
    finally:
        await admin.close()
    return sum(o.offset for tp, o in offsets.items() if tp.topic == COMPLETIONS and o.offset > 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
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
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
