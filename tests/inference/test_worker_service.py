"""Two real inference worker processes (real Kafka, real SmolLM2 on llama.cpp) in one pool.

Prompts go straight to sluice.prompts.v1, replies are read from a
sluice.tokens.v1 partition and completions from sluice.completions.v1, so this
is the worker's whole Kafka contract: load spreading, cancel (late and early),
expired deadlines, unknown models, over-long prompts, poison records,
backpressure (a flood waits in Kafka, not in a worker), kill -9 mid-stream
(re-run as the next attempt) and a SIGTERM drain.
The tests run in file order and share the two workers; the last ones kill them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.metering.reader import read_committed
from services.prompts.chat_template import ChatTemplate
from sluice import tls
from sluice.config import Settings, load_settings
from sluice.kafka_security import client_options
from sluice.ports import free_offset, free_ports
from sluice.stack import Stack
from sluice.topics import COMPLETIONS, CONTROL, DLQ, PROMPTS, TOKENS
from sluice.v1 import events_pb2
from tests.conftest import paused
from tests.inference.worker_helpers import (
    MODEL,
    Replies,
    ReplyReader,
    cancel_event,
    completions,
    markers,
    produce,
    prompt_event,
    start_worker,
)
from tests.metering.helpers import kill_hard, wait_until

pytestmark = pytest.mark.timeout(600)

REPLY_PARTITION = 3
LONG = "Count from 1 to 500, separated by commas."
GROUP = f"sluice-inference-{MODEL}"


@dataclass
class Worker:
    worker_id: str
    settings: Settings
    log: Path
    proc: subprocess.Popen[bytes]

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def logged(self, event: str, **fields: object) -> bool:
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.lines()
        )


@pytest.fixture(scope="module")
def settings(topics_ready: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        kafka_bootstrap=topics_ready,
        state_dir=tmp_path_factory.mktemp("workers"),
        output_redaction=False,  # the request-path e2e test covers it; spaCy twice would slow this down
        inference_slots=2,
        inference_threads=1,
        inference_session_timeout_ms=6000,
        # Long enough that a rebalance (the kill test) lets the survivor finish, not hand back.
        inference_drain_grace_s=90,
        drain_timeout_s=120,
    )


def _spawn(settings: Settings, worker_id: str, env: dict[str, str] | None = None) -> Worker:
    (port,) = free_ports(1)
    mine = settings.model_copy(update={"inference_port": port, "metrics_port_offset": free_offset([port])})
    log = settings.state_dir / "logs" / f"{worker_id}.log"
    extra = {"SLUICE_METRICS_PORT_OFFSET": str(mine.metrics_port_offset), **(env or {})}
    return Worker(worker_id, mine, log, start_worker(mine, worker_id, port, log, extra))


@pytest.fixture(scope="module")
def workers(settings: Settings, stack_settings: Settings) -> Iterator[list[Worker]]:
    with paused(stack_settings, "inference"):  # the pool's group must hold only our two workers
        yield from _two_workers(settings)


def _two_workers(settings: Settings) -> Iterator[list[Worker]]:
    started = [_spawn(settings, "worker-a"), _spawn(settings, "worker-b")]
    try:
        for w in started:
            wait_until(
                lambda w=w: w.proc.poll() is not None or Stack(w.settings).healthy("inference"),
                300,
                f"{w.worker_id} to serve",
            )
            assert w.proc.poll() is None, w.log.read_text()[-3000:]
        # Both members joined and own partitions before any test counts on spreading.
        wait_until(lambda: all(w.logged("partitions assigned") for w in started), 120, "assignments")
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                kill_hard(w.proc)


def _ask(
    settings: Settings, events: list[events_pb2.PromptAssembled], partitions: list[int] | None = None
) -> None:
    asyncio.run(produce(settings.bootstrap, PROMPTS, events, partitions))  # type: ignore[arg-type]


def _completions(settings: Settings, ids: list[str]) -> dict[str, list[events_pb2.CompletionFinished]]:
    return asyncio.run(completions(settings.bootstrap, ids))


def _wait_completions(
    settings: Settings, ids: list[str], count: int = 1
) -> dict[str, list[events_pb2.CompletionFinished]]:
    deadline = time.monotonic() + 120
    while True:
        found = _completions(settings, ids)
        if all(len(found.get(i, [])) >= count for i in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _roundtrip(
    settings: Settings,
    events: list[events_pb2.PromptAssembled],
    partitions: list[int] | None = None,
    timeout: float = 240,
):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
            await produce(settings.bootstrap, PROMPTS, events, partitions)
            return await reader.all_ended([e.envelope.request_id for e in events], timeout)

    return asyncio.run(go())


def test_two_workers_share_the_load_and_answer_each_request_once(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    events = [prompt_event(template, f"Name a colour. ({i})", 12, REPLY_PARTITION) for i in range(8)]
    replies = _roundtrip(settings, events, [i % 6 for i in range(8)])
    ids = [e.envelope.request_id for e in events]
    found = _wait_completions(settings, ids)
    for request_id in ids:
        final = replies.final(request_id)
        assert final.WhichOneof("body") == "finished", final
        (completion,) = found[request_id]
        assert completion.envelope.attempt == 1
        assert completion.finish_reason in (events_pb2.FINISH_REASON_STOP, events_pb2.FINISH_REASON_LENGTH)
        assert completion.usage == final.finished.usage
        assert 0 < completion.usage.completion_tokens <= 12
        assert completion.usage.prompt_tokens == events[ids.index(request_id)].prompt_tokens
        assert completion.engine == "llamacpp" and completion.model_version
        assert completion.time_to_first_token_ms <= completion.duration_ms
        streamed = sum(e.chunk.tokens for e in replies.events[request_id] if e.WhichOneof("body") == "chunk")
        assert streamed == completion.usage.completion_tokens
    assert {c[0].worker for c in found.values()} == {"worker-a", "worker-b"}, "load must spread across both"


def test_cancel_on_the_control_topic_stops_generation(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    event = prompt_event(template, LONG, 400, REPLY_PARTITION)
    request_id = event.envelope.request_id

    async def go() -> tuple[int, events_pb2.ReplyEvent]:
        async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
            await produce(settings.bootstrap, PROMPTS, [event])
            await reader.until(lambda r: request_id in r.arrived, 120, "the first chunk")
            seen = sum(e.chunk.tokens for e in reader.replies.events[request_id])
            await produce(settings.bootstrap, CONTROL, [cancel_event(request_id)])
            await reader.all_ended([request_id], 120)
            return seen, reader.replies.final(request_id)

    seen, final = asyncio.run(go())
    assert final.finished.finish_reason == events_pb2.FINISH_REASON_CANCELLED
    (completion,) = _wait_completions(settings, [request_id])[request_id]
    assert completion.finish_reason == events_pb2.FINISH_REASON_CANCELLED
    produced = completion.usage.completion_tokens
    assert seen <= produced < 400, "cancelled generation is billed for what it produced"
    assert produced - seen < 60, f"generation ran on for {produced - seen} tokens after the cancel"


def test_a_cancel_that_overtakes_its_prompt_keeps_it_from_starting(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    event = prompt_event(template, LONG, 200, REPLY_PARTITION)
    request_id = event.envelope.request_id
    asyncio.run(produce(settings.bootstrap, CONTROL, [cancel_event(request_id)]))
    wait_until(
        lambda: all(w.logged("cancel remembered", request_id=request_id) for w in workers), 60, "the cancel"
    )
    replies = _roundtrip(settings, [event])
    assert replies.final(request_id).finished.finish_reason == events_pb2.FINISH_REASON_CANCELLED
    assert replies.text(request_id, 1) == ""
    (completion,) = _wait_completions(settings, [request_id])[request_id]
    assert completion.finish_reason == events_pb2.FINISH_REASON_CANCELLED
    assert completion.usage.completion_tokens == 0 and completion.usage.prompt_tokens == 0


def test_a_prompt_whose_deadline_passed_in_the_queue_expires(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    event = prompt_event(template, LONG, 200, REPLY_PARTITION, deadline=time.time() - 1)
    request_id = event.envelope.request_id
    replies = _roundtrip(settings, [event])
    assert replies.final(request_id).finished.finish_reason == events_pb2.FINISH_REASON_EXPIRED
    (completion,) = _wait_completions(settings, [request_id])[request_id]
    assert completion.finish_reason == events_pb2.FINISH_REASON_EXPIRED
    assert completion.usage.completion_tokens == 0


def test_an_unknown_model_gets_one_error_completion_and_not_found(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    event = prompt_event(template, "hi", 8, REPLY_PARTITION, model="no-such-model")
    request_id = event.envelope.request_id
    final = _roundtrip(settings, [event]).final(request_id)
    assert final.failed.code == "NOT_FOUND" and final.failed.message.startswith("model:"), final
    found = _wait_completions(settings, [request_id])
    time.sleep(1)  # a second (wrong) completion would come from the same poll
    found = _completions(settings, [request_id])
    (completion,) = found[request_id]
    assert completion.finish_reason == events_pb2.FINISH_REASON_ERROR and "no-such-model" in completion.error


def test_a_prompt_longer_than_the_context_gets_an_error_completion(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    event = prompt_event(template, "", 16, REPLY_PARTITION, raw_prompt="hello " * 2100)
    request_id = event.envelope.request_id
    final = _roundtrip(settings, [event]).final(request_id)
    assert final.failed.code == "INVALID_ARGUMENT" and final.failed.message.startswith("prompt:"), final
    (completion,) = _wait_completions(settings, [request_id])[request_id]
    assert completion.finish_reason == events_pb2.FINISH_REASON_ERROR
    assert "context" in completion.error and completion.usage.completion_tokens == 0


def test_a_poison_prompt_goes_to_the_dlq_and_the_pool_keeps_serving(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    marker = os.urandom(8).hex()
    asyncio.run(produce(settings.bootstrap, PROMPTS, [b"\xffpoison " + marker.encode()], [0]))
    after = prompt_event(template, "Say yes.", 4, REPLY_PARTITION)
    replies = _roundtrip(settings, [after], [0])
    assert replies.final(after.envelope.request_id).WhichOneof("body") == "finished"

    async def letters() -> list[events_pb2.DeadLetter]:
        return [
            events_pb2.DeadLetter.FromString(r.value or b"")
            async for r in read_committed(settings.bootstrap, DLQ)
        ]

    mine = [d for d in asyncio.run(letters()) if d.source_topic == PROMPTS and d.consumer_group == GROUP]
    assert any("PromptAssembled" in d.reason for d in mine)


FLOOD = 12  # three times the two workers' combined slots (2 + 2)


def _owners(workers: list[Worker]) -> dict[int, str]:
    """sluice.prompts.v1 partition -> worker, from each worker's latest assignment."""
    owners: dict[int, str] = {}
    for w in workers:
        assigned = [e for e in w.lines() if e.get("event") == "partitions assigned"][-1]
        partitions = assigned["partitions"]
        assert isinstance(partitions, list)
        for name in partitions:
            topic, _, partition = str(name).rpartition(":")
            if topic == PROMPTS:
                owners[int(partition)] = w.worker_id
    return owners


