"""Exactly-once charging under failure: kill -9 of the metering process, and a broker restart.

The tests share a broker of their own (in a temp dir), so killing things cannot
disturb the session stack; each uses its own tenant. Completions with known usage
go in; the committed ledger must hold exactly one charge per (request_id, attempt)
and the exact total, and the budgets must count every charge exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest

from services.metering.pricing import Catalog
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, Settings, load_settings
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.v1 import billing_pb2, events_pb2
from tests.metering.helpers import (
    budget_state,
    charges,
    committed,
    kill_hard,
    metric,
    produce,
    set_budget,
    start_metering,
    varied_completions,
    wait_until,
)

COUNT = 1500  # 60 transactions of 25: the kill lands with many still to come


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    port, controller = free_ports(2)
    broker = LocalBroker(
        REPO_ROOT, tmp_path_factory.mktemp("metering-kafka"), port=port, controller_port=controller
    )
    broker.start()
    try:
        broker.wait_ready(timeout=120)
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def private_stack(private_broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    (grpc_port,) = free_ports(1)
    settings = load_settings(
        kafka_bootstrap=private_broker.bootstrap,
        state_dir=tmp_path_factory.mktemp("metering-state"),
        metering_port=grpc_port,
        metrics_port_offset=free_offset([grpc_port]),
        # Small transactions: many of them are open while the process is killed.
        metering_transaction_records=25,
    )
    stack = Stack(settings)
    stack.apply_topics()
    return stack


def expected_total(events: list[events_pb2.CompletionFinished], settings: Settings) -> int:
    catalog = Catalog.load(settings.prices_file)
    return sum(
        catalog.price(e.model, e.usage, e.envelope.event_time.ToDatetime(tzinfo=UTC)).cost.nanos
        for e in events
    )


def produce_completions(stack: Stack, events: list[events_pb2.CompletionFinished]) -> int:
    """Produce `events`; returns the pricer's committed count they will take it to."""
    bootstrap = stack.settings.bootstrap
    before = asyncio.run(committed(bootstrap))
    asyncio.run(produce(bootstrap, events))
    return before + len(events)


def assert_exact_ledger(
    stack: Stack, tenant: str, events: list[events_pb2.CompletionFinished], done_at: int
) -> None:
    bootstrap = stack.settings.bootstrap
    wanted = {(e.envelope.request_id, e.envelope.attempt) for e in events}
    # The offsets commit with the charges: once they reach `done_at`, every charge is in.
    wait_until(lambda: asyncio.run(committed(bootstrap)) >= done_at, 180, f"{len(wanted)} charges")
    ledger = asyncio.run(charges(bootstrap, tenant))
    duplicates = {pair: len(found) for pair, found in ledger.items() if len(found) > 1}
    assert duplicates == {}
    assert set(ledger) == wanted
    assert sum(found[0].cost.nanos for found in ledger.values()) == expected_total(events, stack.settings)
    fallback = [found[0] for found in ledger.values() if found[0].model == "no-such-model"]
    assert fallback and all(c.fallback_price and c.cost.nanos > 0 for c in fallback)


def charged_so_far(stack: Stack) -> float:
    return metric(stack.settings, "metering", "sluice_events_consumed_total", topic="sluice.completions.v1")


def test_kill_9_mid_transaction_neither_loses_nor_doubles_a_charge(private_stack: Stack) -> None:
    tenant = "crash-kill"
    events = varied_completions(tenant, COUNT)
    done_at = produce_completions(private_stack, events)
    metering = start_metering(private_stack)
    try:
        wait_until(lambda: charged_so_far(private_stack) >= 200, timeout=120, what="pricing to be under way")
        kill_hard(metering)
        # The group's offsets, not the ledger: a read-committed read would wait for the killed
        # process's open transaction to time out (60 s) before it could end.
        assert asyncio.run(committed(private_stack.settings.bootstrap)) < done_at, (
            "the process finished before it was killed: nothing was tested"
        )
        metering = start_metering(private_stack)
        assert_exact_ledger(private_stack, tenant, events, done_at)
    finally:
        kill_hard(metering)


