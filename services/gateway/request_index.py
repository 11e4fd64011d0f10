"""Which tenant owns a request and whether it has finished, on every gateway replica.

Feedback may reach any replica, not only the one that streamed the answer, so
each replica folds sluice.requests.v1, sluice.prompts.v1 and
sluice.completions.v1 (every partition, no consumer group) into its own SQLite
file: request_id -> tenant, finished. Only ids are kept, never text. The
offsets are stored with the rows, so a restart resumes where it stopped.

A lookup that misses first waits until the index has read everything committed
before the call ("read your writes"): a caller who rates an answer right after
its stream ended is never told the request does not exist.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.metering.reader import topic_partitions
from sluice.kafka import started, with_backoff
from sluice.logs import get_logger
from sluice.topics import COMPLETIONS, PROMPTS, REQUESTS, BadEvent, Codec

log = get_logger()
SOURCES = (REQUESTS, PROMPTS, COMPLETIONS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  finished INTEGER NOT NULL DEFAULT 0
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


@dataclass
class RequestIndex:
    bootstrap: str
    path: Path
    codec: Codec
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _consumer: AIOKafkaConsumer | None = None
    _positions: dict[TopicPartition, int] = field(default_factory=dict)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def lookup(self, request_id: str) -> Known | None:
        row = self._db.execute(
            "SELECT tenant, finished FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        return Known(row[0], bool(row[1])) if row else None

    async def run(self) -> None:
        consumer = await with_backoff("request index", "gateway", self._start)
        self._consumer = consumer
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
                async with self._progress:
                    self._progress.notify_all()
        finally:
            self._consumer = None
            await consumer.stop()
            self._db.close()

    async def _start(self) -> AIOKafkaConsumer:
        consumer = await started(
            AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id="sluice-gateway-request-index",
                enable_auto_commit=False,
                isolation_level="read_committed",
                fetch_max_wait_ms=20,
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

    def apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Note the request's tenant (first event wins) and, from a completion, that it finished."""
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
        if record.topic == COMPLETIONS:
            self._db.execute(
                "UPDATE requests SET finished = 1 WHERE request_id = ? AND tenant = ?",
                (env.request_id, env.tenant),
            )

    async def caught_up(self, timeout: float) -> bool:
        """Wait until everything committed before this call is indexed; False if not within `timeout`."""
        consumer = self._consumer
        if consumer is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                ends = await consumer.end_offsets(list(consumer.assignment()))
                async with self._progress:
                    await self._progress.wait_for(
                        lambda: all(self._positions.get(tp, -1) >= end for tp, end in ends.items())
                    )
        except TimeoutError:
            return False
        return True
