"""`sluice status`: one screen with what an on-call engineer checks first.

Each service's gRPC health, every Sluice consumer group's lag (Kafka admin API),
the gateway's request rate, errors and time to first token (its /metrics page),
and today's spend (the Metering API). It works against the local stack or a
remote one (`--host`, or the usual SLUICE_* settings), live or as one snapshot
(`--once`, also `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sluice.config import SERVICES, ServiceName, Settings
from sluice.lag import GroupLag, LagReader
from sluice.stack import Stack
from sluice.v1 import metering_pb2, metering_pb2_grpc

GENERATE = "sluice.v1.Gateway/Generate"
TTFT = "sluice_grpc_time_to_first_token_seconds"
REQUESTS = "sluice_grpc_requests_total"
TIMEOUT_S = 2.0


@dataclass
class GatewayTraffic:
    """Counters from one scrape of the gateway's /metrics."""

    requests: float = 0.0
    errors: float = 0.0
    ttft_buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)

    def quantile(self, q: float) -> float | None:
        """Like PromQL's histogram_quantile: linear within the bucket the rank falls in."""
        if not self.ttft_buckets or self.ttft_buckets[-1][1] == 0:
            return None
        rank = q * self.ttft_buckets[-1][1]
        lower, below = 0.0, 0.0
        for le, count in self.ttft_buckets:
            if count >= rank:
                if le == float("inf"):
                    return lower
                return lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
            lower, below = le, count
        return lower


@dataclass
class Snapshot:
    health: dict[str, str]
    lag: list[GroupLag]
    traffic: GatewayTraffic | None
    request_rate: float | None
    spend_today: dict[str, dict[str, float]]  # tenant -> currency -> amount
    problems: list[str]
    taken_at: float  # monotonic time of the (last) gateway scrape

    def as_json(self) -> dict[str, Any]:
        p50 = self.traffic.quantile(0.5) if self.traffic else None
        p99 = self.traffic.quantile(0.99) if self.traffic else None
        return {
            **self.health,
            "consumer_lag": {f"{r.group}/{r.topic}": r.lag for r in self.lag},
            "requests_total": self.traffic.requests if self.traffic else None,
            "errors_total": self.traffic.errors if self.traffic else None,
            "requests_per_s": self.request_rate,
            "ttft_p50_s": p50,
            "ttft_p99_s": p99,
            "spend_today": self.spend_today,
            "problems": self.problems,
        }


async def _health(settings: Settings, name: ServiceName, stack: Stack | None) -> str:
    target = settings.grpc_target(name)
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if stack is not None and stack.pid(name) is None:
                return "stopped"
            return f"unreachable {target} ({exc.code().name})"
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status).lower()
    return f"{state} {target}"


def _scrape(url: str) -> GatewayTraffic:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        text = response.read().decode()
    traffic = GatewayTraffic()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") != GENERATE:
                continue
            if sample.name == REQUESTS:
                traffic.requests += sample.value
                if sample.labels.get("code") != "OK":
                    traffic.errors += sample.value
            elif sample.name == f"{TTFT}_bucket":
                traffic.ttft_buckets.append((float(sample.labels["le"]), sample.value))
    traffic.ttft_buckets.sort()
    return traffic


async def _lag(settings: Settings) -> list[GroupLag]:
    reader = LagReader(settings.bootstrap, client_id="sluice-status")
    try:
        await asyncio.wait_for(reader.start(), TIMEOUT_S * 5)
        rows: list[GroupLag] = []
        for group in await reader.groups():
            if group.startswith("sluice"):
                rows += await reader.lag(group)
        return rows
    finally:
        await reader.close()


async def _spend_today(settings: Settings) -> dict[str, dict[str, float]]:
    request = metering_pb2.GetUsageRequest(group_by=metering_pb2.USAGE_GROUPING_MODEL)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    getattr(request, "from").FromDatetime(midnight)
    async with grpc.aio.insecure_channel(settings.grpc_target("metering")) as channel:
        usage = await metering_pb2_grpc.MeteringStub(channel).GetUsage(request, timeout=TIMEOUT_S * 2)
    spend: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in usage.rows:
        spend[row.tenant][row.cost.currency] += row.cost.nanos / 1e9
    return {tenant: dict(by_currency) for tenant, by_currency in spend.items()}