@dataclass
class Sample:
    in_flight: dict[str, float]  # worker -> its sluice_inference_in_flight gauge
    lag: dict[str, int]  # worker -> flood records its partitions hold uncommitted


async def _flood_lag(
    admin: AIOKafkaAdminClient, ends: AIOKafkaConsumer, base: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Per partition: flood records (offset >= base) the group has not committed, read from the broker."""
    committed = await admin.list_consumer_group_offsets(GROUP)
    end = await ends.end_offsets(list(base))
    return {tp: end[tp] - max(base[tp], committed[tp].offset if tp in committed else 0) for tp in base}


def test_full_workers_stop_fetching_and_leave_waiting_prompts_in_kafka(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    """Backpressure: more long prompts than slots wait in Kafka (the group's lag), not in a worker.

    Sampled while it runs: each worker's in-flight gauge never passes its slots,
    and while a worker is full its partitions hold more uncommitted prompts than
    it runs. Afterwards, exhaustively from the completions: no worker ever had
    more prompts between taking one (the completion envelope's event_time) and
    its generation's end (the CreateTime of its last chunk, sent as the engine
    stops; the completion follows once that is acknowledged, while the freed
    slot already serves the next prompt) than it has slots, so nothing queued
    in its memory.
    """
    capacity = settings.inference_slots
    owners = _owners(workers)
    assert sorted(owners) == list(range(6)) and set(owners.values()) == {"worker-a", "worker-b"}
    events = [prompt_event(template, LONG, 48, REPLY_PARTITION) for _ in range(FLOOD)]
    ids = [e.envelope.request_id for e in events]
    gauge = f'sluice_inference_in_flight{{model="{MODEL}"}}'

    async def sample(
        admin: AIOKafkaAdminClient, ends: AIOKafkaConsumer, base: dict[TopicPartition, int]
    ) -> Sample:
        lag = await _flood_lag(admin, ends, base)
        per_worker = {w.worker_id: 0 for w in workers}
        for tp, count in lag.items():
            per_worker[owners[tp.partition]] += count
        gauges = {w.worker_id: await asyncio.to_thread(_gauge, w.settings, gauge) for w in workers}
        return Sample(gauges, per_worker)

    async def go() -> tuple[list[Sample], Replies]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, **client_options())
        ends = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, **client_options())
        await admin.start()
        await ends.start()
        try:
            tps = [TopicPartition(PROMPTS, p) for p in range(6)]
            base = await ends.end_offsets(tps)
            samples: list[Sample] = []
            async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
                await produce(settings.bootstrap, PROMPTS, events, [i % 6 for i in range(FLOOD)])
                while not all(reader.replies.ended(i) for i in ids):
                    samples.append(await sample(admin, ends, base))
                    await reader.poll()
                    assert len(samples) < 5000, "the flood did not finish"
            # Drained: the group commits every flood prompt.
            deadline = time.monotonic() + 60
            while any((await _flood_lag(admin, ends, base)).values()):
                assert time.monotonic() < deadline, "the group did not commit the flood"
                await asyncio.sleep(0.5)
            return samples, reader.replies
        finally:
            await ends.stop()
            await admin.close()

    samples, replies = asyncio.run(go())
    for s in samples:
        assert all(v <= capacity for v in s.in_flight.values()), f"a worker ran over its slots: {s}"
    for w in workers:
        backed_up = [
            s for s in samples if s.in_flight[w.worker_id] == capacity and s.lag[w.worker_id] > capacity
        ]
        assert backed_up, f"{w.worker_id} never showed full slots with prompts waiting in Kafka: {samples}"

    found = _wait_completions(settings, ids)
    for request_id in ids:
        assert replies.final(request_id).WhichOneof("body") == "finished"
        (completion,) = found[request_id]  # exactly once
        assert completion.envelope.attempt == 1
        assert completion.usage.completion_tokens > 0
        partition = ids.index(request_id) % 6
        assert completion.worker == owners[partition], "a waiting prompt stays with its partition's owner"
    spans = asyncio.run(_generation_spans(settings, ids))
    for w in workers:
        assert _most_at_once(spans[w.worker_id]) <= capacity, f"{w.worker_id} held more than its slots"


async def _generation_spans(settings: Settings, ids: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Per worker: (taken, last chunk sent) of each request, in seconds since the epoch."""
    wanted = set(ids)
    last_chunk: dict[str, float] = {}
    async for record in read_committed(settings.bootstrap, TOKENS):
        reply = events_pb2.ReplyEvent.FromString(record.value or b"")
        if reply.envelope.request_id in wanted and reply.WhichOneof("body") == "chunk":
            last_chunk[reply.envelope.request_id] = record.timestamp / 1000
    spans: dict[str, list[tuple[float, float]]] = {"worker-a": [], "worker-b": []}
    async for record in read_committed(settings.bootstrap, COMPLETIONS):
        completion = events_pb2.CompletionFinished.FromString(record.value or b"")
        if completion.envelope.request_id in wanted:
            taken = completion.envelope.event_time.ToNanoseconds() / 1e9
            spans[completion.worker].append((taken, last_chunk[completion.envelope.request_id]))
    return spans


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """Most spans open at one moment (an end and a start at the same instant do not overlap)."""
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_kill_9_mid_stream_reruns_as_the_next_attempt_and_loses_nothing(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    events = [prompt_event(template, LONG, 80, REPLY_PARTITION) for _ in range(4)]
    ids = [e.envelope.request_id for e in events]

    async def go() -> tuple[str, object]:
        async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
            await produce(settings.bootstrap, PROMPTS, events, [0, 3, 1, 4])
            await reader.until(lambda r: all(i in r.arrived for i in ids), 180, "every stream to start")
            started = [m for m in await markers(settings.bootstrap, ids[0]) if m.state == 1]
            victim = next(w for w in workers if w.worker_id == started[0].worker)
            kill_hard(victim.proc)
            await reader.all_ended(ids, 300)
            return victim.worker_id, reader.replies

    victim, replies = asyncio.run(go())
    survivor = next(w.worker_id for w in workers if w.worker_id != victim)
    found = _wait_completions(settings, ids)
    rerun = 0
    for request_id in ids:
        final = replies.final(request_id)  # type: ignore[attr-defined]
        assert final.WhichOneof("body") == "finished", final
        attempts = sorted(c.envelope.attempt for c in found[request_id])
        assert len(attempts) == len(set(attempts)), f"one completion per attempt: {attempts}"
        if final.envelope.attempt == 1:
            assert attempts == [1] and found[request_id][0].worker == survivor
            continue
        rerun += 1
        assert final.envelope.attempt == 2 and attempts == [1, 2]
        dead, second = sorted(found[request_id], key=lambda c: c.envelope.attempt)
        assert dead.worker == victim and dead.finish_reason == events_pb2.FINISH_REASON_ERROR
        assert "died mid-stream" in dead.error and dead.usage.prompt_tokens > 0
        seen = sum(
            e.chunk.tokens
            for e in replies.events[request_id]
            if e.WhichOneof("body") == "chunk" and e.envelope.attempt == 1
        )  # type: ignore[attr-defined]
        assert dead.usage.completion_tokens == seen > 0, "the dead attempt bills what its caller received"
        assert second.worker == survivor and second.usage == final.finished.usage
        bodies = [(e.WhichOneof("body"), e.envelope.attempt) for e in replies.events[request_id]]  # type: ignore[attr-defined]
        restart = bodies.index(("restarted", 2))
        assert all(attempt == 1 for _, attempt in bodies[:restart]), (
            "attempt 2 starts after its restart notice"
        )
        assert ("chunk", 2) in bodies[restart:]
    assert rerun >= 1, "the killed worker's request must be re-run"


def test_sigterm_drains_in_flight_work_then_leaves(
    workers: list[Worker], settings: Settings, template: ChatTemplate
) -> None:
    alive = next(w for w in workers if w.proc.poll() is None)
    event = prompt_event(template, LONG, 40, REPLY_PARTITION)
    request_id = event.envelope.request_id

    async def go() -> events_pb2.ReplyEvent:
        async with ReplyReader(settings.bootstrap, REPLY_PARTITION) as reader:
            await produce(settings.bootstrap, PROMPTS, [event])
            await reader.until(lambda r: request_id in r.arrived, 120, "the first chunk")
            alive.proc.send_signal(signal.SIGTERM)
            await reader.all_ended([request_id], 120)
            return reader.replies.final(request_id)

    final = asyncio.run(go())
    assert alive.proc.wait(timeout=60) == 0
    assert final.WhichOneof("body") == "finished" and final.envelope.attempt == 1
    (completion,) = _wait_completions(settings, [request_id])[request_id]
    assert completion.finish_reason != events_pb2.FINISH_REASON_ERROR
    assert "Traceback" not in alive.log.read_text()


def test_an_engine_that_cannot_load_stays_unhealthy_and_out_of_the_group(
    settings: Settings, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really a model")
    models = tmp_path / "models.yaml"
    models.write_text(
        "default_model: broken\nmodels:\n  broken:\n    engine: llamacpp\n"
        f"    source: {broken}\n    context_tokens: 512\n    max_output_tokens: 64\n"
    )
    worker = _spawn(settings, "worker-broken", {"SLUICE_MODELS_FILE": str(models)})
    try:
        wait_until(
            lambda: worker.proc.poll() is not None or worker.logged("engine failed to load", model="broken"),
            120,
            "the load failure",
        )
        assert worker.proc.poll() is None, "the worker must stay up: " + worker.log.read_text()[-2000:]
        assert _health(worker.settings) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _metric(worker.settings, 'sluice_inference_engine_load_failed{model="broken"}') == 1.0
        assert _group_members(settings, "sluice-inference-broken") == 0
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=60) == 0
    finally:
        if worker.proc.poll() is None:
            kill_hard(worker.proc)
    assert not worker.logged("partitions assigned")
    assert not worker.logged("serving")


def _health(settings: Settings) -> int:
    with tls.channel(settings, settings.grpc_target("inference")) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(response.status)


def _metric(settings: Settings, sample: str) -> float | None:
    url = f"http://127.0.0.1:{settings.metrics_port('inference')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return None


def _gauge(settings: Settings, sample: str) -> float:
    """A gauge's value; 0 before the worker first set it."""
    return _metric(settings, sample) or 0.0


def _group_members(settings: Settings, group: str) -> int:
    """Members of `group`; a fresh broker's coordinator may need a while to come up (retried)."""

    async def describe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, **client_options())
        await admin.start()
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    (described,) = await admin.describe_consumer_groups([group])
                    break
                except GroupCoordinatorNotAvailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1)
        finally:
            await admin.close()
        # DescribeGroups rows: (error, group, state, protocol type, protocol, members, ...)
        return sum(len(g[5]) for g in described.groups)

    return asyncio.run(describe())
