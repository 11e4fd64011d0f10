"""`make bench-feedback`: ratings joined and counted per second by the feedback stats stream.

On a private local Kafka broker (a temp dir): N requests' assembled prompts
(two template versions, two variants), completions and ratings are produced
first; then a real gateway starts pinned to one core (`taskset`-style affinity),
its embedded faust app (streams/feedback_stats.py, exactly-once) joins and
counts them. The rate is measured on sluice.feedback-stats.v1 from the first
published total to the moment the totals account for every rating, and the
totals are checked against the ratings produced, so a fast but wrong run cannot
report a number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.metering.reader import topic_partitions
from sluice import envelope as envelopes
from sluice.broker import LocalBroker
from sluice.config import REPO_ROOT, load_settings
from sluice.kafka_security import client_options
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topics import COMPLETIONS, FEEDBACK, PROMPTS
from sluice.v1 import events_pb2, feedback_pb2, templates_pb2
from streams.feedback_stats import FEEDBACK_STATS, rating_class

TENANT, MODEL = "bench", "smollm2-135m-instruct"


def events(count: int) -> tuple[list[tuple[str, str, bytes]], Counter[tuple[str, str]]]:
    """(topic, key, value) for `count` rated requests, and the expected (variant, class) counts."""
    out: list[tuple[str, str, bytes]] = []
    expected: Counter[tuple[str, str]] = Counter()
    for i in range(count):
        request_id = f"bench-{i:07d}"
        variant, version = ("v1", 1) if i % 2 else ("v2", 2)
        env = envelopes.new_envelope(request_id=request_id, tenant=TENANT, producer="bench")
        used = templates_pb2.TemplateUse(name="bench", version=version, label="production", variant=variant)
        prompt = events_pb2.PromptAssembled(envelope=env, model=MODEL, template_used=used)
        done = events_pb2.CompletionFinished(envelope=env, model=MODEL)
        scale = feedback_pb2.RATING_SCALE_STARS if i % 3 else feedback_pb2.RATING_SCALE_THUMBS
        rating = (i % 5) + 1 if scale == feedback_pb2.RATING_SCALE_STARS else (i % 3) - 1
        rated = events_pb2.FeedbackSubmitted(envelope=env, scale=scale, rating=rating, feedback_id=f"f{i}")
        expected[(variant, rating_class(scale, rating) or "")] += 1
        for topic, event in ((PROMPTS, prompt), (COMPLETIONS, done), (FEEDBACK, rated)):
            out.append((topic, request_id, event.SerializeToString()))
    return out, expected


async def produce(bootstrap: str, records: list[tuple[str, str, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, **client_options(), acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        pending = [await producer.send(t, v, key=k.encode()) for t, k, v in records]
        for future in pending:
            await future
    finally:
        await producer.stop()


async def watch(
    bootstrap: str, count: int, timeout: float
) -> tuple[float, float, dict[str, feedback_pb2.FeedbackStats]]:
    """(time of the first total, time all ratings are counted, newest totals per group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    latest: dict[str, feedback_pb2.FeedbackStats] = {}
    first = 0.0
    try:
        partitions = await topic_partitions(consumer, FEEDBACK_STATS)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    first = first or time.perf_counter()
                    latest[bytes(r.key or b"").decode()] = feedback_pb2.FeedbackStats.FromString(
                        r.value or b""
                    )
            if sum(s.ratings for s in latest.values()) >= count:
                return first, time.perf_counter(), latest
        raise SystemExit(f"timed out: {sum(s.ratings for s in latest.values())} of {count} ratings counted")
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port, controller, grpc_port = free_ports(3)
        broker = LocalBroker(REPO_ROOT, Path(tmp) / "kafka", port=port, controller_port=controller)
        broker.start()
        try:
            broker.wait_ready(timeout=120)
            settings = load_settings(
                kafka_bootstrap=broker.bootstrap,
                state_dir=Path(tmp) / "state",
                gateway_port=grpc_port,
                metrics_port_offset=free_offset([grpc_port]),
                log_level="warning",
            )
            stack = Stack(settings)
            stack.apply_topics()
            records, expected = events(args.count)
            asyncio.run(produce(broker.bootstrap, records))
            stack.log_dir.mkdir(parents=True, exist_ok=True)
            everywhere = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {0})  # the gateway inherits one core
            with open(stack.log_dir / "gateway.log", "ab") as log:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "sluice.cli", "serve", "gateway"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=stack.child_env(),
                    start_new_session=True,
                )
            os.sched_setaffinity(0, (everywhere - {0}) or everywhere)
            try:
                first, last, totals = asyncio.run(watch(broker.bootstrap, args.count, 900))
            finally:
                gateway.terminate()
                gateway.wait(timeout=60)
            got: Counter[tuple[str, str]] = Counter()
            for s in totals.values():
                for name in ("positive", "negative", "neutral"):
                    got[(s.variant, name)] += getattr(s, name)
            assert +got == +expected, (got, expected)
            elapsed = last - first
            print(
                f"feedback stats stream (faust, exactly-once, in the gateway), one core "
                f"({platform.processor() or platform.machine()}, {os.cpu_count()} vCPU host):\n"
                f"  {args.count} ratings (x3 input events) joined and counted in {elapsed:.2f}s after the "
                f"first total = {args.count / elapsed:,.0f} ratings/s  (totals checked exact)"
            )
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
