"""The budget stream sums a batch of charges per scope and minute before counting them.

Counting the sums must leave every window exactly as counting the charges one
by one would, in any order, and the wire form of a sum must round-trip.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from sluice.v1 import billing_pb2, envelope_pb2, events_pb2
from streams.budget_rules import Spend
from streams.metering_budgets import (
    DELTA_MARK,
    add_to_windows,
    decode_delta,
    encode_delta,
    sum_charges,
    usage_scopes,
)

NOW = datetime(2026, 11, 29, 15, 30, 12, tzinfo=UTC)


def charge(
    nanos: int,
    tokens: tuple[int, int],
    at: datetime,
    *,
    key_id: str = "",
    correction: bool = False,
) -> events_pb2.UsageCharged:
    completed = Timestamp()
    completed.FromDatetime(at)
    return events_pb2.UsageCharged(
        envelope=envelope_pb2.Envelope(tenant="t", request_id=f"r{nanos}", attempt=1),
        model="m",
        usage=envelope_pb2.Usage(prompt_tokens=tokens[0], completion_tokens=tokens[1]),
        cost=envelope_pb2.Cost(nanos=nanos, currency="USD"),
        kind=billing_pb2.CHARGE_KIND_CORRECTION if correction else billing_pb2.CHARGE_KIND_COMPLETION,
        key_id=key_id,
        completed_at=completed,
    )


def one_by_one(charges: list[events_pb2.UsageCharged]) -> dict[str, dict[str, list[Any]]]:
    tables: dict[str, dict[str, list[Any]]] = {}
    for c in charges:
        for name in usage_scopes(c):
            add_to_windows(tables.setdefault(name, {}), Spend.of(c), c.completed_at.ToDatetime(tzinfo=UTC))
    return tables


def summed(charges: list[events_pb2.UsageCharged]) -> dict[str, dict[str, list[Any]]]:
    tables: dict[str, dict[str, list[Any]]] = {}
    count_sums(tables, charges)
    return tables


def count_sums(tables: dict[str, dict[str, list[Any]]], charges: list[events_pb2.UsageCharged]) -> None:
    for (name, minute), total in sum_charges(charges, NOW).items():
        # Through the wire form, as the `account` agent receives it.
        value = encode_delta(minute, total)
        assert value.startswith(DELTA_MARK)
        at, spend = decode_delta(value[1:])
        add_to_windows(tables.setdefault(name, {}), spend, at)


BATCH = [
    charge(100, (10, 5), NOW, key_id="k1"),
    charge(250, (20, 0), NOW.replace(second=40), key_id="k1"),
    charge(0, (0, 0), NOW.replace(second=59)),  # zero tokens still counts as a request
    charge(-30, (7, 7), NOW.replace(second=1), correction=True),  # money only
    charge(400, (3, 4), NOW.replace(minute=31, second=2), key_id="k2"),  # the next minute
    charge(70, (1, 1), NOW.replace(minute=29)),  # late: the minute before
]


def test_a_batch_with_several_charges_per_scope_sums_to_one_delta_per_scope_and_minute() -> None:
    deltas = sum_charges(BATCH, NOW)
    minute = int(NOW.replace(second=0).timestamp())
    assert deltas[("tenant=t", minute)] == Spend(nanos=100 + 250 + 0 - 30, tokens=15 + 20, requests=3)
    assert deltas[("key=t/k1", minute)] == Spend(nanos=350, tokens=35, requests=2)
    assert deltas[("key=t/k2", minute + 60)] == Spend(nanos=400, tokens=7, requests=1)
    assert deltas[("model=t/m", minute - 60)] == Spend(nanos=70, tokens=2, requests=1)
    assert len(deltas) == 8  # (tenant, model, k1) + (tenant, model, k2) + (tenant, model)


def test_counting_sums_equals_counting_each_charge_in_any_order() -> None:
    expected = one_by_one(BATCH)
    month = expected["tenant=t"]["month"]
    assert month[1:] == [100 + 250 - 30 + 400 + 70, 15 + 20 + 7 + 2, 5]
    for order in itertools.permutations(BATCH):
        assert one_by_one(list(order)) == expected
    # Split into batches at every point: still the same windows.
    for cut in range(len(BATCH) + 1):
        tables = summed(BATCH[:cut])
        count_sums(tables, BATCH[cut:])
        assert tables == expected


def test_a_charge_without_completion_time_counts_now() -> None:
    bare = events_pb2.UsageCharged(
        envelope=envelope_pb2.Envelope(tenant="t"), model="m", cost=envelope_pb2.Cost(nanos=5)
    )
    assert sum_charges([bare], NOW) == {
        ("tenant=t", int(NOW.replace(second=0).timestamp())): Spend(5, 0, 1),
        ("model=t/m", int(NOW.replace(second=0).timestamp())): Spend(5, 0, 1),
    }
