"""The gateway's local copy of sluice.budgets.v1, and the budget and rate-limit check.

Metering publishes every budget's state (spend in the current period, and
whether a hard limit is reached) to the compacted sluice.budgets.v1. Each
gateway reads that topic from the start and keeps the newest state per budget,
so the check on the request path is a dictionary lookup, not a call.

Requests per minute are also counted here as they are admitted, because a
request is only charged once it finishes: the stream alone would let a burst through.

A key's own rate limit (requests and tokens per minute, on its sluice.keys.v1
record) holds across all replicas. Each replica counts what it admits itself at
once, and learns what the others admitted from the request index, which folds
every request's first record on sluice.requests.v1 (by key, minute and the
replica that sent it; services/gateway/request_index.py). Tokens come from
sluice.completions.v1 the same way. So the count is global, late only by the
index's lag (well under a second): a replica can over-admit by at most what the
other replicas admitted within that lag (docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from aiokafka import AIOKafkaConsumer
from google.protobuf.message import DecodeError

from services.gateway.auth import Principal
from services.gateway.request_index import RequestIndex, minute_of
from services.metering.reader import topic_partitions
from sluice.kafka import with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.service import Context
from sluice.topics import BUDGETS
from sluice.v1 import billing_pb2, events_pb2
from streams.budget_rules import describe, limit_text
from streams.periods import stamp, window_end, window_start

log = get_logger()


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
    # key_id -> (minute start, tokens its finished requests used in it)
    _tokens: dict[str, tuple[datetime, int]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Every replica's admissions and tokens per key and minute; None: this replica's only.
    index: RequestIndex | None = None
    origin: int = -1  # this replica's reply partition: how the index names its admissions

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
            **client_options(),
            client_id="sluice-gateway-budgets",
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=IDLE_POLL_MS,  # a long poll: answered as soon as a record arrives
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

    def key_requests(self, key_id: str, tenant: str, now: datetime) -> int:
        """Requests of the key admitted this minute by every replica.

        Ours count from memory (immediate); the index adds the other replicas'. After a
        restart within the minute, the index's record of our own admissions stands in.
        """
        mine = self._admitted_now(tenant, key_id, now)
        if self.index is None:
            return mine
        minute = minute_of(int(now.timestamp() * 1000))
        by_origin = self.index.admitted(key_id, minute)
        others = sum(n for origin, n in by_origin.items() if origin != self.origin)
        return max(mine, by_origin.get(self.origin, 0)) + others

    def key_tokens(self, key_id: str, now: datetime) -> int:
        """Tokens the key's finished requests used this minute, on any replica we know of."""
        start, used = self._tokens.get(key_id, (None, 0))
        mine = used if start == window_start("minute", now) else 0
        if self.index is None:
            return mine
        return max(mine, self.index.tokens(key_id, minute_of(int(now.timestamp() * 1000))))

    def check_key(self, caller: Principal, now: datetime) -> Rejection | None:
        """The key's own per-minute limits, from its record on sluice.keys.v1, over all replicas."""
        reset = window_end("minute", window_start("minute", now))
        # Only a key with a limit pays for the index lookups.
        rpm, tpm = caller.requests_per_minute, caller.tokens_per_minute
        if rpm and self.key_requests(caller.key_id, caller.tenant, now) >= rpm:
            return Rejection(
                f"rate limit: key {caller.key_id} allows {caller.requests_per_minute} requests per minute; "
                f"resets at {stamp(reset)}",
                reset,
            )
        used = self.key_tokens(caller.key_id, now) if tpm else 0
        if tpm and used >= tpm:
            return Rejection(
                f"rate limit: key {caller.key_id} allows {caller.tokens_per_minute} tokens per minute "
                f"({used} used); resets at {stamp(reset)}",
                reset,
            )
        return None

    def record_tokens(self, key: str, tokens: int, now: datetime) -> None:
        """Count a finished request's tokens against its key's minute."""
        minute = window_start("minute", now)
        start, used = self._tokens.get(key, (minute, 0))
        self._tokens[key] = (minute, used + tokens if start == minute else tokens)

    async def enforce(self, context: Context, caller: Principal) -> None:
        """Admit the request or abort it with RESOURCE_EXHAUSTED and a retry-after."""
        now = datetime.now(UTC)
        rejection = self.check(caller.tenant, caller.key_id, now) or self.check_key(caller, now)
        if rejection is not None:
            retry_after = max(1, math.ceil((rejection.reset_at - now).total_seconds()))
            context.set_trailing_metadata((("retry-after", str(retry_after)),))
            log.info("request over budget rejected", key_id=caller.key_id, retry_after_s=retry_after)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, rejection.message)
        self.admit(caller.tenant, caller.key_id, now)
