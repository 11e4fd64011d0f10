"""Budgets count each charge exactly once, even when metering is killed mid-run.

The pricer sends each poll's budget sums in the transaction of the poll's charges,
and the budget stream counts them in transactions with its table writes; after a
kill -9 both must re-read exactly what never committed. A replay happens first
thing after the restart, so the first budget state that has seen every charge
must equal the ledger exactly: a doubled poll would already be in it.
"""

from __future__ import annotations

import asyncio

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


def test_kill_9_mid_batch_neither_loses_nor_doubles_a_charge_in_a_budget(private_stack: Stack) -> None:
    bootstrap = private_stack.settings.bootstrap
    asyncio.run(set_budget(bootstrap, BUDGET))
    # Small transactions (budgets count at the pricer's pace), and the charges only once the
    # budget is known (its state is published from then on): the kill must land mid-run.
    slow = {"SLUICE_METERING_TRANSACTION_RECORDS": "3"}
    metering = start_metering(private_stack, slow)
    try:
        wait_until(lambda: state_now(private_stack) is not None, timeout=180, what="the budget to be set")
        asyncio.run(produce(bootstrap, varied_completions(TENANT, COUNT)))
        wait_until(lambda: counted(private_stack) > 0, timeout=180, what="budgets to be counting")
        kill_hard(metering)
        assert counted(private_stack) < COUNT, "budgets were done before the kill: nothing was tested"
        metering = start_metering(private_stack, slow)
        wait_until(
            lambda: len(asyncio.run(charges(bootstrap, TENANT))) >= COUNT, timeout=300, what="every charge"
        )
        wait_until(lambda: counted(private_stack) >= COUNT, timeout=300, what="budgets to count every charge")
    finally:
        kill_hard(metering)
    ledger = asyncio.run(charges(bootstrap, TENANT))
    assert [key for key, found in ledger.items() if len(found) != 1] == []
    state = state_now(private_stack)
    assert state is not None
    assert state.window.requests == COUNT
    assert state.window.spent_nanos == sum(found[0].cost.nanos for found in ledger.values())
    usage = [found[0].usage for found in ledger.values()]
    assert state.window.tokens == sum(u.prompt_tokens + u.completion_tokens for u in usage)
