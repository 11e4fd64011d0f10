"""Load-test reports: report.json, a terminal summary table and PNG plots from RunResults.

`write_report({"upstream": bare, "sluice": through_sluice}, out, baseline="upstream")`
also reports the latency each target adds over the baseline, percentile by
percentile (p50 of the target minus p50 of the baseline, and so on), which is
how gateways are compared: the upstream's own fixed timing cancels out.

Every latency is in milliseconds. Percentiles are over successful requests;
errors are counted by status. The generator's own CPU use is in every summary,
because everything runs on one machine at once.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.loadgen.records import RunResult

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt
from matplotlib.ticker import ScalarFormatter

PERCENTILES = (50, 95, 99)


def percentiles(values: Iterable[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p95/p99, mean and max of `values` times `scale` (None for an empty list)."""
    data = np.asarray(list(values), dtype=float) * scale
    out: dict[str, float | None] = dict.fromkeys([*(f"p{p}" for p in PERCENTILES), "mean", "max"])
    if data.size:
        out.update({f"p{p}": float(np.percentile(data, p)) for p in PERCENTILES})
        out.update(mean=float(data.mean()), max=float(data.max()))
    out["count"] = float(data.size)
    return out


def summarize(result: RunResult) -> dict[str, Any]:
    """One run's numbers, as report.json holds them."""
    ok = [r for r in result.records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    lag = [r.lag_s for r in result.records]
    return {
        "target": result.target,
        "target_info": result.target_info,
        "rps_target": result.rps,
        "duration_s": result.duration_s,
        "seed": result.seed,
        "sent": result.sent,
        "achieved_rps": result.sent / result.duration_s,
        "ok": len(ok),
        "errors": result.errors,
        "errors_by_status": dict(Counter(r.status for r in result.records if not r.ok)),
        "with_planted_pii": sum(r.pii_planted for r in result.records),
        "restarts": sum(r.restarts for r in result.records),
        "ttft_ms": percentiles((r.ttft_s for r in ok if r.ttft_s is not None), 1000.0),
        "e2e_ms": percentiles((r.e2e_s for r in ok if r.e2e_s is not None), 1000.0),
        "itl_ms": percentiles((gap for r in ok for gap in r.itl_s), 1000.0),
        "tokens_per_s": percentiles(t for r in ok if (t := r.tokens_per_s) is not None),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / result.wall_s if result.wall_s else 0.0,
        "generator": {
            "cpu_s": result.generator_cpu_s,
            "wall_s": result.wall_s,
            "cpu_percent_of_one_core": 100.0 * result.generator_cpu_s / result.wall_s
            if result.wall_s
            else 0.0,
            "send_lag_ms": percentiles(lag, 1000.0),
        },
        "extra": result.extra,
    }


def added(
    target: Mapping[str, Any], baseline: Mapping[str, Any], metric: str = "ttft_ms"
) -> dict[str, float]:
    """What `target` adds over `baseline` for `metric`, percentile by percentile (summaries)."""
    out = {}
    for p in PERCENTILES:
        key = f"p{p}"
        mine, base = target[metric][key], baseline[metric][key]
        if mine is not None and base is not None:
            out[key] = mine - base
    return out


def added_latency(target: RunResult, baseline: RunResult) -> dict[str, dict[str, float]]:
    """Added TTFT and end-to-end latency (ms, p50/p95/p99) of one run over a baseline run."""
    mine, base = summarize(target), summarize(baseline)
    return {metric: added(mine, base, metric) for metric in ("ttft_ms", "e2e_ms")}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(summaries: Mapping[str, Mapping[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("target", "rps", "sent", "ok", "errors"):
        table.add_column(column, justify="right" if column != "target" else "left")
    for metric in ("TTFT", "E2E"):
        for p in PERCENTILES:
            table.add_column(f"{metric} p{p}", justify="right")
    for column in ("ITL p50", "ITL p99", "tok/s p50", "lag p99", "gen CPU %"):
        table.add_column(column, justify="right")
    for name, s in summaries.items():
        errors = ", ".join(f"{k}:{v}" for k, v in s["errors_by_status"].items()) or "0"
        table.add_row(
            name,
            f"{s['rps_target']:g}",
            str(s["sent"]),
            str(s["ok"]),
            errors,
            *(_fmt(s[m][f"p{p}"]) for m in ("ttft_ms", "e2e_ms") for p in PERCENTILES),
            _fmt(s["itl_ms"]["p50"], 2),
            _fmt(s["itl_ms"]["p99"], 2),
            _fmt(s["tokens_per_s"]["p50"]),
            _fmt(s["generator"]["send_lag_ms"]["p99"]),
            _fmt(s["generator"]["cpu_percent_of_one_core"]),
        )
    table.caption = "latencies in ms; lag = actual minus scheduled send; gen CPU = load generator process"
    return table


def added_table(added_by_target: Mapping[str, Mapping[str, Mapping[str, float]]], baseline: str) -> Table:
    table = Table(title=f"added over {baseline} (ms)")
    table.add_column("target")
    for metric in ("TTFT", "E2E"):
        for p in PERCENTILES:
            table.add_column(f"+{metric} p{p}", justify="right")
    for name, extra in added_by_target.items():
        table.add_row(
            name, *(_fmt(extra[m].get(f"p{p}")) for m in ("ttft_ms", "e2e_ms") for p in PERCENTILES)
        )
    return table


def plot_cdf(results: Mapping[str, RunResult], path: Path, title: str) -> None:
    """Latency CDFs (TTFT and end-to-end), one curve per target."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (attr, label) in zip(
        axes, (("ttft_s", "time to first token"), ("e2e_s", "end-to-end")), strict=True
    ):
        for name, result in results.items():
            values = np.sort([getattr(r, attr) * 1000.0 for r in result.records if r.ok and getattr(r, attr)])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize="x-small")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{title}: latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_over_time(results: Mapping[str, RunResult], path: Path, title: str) -> None:
    """TTFT and end-to-end latency of each request against its send time; errors marked."""
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for ax, (attr, label) in zip(axes, (("ttft_s", "TTFT"), ("e2e_s", "end-to-end")), strict=True):
        for name, result in results.items():
            ok = [r for r in result.records if r.ok and getattr(r, attr) is not None]
            ax.scatter([r.sent_s for r in ok], [getattr(r, attr) * 1000.0 for r in ok], s=4, label=name)
            failed = [r for r in result.records if not r.ok]
            if failed:
                ax.scatter(
                    [r.sent_s for r in failed], [0.0] * len(failed), marker="x", label=f"{name} errors"
                )
        ax.set_ylabel(f"{label} (ms)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small", markerscale=3)
    axes[-1].set_xlabel("send time (s from run start)")
    fig.suptitle(f"{title}: latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Mapping[str, RunResult] | RunResult,
    out_dir: Path | str,
    *,
    baseline: str | None = None,
    title: str = "Sluice load test",
    notes: Mapping[str, Any] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write report.json, records/<target>.json, latency_cdf.png, latency_over_time.png; print tables.

    `baseline` names one of `results`: every other target gets its added latency over it.
    Returns the report as written to report.json.
    """
    runs = {results.target: results} if isinstance(results, RunResult) else dict(results)
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline: {baseline!r} is not one of {sorted(runs)}")
    out = Path(out_dir)
    (out / "records").mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(result) for name, result in runs.items()}
    report: dict[str, Any] = {"title": title, "notes": dict(notes or {}), "targets": summaries}
    if baseline is not None:
        report["baseline"] = baseline
        report["added"] = {
            name: {m: added(s, summaries[baseline], m) for m in ("ttft_ms", "e2e_ms")}
            for name, s in summaries.items()
            if name != baseline
        }
    for name, result in runs.items():
        result.save(out / "records" / f"{_filename(name)}.json")
    plots = {"latency_cdf": out / "latency_cdf.png", "latency_over_time": out / "latency_over_time.png"}
    plot_cdf(runs, plots["latency_cdf"], title)
    plot_over_time(runs, plots["latency_over_time"], title)
    report["plots"] = {k: str(v) for k, v in plots.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    # A wide table: give it room when the output is a file or a pipe (rich's default is 80 columns).
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    console.print(summary_table(summaries, title))
    if baseline is not None:
        console.print(added_table(report["added"], baseline))
    return report


def _filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
