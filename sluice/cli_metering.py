"""`sluice usage`, `sluice budget`, `sluice prices` and `sluice metering reprice`."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from sluice.cli import Commands, as_dict, grpc_channel, print_json
from sluice.config import Settings
from sluice.v1 import billing_pb2, events_pb2, metering_pb2, metering_pb2_grpc

GROUP_BY = {
    "model": metering_pb2.USAGE_GROUPING_MODEL,
    "key": metering_pb2.USAGE_GROUPING_KEY,
    "template": metering_pb2.USAGE_GROUPING_TEMPLATE,
    "day": metering_pb2.USAGE_GROUPING_DAY,
}
PERIODS = {
    "minute": billing_pb2.BUDGET_PERIOD_MINUTE,
    "day": billing_pb2.BUDGET_PERIOD_DAY,
    "month": billing_pb2.BUDGET_PERIOD_MONTH,
}
EXPORT_COLUMNS = (
    "request_id",
    "attempt",
    "kind",
    "tenant",
    "key_id",
    "template",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "engine_busy_ms",
    "cost_nanos",
    "cost",
    "currency",
    "price_version",
    "corrects_version",
    "fallback_price",
    "completed_at",
    "charged_at",
)


def moment(text: str) -> datetime:
    """An ISO date or time; without a zone it is UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when.astimezone(UTC))
    return stamp


def _stub(settings: Settings) -> tuple[Any, metering_pb2_grpc.MeteringStub]:
    channel = grpc_channel(settings, "metering")
    return channel, metering_pb2_grpc.MeteringStub(channel)


def cmd_usage(settings: Settings, args: argparse.Namespace) -> int:
    request = metering_pb2.GetUsageRequest(tenant=args.tenant, group_by=GROUP_BY[args.by])
    if args.start:
        getattr(request, "from").CopyFrom(_timestamp(args.start))
    if args.end:
        request.to.CopyFrom(_timestamp(args.end))
    channel, stub = _stub(settings)
    with channel:
        usage = stub.GetUsage(request)
    if args.json:
        print_json({"rows": [as_dict(row) for row in usage.rows]})
        return 0
    print(f"{'tenant':<12} {args.by:<28} {'requests':>8} {'prompt':>8} {'output':>8} {'cached':>7}  cost")
    for row in usage.rows:
        flags = []
        if row.corrections:
            flags.append(f"{row.corrections} corrections")
        if row.fallback_priced:
            flags.append(f"{row.fallback_priced} at fallback rate")
        note = f"  ({', '.join(flags)})" if flags else ""
        print(
            f"{row.tenant:<12} {row.group or '-':<28} {row.requests:>8} {row.usage.prompt_tokens:>8} "
            f"{row.usage.completion_tokens:>8} {row.usage.cached_tokens:>7}  "
            f"{row.cost.amount} {row.cost.currency}{note}"
        )
    return 0


