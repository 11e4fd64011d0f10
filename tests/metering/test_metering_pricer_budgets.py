"""The pricer hands each poll's budget sums to its transaction, and only the poll's charges.

The sums travel in the transaction that produces the charges (EventConsumer.poll_outputs),
so they must cover exactly the charges the poll produced: a dead-lettered completion adds
nothing, and a second call (the next poll) starts from zero.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.metering.attribution import Attribution
from services.metering.pricer import Pricer
from services.metering.pricing import Catalog
from sluice.config import load_settings
from sluice.topics import USAGE, BadEvent
from sluice.v1 import billing_pb2, events_pb2
from streams.budget_rules import Spend
from streams.metering_budgets import SCOPED, decode_change
from tests.metering.helpers import completion, varied_completions


def pricer(tmp_path: Path) -> Pricer:
    attribution = Attribution(tmp_path / "attribution.sqlite")
    attribution.note("keyed", key_id="k1")
    return Pricer(Catalog.load(load_settings().prices_file), attribution)


def sums(outputs: list[tuple[str, bytes]]) -> dict[str, Spend]:
    totals: dict[str, Spend] = {}
    for name, value in outputs:
        change = decode_change(value, datetime.now(UTC))
        assert not isinstance(change, billing_pb2.BudgetPolicy)
        totals.setdefault(name, Spend()).add(change[1])
    return totals


def test_a_polls_budget_sums_equal_its_charges_and_the_next_poll_starts_empty(tmp_path: Path) -> None:
    prices = pricer(tmp_path)
    events = [*varied_completions("t", 40), completion("t", 10, 5, request_id="keyed")]
    charges: list[events_pb2.UsageCharged] = []
    for event in events:
        charges.extend(o.event for o in prices.outputs(event) if o.topic == USAGE)  # type: ignore[misc]
    with pytest.raises(BadEvent):
        prices.outputs(events_pb2.CompletionFinished(model="m"))  # no usage: dead-lettered
    outputs = prices.budget_outputs()
    assert {o.topic for o in outputs} == {SCOPED}
    totals = sums([(o.key, o.event.SerializeToString()) for o in outputs])
    tenant = totals["tenant=t"]
    assert tenant.requests == len(events) == len(charges)
    assert tenant.nanos == sum(c.cost.nanos for c in charges)
    assert tenant.tokens == sum(c.usage.prompt_tokens + c.usage.completion_tokens for c in charges)
    assert totals["key=t/k1"] == Spend(charges[-1].cost.nanos, 15, 1)
    assert prices.budget_outputs() == []
