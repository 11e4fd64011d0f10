"""Pieces bench-overhead and bench-capacity share: one measured run, its upstream check and loss audit.

A run is only evidence if the yardstick held: the upstream's own /stats for the
run (token lateness, CPU) must show it far from saturated, and a Sluice run must
audit to zero loss. Both verdicts travel in the run's `extra`, so report.json
carries them next to the latencies they qualify.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.loadgen import PromptMix, RunResult, Target, run_load
from loadtest.loss_audit import audit_run
from loadtest.process_cpu import CpuMeter
from loadtest.service_cpu import per_request, sluice_meter, summary_line
from loadtest.sluice_under_test import SluiceUnderTest
from loadtest.stage_latency import lag_peaks, stage_breakdown, summary_lines
from loadtest.upstream import fetch_stats, reset_stats
from sluice.config import REPO_ROOT

# The upstream is "not the bottleneck" while its tokens leave this close to their
# deadlines and it uses this little of one core.
UPSTREAM_MAX_LATENESS_P99_MS = 5.0
UPSTREAM_MAX_CPU_SHARE = 0.5


def default_out(kind: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return REPO_ROOT / ".sluice" / "bench" / kind / stamp


def machine_notes() -> dict[str, Any]:
    """What the reader must know before trusting any number: it all shares one small machine."""
    return {
        "machine": (
            f"everything runs at once on this {os.cpu_count()}-core machine: the load generator, "
            "the fixed-timing upstream, and the target under test (Sluice: Kafka broker and six "
            "services; or the LiteLLM proxy). The generator's own CPU is in each row (gen CPU %)."
        ),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def upstream_verdict(stats: dict[str, Any]) -> dict[str, Any]:
    """Whether the upstream kept its exact timing during a run (then it was not the bottleneck)."""
    lateness = stats.get("token_lateness_ms", {})
    wall = stats.get("wall_seconds") or 0.0
    cpu_share = stats.get("cpu_seconds", 0.0) / wall if wall else 0.0
    problems = []
    if (lateness.get("p99") or 0.0) > UPSTREAM_MAX_LATENESS_P99_MS:
        problems.append(f"token lateness p99 {lateness['p99']:.1f} ms > {UPSTREAM_MAX_LATENESS_P99_MS} ms")
    if cpu_share > UPSTREAM_MAX_CPU_SHARE:
        problems.append(f"upstream CPU {cpu_share:.0%} of a core > {UPSTREAM_MAX_CPU_SHARE:.0%}")
    if stats.get("requests_failed"):
        problems.append(f"{stats['requests_failed']} upstream requests failed")
    return {
        "not_bottleneck": not problems,
        "problems": problems,
        "token_lateness_p99_ms": lateness.get("p99"),
        "cpu_share_of_one_core": cpu_share,
        "max_in_flight": stats.get("max_in_flight"),
    }


async def measured_run(
    target: Target,
    *,
    upstream_v1: str,
    rps: float,
    duration_s: float,
    mix: PromptMix,
    seed: int,
    name: str,
    sluice: SluiceUnderTest | None = None,
    settle_s: float = 120.0,
    redacting: bool = True,
    lag_every_s: float = 1.0,
) -> RunResult:
    """One load run with the upstream's /stats (and, for Sluice, the loss audit) in `extra`.

    A Sluice run also gets the per-hop breakdown (loadtest/stage_latency.py), the
    peak lag of every consumer group, sampled every `lag_every_s` during the load,
    and the CPU each process spent per request (loadtest/service_cpu.py).
    `redacting=False` (a stack whose policy does not redact the planted entities)
    leaves the PII scan out of the audit: raw PII downstream is then by design.
    """
    reset_stats(upstream_v1)
    since_ms = int(time.time() * 1000) - 1000
    meter = sluice_meter(sluice) if sluice else CpuMeter({})
    meter.start()
    async with lag_peaks(sluice.settings.bootstrap if sluice else None, lag_every_s) as peaks:
        result = await run_load(target, rps=rps, duration_s=duration_s, mix=mix, seed=seed)
    meter.stop()  # before the audit below, which waits and reads
    cpu = per_request(meter, result.sent)
    result.target = name
    stats = fetch_stats(upstream_v1)
    result.extra["upstream"] = stats
    result.extra["upstream_verdict"] = upstream_verdict(stats)
    if sluice is not None:
        audit = await audit_run(
            sluice.settings,
            result.request_ids,
            result.planted_pii if redacting else [],
            since_ms=since_ms,
            settle_s=settle_s,
        )
        print(f"{name} @ {rps:g} rps: {audit.summary()}")
        result.extra["loss_audit"] = audit.as_dict()
        # After the audit: the pipeline has caught up, so every hop has its samples.
        stages = await stage_breakdown(sluice.settings, result, since_ms)
        result.extra["stages"] = stages
        result.extra["consumer_lag_peaks"] = peaks
        result.extra["cpu_ms_per_request"] = cpu
        lines = [*summary_lines(stages, peaks), summary_line(cpu)]
        print("\n".join(f"{name} @ {rps:g} rps: {line}" for line in lines))
    return result


async def warm_up(target: Target, mix: PromptMix, seconds: float) -> None:
    """A few unrecorded requests: connections, caches and JITs are warm before measuring."""
    if seconds > 0:
        await run_load(target, rps=5, duration_s=seconds, mix=mix, seed=999, progress=False)


def audited_ok(result: RunResult) -> bool:
    audit = result.extra.get("loss_audit")
    return audit is None or bool(audit["ok"])
