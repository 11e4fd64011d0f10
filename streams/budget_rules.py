"""What a budget means: its scope, its limits, when it alerts and when it blocks.

Pure functions shared by the budget stream (which publishes the state), the
metering API (which reports it) and the gateway (which enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from services.metering.pricing import format_amount
from sluice.v1 import billing_pb2, events_pb2
from streams.periods import Period, stamp, window_end, window_start

PERIOD_NAMES: dict[int, Period] = {
    billing_pb2.BUDGET_PERIOD_MINUTE: "minute",
    billing_pb2.BUDGET_PERIOD_DAY: "day",
    billing_pb2.BUDGET_PERIOD_MONTH: "month",
}
ALERT_THRESHOLDS = (80, 100)


@dataclass
class Spend:
    nanos: int = 0
    tokens: int = 0
    requests: int = 0

    @classmethod
    def of(cls, charge: events_pb2.UsageCharged) -> Spend:
        """What one ledger entry adds: a correction moves money, not tokens or requests."""
        if charge.kind == billing_pb2.CHARGE_KIND_CORRECTION:
            return cls(nanos=charge.cost.nanos)
        usage = charge.usage
        return cls(charge.cost.nanos, usage.prompt_tokens + usage.completion_tokens, 1)

    def add(self, other: Spend) -> None:
        self.nanos += other.nanos
        self.tokens += other.tokens
        self.requests += other.requests

    def used(self, limit: str) -> int:
        return {"cost": self.nanos, "tokens": self.tokens, "requests": self.requests}[limit]

    def as_list(self) -> list[int]:
        return [self.nanos, self.tokens, self.requests]


def scope(tenant: str, key_id: str) -> str:
    return f"key={tenant}/{key_id}" if key_id else f"tenant={tenant}"


def budget_key(budget: billing_pb2.Budget) -> str:
    """Kafka key of a budget's policy and state: one compacted entry per budget."""
    return f"{budget.tenant}/{budget.key_id}/{PERIOD_NAMES[budget.period]}"


def limits(budget: billing_pb2.Budget) -> list[tuple[str, int]]:
    pairs = [
        ("cost", budget.limit_nanos),
        ("tokens", budget.limit_tokens),
        ("requests", budget.limit_requests),
    ]
    return [(name, limit) for name, limit in pairs if limit > 0]


def crossings(budget: billing_pb2.Budget, before: Spend, after: Spend) -> list[tuple[str, int]]:
    """(limit, percent) thresholds this spend change crossed upwards."""
    found = []
    for name, limit in limits(budget):
        for percent in ALERT_THRESHOLDS:
            if before.used(name) * 100 < percent * limit <= after.used(name) * 100:
                found.append((name, percent))
    return found


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def window(budget: billing_pb2.Budget, spend: Spend, now: datetime) -> billing_pb2.BudgetWindow:
    period = PERIOD_NAMES[budget.period]
    start = window_start(period, now)
    return billing_pb2.BudgetWindow(
        start=timestamp(start),
        reset_at=timestamp(window_end(period, start)),
        spent_nanos=spend.nanos,
        tokens=spend.tokens,
        requests=spend.requests,
    )


def describe(budget: billing_pb2.Budget) -> str:
    who = (
        f"key {budget.key_id!r} of tenant {budget.tenant!r}" if budget.key_id else f"tenant {budget.tenant!r}"
    )
    period = PERIOD_NAMES[budget.period]
    kind = "rate limit" if period == "minute" else f"{'daily' if period == 'day' else 'monthly'} budget"
    return f"{who} {kind}"


def limit_text(name: str, limit: int, used: int, currency: str) -> str:
    if name == "cost":
        return f"limit {format_amount(limit)} {currency}, spent {format_amount(used)} {currency}"
    unit = "tokens" if name == "tokens" else "requests"
    return f"limit {limit} {unit}, used {used}"


def state(budget: billing_pb2.Budget, spend: Spend, now: datetime) -> events_pb2.BudgetState:
    win = window(budget, spend, now)
    reached = [(name, limit) for name, limit in limits(budget) if spend.used(name) >= limit]
    blocked = budget.mode == billing_pb2.BUDGET_MODE_HARD and bool(reached)
    reason = ""
    if reached:
        name, limit = reached[0]
        text = limit_text(name, limit, spend.used(name), budget.currency)
        reason = (
            f"budget: {describe(budget)} reached ({text});"
            f" resets at {stamp(win.reset_at.ToDatetime(tzinfo=UTC))}"
        )
    return events_pb2.BudgetState(
        tenant=budget.tenant,
        spent_nanos=spend.nanos,
        limit_nanos=budget.limit_nanos,
        currency=budget.currency,
        key_id=budget.key_id,
        budget=budget,
        window=win,
        blocked=blocked,
        reason=reason,
        updated_at=timestamp(now),
    )
