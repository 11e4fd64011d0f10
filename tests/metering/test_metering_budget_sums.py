"""Budgets count sums of charges per scope and minute, not each charge.

Counting the sums must leave every window exactly as counting the charges one
by one would, in any order, and the wire form of a sum must round-trip: the
current one (ScopedBudgetChange) and the older ones still on the scoped topic
after an upgrade.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from sluice.v1 import billing_pb2, envelope_pb2, events_pb2
from streams.budget_rules import Spend
from streams.metering_budgets import (
    DELTA_MARK,
    POLICY_MARK,
    SCOPED,
    USAGE_MARK,
    add_to_windows,
    decode_change,
    delta_outputs,
    encode_delta,
    policy_output,
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
    for output in delta_outputs(charges, NOW):
        # Through the wire form, as the `account` agent receives it.
        assert output.topic == SCOPED
        change = decode_change(output.event.SerializeToString(), NOW)
        assert not isinstance(change, billing_pb2.BudgetPolicy)
        at, spend = change
        add_to_windows(tables.setdefault(output.key, {}), spend, at)


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


DAY_POLICY = billing_pb2.BudgetPolicy(
    budget=billing_pb2.Budget(tenant="t", key_id="k1", period=billing_pb2.BUDGET_PERIOD_DAY, limit_tokens=9)
)


def test_the_older_forms_on_the_scoped_topic_still_count() -> None:
    minute = int(NOW.replace(second=0).timestamp())
    assert decode_change(encode_delta(minute, Spend(5, 6, 7)), NOW) == (
        NOW.replace(second=0),
        Spend(5, 6, 7),
    )
    old_charge = BATCH[0]
    assert decode_change(USAGE_MARK + old_charge.SerializeToString(), NOW) == (
        NOW.replace(second=0),
        Spend(100, 15, 1),
    )
    policy = DAY_POLICY
    assert decode_change(POLICY_MARK + policy.SerializeToString(), NOW) == policy


def test_a_policy_goes_to_its_scope_and_never_looks_like_an_older_form() -> None:
    policy = DAY_POLICY
    [output] = policy_output(policy)
    assert (output.topic, output.key) == (SCOPED, "key=t/k1")
    value = output.event.SerializeToString()
    assert value[:1] not in (DELTA_MARK, USAGE_MARK, POLICY_MARK)
    assert decode_change(value, NOW) == policy
    unknown = billing_pb2.BudgetPolicy(budget=billing_pb2.Budget(tenant="t"))  # no period
    assert policy_output(unknown) == []
    for delta in delta_outputs([charge(0, (0, 0), NOW)], NOW):  # even an all-zero sum
        assert delta.event.SerializeToString()[:1] not in (DELTA_MARK, USAGE_MARK, POLICY_MARK)


@pytest.mark.parametrize("value", [b"D[1, 2", b"\xff\xff", b""])
def test_an_undecodable_change_is_refused(value: bytes) -> None:
    with pytest.raises((DecodeError, ValueError)):
        decode_change(value, NOW)
