"""Turns each completion into exactly one priced ledger entry.

Runs inside a transactional consumer: the charge, the caller's cost reply, the
poll's budget sums and the completion's offset commit together (a poll at a
time), so a crash can neither lose a charge nor make two, in the ledger or in
the budgets. Completions the pricer has already charged
(an engine that re-sent one) are recognised from the ledger itself at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord

from services.metering import metrics
from services.metering.attribution import Attribution
from services.metering.pricing import Catalog
from services.metering.reader import read_committed
from sluice import envelope as envelopes
from sluice.kafka import Output, RecentKeys, reply_partition
from sluice.logs import get_logger
from sluice.topics import COMPLETIONS, USAGE, BadEvent
from sluice.v1 import billing_pb2, events_pb2
from streams.metering_budgets import delta_outputs

log = get_logger()
PRODUCER = "metering"


def check_usage(event: events_pb2.CompletionFinished) -> None:
    """Refuse usage that cannot be billed honestly; BadEvent sends it to the DLQ with the reason."""
    if not event.HasField("usage"):
        raise BadEvent("usage: missing; a completion without usage cannot be priced")
    usage = event.usage
    if usage.cached_tokens > usage.prompt_tokens:
        raise BadEvent(
            f"usage.cached_tokens: {usage.cached_tokens} exceeds prompt_tokens {usage.prompt_tokens}"
        )
    if usage.total_tokens and usage.total_tokens != usage.prompt_tokens + usage.completion_tokens:
        raise BadEvent(
            f"usage.total_tokens: {usage.total_tokens} is not prompt_tokens + completion_tokens"
            f" ({usage.prompt_tokens + usage.completion_tokens})"
        )
    if not event.model:
        raise BadEvent("model: empty; a completion must name the model that ran it")


@dataclass
class Pricer:
    catalog: Catalog
    attribution: Attribution
    # Charges made since the last `budget_outputs`: the current poll's.
    _unsummed: list[events_pb2.UsageCharged] = field(default_factory=list)

    def charge(self, event: events_pb2.CompletionFinished) -> events_pb2.UsageCharged:
        check_usage(event)
        finished = event.envelope.event_time.ToDatetime(tzinfo=UTC)
        busy_ms = event.engine_busy_ms or event.duration_ms
        price = self.catalog.price(event.model, event.usage, finished, busy_ms)
        key_id, template = self.attribution.lookup(event.envelope.request_id)
        charge = events_pb2.UsageCharged(
            envelope=envelopes.follow(event.envelope, PRODUCER),
            model=event.model,
            usage=event.usage,
            cost=price.cost,
            finish_reason=event.finish_reason,
            kind=billing_pb2.CHARGE_KIND_COMPLETION,
            key_id=key_id,
            template=template,
            fallback_price=price.fallback,
            completed_at=event.envelope.event_time,
            engine_busy_ms=busy_ms,
        )
        if price.fallback:
            log.warning(
                "model not in catalog; charged at the fallback rate",
                request_id=event.envelope.request_id,
                model=event.model,
                catalog=self.catalog.version,
            )
        return charge

    def outputs(self, event: events_pb2.CompletionFinished) -> Sequence[Output]:
        charge = self.charge(event)
        request_id = event.envelope.request_id
        usage = charge.usage
        metrics.count_charge(
            event.envelope.tenant, charge.model, charge.cost.nanos, charge.cost.currency,
            usage.prompt_tokens, usage.completion_tokens,
        )  # fmt: skip
        self._unsummed.append(charge)
        outputs = [Output(USAGE, charge, request_id)]
        if event.reply_to.topic:
            reply = events_pb2.ReplyEvent(
                envelope=envelopes.follow(event.envelope, PRODUCER),
                charged=events_pb2.StreamCharged(cost=charge.cost),
            )
            outputs.append(Output(event.reply_to.topic, reply, request_id, reply_partition(event.reply_to)))
        return outputs

    def budget_outputs(self) -> Sequence[Output]:
        """The budget sums of the poll's charges (EventConsumer.poll_outputs), one per scope
        and minute: produced in the poll's transaction, they count exactly when the charges do."""
        charges, self._unsummed = self._unsummed, []
        return delta_outputs(charges, datetime.now(UTC))


async def charged_recently(bootstrap: str, since_s: float, capacity: int) -> RecentKeys:
    """(request_id, attempt) of completions charged in the last `since_s` seconds, from the ledger.

    The consumer's in-memory dedupe starts empty after a restart; seeding it from
    committed charges keeps a completion that an engine re-sent from being charged twice.
    """
    recent = RecentKeys(capacity=capacity)
    seeded = 0
    async for record in read_committed(bootstrap, USAGE, datetime.now(UTC) - timedelta(seconds=since_s)):
        seeded += _seed(recent, record)
    log.info("dedupe seeded from the ledger", charges=seeded, window_s=since_s)
    return recent


def _seed(recent: RecentKeys, record: ConsumerRecord[bytes, bytes]) -> int:
    charge = events_pb2.UsageCharged()
    try:
        charge.ParseFromString(record.value or b"")
    except Exception:
        return 0
    if charge.kind == billing_pb2.CHARGE_KIND_CORRECTION:
        return 0
    recent.remember((COMPLETIONS, charge.envelope.request_id, charge.envelope.attempt, ""))
    return 1
