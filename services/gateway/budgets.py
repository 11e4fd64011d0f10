"""The gateway's local copy of sluice.budgets.v1, and the budget and rate-limit check.

Metering publishes every budget's state (spend in the current period, and
whether a hard limit is reached) to the compacted sluice.budgets.v1. Each
gateway reads that topic from the start and keeps the newest state per budget,
so the check on the request path is a dictionary lookup, not a call.

Requests per minute are also counted here as they are admitted, because a
request is only charged once it finishes: the stream alone would let a burst through.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from aiokafka import AIOKafkaConsumer
from google.protobuf.message import DecodeError

from services.metering.reader import topic_partitions
from sluice.kafka import with_backoff
from sluice.logs import get_logger
from sluice.service import Context
from sluice.topics import BUDGETS
from sluice.v1 import billing_pb2, events_pb2
from streams.budget_rules import describe, limit_text
from streams.periods import stamp, window_end, window_start

log = get_logger()


def key_id(authorization: str | None) -> str:
    """First 12 hex digits of the SHA-256 of the API key: names a key without revealing it."""
    _, _, key = (authorization or "").partition(" ")
    return hashlib.sha256(key.strip().encode()).hexdigest()[:12] if key.strip() else ""


@dataclass(frozen=True)
class Rejection:
    message: str
    reset_at: datetime


@dataclass
class BudgetGuard:
    bootstrap: str
    # tenant -> budget key -> newest state
    _states: dict[str, dict[str, events_pb2.BudgetState]] = field(default_factory=lambda: defaultdict(dict))
    # (tenant, key_id or "") -> (minute start, requests admitted in it)
    _admitted: dict[tuple[str, str], tuple[datetime, int]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        consumer = await with_backoff("budgets reader", "gateway", self._start)
        self.ready.set()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batches.values():
                    for record in records:
                        self.apply(bytes(record.key or b"").decode(errors="replace"), record.value)
        finally:
            await consumer.stop()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id="sluice-gateway-budgets",
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=50,
        )
        try:
            await consumer.start()
            partitions = await topic_partitions(consumer, BUDGETS)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    def apply(self, key: str, value: bytes | None) -> None:
        tenant = key.split("/", 1)[0]
        if value is None:  # the budget was removed
            self._states[tenant].pop(key, None)
            return
        try:
            state = events_pb2.BudgetState.FromString(value)
        except DecodeError:
            log.warning("undecodable budget state dropped", key=key)
            return
        self._states[state.tenant][key] = state

    def check(self, tenant: str, key: str, now: datetime) -> Rejection | None:
        """Why a new request from this tenant and key must wait, or None."""
        for state in self._states.get(tenant, {}).values():
            if state.key_id and state.key_id != key:
                continue
            reset_at = state.window.reset_at.ToDatetime(tzinfo=UTC)
            if state.blocked and now < reset_at:
                return Rejection(state.reason, reset_at)
            budget = state.budget
            if budget.period == billing_pb2.BUDGET_PERIOD_MINUTE and budget.limit_requests:
                made = max(
                    self._admitted_now(tenant, state.key_id, now),
                    state.window.requests if now < reset_at else 0,
                )
                if made >= budget.limit_requests:
                    reset = window_end("minute", window_start("minute", now))
                    text = limit_text("requests", budget.limit_requests, made, budget.currency)
                    return Rejection(
                        f"rate limit: {describe(budget)} reached ({text}); resets at {stamp(reset)}", reset
                    )
        return None

    def admit(self, tenant: str, key: str, now: datetime) -> None:
        minute = window_start("minute", now)
        for scope in ((tenant, ""), (tenant, key)):
            start, count = self._admitted.get(scope, (minute, 0))
            self._admitted[scope] = (minute, count + 1 if start == minute else 1)

    def _admitted_now(self, tenant: str, key: str, now: datetime) -> int:
        start, count = self._admitted.get((tenant, key), (None, 0))
        return count if start == window_start("minute", now) else 0

    async def enforce(self, context: Context, tenant: str) -> str:
        """Admit the request or abort it with RESOURCE_EXHAUSTED; returns the caller's key id."""
        metadata = dict(context.invocation_metadata() or ())
        key = key_id(metadata.get("authorization"))
        now = datetime.now(UTC)
        rejection = self.check(tenant, key, now)
        if rejection is not None:
            retry_after = max(1, math.ceil((rejection.reset_at - now).total_seconds()))
            context.set_trailing_metadata((("retry-after", str(retry_after)),))
            log.info("request over budget rejected", tenant=tenant, key_id=key, retry_after_s=retry_after)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, rejection.message)
        self.admit(tenant, key, now)
        return key
