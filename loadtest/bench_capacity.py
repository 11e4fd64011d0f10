"""`make bench-capacity`: the highest RPS full Sluice sustains here with zero loss.

RPS rises step by step against Sluice with every feature on (the same stack as
bench-overhead's variant b). At each step the upstream is also called directly
at the same RPS, so "added" TTFT is measured, not assumed. A step is sustained
when no request failed, the loss audit found nothing and the p99 added TTFT
stayed within the limit (100 ms); the first step that is not ends the climb.
Consumer lag of every group is sampled during each step: the group that falls
furthest behind names the stage that limits capacity.

Output: <out>/rps-<n>/ (report per step, loadtest/report.py) and
<out>/capacity.json + capacity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.bench_runs import audited_ok, default_out, machine_notes, measured_run, warm_up
from loadtest.loadgen import GrpcTarget, OpenAITarget, PromptMix, RunResult
from loadtest.report import added_latency, write_report
from loadtest.sluice_under_test import SluiceUnderTest, bench_kafka, run_sluice
from loadtest.upstream import UpstreamConfig, run_upstream

UPSTREAM = "a-upstream"
SLUICE = "b-sluice-full"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_capacity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--start", type=float, default=10.0, help="first RPS step")
    parser.add_argument("--step", type=float, default=10.0, help="RPS added per step")
    parser.add_argument("--max", type=float, default=400.0, help="stop climbing here")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per step")
    parser.add_argument("--limit-ms", type=float, default=100.0, help="largest sustained p99 added TTFT")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--pii-fraction", type=float, default=0.3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=120.0)
    parser.add_argument("--lag-every", type=float, default=2.0, help="seconds between consumer-lag samples")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--out", type=Path, default=None, help="default .sluice/bench/capacity/<UTC time>")
    args = parser.parse_args(argv)
    if args.start <= 0 or args.step <= 0 or args.max < args.start:
        parser.error("--start and --step must be > 0 and --max >= --start")
    args.out = args.out or default_out("capacity")
    return args


async def one_step(
    rps: float, args: argparse.Namespace, upstream_v1: str, sluice: SluiceUnderTest
) -> tuple[RunResult, RunResult, dict[str, int]]:
    mix = PromptMix(pii_fraction=args.pii_fraction, max_tokens=args.tokens)
    common: dict[str, Any] = {"upstream_v1": upstream_v1, "rps": rps, "duration_s": args.duration, "mix": mix}
    direct = OpenAITarget(upstream_v1, "fixed-timing", name=UPSTREAM)
    gateway = GrpcTarget(sluice.gateway, sluice.api_key, sluice.model, name=SLUICE)
    try:
        base = await measured_run(direct, seed=args.seed, name=UPSTREAM, **common)
        await warm_up(gateway, mix, args.warmup)
        result = await measured_run(
            gateway,
            seed=args.seed,
            name=SLUICE,
            sluice=sluice,
            settle_s=args.settle,
            lag_every_s=args.lag_every,
            **common,
        )
    finally:
        await direct.close()
        await gateway.close()
    return base, result, result.extra["consumer_lag_peaks"]


def judge(
    rps: float, base: RunResult, result: RunResult, peaks: dict[str, int], limit_ms: float
) -> dict[str, Any]:
    added = added_latency(result, base)
    p99 = added["ttft_ms"].get("p99")
    reasons = []
    if result.errors:
        statuses = Counter(r.status for r in result.records if not r.ok)
        reasons.append(f"{result.errors} errors ({', '.join(f'{k}: {v}' for k, v in statuses.items())})")
    if not audited_ok(result):
        reasons.append("loss audit failed")
    if p99 is None or p99 > limit_ms:
        reasons.append(f"p99 added TTFT {p99 if p99 is None else round(p99, 1)} ms > {limit_ms:g} ms")
    top = sorted(peaks.items(), key=lambda kv: kv[1], reverse=True)
    return {
        "rps": rps,
        "sustained": not reasons,
        "reasons": reasons,
        "added_ms": added,
        "errors": result.errors,
        "sent": result.sent,
        "loss_audit_ok": audited_ok(result),
        "upstream_verdict": result.extra["upstream_verdict"],
        "generator_cpu_s": result.generator_cpu_s,
        "peak_lag": dict(top),
        "most_behind": top[0][0] if top and top[0][1] > 0 else None,
    }


def run_all(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    config = UpstreamConfig(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens)
    steps: list[dict[str, Any]] = []
    with (
        run_upstream(config) as upstream_v1,
        bench_kafka(args.out) as bootstrap,
        run_sluice(
            bootstrap=bootstrap,
            upstream_v1=upstream_v1,
            upstream_model=config.model,
            workdir=args.out / SLUICE,
            log_level=args.log_level,
        ) as sluice,
    ):
        rps = args.start
        while rps <= args.max:
            base, result, peaks = asyncio.run(one_step(rps, args, upstream_v1, sluice))
            write_report(
                {UPSTREAM: base, SLUICE: result},
                args.out / f"rps-{rps:g}",
                baseline=UPSTREAM,
                title=f"bench-capacity at {rps:g} rps",
                notes=machine_notes(),
                console=console,
            )
            steps.append(judge(rps, base, result, peaks, args.limit_ms))
            console.print(
                f"step {rps:g} rps: "
                + ("sustained" if steps[-1]["sustained"] else ", ".join(steps[-1]["reasons"]))
            )
            if not steps[-1]["sustained"]:
                break
            rps += args.step
    return steps


def capacity_table(steps: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="bench-capacity: full Sluice, step by step")
    for column in (
        "rps",
        "sent",
        "errors",
        "+TTFT p50",
        "+TTFT p99",
        "loss",
        "sustained",
        "most behind (peak lag)",
    ):
        table.add_column(column)
    for s in steps:
        ttft = s["added_ms"]["ttft_ms"]
        behind = f"{s['most_behind']} ({s['peak_lag'][s['most_behind']]})" if s["most_behind"] else "-"
        table.add_row(
            f"{s['rps']:g}",
            str(s["sent"]),
            str(s["errors"]),
            f"{ttft.get('p50', float('nan')):.1f}",
            f"{ttft.get('p99', float('nan')):.1f}",
            "zero" if s["loss_audit_ok"] else "LOSS",
            "yes" if s["sustained"] else "no: " + ", ".join(s["reasons"]),
            behind,
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 220)
    notes = machine_notes()
    steps = run_all(args, console)
    sustained = [s["rps"] for s in steps if s["sustained"]]
    highest = max(sustained) if sustained else None
    limiting = steps[-1]["most_behind"] if steps else None
    summary = {
        "notes": notes,
        "limit_ms": args.limit_ms,
        "highest_sustained_rps": highest,
        "limiting_stage": limiting,
        "steps": steps,
    }
    (args.out / "capacity.json").write_text(json.dumps(summary, indent=2))
    console.print(capacity_table(steps))
    console.print(notes["machine"])
    verdict = f"highest sustained RPS with zero loss: {highest if highest is not None else 'none'}"
    verdict += f"; furthest behind at the last step: {limiting or 'no consumer group lagged'}"
    console.print(verdict)
    lines = ["# bench-capacity", "", str(notes["machine"]), "", verdict, ""]
    lines += [
        f"- {s['rps']:g} rps: {'sustained' if s['sustained'] else ', '.join(s['reasons'])}" for s in steps
    ]
    (args.out / "capacity.md").write_text("\n".join(lines) + "\n")
    console.print(f"report: {args.out}")
    return 0 if highest is not None else 1


if __name__ == "__main__":
    sys.exit(main())