def export_rows(settings: Settings, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Ledger entries straight from sluice.usage.v1 (the ledger itself), oldest first."""
    from services.metering.pricing import format_amount
    from services.metering.reader import read_committed
    from sluice.topics import USAGE

    async def collect() -> list[dict[str, Any]]:
        rows = []
        async for record in read_committed(settings.bootstrap, USAGE):
            charge = events_pb2.UsageCharged.FromString(record.value or b"")
            env = charge.envelope
            done = (charge.completed_at if charge.HasField("completed_at") else env.event_time).ToDatetime(
                tzinfo=UTC
            )
            if (args.tenant and env.tenant != args.tenant) or (args.start and done < args.start):
                continue
            if args.end and done >= args.end:
                continue
            rows.append(
                {
                    "request_id": env.request_id,
                    "attempt": env.attempt,
                    "kind": billing_pb2.ChargeKind.Name(charge.kind or billing_pb2.CHARGE_KIND_COMPLETION)
                    .removeprefix("CHARGE_KIND_")
                    .lower(),
                    "tenant": env.tenant,
                    "key_id": charge.key_id,
                    "template": charge.template,
                    "model": charge.model,
                    "finish_reason": events_pb2.FinishReason.Name(charge.finish_reason)
                    .removeprefix("FINISH_REASON_")
                    .lower(),
                    "prompt_tokens": charge.usage.prompt_tokens,
                    "completion_tokens": charge.usage.completion_tokens,
                    "cached_tokens": charge.usage.cached_tokens,
                    "engine_busy_ms": charge.engine_busy_ms,
                    "cost_nanos": charge.cost.nanos,
                    "cost": format_amount(charge.cost.nanos),
                    "currency": charge.cost.currency,
                    "price_version": charge.cost.price_version,
                    "corrects_version": charge.corrects_version,
                    "fallback_price": charge.fallback_price,
                    "completed_at": done.isoformat(),
                    "charged_at": env.event_time.ToDatetime(tzinfo=UTC).isoformat(),
                }
            )
        rows.sort(key=lambda r: (r["completed_at"], r["request_id"], r["attempt"], r["kind"]))
        return rows

    return asyncio.run(collect())


def cmd_usage_export(settings: Settings, args: argparse.Namespace) -> int:
    rows = export_rows(settings, args)
    if args.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not args.output:
            raise SystemExit("sluice: --output: parquet needs a file")
        columns = {name: [row[name] for row in rows] for name in EXPORT_COLUMNS}
        pq.write_table(pa.table(columns), args.output)
    else:
        with open(args.output, "w", newline="") if args.output else _stdout() as handle:
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.output:
        total = sum(int(row["cost_nanos"]) for row in rows)
        summary = {"entries": len(rows), "cost_nanos": total, "output": str(args.output)}
        print_json(summary) if args.json else print(f"wrote {len(rows)} entries to {args.output}")
    return 0


def _stdout() -> Any:
    class _Keep:
        def __enter__(self) -> Any:
            return sys.stdout

        def __exit__(self, *_: object) -> None:
            sys.stdout.flush()

    return _Keep()


def cmd_budget_set(settings: Settings, args: argparse.Namespace) -> int:
    from services.metering.pricing import parse_amount

    try:
        limit_nanos = parse_amount(args.usd, "--usd") if args.usd else 0
    except ValueError as exc:
        raise SystemExit(f"sluice: {exc}") from None
    budget = billing_pb2.Budget(
        tenant=args.tenant,
        key_id=args.key_id,
        period=PERIODS[args.period],
        limit_nanos=limit_nanos,
        limit_tokens=args.tokens,
        limit_requests=args.requests,
        mode=billing_pb2.BUDGET_MODE_SOFT if args.soft else billing_pb2.BUDGET_MODE_HARD,
    )
    channel, stub = _stub(settings)
    with channel:
        stored = stub.SetBudget(metering_pb2.SetBudgetRequest(budget=budget)).budget
    if args.json:
        print_json(as_dict(stored))
    else:
        print(f"budget set: {_describe(stored)}")
    return 0


def cmd_budget_get(settings: Settings, args: argparse.Namespace) -> int:
    from services.metering.pricing import format_amount

    channel, stub = _stub(settings)
    with channel:
        states = stub.GetBudget(metering_pb2.GetBudgetRequest(tenant=args.tenant, key_id=args.key_id)).budgets
    if args.json:
        print_json({"budgets": [as_dict(state) for state in states]})
        return 0
    for state in states:
        window = state.window
        status = "BLOCKED" if state.blocked else "ok"
        print(
            f"{_describe(state.budget)}\n    spent {format_amount(window.spent_nanos)} {state.currency}, "
            f"{window.tokens} tokens, {window.requests} requests; resets "
            f"{window.reset_at.ToJsonString()}  [{status}]"
        )
        if state.reason:
            print(f"    {state.reason}")
    if not states:
        print(f"no budgets for tenant {args.tenant!r}")
    return 0


def _describe(budget: billing_pb2.Budget) -> str:
    from services.metering.pricing import format_amount

    who = f"{budget.tenant}/{budget.key_id}" if budget.key_id else budget.tenant
    period = billing_pb2.BudgetPeriod.Name(budget.period).removeprefix("BUDGET_PERIOD_").lower()
    mode = billing_pb2.BudgetMode.Name(budget.mode).removeprefix("BUDGET_MODE_").lower()
    limits = []
    if budget.limit_nanos:
        limits.append(f"{format_amount(budget.limit_nanos)} {budget.currency}")
    if budget.limit_tokens:
        limits.append(f"{budget.limit_tokens} tokens")
    if budget.limit_requests:
        limits.append(f"{budget.limit_requests} requests")
    return f"{who} per {period}: {', '.join(limits) or 'no limit (removed)'} ({mode})"


def cmd_prices_list(settings: Settings, args: argparse.Namespace) -> int:
    channel, stub = _stub(settings)
    with channel:
        catalog = stub.ListPrices(metering_pb2.ListPricesRequest()).catalog
    if args.json:
        print_json(as_dict(catalog))
        return 0
    print(f"catalog {catalog.version} ({catalog.currency}), digest {catalog.digest[:12]}")
    print(
        f"{'model':<32} {'from':<10} {'input/1M':>9} {'output/1M':>9} {'cached/1M':>9}"
        f" {'request':>8} {'gpu-hour':>8}"
    )
    for rate in [*catalog.rates, catalog.fallback]:
        name = "(fallback)" if rate.model == "*" else rate.model + (" (example)" if rate.example else "")
        print(
            f"{name:<32} {rate.effective_from:<10} {rate.input_per_mtok:>9} {rate.output_per_mtok:>9} "
            f"{rate.cached_input_per_mtok:>9} {rate.per_request:>8} {rate.gpu_hour:>8}"
        )
    return 0


def cmd_reprice(settings: Settings, args: argparse.Namespace) -> int:
    from services.metering.pricing import Catalog, CatalogError, format_amount
    from services.metering.replay import plan_reprice, publish_reprice

    try:
        catalog = Catalog.load(args.catalog)
    except CatalogError as exc:
        raise SystemExit(f"sluice: --catalog: {exc}") from None

    async def run() -> Any:
        report = await plan_reprice(settings.bootstrap, catalog, args.start, args.tenant)
        if not args.dry_run and report.corrections:
            await publish_reprice(settings.bootstrap, catalog, report)
        return report

    report = asyncio.run(run())
    summary = {
        "catalog_version": report.catalog_version,
        "completions": report.completions,
        "unchanged": report.unchanged,
        "not_charged_yet": report.not_charged_yet,
        "invalid": report.invalid,
        "corrections": len(report.corrections),
        "difference_nanos": report.difference_nanos,
        "published": not args.dry_run,
    }
    if args.json:
        print_json(summary)
    else:
        verb = "would publish" if args.dry_run else "published"
        print(
            f"replayed {report.completions} completions under catalog {report.catalog_version}: "
            f"{verb} {len(report.corrections)} corrections totalling "
            f"{format_amount(report.difference_nanos)} {catalog.currency}; {report.unchanged} unchanged, "
            f"{report.not_charged_yet} not charged yet, {report.invalid} invalid"
        )
    return 0


def register(commands: Commands) -> None:
    usage = commands.add("usage", cmd_usage, "show usage and cost (per model, key, template or day)")
    _usage_filters(usage)
    usage.add_argument("--by", choices=sorted(GROUP_BY), default="model")
    export = commands.add(
        "export",
        cmd_usage_export,
        "write ledger entries (charges and corrections) for finance",
        into=usage.add_subparsers(dest="usage_command"),
    )
    _usage_filters(export)
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--output", type=Path, help="file to write (CSV goes to stdout without it)")

    budget = commands.group("budget", "budgets and rate limits")
    set_ = commands.add(
        "set", cmd_budget_set, "set a budget or rate limit (all limits 0 removes it)", into=budget
    )
    set_.add_argument("--tenant", required=True)
    set_.add_argument("--key-id", default="", help="12-hex API key id; empty: the whole tenant")
    set_.add_argument("--period", choices=sorted(PERIODS), required=True, help="minute = rate limit")
    set_.add_argument("--usd", default="", help="money limit, e.g. 25.00")
    set_.add_argument("--tokens", type=int, default=0)
    set_.add_argument("--requests", type=int, default=0)
    set_.add_argument("--soft", action="store_true", help="alert only (default: hard, blocks)")
    get = commands.add("get", cmd_budget_get, "show budgets and their spend this period", into=budget)
    get.add_argument("--tenant", required=True)
    get.add_argument("--key-id", default="")

    commands.add(
        "list", cmd_prices_list, "show the price catalog", into=commands.group("prices", "price catalog")
    )
    reprice = commands.add(
        "reprice",
        cmd_reprice,
        "re-price completions since --from under a new catalog, as correction entries",
        into=commands.group("metering", "metering operations"),
    )
    reprice.add_argument("--from", dest="start", type=moment, required=True)
    reprice.add_argument("--catalog", type=Path, required=True)
    reprice.add_argument("--tenant", default="", help="only this tenant's charges (default: every tenant)")
    reprice.add_argument("--dry-run", action="store_true", help="report the corrections without publishing")


def _usage_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default="")
    parser.add_argument("--from", dest="start", type=moment)
    parser.add_argument("--to", dest="end", type=moment)
