"""Idempotent retries and per-key rate limits across gateway replicas: real processes on one
real broker (the stack's), each replica with its own reply partition."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc

from sluice.stack import Stack
from sluice.topics import COMPLETIONS, CONTROL, REQUESTS, TOKENS
from sluice.v1 import events_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import admission, create_key, eventually, first_of, generate, on_topic, request
from tests.gateway.replica_pool import Replica, ReplicaPool

Answer = list[gateway_pb2.GenerateResponse]


def on(replica: Replica, key: str, req: gateway_pb2.GenerateRequest) -> Answer:
    with grpc.insecure_channel(replica.target) as channel:
        return generate(channel, key, req)


def text(answer: Answer) -> str:
    return "".join(r.delta for r in answer)


def synced(replica: Replica, key: str) -> None:
    """Wait until `replica` knows `key` and its request index has read everything committed.

    Feedback on an id that never existed answers NOT_FOUND only after that index caught
    up (docs/gateway.md, feedback): a sync point that needs no peek inside the process.
    """

    def probe() -> bool:
        with grpc.insecure_channel(replica.target) as channel:
            try:
                gateway_pb2_grpc.GatewayStub(channel).SubmitFeedback(
                    gateway_pb2.SubmitFeedbackRequest(request_id=uuid.uuid4().hex, rating=1, scale=1),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=30,
                )
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    eventually(f"replica {replica.partition} to catch up", probe, 120)


def runs(stack: Stack, request_id: str) -> list[events_pb2.CompletionFinished]:
    """The completions of `request_id`: one per run of the model."""
    return eventually(
        "the completion", lambda: on_topic(stack, COMPLETIONS, request_id, events_pb2.CompletionFinished)
    )


def same_answer(first: Answer, second: Answer) -> None:
    assert second[0].request_id == first[0].request_id
    assert text(second) == text(first) and text(first)
    assert second[-1].finish_reason == first[-1].finish_reason != 0
    assert second[-1].usage == first[-1].usage


def test_a_retry_on_another_replica_or_after_a_restart_gets_the_whole_answer_and_nothing_runs_twice(
    stack: Stack, pool: ReplicaPool, demo_key: str
) -> None:
    a, b = pool.replicas
    req = request("Name three rivers.", max_tokens=8, temperature=0.0, idempotency_key=uuid.uuid4().hex)
    first = on(a, demo_key, req)
    synced(b, demo_key)  # so the retry finds the request at once, and publishes nothing
    retried = on(b, demo_key, req)
    same_answer(first, retried)
    assert retried[-1].cost.nanos > 0
    pool.stop(b)
    restarted = pool.start(b.partition)
    synced(restarted, demo_key)
    same_answer(first, on(restarted, demo_key, req))
    assert len(runs(stack, first[0].request_id)) == 1
    published = on_topic(stack, REQUESTS, first[0].request_id, events_pb2.GenerationRequested)
    assert [p.reply_to.partition for p in published] == [a.partition], "retries publish nothing"


def test_a_retry_while_the_first_call_streams_gets_the_answer_from_its_first_token(
    stack: Stack, pool: ReplicaPool, demo_key: str
) -> None:
    a, b = pool.replicas
    req = request(
        "Count from one to twenty.", max_tokens=32, temperature=0.0, idempotency_key=uuid.uuid4().hex
    )
    with grpc.insecure_channel(a.target) as channel:
        opened, call = first_of(channel, demo_key, req, timeout=300)
        retried = on(b, demo_key, req)
        first = [opened, *call]
    same_answer(first, retried)
    assert len(runs(stack, opened.request_id)) == 1


def test_the_same_key_on_two_replicas_at_once_runs_once_and_both_get_its_answer(
    stack: Stack, pool: ReplicaPool, demo_key: str
) -> None:
    a, b = pool.replicas
    req = request("Name a planet.", max_tokens=8, temperature=0.0, idempotency_key=uuid.uuid4().hex)
    with ThreadPoolExecutor(2) as both:
        answers = list(both.map(lambda replica: on(replica, demo_key, req), (a, b)))
    same_answer(answers[0], answers[1])
    request_id = answers[0][0].request_id
    assert len(runs(stack, request_id)) == 1
    # One record won (the first on its partition of sluice.requests.v1); every reply went to it.
    published = on_topic(stack, REQUESTS, request_id, events_pb2.GenerationRequested)
    winner = published[0].reply_to.partition
    replies = on_topic(stack, TOKENS, request_id, events_pb2.ReplyEvent)
    assert replies and all(r.envelope.attempt == 1 for r in replies)
    assert {p.envelope.attempt for p in published} == {1} and winner in (a.partition, b.partition)


def test_a_request_its_caller_cancelled_is_run_again_by_a_retry_on_another_replica(
    stack: Stack, pool: ReplicaPool, demo_key: str
) -> None:
    a, b = pool.replicas
    idem = uuid.uuid4().hex
    with grpc.insecure_channel(a.target) as channel:
        opened, call = first_of(
            channel, demo_key, request("Tell a long story.", max_tokens=200, idempotency_key=idem)
        )
        call.cancel()
    eventually("the cancel", lambda: on_topic(stack, CONTROL, opened.request_id, events_pb2.ControlEvent), 60)
    synced(b, demo_key)
    again = on(b, demo_key, request("Tell a long story.", max_tokens=4, idempotency_key=idem))
    assert again[0].request_id == opened.request_id and again[-1].finish_reason
    attempts = [
        (p.envelope.attempt, p.reply_to.partition)
        for p in on_topic(stack, REQUESTS, opened.request_id, events_pb2.GenerationRequested)
    ]
    assert attempts == [(1, a.partition), (2, b.partition)]


def _away_from_a_minute_boundary() -> None:
    """Per-minute counts reset on the minute; start where the whole test fits in one."""
    second = datetime.now(UTC).second
    if second > 40:
        time.sleep(61 - second)


def test_a_keys_rate_limit_holds_across_replicas(stack: Stack, pool: ReplicaPool) -> None:
    a, b = pool.replicas
    limited = create_key(stack, "tenant-limited-global", "--rpm", "2")["api_key"]
    synced(a, limited)
    synced(b, limited)
    _away_from_a_minute_boundary()
    with grpc.insecure_channel(a.target) as channel:
        assert admission(channel, limited, request(max_tokens=2)) is None
        assert admission(channel, limited, request(max_tokens=2)) is None
    synced(b, limited)  # b has read a's two requests
    with grpc.insecure_channel(b.target) as channel:
        error = admission(channel, limited, request(max_tokens=2))
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert (error.details() or "").startswith(f"rate limit: key {limited[10:22]} allows 2 requests")
    assert 1 <= int(dict(error.trailing_metadata() or ())["retry-after"]) <= 60
