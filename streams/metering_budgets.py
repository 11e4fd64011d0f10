"""Windowed usage totals and budgets, as a faust-streaming app with exactly-once processing.

Two agents:

- `route` reads committed ledger entries (sluice.usage.v1) and budget policies
  (sluice.budget-policies.v1) a batch at a time, sums the batch's charges per
  scope (tenant, key, model, template) and minute, and sends one delta per
  scope and minute onto an internal topic keyed by scope, so each scope's state
  lives on one partition. Summing first is what makes the stream cheap: a batch
  of a thousand charges of one tenant is a handful of deltas, not thousands of
  routed copies and table writes.
- `account` adds each delta to the scope's totals for the current minute, hour,
  day and month in a faust table, and for each tenant/key budget publishes its
  state to the compacted sluice.budgets.v1 and alerts at 80% and 100% to
  sluice.budget-alerts.v1.

Table changes, outputs and input offsets commit in Kafka transactions per
commit interval (faust `processing_guarantee="exactly_once"`), and a batch's
input offsets are acknowledged only after its deltas are sent. But faust gives
each destination partition its own transactional id and commits them one after
the other: `route`'s input offsets (sluice.usage.v1, 6 partitions) and its
deltas (the scoped topic, 3 partitions) are not in one transaction, so a crash
between the two commits can count a batch twice or not at all (known defect,
issue #6; tests/metering/test_metering_budget_replay.py). `account` is exact:
its input (the scoped topic) and its table changelog share partitions and ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import faust
from aiokafka.admin import NewTopic
from faust.tables.manager import TableManager
from faust.types import StreamT
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from sluice.config import Settings
from sluice.kafka_security import faust_credentials
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
DELTA_MARK = b"D"  # JSON [minute start (epoch s), nanos, tokens, requests]
USAGE_MARK = b"U"  # one UsageCharged per scope: what `route` sent before it summed batches
POLICY_MARK = b"P"
# A batch closes at this many input records or after this long, whichever comes first;
# the wait adds at most this much to the time a crossed hard budget takes to block.
ROUTE_BATCH = 2000
ROUTE_WITHIN_S = 0.05
Deltas = dict[tuple[str, int], Spend]


def usage_scopes(charge: events_pb2.UsageCharged) -> list[str]:
    """Every scope whose windows a charge counts in."""
    tenant = charge.envelope.tenant
    scopes = [scope(tenant, ""), f"model={tenant}/{charge.model}"]
    if charge.key_id:
        scopes.append(scope(tenant, charge.key_id))
    if charge.template:
        scopes.append(f"template={tenant}/{charge.template}")
    return scopes


def charge_minute(charge: events_pb2.UsageCharged, now: datetime) -> int:
    """Start (epoch seconds) of the UTC minute the charge's completion falls in."""
    seconds = charge.completed_at.seconds if charge.HasField("completed_at") else int(now.timestamp())
    return seconds - seconds % 60


def sum_charges(charges: Iterable[events_pb2.UsageCharged], now: datetime) -> Deltas:
    """What a batch of charges adds, per (scope, minute).

    The minute fixes the hour, day and month too, so a sum per minute counts in
    exactly the windows its charges would have one by one.
    """
    deltas: Deltas = {}
    for charge in charges:
        spend = Spend.of(charge)
        minute = charge_minute(charge, now)
        for name in usage_scopes(charge):
            total = deltas.get((name, minute))
            if total is None:
                deltas[(name, minute)] = total = Spend()
            total.add(spend)
    return deltas


def encode_delta(minute: int, spend: Spend) -> bytes:
    return DELTA_MARK + json.dumps([minute, *spend.as_list()]).encode()


def decode_delta(body: bytes) -> tuple[datetime, Spend]:
    minute, nanos, tokens, requests = json.loads(body)
    return datetime.fromtimestamp(minute, UTC), Spend(nanos, tokens, requests)


def add_to_windows(windows: dict[str, list[Any]], spend: Spend, at: datetime) -> None:
    """Count spend made at `at` in the current minute, hour, day and month of one scope.

    A window that has ended is replaced by the one the spend falls in; a late
    charge for an already-replaced window only lives on in the ledger. Each window
    ends up holding every charge of the newest period seen, whatever order charges
    (or sums of them) arrive in.
    """
    for period in PERIODS:
        start = window_start(period, at).isoformat()
        current = windows.get(period)
        if current is None or current[0] < start:
            current = [start, 0, 0, 0]
        elif current[0] > start:
            continue
        total = Spend(*current[1:])
        total.add(spend)
        windows[period] = [start, *total.as_list()]


class BudgetStream:
    """The faust app, wired to the settings of the metering process that embeds it."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.bootstrap
        self.app = faust.App(
            APP_ID,
            broker=f"kafka://{settings.bootstrap}",
            broker_credentials=faust_credentials(settings),
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
        # take_events acknowledges a batch's records only once this loop asks for the
        # next batch, i.e. after the batch's deltas are sent: they commit together.
        # (faust's StreamT does not declare take_events; its Stream has it.)
        batches = cast(faust.Stream[bytes], stream).take_events(ROUTE_BATCH, within=ROUTE_WITHIN_S)
        async for events in batches:
            charges: list[events_pb2.UsageCharged] = []
            for event in events:
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
                    charges.append(charge)
                else:
                    # Charges read before a policy count before it, as they would one by one.
                    await self._send_sums(charges)
                    charges = []
                    await self._send_policy(value, event.message.offset)
            await self._send_sums(charges)

    async def _send_sums(self, charges: list[events_pb2.UsageCharged]) -> None:
        for (name, minute), spend in sum_charges(charges, datetime.now(UTC)).items():
            await self.scoped.send(key=name.encode(), value=encode_delta(minute, spend))

    async def _send_policy(self, value: bytes, offset: int) -> None:
        policy = billing_pb2.BudgetPolicy()
        try:
            policy.ParseFromString(value)
        except DecodeError:
            log.warning("undecodable budget policy skipped", offset=offset)
            return
        if policy.budget.period not in PERIOD_NAMES:
            return
        name = scope(policy.budget.tenant, policy.budget.key_id)
        await self.scoped.send(key=name.encode(), value=POLICY_MARK + value)

    async def _account(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            name = bytes(event.key).decode()
            mark, body = event.value[:1], event.value[1:]
            now = datetime.now(UTC)
            if mark == DELTA_MARK:
                at, spend = decode_delta(body)
                await self._count(name, spend, at, now)
            elif mark == USAGE_MARK:  # left on the topic by a version that routed every charge
                charge = events_pb2.UsageCharged.FromString(body)
                at = datetime.fromtimestamp(charge_minute(charge, now), UTC)
                await self._count(name, Spend.of(charge), at, now)
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

    async def _count(self, scope_name: str, spend: Spend, at: datetime, now: datetime) -> None:
        before = {period: self.spend(scope_name, period, now) for period in PERIODS}
        windows = dict(self.windows.get(scope_name) or {})
        add_to_windows(windows, spend, at)
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
