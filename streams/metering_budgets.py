"""Windowed usage totals and budgets, as a faust-streaming app with exactly-once processing.

What counts reaches the app already summed, on an internal topic keyed by scope
(tenant, key, model, template), so each scope's state lives on one partition:

- the pricer (services/metering/pricer.py) sums each poll's charges per scope and
  UTC minute (`delta_outputs`) and produces the sums in the same Kafka transaction
  as the charges themselves and the completions' offsets; it forwards budget
  policies (sluice.budget-policies.v1) the same way (`policy_output`). A re-pricing
  sends its corrections' sums in the transaction of the corrections.
- `account` adds each delta to the scope's totals for the current minute, hour,
  day and month in a faust table, and for each tenant/key budget publishes its
  state to the compacted sluice.budgets.v1 and alerts at 80% and 100% to
  sluice.budget-alerts.v1.

Why there is no faust stage between the ledger and the scoped topic: faust gives
each destination partition its own transactional id and commits them one after
the other, so a stage reading sluice.usage.v1 (6 partitions) and sending to the
scoped topic (3) could count a batch twice or not at all after a crash (issue #6).
`account` is exact: its input and its tables' changelogs have the same partitions,
so faust commits a scoped partition's offsets and the table writes it caused in
one transaction. Its outputs (states, alerts) go to other topics: a state is
republished whole on the next change, and an alert may repeat or go missing
around a crash.
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
from sluice.kafka import Output
from sluice.kafka_security import faust_credentials
from sluice.logs import get_logger
from sluice.topics import BUDGETS
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
# Older formats on the scoped topic, sent by the faust `route` stage this replaced; they are
# read until the topic's retention drops them. New values are ScopedBudgetChange protos.
DELTA_MARK = b"D"  # JSON [minute start (epoch s), nanos, tokens, requests]
USAGE_MARK = b"U"  # one UsageCharged per scope
POLICY_MARK = b"P"  # a BudgetPolicy
OLD_MARKS = (DELTA_MARK, USAGE_MARK, POLICY_MARK)
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


def delta_outputs(charges: Iterable[events_pb2.UsageCharged], now: datetime) -> list[Output]:
    """The scoped-topic records that count `charges`: one per scope and minute.

    The caller produces them in the transaction that produces the charges (or
    commits the records they come from), which is what makes budgets exact.
    """
    outputs = []
    for (name, minute), spend in sum_charges(charges, now).items():
        delta = billing_pb2.BudgetDelta(
            minute_start=minute, nanos=spend.nanos, tokens=spend.tokens, requests=spend.requests
        )
        outputs.append(Output(SCOPED, billing_pb2.ScopedBudgetChange(delta=delta), name))
    return outputs


def policy_output(policy: billing_pb2.BudgetPolicy) -> list[Output]:
    """The scoped-topic record that sets `policy` for its scope (none for an unknown period)."""
    if policy.budget.period not in PERIOD_NAMES:
        return []
    name = scope(policy.budget.tenant, policy.budget.key_id)
    return [Output(SCOPED, billing_pb2.ScopedBudgetChange(policy=policy), name)]


def encode_delta(minute: int, spend: Spend) -> bytes:
    """The older JSON form of a delta (still read, see OLD_MARKS)."""
    return DELTA_MARK + json.dumps([minute, *spend.as_list()]).encode()


def decode_delta(body: bytes) -> tuple[datetime, Spend]:
    minute, nanos, tokens, requests = json.loads(body)
    return datetime.fromtimestamp(minute, UTC), Spend(nanos, tokens, requests)


def decode_change(value: bytes, now: datetime) -> tuple[datetime, Spend] | billing_pb2.BudgetPolicy:
    """A scoped-topic value, in the current or an older form: a delta (when, what) or a policy.

    Raises DecodeError (or ValueError for old JSON) on a value that is neither.
    """
    mark, body = value[:1], value[1:]
    if mark == DELTA_MARK:
        return decode_delta(body)
    if mark == USAGE_MARK:
        charge = events_pb2.UsageCharged.FromString(body)
        return datetime.fromtimestamp(charge_minute(charge, now), UTC), Spend.of(charge)
    if mark == POLICY_MARK:
        return billing_pb2.BudgetPolicy.FromString(body)
    change = billing_pb2.ScopedBudgetChange.FromString(value)
    if change.WhichOneof("change") == "policy":
        return change.policy
    if change.WhichOneof("change") != "delta":
        raise ValueError("scoped budget change: neither delta nor policy")
    delta = change.delta
    at = datetime.fromtimestamp(delta.minute_start, UTC)
    return at, Spend(delta.nanos, delta.tokens, delta.requests)


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


class AwaitedTable(faust.Table):  # type: ignore[type-arg]
    """A faust table whose changelog writes an agent can wait for.

    faust sends table changes from a buffer, so a change can still be unsent when
    faust commits the record that made it; `written` waits until the broker has
    every change so far (in the current transaction, or an earlier one).
    """

    def __post_init__(self) -> None:  # faust Services call this at the end of __init__
        super().__post_init__()
        self._unsent: list[asyncio.Future[Any]] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        future = super().send_changelog(*args, **kwargs)
        self._unsent.append(future)
        return future

    async def written(self) -> None:
        unsent, self._unsent = self._unsent, []
        if unsent:
            await asyncio.gather(*unsent)


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
        self.scoped = self.app.topic(SCOPED, internal=True, partitions=SCOPED_PARTITIONS, **raw)
        self.budgets_out = self.app.topic(BUDGETS, **raw)
        self.alerts_out = self.app.topic(ALERTS, **raw)
        # scope|period|window start -> [nanos, tokens, requests]
        # scope -> {period: [window start, nanos, tokens, requests]}: one changelog write per
        # scope and charge. Plain JSON values: faust's typed values would need faust Records.
        # "offset" holds the scoped-topic offset last counted in (see `_account`).
        self.windows = self._table("windows")
        # scope|period -> Budget, serialized and base64-encoded (tables hold JSON)
        self.policies = self._table("policies")
        self.app.agent(self.scoped, name="account")(self._account)
        # faust only honours exactly_once inside its own Worker (App.in_transaction checks
        # in_worker); embedded, it would read the scoped topic uncommitted (the deltas of an
        # aborted pricer transaction too) and commit without transactions.
        self.app.in_worker = True
        self.app.finalize()
        self.ready = asyncio.Event()

    def _table(self, name: str) -> AwaitedTable:
        table = AwaitedTable(self.app, name=name, default=None, beacon=self.app.tables.beacon)
        self.app.tables.add(table)
        return table

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

    async def _account(self, stream: StreamT[bytes]) -> None:
        # faust commits a partition's offsets from its own task, with whatever table writes
        # the transaction holds by then: those of a record not yet acknowledged (it counts
        # twice after a crash: the offset guard in `_count` skips it), and never those still
        # in faust's send buffer (they would be lost: each record's writes are awaited below,
        # before the record is acknowledged).
        async for event in stream.events():
            name = bytes(event.key).decode()
            now = datetime.now(UTC)
            try:
                change = decode_change(bytes(event.value), now)
            except (DecodeError, ValueError):
                log.warning("undecodable budget change skipped", scope=name, offset=event.message.offset)
                continue
            if isinstance(change, billing_pb2.BudgetPolicy):
                await self._set_policy(name, change.budget, now)  # setting a policy twice is harmless
            else:
                at, spend = change
                await self._count(name, spend, at, now, event.message.offset)
            await self.windows.written()
            await self.policies.written()

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

    async def _count(self, scope_name: str, spend: Spend, at: datetime, now: datetime, offset: int) -> None:
        windows = dict(self.windows.get(scope_name) or {})
        # A scope's changes are all on one partition, so offsets only grow: one already
        # counted is a record re-read after a crash whose count had committed.
        if windows.get("offset", -1) >= offset:
            log.info("budget change already counted", scope=scope_name, offset=offset)
            return
        before = {period: self.spend(scope_name, period, now) for period in PERIODS}
        add_to_windows(windows, spend, at)
        windows["offset"] = offset
        self.windows[scope_name] = windows  # one changelog record: the count and its offset
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
