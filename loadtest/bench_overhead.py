"""`make bench-overhead`: what Sluice adds over a bare engine, side by side with LiteLLM proxy.

One fixed-timing upstream; the same Poisson load at each RPS against
(a) the upstream directly, (b) Sluice with redaction, prompts, metering and audit,
(c) the same with redaction off (a `redact: false` tenant policy),
(d) LiteLLM proxy with its defaults and no database. Each target runs every RPS
level in turn, so each stack starts once. Every Sluice run ends with the loss
audit; any loss fails the bench. Whether the upstream kept its exact timing is
checked from its /stats and printed with every run (a warning, not a failure).

Output: <out>/rps-<n>/ (report.json, records, CDF and latency-over-time PNGs per
RPS, from loadtest/report.py) and <out>/overhead.md + overhead.json: one table of
added TTFT and end-to-end latency (p50/p95/p99) over (a), and Sluice / LiteLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.bench_runs import audited_ok, default_out, machine_notes, measured_run, warm_up
from loadtest.litellm_proxy import LITELLM_VERSION, run_litellm
from loadtest.loadgen import GrpcTarget, OpenAITarget, PromptMix, RunResult, Target
from loadtest.report import PERCENTILES, added_latency, write_report
from loadtest.sluice_under_test import BENCH_MODEL, bench_kafka, run_sluice
from loadtest.upstream import UpstreamConfig, run_upstream
from sluice.ports import free_port_block

UPSTREAM = "a-upstream"
SLUICE_FULL = "b-sluice-full"
SLUICE_LIGHT = "c-sluice-no-redaction"
LITELLM = "d-litellm"
TARGETS = (UPSTREAM, SLUICE_FULL, SLUICE_LIGHT, LITELLM)
SHORT = {"a": UPSTREAM, "b": SLUICE_FULL, "c": SLUICE_LIGHT, "d": LITELLM}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rps", default="20,50,100", help="comma-separated RPS levels")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per level")
    parser.add_argument("--tokens", type=int, default=32, help="answer length (upstream and max_tokens)")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="upstream time to first token")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="upstream delay between tokens")
    parser.add_argument("--targets", default="abcd", help="which of a, b, c, d to run (a is always run)")
    parser.add_argument("--pii-fraction", type=float, default=0.3)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=120.0, help="loss audit: longest wait to catch up")
    parser.add_argument("--log-level", default="info", help="Sluice services' log level")
    parser.add_argument("--out", type=Path, default=None, help="default .sluice/bench/overhead/<UTC time>")
    args = parser.parse_args(argv)
    args.rps_levels = [float(x) for x in args.rps.split(",") if x.strip()]
    unknown = set(args.targets) - set(SHORT)
    if unknown or not args.rps_levels:
        parser.error(
            f"--targets takes letters from abcd (got {''.join(sorted(unknown))}); --rps needs a level"
        )
    args.target_names = [SHORT[c] for c in "abcd" if c == "a" or c in args.targets]
    args.out = args.out or default_out("overhead")
    return args


async def run_levels(
    target: Target, name: str, args: argparse.Namespace, upstream_v1: str, **audit: Any
) -> dict[float, RunResult]:
    """Every RPS level against one started target."""
    mix = PromptMix(pii_fraction=args.pii_fraction, max_tokens=args.tokens)
    try:
        await target.start()
        await warm_up(target, mix, args.warmup)
        return {
            rps: await measured_run(
                target,
                upstream_v1=upstream_v1,
                rps=rps,
                duration_s=args.duration,
                mix=mix,
                seed=args.seed,
                name=name,
                settle_s=args.settle,
                **audit,
            )
            for rps in args.rps_levels
        }
    finally:
        await target.close()


@contextlib.contextmanager
def kafka_if(needed: bool, workdir: Path) -> Iterator[str]:
    if not needed:
        yield ""
        return
    with bench_kafka(workdir) as bootstrap:
        yield bootstrap


def run_all(args: argparse.Namespace) -> dict[str, dict[float, RunResult]]:
    """Runs per target, per RPS level; the stacks start and stop one after the other."""
    config = UpstreamConfig(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens)
    runs: dict[str, dict[float, RunResult]] = {}
    sluice_variants = [n for n in (SLUICE_FULL, SLUICE_LIGHT) if n in args.target_names]
    with run_upstream(config) as upstream_v1, kafka_if(bool(sluice_variants), args.out) as bootstrap:
        direct = OpenAITarget(upstream_v1, config.model, name=UPSTREAM)
        runs[UPSTREAM] = asyncio.run(run_levels(direct, UPSTREAM, args, upstream_v1))
        for name in sluice_variants:
            redacting = name == SLUICE_FULL
            with run_sluice(
                bootstrap=bootstrap,
                upstream_v1=upstream_v1,
                upstream_model=config.model,
                workdir=args.out / name,
                redaction=redacting,
                log_level=args.log_level,
            ) as sluice:
                target: Target = GrpcTarget(sluice.gateway, sluice.api_key, sluice.model, name=name)
                runs[name] = asyncio.run(
                    run_levels(target, name, args, upstream_v1, sluice=sluice, redacting=redacting)
                )
        if LITELLM in args.target_names:
            with run_litellm(
                upstream_v1=upstream_v1,
                upstream_model=config.model,
                port=free_port_block(1),
                workdir=args.out / LITELLM,
                model=BENCH_MODEL,
            ) as (proxy_v1, _):
                target = OpenAITarget(proxy_v1, BENCH_MODEL, name=LITELLM)
                runs[LITELLM] = asyncio.run(run_levels(target, LITELLM, args, upstream_v1))
    return runs


def overhead_rows(runs: Mapping[str, Mapping[float, RunResult]]) -> list[dict[str, Any]]:
    """Added TTFT/E2E of every target over the upstream at each level, and Sluice / LiteLLM."""
    rows = []
    for rps, base in runs[UPSTREAM].items():
        added = {name: added_latency(by_rps[rps], base) for name, by_rps in runs.items() if name != UPSTREAM}
        for name, extra in added.items():
            run = runs[name][rps]
            row: dict[str, Any] = {
                "rps": rps,
                "target": name,
                "sent": run.sent,
                "errors": run.errors,
                "gen_cpu_percent": 100.0 * run.generator_cpu_s / run.wall_s if run.wall_s else 0.0,
                **_flat(extra),
            }
            if LITELLM in added and name != LITELLM:
                row |= {
                    f"ratio_{k}": _ratio(v, _flat(added[LITELLM])[k])
                    for k, v in _flat(extra).items()
                    if k.startswith(("ttft", "e2e"))
                }
            rows.append(row)
    return rows


def _flat(extra: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    return {
        f"{metric.removesuffix('_ms')}_p{p}": extra[metric].get(f"p{p}")
        for metric in extra
        for p in PERCENTILES
    }


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    if mine is None or theirs is None or theirs <= 0:
        return None
    return mine / theirs


def _cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def overhead_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="added over the upstream (ms); ratio = Sluice / LiteLLM at p99")
    for column in HEAD:
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


HEAD = ["RPS", "target", "sent", "errors"]
HEAD += [f"+{m} p{p}" for m in ("TTFT", "E2E") for p in PERCENTILES]
HEAD += ["Sluice/LiteLLM TTFT p99", "Sluice/LiteLLM E2E p99", "gen CPU %"]


def _cells(row: Mapping[str, Any]) -> list[str]:
    cells = [f"{row['rps']:g}", row["target"], str(row["sent"]), str(row["errors"])]
    cells += [_cell(row[f"{m}_p{p}"]) for m in ("ttft", "e2e") for p in PERCENTILES]
    cells += [_cell(row.get("ratio_ttft_p99"), "{:.2f}x"), _cell(row.get("ratio_e2e_p99"), "{:.2f}x")]
    return [*cells, _cell(row["gen_cpu_percent"], "{:.0f}")]


def markdown(rows: Sequence[Mapping[str, Any]], notes: Mapping[str, Any], verdicts: Mapping[str, Any]) -> str:
    lines = ["# bench-overhead", "", str(notes["machine"]), "", "| " + " | ".join(HEAD) + " |"]
    lines.append("|" + "---|" * len(HEAD))
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += [
        "",
        "Added latency in ms over (a), the upstream called directly, at the same RPS; "
        "gen CPU % = the load generator's CPU during that target's run, of one core.",
        "",
    ]
    lines += [f"- {name}: {text}" for name, text in verdicts.items()]
    return "\n".join(lines) + "\n"


def verdicts(runs: Mapping[str, Mapping[float, RunResult]]) -> dict[str, str]:
    """Per run: did the upstream keep its timing, and (Sluice) did the loss audit pass."""
    out = {}
    for name, by_rps in runs.items():
        for rps, result in by_rps.items():
            upstream = result.extra["upstream_verdict"]
            text = (
                "upstream kept its timing (not the bottleneck)"
                if upstream["not_bottleneck"]
                else "WARNING upstream: " + "; ".join(upstream["problems"])
            )
            text += f" (lateness p99 {_cell(upstream['token_lateness_p99_ms'], '{:.2f}')} ms,"
            text += f" CPU {upstream['cpu_share_of_one_core']:.0%} of a core)"
            audit = result.extra.get("loss_audit")
            if audit is not None:
                text += "; loss audit: " + ("zero loss" if audit["ok"] else f"{audit['losses']} PROBLEMS")
            out[f"{name} @ {rps:g} rps"] = text
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    notes = machine_notes() | {
        "litellm_version": LITELLM_VERSION,
        "upstream": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "tokens": args.tokens},
        "duration_s": args.duration,
        "variant_c": "redaction off (tenant policy `redact: false`: no analysis of prompts or "
        "output); its loss audit skips the PII scan, since the planted PII passes by design",
    }
    runs = run_all(args)
    console = Console(width=None if sys.stdout.isatty() else 220)
    for rps in args.rps_levels:
        write_report(
            {name: by_rps[rps] for name, by_rps in runs.items()},
            args.out / f"rps-{rps:g}",
            baseline=UPSTREAM,
            title=f"bench-overhead at {rps:g} rps",
            notes=notes,
            console=console,
        )
    rows = overhead_rows(runs)
    checks = verdicts(runs)
    console.print(overhead_table(rows))
    console.print(notes["machine"])
    for name, text in checks.items():
        console.print(f"  {name}: {text}")
    (args.out / "overhead.json").write_text(
        json.dumps({"notes": notes, "rows": rows, "checks": checks}, indent=2)
    )
    (args.out / "overhead.md").write_text(markdown(rows, notes, checks))
    console.print(f"report: {args.out}")
    failed = [
        f"{name} @ {rps:g}"
        for name, by_rps in runs.items()
        for rps, result in by_rps.items()
        if not audited_ok(result)
    ]
    if failed:
        console.print(f"[red]FAILED: the loss audit found problems in {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
