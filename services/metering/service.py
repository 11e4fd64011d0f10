"""Metering: prices every completion exactly once and keeps the usage ledger.

Pricing consumes sluice.completions.v1 and produces the charge, the caller's
cost reply and its input offset in one Kafka transaction, so a charge is never
lost or doubled. The ledger view is built only from committed charges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from services.metering.ledger import Ledger
from services.metering.pricing import PriceTable, format_amount
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka import EventConsumer, Output, RequestFailed
from sluice.logs import get_logger
from sluice.service import Context, GrpcApi, Runtime, Service
from sluice.topics import COMPLETIONS, USAGE
from sluice.v1 import envelope_pb2, events_pb2, metering_pb2, metering_pb2_grpc

log = get_logger()


@dataclass
class MeteringServicer(metering_pb2_grpc.MeteringServicer):
    ledger: Ledger

    async def GetUsage(
        self, request: metering_pb2.GetUsageRequest, context: Context
    ) -> metering_pb2.GetUsageResponse:
        rows = [
            metering_pb2.TenantUsage(
                tenant=row.tenant,
                model=row.model,
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
            )
            for row in self.ledger.totals(request.tenant)
        ]
        return metering_pb2.GetUsageResponse(rows=rows)


class MeteringService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.name = "metering"
        # A fixed id fences a stale instance: only one pricer can commit at a time.
        self.transactional_id = "sluice-metering-pricer"
        self.prices = PriceTable.load(settings.prices_file)
        self.ledger = Ledger(settings.state_dir / "metering" / "ledger.sqlite")

    def apis(self) -> Sequence[GrpcApi]:
        return [
            GrpcApi(
                metering_pb2.DESCRIPTOR.services_by_name["Metering"].full_name,
                MeteringServicer(self.ledger),
                metering_pb2_grpc.add_MeteringServicer_to_server,
            )
        ]

    async def connect(self, runtime: Runtime) -> Sequence[EventConsumer]:
        return [
            runtime.consumer([COMPLETIONS], self.price, transactional=True),
            runtime.consumer([USAGE], self.record, group_id="sluice-metering-ledger"),
        ]

    async def price(
        self, event: events_pb2.CompletionFinished, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        try:
            cost = self.prices.price(event.model, event.usage)
        except KeyError as exc:
            raise RequestFailed("FAILED_PRECONDITION", f"model: {exc.args[0]}") from None
        charge = events_pb2.UsageCharged(
            envelope=envelopes.follow(event.envelope, self.name),
            model=event.model,
            usage=event.usage,
            cost=cost,
            finish_reason=event.finish_reason,
        )
        log.info("charged", request_id=event.envelope.request_id, cost_nanos=cost.nanos)
        outputs = [Output(USAGE, charge, event.envelope.request_id)]
        if event.reply_to.topic:
            reply = events_pb2.ReplyEvent(
                envelope=envelopes.follow(event.envelope, self.name),
                charged=events_pb2.StreamCharged(cost=cost),
            )
            outputs.append(
                Output(event.reply_to.topic, reply, event.envelope.request_id, event.reply_to.partition)
            )
        return outputs

    async def record(
        self, event: events_pb2.UsageCharged, record: ConsumerRecord[bytes, bytes]
    ) -> Sequence[Output]:
        self.ledger.record(event)
        return ()

    async def close(self) -> None:
        self.ledger.close()


def build(settings: Settings) -> Service:
    return MeteringService(settings)
