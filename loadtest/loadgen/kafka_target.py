"""The Kafka ingress: the same traffic produced straight into sluice.requests.v1 (docs/ingress.md).

Each request is a protobuf `GenerationRequested` keyed by a fresh request id,
authenticated with a `sluice-key-ref` header (or signed, given the key's
signing secret), with `sluice-reply-to` naming this target's reply topic. One
reader follows the reply topic from its end (set before the first send) and
hands each `ReplyEvent` to the request waiting for it.

Timing: the clock starts before the produce call (its acknowledgement is part
of what a producer waits for). TTFT is the first token chunk read from the
reply topic; end-to-end is when both `finished` and `charged` are read (the
gRPC target's last response carries the cost too), or `failed`.

A record the ingress refuses (bad key, bad field) goes to sluice.dlq.v1 and
nothing ever reaches the reply topic, so such a request ends as
`DEADLINE_EXCEEDED` after `timeout_s`; the dead letter says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from loadtest.loadgen.mix import LoadRequest
from loadtest.loadgen.records import RequestRecord, Timing
from loadtest.loadgen.target import TargetBase, error_text
from services.gateway.ingress import REPLY_TO, ReplyTopics, key_ref_header, signature_header
from services.gateway.keys import key_id_of
from sluice import topics
from sluice.v1 import envelope_pb2, events_pb2

DONE = frozenset({"finished", "charged"})


class KafkaIngressTarget(TargetBase):
    def __init__(
        self,
        bootstrap: str,
        api_key: str,
        *,
        tenant: str = "demo",
        model: str = "",
        reply_topic: str = "replies.demo.loadtest",
        reply_partitions: int = 3,
        signing_secret: bytes | None = None,
        name: str = "sluice-kafka",
        timeout_s: float = 120.0,
        max_tokens: int | None = None,
        kafka_options: dict[str, Any] | None = None,
    ) -> None:
        """`model` empty means Sluice's default; the reply topic is created if missing.
        `kafka_options` are extra client settings (sluice.kafka_security.client_options)."""
        self.name = name
        self.bootstrap = bootstrap
        self.tenant = tenant
        self.model = model
        self.reply_topic = reply_topic
        self._partitions = reply_partitions
        self._key_id = key_id_of(api_key)
        self._key_ref = key_ref_header(self._key_id, api_key)
        self._secret = signing_secret
        self._timeout_s = timeout_s
        self._max_tokens = max_tokens
        self._options = dict(kafka_options or {})
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Queue[events_pb2.ReplyEvent]] = {}

    def info(self) -> dict[str, Any]:
        return {
            "kind": "kafka-ingress",
            "bootstrap": self.bootstrap,
            "reply_topic": self.reply_topic,
            "model": self.model or "(default)",
            "auth": "signature" if self._secret else "key-ref",
        }

    async def start(self) -> None:
        if self._producer is not None:
            return
        await self._ensure_reply_topic()
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0, **self._options)
        await producer.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, **self._options
        )
        try:
            # The producer waits for the topic's metadata; the consumer reads every partition.
            partitions = await producer.partitions_for(self.reply_topic)
            await consumer.start()
            tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end offsets now, before any request can be answered
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._consumer, self._producer = consumer, producer
        self._reader = asyncio.create_task(self._read_replies(consumer))

    async def _ensure_reply_topic(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self._options)
        await admin.start()
        try:
            if self.reply_topic not in set(await admin.list_topics()):
                with contextlib.suppress(Exception):  # created meanwhile by another run
                    await admin.create_topics([NewTopic(self.reply_topic, self._partitions, 1)])
        finally:
            await admin.close()
        ready = ReplyTopics(self.bootstrap, refresh_s=0)
        deadline = time.monotonic() + 60
        while not await ready.exists(self.reply_topic):
            if time.monotonic() > deadline:
                raise RuntimeError(f"reply topic {self.reply_topic} has no leader after 60 s")
            await asyncio.sleep(0.2)

    async def _read_replies(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    event = events_pb2.ReplyEvent.FromString(record.value or b"")
                    queue = self._waiting.get(event.envelope.request_id)
                    if queue is not None:
                        queue.put_nowait(event)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for client in (self._producer, self._consumer):
            if client is not None:
                await client.stop()
        self._producer = self._consumer = self._reader = None

    def _event(self, request_id: str, request: LoadRequest) -> events_pb2.GenerationRequested:
        event = events_pb2.GenerationRequested(
            envelope=envelope_pb2.Envelope(
                request_id=request_id, attempt=1, tenant=self.tenant, schema_version=1
            ),
            model=self.model,
            messages=[envelope_pb2.ChatMessage(role="user", content=request.prompt)],
        )
        max_tokens = request.max_tokens or self._max_tokens
        if max_tokens:
            event.params.max_tokens = max_tokens
        return event

    def _headers(self, request_id: str, value: bytes) -> list[tuple[str, bytes]]:
        auth = (
            signature_header(self._key_id, self._secret, request_id, value, self.reply_topic)
            if self._secret
            else self._key_ref
        )
        return [(REPLY_TO, self.reply_topic.encode()), auth]

    async def send(self, request: LoadRequest) -> RequestRecord:
        await self.start()
        assert self._producer is not None
        request_id = uuid.uuid4().hex
        value = self._event(request_id, request).SerializeToString()
        queue: asyncio.Queue[events_pb2.ReplyEvent] = asyncio.Queue()
        self._waiting[request_id] = queue
        timing = Timing(request.index, request.pii_planted)
        timing.record.request_id = request_id
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._producer.send_and_wait(
                    topics.REQUESTS, value, key=request_id.encode(), headers=self._headers(request_id, value)
                )
                return await self._follow(queue, timing)
        except TimeoutError:
            return timing.finish("DEADLINE_EXCEEDED", f"no complete answer within {self._timeout_s} s")
        except Exception as exc:
            return timing.finish(error_text(exc), "producer failure")
        finally:
            del self._waiting[request_id]

    async def _follow(self, queue: asyncio.Queue[events_pb2.ReplyEvent], timing: Timing) -> RequestRecord:
        seen: set[str] = set()
        output_tokens: int | None = None
        while not seen >= DONE:
            event = await queue.get()
            kind = event.WhichOneof("body")
            if kind == "failed":
                return timing.finish(event.failed.code or "failed", event.failed.stage)
            if kind == "chunk" and event.chunk.delta:
                timing.token_event()
            elif kind == "restarted":
                timing.restart()
            elif kind == "finished":
                output_tokens = event.finished.usage.completion_tokens
            if kind:
                seen.add(kind)
        return timing.finish(output_tokens=output_tokens)
