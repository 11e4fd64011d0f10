"""Open-loop Poisson arrivals: when each request is due, fixed before the run starts.

Gaps are exponential with mean 1/rps from a seeded generator, so the same
(rps, duration, seed) gives the same schedule, and the sending never waits for
answers (a closed loop would slow down with the system under test and hide its
latency).
"""

from __future__ import annotations

import numpy as np


def poisson_schedule(rps: float, duration_s: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the run's start, all below `duration_s`."""
    if rps <= 0 or duration_s <= 0:
        raise ValueError("rps and duration_s must be > 0")
    rng = np.random.default_rng(seed)
    expected = rps * duration_s
    offsets: list[float] = []
    now = 0.0
    while True:
        # Draw in blocks (about the expected count plus margin), keep those inside the window.
        gaps = rng.exponential(1.0 / rps, size=int(expected + 6 * expected**0.5) + 16)
        for t in np.cumsum(gaps) + now:
            if t >= duration_s:
                return offsets
            offsets.append(float(t))
        now = offsets[-1]
