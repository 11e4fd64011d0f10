"""Budgets count each charge exactly once, even when the budget stream is killed mid-batch.

The budget stream sums a batch of charges per scope before counting it; after a
kill -9 it must re-read exactly the charges whose sums never committed. A replay
happens first thing after the restart, so the first budget state that has seen
every charge must equal the ledger exactly: a doubled batch would already be in it.
"""

from __future__ import annotations

import asyncio

import pytest

from sluice.stack import Stack
from sluice.v1 import billing_pb2, events_pb2
from tests.e2e import test_metering_exactly_once as exactly_once
from tests.metering.helpers import (
    budget_state,
    charges,
    kill_hard,
    produce,
    set_budget,
    start_metering,
    varied_completions,
    wait_until,
)

# The kill test's private broker and stack (pytest finds fixtures by their name here).
private_broker = exactly_once.private_broker
private_stack = exactly_once.private_stack
COUNT = exactly_once.COUNT
TENANT = "crash-budget"
BUDGET = billing_pb2.Budget(
    tenant=TENANT,
    period=billing_pb2.BUDGET_PERIOD_MONTH,
    currency="USD",
    limit_tokens=10**15,  # never reached: this test is about the count, not the block
    mode=billing_pb2.BUDGET_MODE_HARD,
)


def state_now(stack: Stack) -> events_pb2.BudgetState | None:
    return asyncio.run(budget_state(stack.settings.bootstrap, BUDGET))


def counted(stack: Stack) -> int:
    state = state_now(stack)
    return state.window.requests if state is not None else 0


@pytest.mark.xfail(
    strict=False,
    reason="known defect (issue #6): faust commits the route stage's input offsets (sluice.usage.v1,"
    " 6 partitions) and its sends to the scoped topic (3 partitions) under different transactional"
    " ids, so a kill between the two commits can count a batch twice; seen once in three runs (3025"
    " requests for 3000 charges). Fix: the pricer sends the per-poll sums in its own transaction.",
)
def test_kill_9_mid_batch_neither_loses_nor_doubles_a_charge_in_a_budget(private_stack: Stack) -> None:
    bootstrap = private_stack.settings.bootstrap
    asyncio.run(set_budget(bootstrap, BUDGET))
    events = varied_completions(TENANT, COUNT)
    asyncio.run(produce(bootstrap, events))
    metering = start_metering(private_stack)
    try:
        wait_until(lambda: counted(private_stack) > 0, timeout=180, what="budgets to be counting")
        kill_hard(metering)
        assert counted(private_stack) < COUNT, "budgets were done before the kill: nothing was tested"
        metering = start_metering(private_stack)
        wait_until(
            lambda: len(asyncio.run(charges(bootstrap, TENANT))) >= COUNT, timeout=300, what="every charge"
        )
        wait_until(lambda: counted(private_stack) >= COUNT, timeout=300, what="budgets to count every charge")
    finally:
        kill_hard(metering)
    ledger = asyncio.run(charges(bootstrap, TENANT))
    assert all(len(found) == 1 for found in ledger.values())
    state = state_now(private_stack)
    assert state is not None
    assert state.window.requests == COUNT
    assert state.window.spent_nanos == sum(found[0].cost.nanos for found in ledger.values())
    usage = [found[0].usage for found in ledger.values()]
    assert state.window.tokens == sum(u.prompt_tokens + u.completion_tokens for u in usage)
