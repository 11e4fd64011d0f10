"""What every gateway replica knows of every request, from Kafka alone.

Feedback and idempotent retries may reach any replica, not only the one that
streamed the answer, so each replica folds sluice.requests.v1,
sluice.prompts.v1, sluice.completions.v1 and sluice.control.v1 (every
partition, no consumer group) into its own SQLite file. Per request: tenant,
finished, and who owns its newest attempt; per key and minute: requests
admitted (by the replica that sent them) and tokens used. Only ids and counts
are kept, never text. The offsets are stored with the rows, so a restart
resumes where it stopped.

**Owner of an attempt.** Records are keyed by request_id, so every record of a
request is on one partition of sluice.requests.v1, in one order for every
reader. The first record of an attempt is the one the pipeline runs (every
consumer drops a repeated (request_id, attempt) as a duplicate), so it is the
attempt's owner: its reply partition on sluice.tokens.v1, offset and time are
kept. Two replicas that publish the same idempotent request at once both learn,
from this same fold, which of them won.

A lookup that misses first waits until the index has read everything committed
before the call ("read your writes"): a caller who rates an answer right after
its stream ended is never told the request does not exist.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.metering.reader import topic_partitions
from sluice.kafka import started, with_backoff
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import COMPLETIONS, CONTROL, PROMPTS, REQUESTS, TOKENS, BadEvent, Codec
from sluice.v1 import events_pb2

log = get_logger()
SOURCES = (REQUESTS, PROMPTS, COMPLETIONS, CONTROL)
SCHEMA_VERSION = 2  # an older file is rebuilt from Kafka (the index is only a fold of topics)
KEEP_MINUTES = 5  # per-minute rate counts kept back from now
NO_OWNER = -1  # an attempt whose replies do not go to a gateway replica (Kafka ingress, batches)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  finished INTEGER NOT NULL DEFAULT 0,
  key_id TEXT NOT NULL DEFAULT '',
  attempt INTEGER NOT NULL DEFAULT 0,      -- the newest attempt on sluice.requests.v1
  owner INTEGER NOT NULL DEFAULT -1,       -- its reply partition of sluice.tokens.v1
  owner_offset INTEGER NOT NULL DEFAULT -1,-- its first record's offset on sluice.requests.v1
  owner_ms INTEGER NOT NULL DEFAULT 0,     -- and that record's timestamp
  cancelled INTEGER NOT NULL DEFAULT 0     -- a cancel of that attempt was seen
);
CREATE TABLE IF NOT EXISTS admitted (
  key_id TEXT NOT NULL,
  minute INTEGER NOT NULL,
  origin INTEGER NOT NULL,                 -- reply partition of the replica that admitted them
  requests INTEGER NOT NULL,
  PRIMARY KEY (key_id, minute, origin)
);
CREATE TABLE IF NOT EXISTS used (
  key_id TEXT NOT NULL,
  minute INTEGER NOT NULL,
  tokens INTEGER NOT NULL,
  PRIMARY KEY (key_id, minute)
);
CREATE TABLE IF NOT EXISTS offsets (
  topic TEXT NOT NULL,
  partition INTEGER NOT NULL,
  next_offset INTEGER NOT NULL,
  PRIMARY KEY (topic, partition)
);
"""


@dataclass(frozen=True)
class Known:
    tenant: str
    finished: bool
    attempt: int = 0
    owner: int = NO_OWNER
    owner_offset: int = -1
    owner_ms: int = 0
    cancelled: bool = False


def minute_of(ms: int) -> int:
    return ms // 60_000


