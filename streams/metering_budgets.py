"""Windowed usage totals and budgets, as a faust-streaming app with exactly-once processing.

Two agents:

- `route` reads committed ledger entries (sluice.usage.v1) and budget policies
  (sluice.budget-policies.v1) and re-keys them by scope (tenant, key, model,
  template) onto an internal topic, so each scope's state lives on one partition.
- `account` keeps per-scope totals for the current minute, hour, day and month
  in a faust table, and for each tenant/key budget publishes its state to the
  compacted sluice.budgets.v1 and alerts at 80% and 100% to sluice.budget-alerts.v1.

Table changes, outputs and input offsets commit in one Kafka transaction per
commit interval (faust `processing_guarantee="exactly_once"`), so a crash can
neither lose nor double-count a charge in a budget.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import faust
from aiokafka.admin import NewTopic
from faust.tables.manager import TableManager
from faust.types import StreamT
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from sluice.config import Settings
from sluice.logs import get_logger
from sluice.topics import BUDGETS, USAGE
from sluice.v1 import billing_pb2, events_pb2
from streams.budget_rules import (
    PERIOD_NAMES,
    Spend,
    budget_key,
    crossings,
    scope,
    state,
    timestamp,
    window,
)
from streams.embedded import changelogs, declare_topics, run_until_cancelled
from streams.periods import PERIODS, Period, window_start

log = get_logger()

APP_ID = "sluice-metering-budgets"
POLICIES = "sluice.budget-policies.v1"
ALERTS = "sluice.budget-alerts.v1"
SCOPED = "sluice-metering-budgets-scoped"
SCOPED_PARTITIONS = 3
TABLE_PARTITIONS = 3
# Thresholds crossed, for the "hard budget reached" alert (threshold="100").
BUDGET_ALERTS = Counter(
    "sluice_budget_alerts_total", "Budget thresholds crossed (80 and 100 percent)", ["tenant", "threshold"]
)
USAGE_MARK = b"U"
POLICY_MARK = b"P"


def usage_scopes(charge: events_pb2.UsageCharged) -> list[str]:
    """Every scope whose windows a charge counts in."""
    tenant = charge.envelope.tenant
    scopes = [scope(tenant, ""), f"model={tenant}/{charge.model}"]
    if charge.key_id:
        scopes.append(scope(tenant, charge.key_id))
    if charge.template:
        scopes.append(f"template={tenant}/{charge.template}")
    return scopes


def add_to_windows(windows: dict[str, list[Any]], charge: events_pb2.UsageCharged, at: datetime) -> None:
    """Count a charge in the current minute, hour, day and month of one scope.

    A window that has ended is replaced by the one the charge falls in; a late
    charge for an already-replaced window only lives on in the ledger.
    """
    for period in PERIODS:
        start = window_start(period, at).isoformat()
        current = windows.get(period)
        if current is None or current[0] < start:
            current = [start, 0, 0, 0]
        elif current[0] > start:
            continue
        spend = Spend(*current[1:])
        spend.add(charge)
        windows[period] = [start, *spend.as_list()]


class BudgetStream:
    """The faust app, wired to the settings of the metering process that embeds it."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.bootstrap
        self.app = faust.App(
            APP_ID,
            broker=f"kafka://{settings.bootstrap}",
            processing_guarantee="exactly_once",
            store="memory://",
            datadir=str(settings.state_dir / "metering" / "faust"),
            web_enabled=False,
            autodiscover=False,
            topic_replication_factor=1,
            topic_partitions=TABLE_PARTITIONS,
            broker_commit_interval=settings.metering_budget_commit_s,
            consumer_auto_offset_reset="earliest",
        )
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
        raw["value_serializer"] = "raw"
        self.inputs = self.app.topic(USAGE, POLICIES, **raw)
        self.scoped = self.app.topic(SCOPED, internal=True, partitions=SCOPED_PARTITIONS, **raw)
        self.budgets_out = self.app.topic(BUDGETS, **raw)
        self.alerts_out = self.app.topic(ALERTS, **raw)
        # scope|period|window start -> [nanos, tokens, requests]
        # scope -> {period: [window start, nanos, tokens, requests]}: one changelog write per
        # scope and charge. Plain JSON values: faust's typed values would need faust Records.
        self.windows = self.app.Table("windows", default=None)
        # scope|period -> Budget, serialized and base64-encoded (tables hold JSON)
        self.policies = self.app.Table("policies", default=None)
        self.app.agent(self.inputs, name="route")(self._route)
        self.app.agent(self.scoped, name="account")(self._account)
        self.app.finalize()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Run embedded in the metering process until cancelled."""
        scoped = NewTopic(SCOPED, SCOPED_PARTITIONS, 1)
        tables = changelogs(APP_ID, ("windows", "policies"), TABLE_PARTITIONS)
        await declare_topics(self.bootstrap, "metering", APP_ID, [scoped, *tables])
        started = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(run_until_cancelled(self.app, started))
            group.create_task(self._become_ready(started))

    async def _become_ready(self, started: asyncio.Event) -> None:
        # Budgets are only right once the tables are rebuilt from their changelogs.
        await started.wait()
        await cast(TableManager, self.app.tables).recovery.completed.wait()
        self.ready.set()
        log.info("budget stream ready", app=APP_ID)

    async def _route(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            value: bytes | None = event.value
            if value is None:
                continue
            if event.message.topic == USAGE:
                charge = events_pb2.UsageCharged()
                try:
                    charge.ParseFromString(value)
                except DecodeError:  # the ledger view dead-letters it; budgets skip it
                    log.warning("undecodable ledger entry skipped", offset=event.message.offset)
                    continue
                for name in usage_scopes(charge):
                    await self.scoped.send(key=name.encode(), value=USAGE_MARK + value)
            else:
                policy = billing_pb2.BudgetPolicy()
                try:
                    policy.ParseFromString(value)
                except DecodeError:
                    log.warning("undecodable budget policy skipped", offset=event.message.offset)
                    continue
                if policy.budget.period not in PERIOD_NAMES:
                    continue
                name = scope(policy.budget.tenant, policy.budget.key_id)
                await self.scoped.send(key=name.encode(), value=POLICY_MARK + value)

    async def _account(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            name = bytes(event.key).decode()
            mark, body = event.value[:1], event.value[1:]
            now = datetime.now(UTC)
            if mark == USAGE_MARK:
                charge = events_pb2.UsageCharged()
                charge.ParseFromString(body)
                await self._count(name, charge, now)
            else:
                policy = billing_pb2.BudgetPolicy()
                policy.ParseFromString(body)
                await self._set_policy(name, policy.budget, now)

    def spend(self, scope_name: str, period: Period, moment: datetime) -> Spend:
        current = (self.windows.get(scope_name) or {}).get(period)
        if current is None or current[0] != window_start(period, moment).isoformat():
            return Spend()
        return Spend(*current[1:])

    def budgets_of(self, scope_name: str) -> list[billing_pb2.Budget]:
        found = []
        for period in PERIOD_NAMES.values():
            stored = self.policies.get(f"{scope_name}|{period}")
            if stored:
                found.append(billing_pb2.Budget.FromString(base64.b64decode(stored)))
        return found

    def all_budgets(self) -> list[billing_pb2.Budget]:
        return [billing_pb2.Budget.FromString(base64.b64decode(v)) for v in self.policies.values() if v]

    def current_state(self, budget: billing_pb2.Budget, now: datetime) -> events_pb2.BudgetState:
        name = scope(budget.tenant, budget.key_id)
        return state(budget, self.spend(name, PERIOD_NAMES[budget.period], now), now)

    async def _count(self, scope_name: str, charge: events_pb2.UsageCharged, now: datetime) -> None:
        at = charge.completed_at.ToDatetime(tzinfo=UTC) if charge.HasField("completed_at") else now
        before = {period: self.spend(scope_name, period, now) for period in PERIODS}
        windows = dict(self.windows.get(scope_name) or {})
        add_to_windows(windows, charge, at)
        self.windows[scope_name] = windows
        for budget in self.budgets_of(scope_name):
            period = PERIOD_NAMES[budget.period]
            if window_start(period, at) != window_start(period, now):
                continue  # a late charge for a past period changes no current budget
            after = self.spend(scope_name, period, now)
            for limit, percent in crossings(budget, before[period], after):
                await self._alert(budget, after, limit, percent, now)
            await self._publish(budget, now)

    async def _set_policy(self, scope_name: str, budget: billing_pb2.Budget, now: datetime) -> None:
        key = f"{scope_name}|{PERIOD_NAMES[budget.period]}"
        if budget.limit_nanos or budget.limit_tokens or budget.limit_requests:
            self.policies[key] = base64.b64encode(budget.SerializeToString()).decode()
            await self._publish(budget, now)
        else:
            if key in self.policies:
                del self.policies[key]
            await self.budgets_out.send(key=budget_key(budget).encode(), value=None)

    async def _publish(self, budget: billing_pb2.Budget, now: datetime) -> None:
        current = self.current_state(budget, now)
        await self.budgets_out.send(key=budget_key(budget).encode(), value=current.SerializeToString())

    async def _alert(
        self, budget: billing_pb2.Budget, spend: Spend, limit: str, percent: int, now: datetime
    ) -> None:
        alert = billing_pb2.BudgetAlert(
            alert_id=uuid.uuid4().hex,
            budget=budget,
            window=window(budget, spend, now),
            threshold_percent=percent,
            limit=limit,
            event_time=timestamp(now),
        )
        log.warning("budget alert", tenant=budget.tenant, key_id=budget.key_id, limit=limit, percent=percent)
        BUDGET_ALERTS.labels(budget.tenant, str(percent)).inc()
        await self.alerts_out.send(key=budget_key(budget).encode(), value=alert.SerializeToString())
