"""Exactly-once charging under failure: kill -9 of the metering process, and a broker restart.

Each test runs on a broker of its own (in a temp dir), so killing things cannot
disturb the session stack. Completions with known usage go in; the committed
ledger must hold exactly one charge per (request_id, attempt) and the exact total.
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
from sluice.v1 import events_pb2
from tests.metering.helpers import (
    charges,
    kill_hard,
    metric,
    produce,
    start_metering,
    varied_completions,
    wait_until,
)

COUNT = 3000


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


def assert_exact_ledger(stack: Stack, tenant: str, events: list[events_pb2.CompletionFinished]) -> None:
    bootstrap = stack.settings.bootstrap
    wanted = {(e.envelope.request_id, e.envelope.attempt) for e in events}

    def all_charged() -> bool:
        return len(asyncio.run(charges(bootstrap, tenant))) >= len(wanted)

    wait_until(all_charged, timeout=180, what=f"{len(wanted)} charges")
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
    asyncio.run(produce(private_stack.settings.bootstrap, events))
    metering = start_metering(private_stack)
    try:
        wait_until(lambda: charged_so_far(private_stack) >= 200, timeout=120, what="pricing to be under way")
        kill_hard(metering)
        committed = len(asyncio.run(charges(private_stack.settings.bootstrap, tenant)))
        assert committed < COUNT, "the process finished before it was killed: nothing was tested"
        metering = start_metering(private_stack)
        assert_exact_ledger(private_stack, tenant, events)
    finally:
        kill_hard(metering)


def test_broker_restart_mid_stream_neither_loses_nor_doubles_a_charge(
    private_stack: Stack, private_broker: LocalBroker
) -> None:
    tenant = "crash-broker"
    events = varied_completions(tenant, COUNT)
    asyncio.run(produce(private_stack.settings.bootstrap, events))
    metering = start_metering(private_stack)
    try:
        wait_until(lambda: charged_so_far(private_stack) >= 200, timeout=120, what="pricing to be under way")
        private_broker.stop()
        private_broker.start()
        private_broker.wait_ready(timeout=120)
        if metering.poll() is not None:  # a supervisor would restart it; so do we
            metering = start_metering(private_stack)
        assert_exact_ledger(private_stack, tenant, events)
    finally:
        kill_hard(metering)


def test_log_of_the_killed_process_is_kept(private_stack: Stack) -> None:
    assert Path(private_stack.log_dir / "metering.log").stat().st_size > 0
