"""The sluice.v1.Metering gRPC API: usage, budgets and prices."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from aiokafka import AIOKafkaProducer

from services.metering.ledger import Ledger, UsageRow
from services.metering.pricing import Catalog, format_amount
from sluice.kafka import Output, send
from sluice.service import Context
from sluice.v1 import billing_pb2, envelope_pb2, metering_pb2, metering_pb2_grpc
from streams.budget_rules import PERIOD_NAMES, budget_key, timestamp
from streams.metering_budgets import POLICIES, BudgetStream

GROUPINGS = {
    metering_pb2.USAGE_GROUPING_UNSPECIFIED: "model",
    metering_pb2.USAGE_GROUPING_MODEL: "model",
    metering_pb2.USAGE_GROUPING_KEY: "key",
    metering_pb2.USAGE_GROUPING_TEMPLATE: "template",
    metering_pb2.USAGE_GROUPING_DAY: "day",
}
MODES = (billing_pb2.BUDGET_MODE_SOFT, billing_pb2.BUDGET_MODE_HARD)


class InvalidBudget(ValueError):
    """A SetBudget request that cannot be stored; the message names the field."""


def check_budget(budget: billing_pb2.Budget, currency: str) -> billing_pb2.Budget:
    """The budget as it will be stored, or InvalidBudget naming the first bad field."""
    if not budget.tenant:
        raise InvalidBudget("budget.tenant: must not be empty")
    if budget.key_id and (
        len(budget.key_id) != 12 or any(c not in "0123456789abcdef" for c in budget.key_id)
    ):
        raise InvalidBudget("budget.key_id: must be 12 lower-case hex digits (see `sluice keys id`)")
    if budget.period not in PERIOD_NAMES:
        raise InvalidBudget(f"budget.period: {budget.period} is not a known period (minute, day or month)")
    for field in ("limit_nanos", "limit_tokens", "limit_requests"):
        if getattr(budget, field) < 0:
            raise InvalidBudget(f"budget.{field}: must not be negative")
    stored = billing_pb2.Budget()
    stored.CopyFrom(budget)
    if stored.mode == billing_pb2.BUDGET_MODE_UNSPECIFIED:
        stored.mode = billing_pb2.BUDGET_MODE_HARD
    if stored.mode not in MODES:
        raise InvalidBudget(f"budget.mode: {budget.mode} is not soft or hard")
    if stored.currency and stored.currency != currency:
        raise InvalidBudget(f"budget.currency: the catalog bills in {currency}, not {stored.currency}")
    stored.currency = currency
    return stored


def usage_row(row: UsageRow, grouping: str) -> metering_pb2.TenantUsage:
    return metering_pb2.TenantUsage(
        tenant=row.tenant,
        model=row.group if grouping == "model" else "",
        group=row.group,
        requests=row.requests,
        usage=envelope_pb2.Usage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_tokens=row.cached_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
        ),
        cost=envelope_pb2.Cost(
            nanos=row.cost_nanos, currency=row.currency, amount=format_amount(row.cost_nanos)
        ),
        corrections=row.corrections,
        fallback_priced=row.fallback_priced,
    )


@dataclass
class MeteringServicer(metering_pb2_grpc.MeteringServicer):
    ledger: Ledger
    catalog: Catalog
    budgets: BudgetStream
    producer: AIOKafkaProducer | None = None

    async def GetUsage(
        self, request: metering_pb2.GetUsageRequest, context: Context
    ) -> metering_pb2.GetUsageResponse:
        grouping = GROUPINGS.get(request.group_by)
        if grouping is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"group_by: {request.group_by} is unknown")
        assert grouping is not None
        start = _moment(request, "from")
        end = _moment(request, "to")
        if start and end and start >= end:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from: must be before to")
        rows = self.ledger.totals(request.tenant, grouping, start, end)
        return metering_pb2.GetUsageResponse(rows=[usage_row(row, grouping) for row in rows])

    async def GetBudget(
        self, request: metering_pb2.GetBudgetRequest, context: Context
    ) -> metering_pb2.GetBudgetResponse:
        if not request.tenant:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tenant: must not be empty")
        now = datetime.now(UTC)
        states = [
            self.budgets.current_state(budget, now)
            for budget in self.budgets.all_budgets()
            if budget.tenant == request.tenant and (not request.key_id or budget.key_id == request.key_id)
        ]
        return metering_pb2.GetBudgetResponse(budgets=states)

    async def SetBudget(
        self, request: metering_pb2.SetBudgetRequest, context: Context
    ) -> metering_pb2.SetBudgetResponse:
        try:
            budget = check_budget(request.budget, self.catalog.currency)
        except InvalidBudget as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.producer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "metering is starting; retry shortly")
        assert self.producer is not None
        policy = billing_pb2.BudgetPolicy(budget=budget, updated_at=timestamp(datetime.now(UTC)))
        await send(self.producer, "metering", Output(POLICIES, policy, budget_key(budget)))
        return metering_pb2.SetBudgetResponse(budget=budget)

    async def ListPrices(
        self, request: metering_pb2.ListPricesRequest, context: Context
    ) -> metering_pb2.ListPricesResponse:
        return metering_pb2.ListPricesResponse(catalog=self.catalog.to_proto())


def _moment(request: metering_pb2.GetUsageRequest, field: str) -> datetime | None:
    """A request time as naive UTC (the ledger's form), or None when unset."""
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    stamp = getattr(request, field)
    moment: datetime = stamp.ToDatetime()
    return moment
