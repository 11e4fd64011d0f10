"""Metering: prices every completion exactly once, keeps the ledger, budgets and prices.

Pricing consumes sluice.completions.v1 and produces the charges, the callers'
cost replies, the charges' budget sums and the input offsets in one Kafka
transaction per poll, so a charge is never lost or doubled, in the ledger or in
the budgets. The same consumer forwards budget policies to the budget stream in
its transaction. The ledger view is built only from committed charges. Budgets
and windowed totals run as an embedded faust app (streams/).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord

from services.metering.api import MeteringServicer
from services.metering.attribution import Attribution
from services.metering.ledger import Ledger
from services.metering.pricer import Pricer, charged_recently
from services.metering.pricing import Catalog, CatalogError
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output, send, start_producer
from sluice.logs import get_logger
from sluice.service import GrpcApi, Runtime, Service
from sluice.topics import COMPLETIONS, PROMPTS, REQUESTS, USAGE
from sluice.v1 import billing_pb2, events_pb2, metering_pb2, metering_pb2_grpc
from streams.metering_budgets import POLICIES, BudgetStream, policy_output

log = get_logger()
PRICES = "sluice.prices.v1"


class MeteringService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "metering"
        # A fixed id fences a stale instance: only one pricer can commit at a time.
        self.transactional_id = "sluice-metering-pricer"
        try:
            self.catalog = Catalog.load(settings.prices_file)
        except CatalogError as exc:
            raise SystemExit(f"metering: SLUICE_PRICES_FILE: {exc}") from None
        state = settings.state_dir / "metering"
        self.ledger = Ledger(state / "ledger.sqlite")
        self.attribution = Attribution(state / "attribution.sqlite")
        self.pricer = Pricer(self.catalog, self.attribution)
        self.budgets = BudgetStream(settings)
        self.servicer = MeteringServicer(self.ledger, self.catalog, self.budgets)

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                metering_pb2.DESCRIPTOR.services_by_name["Metering"].full_name,
                self.servicer,
                metering_pb2_grpc.add_MeteringServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        settings = self.settings
        recent = await charged_recently(
            settings.bootstrap, settings.metering_dedupe_window_s, settings.metering_dedupe_capacity
        )
        # The pricer's producer is transactional; everything else (the ledger view's and
        # attribution's dead letters, budgets, the catalog) goes through a plain one.
        self.side_producer = await start_producer(settings.bootstrap, self.name)
        self.servicer.producer = self.side_producer

        def plain(topics: list[str], handler: Any, group_id: str, **options: Any) -> EventConsumer:
            return EventConsumer(
                service=self.name,
                group_id=group_id,
                topics=topics,
                handler=handler,
                codec=runtime.codec,
                bootstrap=settings.bootstrap,
                producer=self.side_producer,
                **options,
            )

        return [
            runtime.consumer(
                [COMPLETIONS, POLICIES],
                self.price,
                transactional=True,
                batch_transactions=True,
                max_records=settings.metering_transaction_records,
                poll_outputs=self.pricer.budget_outputs,
                _recent=recent,
            ),
            # The ledger view dedupes by its primary key, which also tells corrections apart;
            # it writes SQLite once per poll, before the poll's offsets commit.
            plain(
                [USAGE],
                self.record,
                "sluice-metering-ledger-v2",
                after_poll=self.ledger.flush,
                max_records=500,
            ),
            plain(
                [REQUESTS, PROMPTS],
                self.attribution.handle,
                "sluice-metering-attribution",
                after_poll=self.attribution.flush,
            ),
        ]

    async def background(self, runtime: Runtime) -> Sequence[asyncio.Task[None]]:
        producer = self.side_producer
        await send(producer, self.name, Output(PRICES, self.catalog.to_proto(), self.catalog.version))
        log.info("price catalog published", version=self.catalog.version, models=len(self.catalog.models))
        stream = asyncio.create_task(self.budgets.run(), name="budget-stream")
        # Report SERVING only once budgets are known: before that, GetBudget would answer wrong.
        ready = asyncio.create_task(self.budgets.ready.wait())
        await asyncio.wait([stream, ready], return_when=asyncio.FIRST_COMPLETED)
        if stream.done():
            ready.cancel()
            stream.result()  # raises why the stream stopped
            raise RuntimeError("budget stream stopped before it was ready")
        log.info("budget stream ready")
        return [stream, asyncio.create_task(_hold(producer), name="metering-producer")]

    async def price(
        self,
        event: events_pb2.CompletionFinished | billing_pb2.BudgetPolicy,
        record: ConsumerRecord[bytes, bytes],
    ) -> Sequence[Output]:
        if isinstance(event, billing_pb2.BudgetPolicy):
            return policy_output(event)  # to the budget stream, in this poll's transaction
        return self.pricer.outputs(event)

    async def record(
        self, event: events_pb2.UsageCharged, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        self.ledger.record(event)
        return ()

    async def close(self) -> None:
        self.ledger.close()
        self.attribution.close()


async def _hold(producer: AIOKafkaProducer) -> None:
    """Keep the side producer open for SetBudget until shutdown, then flush and close it."""
    try:
        await asyncio.Event().wait()
    finally:
        await producer.stop()


def build(settings: Settings) -> Service:
    return MeteringService(settings)