def test_broker_restart_mid_stream_neither_loses_nor_doubles_a_charge(
    private_stack: Stack, private_broker: LocalBroker
) -> None:
    tenant = "crash-broker"
    events = varied_completions(tenant, COUNT)
    done_at = produce_completions(private_stack, events)
    metering = start_metering(private_stack)
    try:
        wait_until(lambda: charged_so_far(private_stack) >= 200, timeout=120, what="pricing to be under way")
        private_broker.stop()
        private_broker.start()
        private_broker.wait_ready(timeout=120)
        if metering.poll() is not None:  # a supervisor would restart it; so do we
            metering = start_metering(private_stack)
        assert_exact_ledger(private_stack, tenant, events, done_at)
    finally:
        kill_hard(metering)


BUDGET_TENANT = "crash-budget"
BUDGET = billing_pb2.Budget(
    tenant=BUDGET_TENANT,
    period=billing_pb2.BUDGET_PERIOD_MONTH,
    currency="USD",
    limit_tokens=10**15,  # never reached: this test is about the count, not the block
    mode=billing_pb2.BUDGET_MODE_HARD,
)
# Budgets count at the pricer's pace: with 3-record transactions, a few hundred of them
# are under way when the kill lands, which is what a doubled or lost poll needs to show.
BUDGET_COUNT = 1000


def budget_now(stack: Stack) -> events_pb2.BudgetState | None:
    return asyncio.run(budget_state(stack.settings.bootstrap, BUDGET))


def counted(stack: Stack) -> int:
    state = budget_now(stack)
    return state.window.requests if state is not None else 0


def test_kill_9_mid_batch_neither_loses_nor_doubles_a_charge_in_a_budget(private_stack: Stack) -> None:
    """The pricer sends each poll's budget sums in the transaction of the poll's charges, and
    the budget stream counts them in transactions with its table writes; after a kill -9 both
    must re-read exactly what never committed. A replay happens first thing after the restart,
    so the first budget state that has seen every charge must equal the ledger exactly: a
    doubled poll would already be in it."""
    bootstrap = private_stack.settings.bootstrap
    asyncio.run(set_budget(bootstrap, BUDGET))
    # Small transactions, and the charges only once the budget is known (its state is
    # published from then on): the kill must land mid-run.
    slow = {"SLUICE_METERING_TRANSACTION_RECORDS": "3"}
    metering = start_metering(private_stack, slow)
    try:
        wait_until(lambda: budget_now(private_stack) is not None, timeout=180, what="the budget to be set")
        done_at = produce_completions(private_stack, varied_completions(BUDGET_TENANT, BUDGET_COUNT))
        wait_until(lambda: counted(private_stack) > 0, timeout=180, what="budgets to be counting")
        kill_hard(metering)
        # Pricing was still under way (so were the budgets, which only count what it committed).
        assert asyncio.run(committed(bootstrap)) < done_at, "pricing was done before the kill: nothing tested"
        metering = start_metering(private_stack, slow)
        wait_until(lambda: asyncio.run(committed(bootstrap)) >= done_at, 300, "every charge")
        wait_until(lambda: counted(private_stack) >= BUDGET_COUNT, 300, "budgets to count every charge")
    finally:
        kill_hard(metering)
    ledger = asyncio.run(charges(bootstrap, BUDGET_TENANT))
    assert len(ledger) == BUDGET_COUNT
    assert [key for key, found in ledger.items() if len(found) != 1] == []
    state = budget_now(private_stack)
    assert state is not None
    assert state.window.requests == BUDGET_COUNT
    assert state.window.spent_nanos == sum(found[0].cost.nanos for found in ledger.values())
    usage = [found[0].usage for found in ledger.values()]
    assert state.window.tokens == sum(u.prompt_tokens + u.completion_tokens for u in usage)


def test_log_of_the_killed_process_is_kept(private_stack: Stack) -> None:
    assert Path(private_stack.log_dir / "metering.log").stat().st_size > 0
