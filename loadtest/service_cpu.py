"""Where a run's CPU went: CPU-ms per request of each Sluice service and the broker.

Consumer lag says which stage fell behind; this says which process spent the
machine's cores, so a run names its limiting stage from both. CPU time comes
from /proc (user + system, all threads), so it holds on a busy machine where
wall-clock timings do not.
"""

from __future__ import annotations

import psutil

from loadtest.process_cpu import CpuMeter
from loadtest.sluice_under_test import SluiceUnderTest
from sluice.config import SERVICES

BROKER = "kafka broker"


def sluice_meter(sluice: SluiceUnderTest) -> CpuMeter:
    """A meter of the six services, and of the broker if it listens on this machine."""
    targets: dict[str, tuple[int, int | None]] = {
        name: (pid, None) for name in SERVICES if (pid := sluice.stack.pid(name))
    }
    port = int(sluice.settings.bootstrap.split(",")[0].rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            targets[BROKER] = (conn.pid, None)
            break
    return CpuMeter(targets)


def per_request(meter: CpuMeter, requests: int) -> dict[str, float]:
    """CPU-ms per request of each process the stopped meter saw, largest first."""
    spent = {name: seconds * 1000 / max(requests, 1) for name, seconds in meter.spent.items()}
    return dict(sorted(spent.items(), key=lambda kv: kv[1], reverse=True))


def summary_line(per_request: dict[str, float]) -> str:
    total = sum(per_request.values())
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in per_request.items())
    return f"CPU-ms per request (from /proc): {parts}; total {total:.1f}"