@dataclass
class RequestIndex:
    bootstrap: str
    path: Path
    codec: Codec
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _consumer: AIOKafkaConsumer | None = None
    # End offsets for `caught_up` come from a client that never fetches: the broker answers
    # one connection's requests in order, so on the index's own connection a ListOffsets
    # would wait behind its long poll.
    _offsets: AIOKafkaConsumer | None = None
    _positions: dict[TopicPartition, int] = field(default_factory=dict)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    _pruned: int = -1  # the minute old rate counts were last dropped in

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        # One commit per poll; no fsync each time: after a crash the file is still consistent
        # (rows and offsets commit together) and at worst re-reads a few polls from Kafka.
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._db.executescript("DROP TABLE IF EXISTS requests; DROP TABLE IF EXISTS offsets;")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)

    def lookup(self, request_id: str) -> Known | None:
        row = self._db.execute(
            "SELECT tenant, finished, attempt, owner, owner_offset, owner_ms, cancelled"
            " FROM requests WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        return Known(row[0], bool(row[1]), row[2], row[3], row[4], row[5], bool(row[6]))

    def _forget_old_minutes(self) -> None:
        """Rate counts matter only for the current minute: keep a few, so the file stays small."""
        now = minute_of(int(time.time() * 1000))
        if now != self._pruned:
            self._pruned = now
            for table in ("admitted", "used"):
                self._db.execute(f"DELETE FROM {table} WHERE minute < ?", (now - KEEP_MINUTES,))

    def admitted(self, key_id: str, minute: int) -> dict[int, int]:
        """Requests of `key_id` first published in `minute`, per origin (the sender's reply partition)."""
        rows = self._db.execute(
            "SELECT origin, requests FROM admitted WHERE key_id = ? AND minute = ?", (key_id, minute)
        ).fetchall()
        return {int(origin): int(n) for origin, n in rows}

    def tokens(self, key_id: str, minute: int) -> int:
        """Tokens the finished requests of `key_id` used in `minute` (all replicas, all producers)."""
        row = self._db.execute(
            "SELECT tokens FROM used WHERE key_id = ? AND minute = ?", (key_id, minute)
        ).fetchone()
        return int(row[0]) if row else 0

    async def run(self) -> None:
        consumer = await with_backoff("request index", "gateway", self._start)
        try:
            offsets = await with_backoff("request index ends", "gateway", self._offsets_client)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer, self._offsets = consumer, offsets
        self.ready.set()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                with self._db:
                    for records in batches.values():
                        for record in records:
                            self.apply(record)
                    for tp in consumer.assignment():
                        position = await consumer.position(tp)
                        self._positions[tp] = position
                        self._db.execute(
                            "INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)",
                            (tp.topic, tp.partition, position),
                        )
                    self._forget_old_minutes()
                async with self._progress:
                    self._progress.notify_all()
        finally:
            self._consumer = None
            await consumer.stop()
            await offsets.stop()
            self._db.close()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id="sluice-gateway-request-index",
                enable_auto_commit=False,
                isolation_level="read_committed",
                # A long poll (the broker answers as soon as a record arrives): 20 ms polls
                # of every partition of four topics cost CPU in broker and gateway for nothing.
                fetch_max_wait_ms=IDLE_POLL_MS,
            )
        )
        try:
            partitions = [tp for topic in SOURCES for tp in await topic_partitions(consumer, topic)]
            consumer.assign(partitions)
            stored = {
                TopicPartition(t, p): o for t, p, o in self._db.execute("SELECT * FROM offsets").fetchall()
            }
            for tp in partitions:
                if tp in stored:
                    consumer.seek(tp, stored[tp])
                else:
                    await consumer.seek_to_beginning(tp)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _offsets_client(self) -> AIOKafkaConsumer:
        return await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **client_options(),
                client_id="sluice-gateway-request-index-ends",
                isolation_level="read_committed",  # the last stable offset: what the index can reach
            )
        )

    def apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Note the request's tenant (first event wins), its attempts' owners and, from a
        completion, that it finished."""
        content_type = next((bytes(v) for k, v in record.headers or () if k.lower() == "content-type"), None)
        try:
            event = self.codec.decode(record.topic, record.value, content_type)
        except BadEvent:
            return  # the services that own these topics dead-letter it; nothing to index
        env = event.envelope  # type: ignore[attr-defined]
        if not env.request_id or not env.tenant:
            return
        self._db.execute(
            "INSERT OR IGNORE INTO requests (request_id, tenant) VALUES (?, ?)", (env.request_id, env.tenant)
        )
        if isinstance(event, events_pb2.GenerationRequested):
            self._requested(event, record)
        elif isinstance(event, events_pb2.ControlEvent) and event.HasField("cancel"):
            self._db.execute(
                "UPDATE requests SET cancelled = 1 WHERE request_id = ? AND tenant = ? AND attempt = ?",
                (env.request_id, env.tenant, env.attempt),
            )
        elif isinstance(event, events_pb2.CompletionFinished):
            changed = self._db.execute(
                "UPDATE requests SET finished = 1 WHERE request_id = ? AND tenant = ? AND finished = 0"
                " RETURNING key_id",
                (env.request_id, env.tenant),
            ).fetchone()
            if changed and changed[0]:
                self._db.execute(
                    "INSERT INTO used VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET tokens = tokens + ?",
                    (
                        changed[0],
                        minute_of(record.timestamp),
                        event.usage.total_tokens,
                        event.usage.total_tokens,
                    ),
                )

    def _requested(self, event: events_pb2.GenerationRequested, record: ConsumerRecord[bytes, bytes]) -> None:
        """The first record of a newer attempt owns it; a Generate call's counts against its key's
        minute (batch items and Kafka producers' requests are not subject to the gateway's limit)."""
        env = event.envelope
        owner = event.reply_to.partition if event.reply_to.topic == TOKENS else NO_OWNER
        newer = self._db.execute(
            "UPDATE requests SET attempt = ?, owner = ?, owner_offset = ?, owner_ms = ?, cancelled = 0,"
            " key_id = ? WHERE request_id = ? AND tenant = ? AND attempt < ?",
            (
                env.attempt,
                owner,
                record.offset,
                record.timestamp,
                event.key_id,
                env.request_id,
                env.tenant,
                env.attempt,
            ),
        ).rowcount
        if newer and event.key_id and owner != NO_OWNER:  # Generate calls, as the key's limit counts
            self._db.execute(
                "INSERT INTO admitted VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE SET requests = requests + 1",
                (event.key_id, minute_of(record.timestamp), owner),
            )

    async def indexed(self, topic: str, partition: int, offset: int, timeout: float) -> bool:
        """Wait until the record at `offset` is folded in; False if not within `timeout`."""
        tp = TopicPartition(topic, partition)
        try:
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(lambda: self._positions.get(tp, -1) > offset)
        except TimeoutError:
            return False
        return True

    async def caught_up(self, timeout: float) -> bool:
        """Wait until everything committed before this call is indexed; False if not within `timeout`."""
        consumer, offsets = self._consumer, self._offsets
        if consumer is None or offsets is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                ends = await offsets.end_offsets(list(consumer.assignment()))
                async with self._progress:
                    await self._progress.wait_for(
                        lambda: all(self._positions.get(tp, -1) >= end for tp, end in ends.items())
                    )
        except TimeoutError:
            return False
        return True
