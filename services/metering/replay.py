"""Reading the ledger back, and re-pricing it by replay.

Re-pricing never edits history: it replays completions from a point in time,
prices each under the new catalog, compares with what the ledger already
holds for that (request_id, attempt), and publishes the difference as a
correction entry. All corrections and the new catalog commit in one
transaction, together with the budget sums of the corrections (so budgets move
by exactly the corrected amounts), and a second run with the same catalog
finds nothing to correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.metering.pricer import PRODUCER, check_usage
from services.metering.pricing import Catalog, format_amount
from services.metering.reader import read_committed
from sluice import envelope as envelopes
from sluice.kafka import ENTRY_HEADER, send_all, start_producer
from sluice.topics import COMPLETIONS, USAGE, BadEvent
from sluice.v1 import billing_pb2, events_pb2
from streams.metering_budgets import delta_outputs

PRICES = "sluice.prices.v1"
REPRICE_TRANSACTIONAL_ID = "sluice-metering-reprice"


@dataclass
class LedgerEntry:
    """What the ledger holds for one (request_id, attempt): its charge and its corrections."""

    charge: events_pb2.UsageCharged
    net_nanos: int
    version: str


async def ledger_entries(bootstrap: str) -> dict[tuple[str, int], LedgerEntry]:
    entries: dict[tuple[str, int], LedgerEntry] = {}
    corrections: list[events_pb2.UsageCharged] = []
    async for record in read_committed(bootstrap, USAGE):
        charge = events_pb2.UsageCharged.FromString(record.value or b"")
        key = (charge.envelope.request_id, charge.envelope.attempt)
        if charge.kind == billing_pb2.CHARGE_KIND_CORRECTION:
            corrections.append(charge)
        elif key not in entries:
            entries[key] = LedgerEntry(charge, charge.cost.nanos, charge.cost.price_version)
    for fix in sorted(corrections, key=lambda c: c.envelope.event_time.ToNanoseconds()):
        entry = entries.get((fix.envelope.request_id, fix.envelope.attempt))
        if entry is not None:
            entry.net_nanos += fix.cost.nanos
            entry.version = fix.cost.price_version
    return entries


@dataclass
class RepriceReport:
    catalog_version: str
    completions: int = 0
    unchanged: int = 0
    not_charged_yet: int = 0
    invalid: int = 0
    corrections: list[events_pb2.UsageCharged] = field(default_factory=list)

    @property
    def difference_nanos(self) -> int:
        return sum(c.cost.nanos for c in self.corrections)


async def plan_reprice(bootstrap: str, catalog: Catalog, since: datetime, tenant: str = "") -> RepriceReport:
    """The corrections that would make every charge since `since` (of `tenant`, if given)
    equal its price under `catalog`."""
    ledger = await ledger_entries(bootstrap)
    report = RepriceReport(catalog.version)
    seen: set[tuple[str, int]] = set()
    async for record in read_committed(bootstrap, COMPLETIONS, since):
        event = events_pb2.CompletionFinished.FromString(record.value or b"")
        key = (event.envelope.request_id, event.envelope.attempt)
        if key in seen or (tenant and event.envelope.tenant != tenant):
            continue
        seen.add(key)
        report.completions += 1
        entry = ledger.get(key)
        if entry is None:
            report.not_charged_yet += 1
            continue
        try:
            check_usage(event)
        except BadEvent:
            report.invalid += 1
            continue
        busy_ms = event.engine_busy_ms or event.duration_ms
        price = catalog.price(
            event.model, event.usage, event.envelope.event_time.ToDatetime(tzinfo=UTC), busy_ms
        )
        delta = price.cost.nanos - entry.net_nanos
        if delta == 0:
            report.unchanged += 1
            continue
        report.corrections.append(correction(entry, delta, catalog, price.fallback))
    return report


def correction(entry: LedgerEntry, delta: int, catalog: Catalog, fallback: bool) -> events_pb2.UsageCharged:
    """The charge, restated with the difference as its cost: same request, attempt and usage."""
    fix = events_pb2.UsageCharged()
    fix.CopyFrom(entry.charge)
    fix.envelope.CopyFrom(envelopes.follow(entry.charge.envelope, f"{PRODUCER}-reprice"))
    fix.kind = billing_pb2.CHARGE_KIND_CORRECTION
    fix.corrects_version = entry.version
    fix.fallback_price = fallback
    fix.cost.nanos = delta
    fix.cost.currency = catalog.currency
    fix.cost.price_version = catalog.version
    fix.cost.amount = format_amount(delta)
    return fix


async def publish_reprice(bootstrap: str, catalog: Catalog, report: RepriceReport) -> None:
    """The new catalog, every correction and their budget sums, in one transaction: all or none."""
    producer = await start_producer(bootstrap, PRODUCER, REPRICE_TRANSACTIONAL_ID)
    try:
        async with producer.transaction():
            await producer.send(PRICES, catalog.to_proto().SerializeToString(), key=catalog.version.encode())
            for fix in report.corrections:
                header = (ENTRY_HEADER, f"correction:{catalog.version}".encode())
                await producer.send(
                    USAGE, fix.SerializeToString(), key=fix.envelope.request_id.encode(), headers=[header]
                )
            await send_all(producer, PRODUCER, delta_outputs(report.corrections, datetime.now(UTC)))
    finally:
        await producer.stop()
