"""Driving inference workers through their Kafka contract: prompts in, replies and completions out.

Shared by the worker tests and `make bench-inference`. Prompts are produced
straight to sluice.prompts.v1 (as the prompts service would), replies are read
from one sluice.tokens.v1 partition (as a gateway would), and completions and
markers are read back committed, so the real worker processes are the only
thing under test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from services.metering.reader import read_committed
from services.prompts.chat_template import ChatTemplate
from sluice import envelope as envelopes
from sluice.config import Settings
from sluice.kafka_inflight import IDLE_POLL_MS
from sluice.stack import Stack
from sluice.topics import COMPLETIONS, INFERENCE_ATTEMPTS, TOKENS
from sluice.v1 import attempts_pb2, envelope_pb2, events_pb2

MODEL = "smollm2-135m-instruct"
TENANT = "worker-tests"


def prompt_event(
    template: ChatTemplate,
    text: str,
    max_tokens: int,
    reply_partition: int,
    *,
    model: str = MODEL,
    temperature: float = 0.0,
    deadline: float | None = None,
    request_id: str | None = None,
    raw_prompt: str | None = None,
) -> events_pb2.PromptAssembled:
    """A PromptAssembled as the prompts service makes it (chat-templated, tokens counted)."""
    prompt = raw_prompt if raw_prompt is not None else template.render([("user", text)])
    env = envelopes.new_envelope(
        request_id=request_id or envelopes.new_request_id(), tenant=TENANT, producer="prompts"
    )
    if deadline is not None:
        env.deadline.CopyFrom(_timestamp(deadline))
    return events_pb2.PromptAssembled(
        envelope=env,
        model=model,
        prompt=prompt,
        prompt_tokens=template.count_tokens(prompt),
        params=events_pb2.GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0),
        reply_to=envelope_pb2.ReplyTo(topic=TOKENS, partition=reply_partition, gateway_id="tests"),
    )


def cancel_event(request_id: str, reason: str = "client disconnected") -> events_pb2.ControlEvent:
    env = envelopes.new_envelope(request_id=request_id, tenant=TENANT, producer="gateway")
    return events_pb2.ControlEvent(envelope=env, cancel=events_pb2.CancelRequest(reason=reason))


def _timestamp(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


async def produce(
    bootstrap: str,
    topic: str,
    events: Sequence[events_pb2.PromptAssembled | events_pb2.ControlEvent] | Sequence[bytes],
    partitions: Sequence[int | None] | None = None,
    producer: AIOKafkaProducer | None = None,
) -> None:
    """Produce events (or raw bytes) keyed by request_id, optionally to chosen partitions.

    Without `producer`, one is started and stopped for this call (a timed caller
    passes a started one, so connecting is not part of what it measures).
    """
    own = producer is None
    if producer is None:
        producer = new_producer(bootstrap)
        await producer.start()
    try:
        pending = []
        for i, event in enumerate(events):
            value = event if isinstance(event, bytes) else event.SerializeToString()
            key = b"poison" if isinstance(event, bytes) else event.envelope.request_id.encode()
            partition = partitions[i] if partitions is not None else None
            pending.append(await producer.send(topic, value, key=key, partition=partition))
        for future in pending:
            await future
    finally:
        if own:
            await producer.stop()


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1)


@dataclass
class Replies:
    """Everything a gateway would see for each request on one reply partition."""

    events: dict[str, list[events_pb2.ReplyEvent]] = field(default_factory=lambda: defaultdict(list))
    arrived: dict[str, float] = field(default_factory=dict)  # request_id -> first chunk (monotonic)

    def ended(self, request_id: str) -> bool:
        return any(e.WhichOneof("body") in ("finished", "failed") for e in self.events.get(request_id, []))

    def final(self, request_id: str) -> events_pb2.ReplyEvent:
        return next(e for e in self.events[request_id] if e.WhichOneof("body") in ("finished", "failed"))

    def text(self, request_id: str, attempt: int) -> str:
        return "".join(
            e.chunk.delta
            for e in self.events[request_id]
            if e.WhichOneof("body") == "chunk" and e.envelope.attempt == attempt
        )


class ReplyReader:
    """Reads one sluice.tokens.v1 partition from its end, like a gateway replica."""

    def __init__(self, bootstrap: str, partition: int) -> None:
        self.bootstrap = bootstrap
        self.tp = TopicPartition(TOKENS, partition)
        self.replies = Replies()
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ReplyReader:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=IDLE_POLL_MS
        )
        await consumer.start()
        consumer.assign([self.tp])
        await consumer.seek_to_end(self.tp)
        await consumer.position(self.tp)
        self._consumer = consumer
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self, timeout_ms: int = 100) -> None:
        assert self._consumer is not None
        for records in (await self._consumer.getmany(self.tp, timeout_ms=timeout_ms)).values():
            for record in records:
                reply = events_pb2.ReplyEvent.FromString(record.value or b"")
                request_id = reply.envelope.request_id
                if reply.WhichOneof("body") == "chunk" and request_id not in self.replies.arrived:
                    self.replies.arrived[request_id] = time.monotonic()
                self.replies.events[request_id].append(reply)

    async def until(self, done: object, timeout: float, what: str) -> Replies:
        deadline = time.monotonic() + timeout
        while not done(self.replies):  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            await self.poll()
        return self.replies

    async def all_ended(self, request_ids: Sequence[str], timeout: float) -> Replies:
        return await self.until(
            lambda r: all(r.ended(i) for i in request_ids), timeout, f"{len(request_ids)} replies to end"
        )


async def completions(
    bootstrap: str, request_ids: Sequence[str]
) -> dict[str, list[events_pb2.CompletionFinished]]:
    """Committed completions of `request_ids`, every copy kept (so duplicates are visible)."""
    wanted = set(request_ids)
    found: dict[str, list[events_pb2.CompletionFinished]] = defaultdict(list)
    async for record in read_committed(bootstrap, COMPLETIONS):
        completion = events_pb2.CompletionFinished.FromString(record.value or b"")
        if completion.envelope.request_id in wanted:
            found[completion.envelope.request_id].append(completion)
    return found


async def markers(bootstrap: str, request_id: str) -> list[attempts_pb2.AttemptMarker]:
    found = []
    async for record in read_committed(bootstrap, INFERENCE_ATTEMPTS):
        marker = attempts_pb2.AttemptMarker.FromString(record.value or b"")
        if marker.envelope.request_id == request_id:
            found.append(marker)
    return found


def start_worker(
    settings: Settings, worker_id: str, grpc_port: int, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """One inference worker process, with its own id and ports, as `sluice serve inference` runs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child = {
        **Stack(settings).child_env(),
        "SLUICE_INFERENCE_WORKER_ID": worker_id,
        "SLUICE_INFERENCE_PORT": str(grpc_port),
        **(env or {}),
    }
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "inference"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=child,
        start_new_session=True,
    )
