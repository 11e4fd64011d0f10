"""Where a run's CPU went: CPU-ms per request of each Sluice service and the broker.

Consumer lag says which stage fell behind; this says which process spent the
machine's cores, so a run names its limiting stage from both. CPU time comes
from the OS (user + system, all threads), so it holds on a busy machine where
wall-clock timings do not.
"""

from __future__ import annotations

import psutil

from loadtest.sluice_under_test import SluiceUnderTest
from sluice.config import SERVICES

BROKER = "kafka broker"


def sluice_processes(sluice: SluiceUnderTest) -> dict[str, psutil.Process]:
    """The six services, and the broker if it listens on this machine (else it is left out)."""
    found: dict[str, psutil.Process] = {
        name: psutil.Process(pid) for name in SERVICES if (pid := sluice.stack.pid(name))
    }
    port = int(sluice.settings.bootstrap.split(",")[0].rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            found[BROKER] = psutil.Process(conn.pid)
            break
    return found


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class CpuMeter:
    """CPU seconds of some processes between construction and `per_request`."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self._processes = processes
        self._start = {name: _cpu_s(p) for name, p in processes.items()}

    def per_request(self, requests: int) -> dict[str, float]:
        """CPU-ms per request of each process, largest first (a process that died is left out)."""
        spent: dict[str, float] = {}
        for name, process in self._processes.items():
            try:
                spent[name] = (_cpu_s(process) - self._start[name]) * 1000 / max(requests, 1)
            except psutil.NoSuchProcess:
                continue
        return dict(sorted(spent.items(), key=lambda kv: kv[1], reverse=True))


def summary_line(per_request: dict[str, float]) -> str:
    total = sum(per_request.values())
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in per_request.items())
    return f"CPU-ms per request (from /proc): {parts}; total {total:.1f}"
