"""A consumer that keeps several records in flight at once, bounded by the caller's capacity.

EventConsumer handles one record after another, which is right for cheap
handlers but would leave an inference engine's batch mostly empty. This one
runs each record as its own task, up to `capacity()` at a time. When full it
pauses every assigned partition, so unstarted records stay in Kafka (the
group's lag grows) instead of piling up in memory; it resumes when a task ends
or gives its capacity back.

A handler may give its capacity back before it returns (`release_capacity`):
an inference worker does once its generation has ended, so the next prompt is
fetched while the last chunks, the completion and the commit are still making
their round trips, and the engine slot does not sit idle meanwhile.

Offsets: records finish out of order, so per partition it commits the lowest
offset still open (everything below it is done), only after a record's outputs
are acknowledged. Records on `background_topics` (batch work) are fetched only
while the interactive topics have nothing waiting.

It keeps EventConsumer's guarantees: undecodable records go to the DLQ,
redeliveries of a handled (request_id, attempt) are dropped, a failing handler
never stops the loop. On rebalance and SIGTERM it waits `grace_s` for running
records, then cancels the rest (the handler hands them back) and commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError
from google.protobuf.message import Message

from sluice import envelope as envelopes
from sluice import metrics, tracing
from sluice.kafka import (
    Handler,
    Output,
    RecentKeys,
    RequestFailed,
    _content_type,
    dead_letter,
    dedupe_key,
    send_all,
    started,
    with_backoff,
)
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import BadEvent, Codec

log = get_logger()

PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]

#: fetch_max_wait_ms for readers that mostly wait. A fetch is a long poll: the broker
#: answers as soon as a record arrives, so a short wait buys no latency, only an empty
#: round trip every few ms (at 10 ms, a third of a broker core on 2 vCPUs, taken
#: from the engine). Kafka's own default.
IDLE_POLL_MS = 500


#: Set in each record's task, so its handler can give back capacity without a reference here.
_release: ContextVar[Callable[[], None] | None] = ContextVar("sluice_inflight_release", default=None)


def release_capacity() -> None:
    """The calling record no longer needs the engine: the consumer may fetch the next one.

    Its offset stays open until its outputs are acknowledged, so crash safety is
    unchanged. Outside a record's task (or called twice) it does nothing.
    """
    release = _release.get()
    if release is not None:
        release()


@dataclass
class PartitionProgress:
    """Offsets taken but not finished on one partition; the commit point is the lowest of them."""

    next_offset: int | None = None  # one past the highest offset taken; None until the first record
    open: set[int] = field(default_factory=set)
    committed: int | None = None

    def take(self, offset: int) -> None:
        self.open.add(offset)
        self.next_offset = offset + 1 if self.next_offset is None else max(self.next_offset, offset + 1)

    def finish(self, offset: int) -> None:
        self.open.discard(offset)

    def commit_point(self) -> int | None:
        """The offset to commit: below it every taken record is done. None if nothing new."""
        point = min(self.open) if self.open else self.next_offset
        if point is None or (self.committed is not None and point <= self.committed):
            return None
        return point


@dataclass
class InFlightConsumer:
    """Consume `topics` (and, with spare capacity, `background_topics`) with concurrent handlers."""

    service: str
    group_id: str
    topics: Sequence[str]
    handler: Handler
    codec: Codec
    bootstrap: str
    producer: AIOKafkaProducer
    capacity: Callable[[], int]
    background_topics: Sequence[str] = ()
    grace_s: float = 20.0
    session_timeout_ms: int = 10_000
    # Long poll while there is free capacity (see IDLE_POLL_MS); shorter, because a
    # fetch already in flight delays the batch partitions resumed after it was sent.
    fetch_max_wait_ms: int = 100
    on_assigned: PartitionsHook | None = None
    on_revoked: PartitionsHook | None = None
    _consumer: AIOKafkaConsumer | None = None
    _tasks: dict[asyncio.Task[None], tuple[TopicPartition, int]] = field(default_factory=dict)
    # Tasks that still count against capacity (not yet released, not yet done).
    _holding: set[asyncio.Task[Any]] = field(default_factory=set)
    _progress: dict[TopicPartition, PartitionProgress] = field(default_factory=dict)
    _recent: RecentKeys = field(default_factory=RecentKeys)
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # How many fetch rounds found the consumer full (for tests and metrics: proof it paused).
    full_rounds: int = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        consumer = await with_backoff(f"consumer {self.group_id}", self.service, self._start)
        self._consumer = consumer
        log.info("consuming", group=self.group_id, topics=[*self.topics, *self.background_topics])
        try:
            while not self._stopping.is_set():
                await self._fetch_round(consumer)
            await self._drain(set(self._progress))
        finally:
            await consumer.stop()

    async def stop(self) -> None:
        """Stop fetching; `run` then finishes or hands back what is in flight, commits and leaves."""
        self._stopping.set()
        self._freed.set()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **client_options(),
            group_id=self.group_id,
            client_id=f"sluice-{self.service}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(1000, self.session_timeout_ms // 3),
            # A rebalance waits while revoked work finishes (up to grace_s).
            rebalance_timeout_ms=int(self.grace_s * 1000) + self.session_timeout_ms,
        )
        consumer.subscribe([*self.topics, *self.background_topics], listener=_Listener(self))
        return await started(consumer)

    # -- fetching ------------------------------------------------------------------------------

    async def _fetch_round(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        free = self.capacity() - len(self._holding)
        if free <= 0:
            self.full_rounds += 1
            _set_paused(consumer, assigned, assigned)
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout=0.5)
            await consumer.getmany(timeout_ms=0)  # keeps the poll interval alive; paused: returns nothing
            return
        if not assigned:
            await asyncio.sleep(0.1)  # not assigned anything (yet)
            return
        interactive = {tp for tp in assigned if tp.topic in self.topics}
        background = assigned - interactive
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        if interactive:
            _set_paused(consumer, assigned, background)
            batches = await consumer.getmany(
                *interactive, timeout_ms=20 if background else 200, max_records=free
            )
        if background and not batches and not await self._interactive_waiting(consumer, interactive):
            # Spare capacity and nothing interactive waiting: wait on every partition, so an
            # interactive prompt arriving now is not held up behind an idle batch topic.
            _set_paused(consumer, assigned, set())
            batches = await consumer.getmany(timeout_ms=200, max_records=free)
        for records in batches.values():
            for record in records:
                self._dispatch(record)

    async def _interactive_waiting(
        self, consumer: AIOKafkaConsumer, interactive: Iterable[TopicPartition]
    ) -> bool:
        """Whether an interactive partition has records we have not taken (unknown counts as yes)."""
        for tp in interactive:
            highwater = consumer.highwater(tp)
            if highwater is None or highwater > await consumer.position(tp):
                return True
        return False

    def _dispatch(self, record: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self._progress.setdefault(tp, PartitionProgress()).take(record.offset)
        task = asyncio.create_task(
            self._run_one(record), name=f"record:{tp.topic}:{tp.partition}:{record.offset}"
        )
        self._tasks[task] = (tp, record.offset)
        self._holding.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._release_task(task)
        if not task.cancelled() and task.exception() is not None:
            # Its offset stays open, so the record is redelivered after a restart.
            log.error("record task failed", task=task.get_name(), error=repr(task.exception()))

    # -- one record ------------------------------------------------------------------------------

    def _release_task(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None and task in self._holding:
            self._holding.discard(task)
            self._freed.set()

    async def _run_one(self, record: ConsumerRecord[bytes, bytes]) -> None:
        _release.set(functools.partial(self._release_task, asyncio.current_task()))
        began = time.perf_counter()
        with contextlib.ExitStack() as scope:
            event, outputs, outcome = await self._outputs_for(record, scope)
            outputs = tracing.traced_outputs(outputs, outcome)
            produce = functools.partial(send_all, self.producer, self.service, outputs)
            await with_backoff("produce", self.service, produce)
        env = getattr(event, "envelope", None)
        if env is not None and env.request_id:
            self._recent.remember(dedupe_key(record, env))
        metrics.EVENTS_CONSUMED.labels(self.service, record.topic, outcome).inc()
        metrics.HANDLER_SECONDS.labels(self.service, record.topic).observe(time.perf_counter() - began)
        tp = TopicPartition(record.topic, record.partition)
        progress = self._progress.get(tp)
        if progress is not None:  # None: revoked meanwhile, the new owner decides
            progress.finish(record.offset)
            await self._commit({tp})

    async def _outputs_for(
        self, record: ConsumerRecord[bytes, bytes], scope: contextlib.ExitStack
    ) -> tuple[Message | None, Sequence[Output], str]:
        event: Message | None = None
        try:
            event = self.codec.decode(record.topic, record.value, _content_type(record))
            scope.enter_context(tracing.consume_span(self.service, record, event))
            env = getattr(event, "envelope", None)
            if env is not None:
                try:
                    envelopes.validate(env)
                except ValueError as exc:
                    raise BadEvent(str(exc)) from None
                if self._recent.seen(dedupe_key(record, env)):
                    log.info("duplicate dropped", request_id=env.request_id, attempt=env.attempt)
                    return event, (), "duplicate"
            return event, await self.handler(event, record), "ok"
        except BadEvent as exc:
            return event, self._dead_letter(record, event, str(exc), "INVALID_ARGUMENT"), "dead_letter"
        except RequestFailed as exc:
            return event, self._dead_letter(record, event, str(exc), exc.code), "dead_letter"
        except Exception as exc:  # a bug or a broken dependency must not stop the consumer
            log.exception("handler failed", topic=record.topic, offset=record.offset)
            reason = f"{self.service} failed: {type(exc).__name__}"
            return event, self._dead_letter(record, event, reason, "INTERNAL"), "dead_letter"

    def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], event: Message | None, reason: str, code: str
    ) -> list[Output]:
        return dead_letter(self.service, self.group_id, record, event, reason, code)

    # -- offsets and hand-over -----------------------------------------------------------------

    async def _commit(self, tps: Iterable[TopicPartition]) -> None:
        offsets = {}
        for tp in tps:
            progress = self._progress.get(tp)
            point = progress.commit_point() if progress is not None else None
            if progress is not None and point is not None:
                offsets[tp] = point
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:  # the group moved on: the new owner re-runs, the markers dedupe
            log.warning("commit failed", group=self.group_id, error=type(exc).__name__)
            return
        for tp, point in offsets.items():
            self._progress[tp].committed = point

    async def _drain(self, tps: set[TopicPartition]) -> None:
        """Let running records on `tps` finish within grace_s, cancel (hand back) the rest, commit."""
        tasks = [task for task, (tp, _) in self._tasks.items() if tp in tps]
        if tasks:
            log.info(
                "draining in-flight records", group=self.group_id, records=len(tasks), grace_s=self.grace_s
            )
            _, late = await asyncio.wait(tasks, timeout=self.grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("handed back unfinished records", group=self.group_id, records=len(late))
                await asyncio.wait(late, timeout=5)
        await self._commit(tps)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        await self._drain(revoked)
        for tp in revoked:
            self._progress.pop(tp, None)
        if self.on_revoked is not None:
            await self.on_revoked(revoked)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._progress[tp] = PartitionProgress()
        log.info(
            "partitions assigned",
            group=self.group_id,
            partitions=sorted(f"{t.topic}:{t.partition}" for t in assigned),
        )
        if self.on_assigned is not None:
            await self.on_assigned(assigned)


def _set_paused(
    consumer: AIOKafkaConsumer, assigned: set[TopicPartition], paused: set[TopicPartition]
) -> None:
    """Make exactly `paused` (of `assigned`) paused; paused records stay in Kafka."""
    current = consumer.paused()
    to_pause = (paused & assigned) - current
    to_resume = (current & assigned) - paused
    if to_pause:
        consumer.pause(*to_pause)
    if to_resume:
        consumer.resume(*to_resume)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: InFlightConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.owner._assigned(set(assigned))
