"""CPU time of other processes (and threads) from /proc: benches compare it where wall time is noisy."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU of a process (all its threads), or of one of its threads, so far."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class CpuMeter:
    """CPU spent between start() and stop() by named (pid, thread or None for all threads).

    A process that is gone by stop() is left out of `spent`.
    """

    targets: dict[str, tuple[int, int | None]]
    spent: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._began = {name: cpu_seconds(*target) for name, target in self.targets.items()}

    def stop(self) -> None:
        self.spent = {}
        for name, target in self.targets.items():
            try:
                self.spent[name] = cpu_seconds(*target) - self._began[name]
            except FileNotFoundError:
                continue