async def snapshot(
    settings: Settings, local: bool, window_s: float, previous: Snapshot | None = None
) -> Snapshot:
    """Everything the view shows; parts that cannot be read become `problems`, not errors."""
    problems: list[str] = []
    stack = Stack(settings) if local else None
    health: dict[str, str] = {}
    if stack is not None:
        broker = stack.broker()
        health["kafka"] = "stopped" if broker and not broker.is_running() else f"at {settings.bootstrap}"
    states = await asyncio.gather(*(_health(settings, name, stack) for name in SERVICES))
    health.update(zip(SERVICES, states, strict=True))

    async def guarded(what: str, work: Any, default: Any) -> Any:
        try:
            return await work
        except Exception as exc:  # one unreadable part must not blank the whole view
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            problems.append(f"{what}: {type(exc).__name__}: {detail}"[:200])
            return default

    metrics_url = f"http://{settings.host}:{settings.metrics_port('gateway')}/metrics"
    lag, spend, traffic = await asyncio.gather(
        guarded("consumer lag", _lag(settings), []),
        guarded("spend today", _spend_today(settings), {}),
        guarded("gateway metrics", asyncio.to_thread(_scrape, metrics_url), None),
    )
    taken_at = time.monotonic()
    rate = None
    if traffic is not None and previous is not None and previous.traffic is not None:
        rate = max(0.0, traffic.requests - previous.traffic.requests) / max(
            taken_at - previous.taken_at, 1e-3
        )
    elif traffic is not None:  # no earlier scrape: take a second one `window_s` later
        await asyncio.sleep(window_s)
        first, traffic = (
            traffic,
            await guarded("gateway metrics", asyncio.to_thread(_scrape, metrics_url), None),
        )
        if traffic is not None:
            rate = max(0.0, traffic.requests - first.requests) / max(time.monotonic() - taken_at, 1e-3)
            taken_at = time.monotonic()
    return Snapshot(health, lag, traffic, rate, spend, problems, taken_at)


def render(snap: Snapshot, settings: Settings) -> Group:
    services = Table(title="services", expand=True)
    services.add_column("service")
    services.add_column("state")
    for name, state in snap.health.items():
        style = "green" if state.startswith(("serving", "at ")) else "red"
        services.add_row(name, Text(state, style=style))

    lag = Table(title="consumer lag", expand=True)
    lag.add_column("group")
    lag.add_column("topic")
    lag.add_column("lag", justify="right")
    for row in snap.lag:
        lag.add_row(row.group, row.topic, Text(str(row.lag), style="yellow" if row.lag > 100 else ""))

    traffic = Table(title=f"gateway {settings.grpc_target('gateway')}", expand=True)
    for column in ("requests/s", "requests", "errors", "TTFT p50", "TTFT p99"):
        traffic.add_column(column, justify="right")
    t = snap.traffic
    traffic.add_row(
        "-" if snap.request_rate is None else f"{snap.request_rate:.2f}",
        "-" if t is None else f"{t.requests:.0f}",
        "-" if t is None else f"{t.errors:.0f}",
        *("-" if t is None or (v := t.quantile(q)) is None else f"{v * 1000:.0f} ms" for q in (0.5, 0.99)),
    )

    spend = Table(title="spend today (UTC)", expand=True)
    spend.add_column("tenant")
    spend.add_column("spend", justify="right")
    for tenant, by_currency in sorted(snap.spend_today.items()):
        spend.add_row(tenant, ", ".join(f"{amount:.6f} {cur}" for cur, amount in by_currency.items()))
    parts: list[Any] = [services, traffic, lag, spend]
    parts += [Text(problem, style="red") for problem in snap.problems]
    parts.append(Text(f"updated {datetime.now(UTC):%H:%M:%S} UTC", style="dim"))
    return Group(*parts)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if args.host:
        settings = settings.model_copy(update={"host": args.host})
    local = not args.host
    if args.once or args.json:
        snap = asyncio.run(snapshot(settings, local, args.interval))
        if args.json:
            from sluice.cli import print_json

            print_json(snap.as_json())
        else:
            Console().print(render(snap, settings))
        return 0 if all(s.startswith(("serving", "at ")) for s in snap.health.values()) else 3
    with Live(console=Console(), screen=False, auto_refresh=False) as live:
        previous: Snapshot | None = None
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                started = time.monotonic()
                previous = asyncio.run(snapshot(settings, local, args.interval, previous))
                live.update(render(previous, settings), refresh=True)
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return 0


def register(commands: Any) -> None:
    status = commands.add(
        "status", cmd_status, "live view: health, consumer lag, request rate, TTFT, spend today"
    )
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.add_argument("--host", default="", help="a remote stack's host (default: SLUICE_HOST)")
