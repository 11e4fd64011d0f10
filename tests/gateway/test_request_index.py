"""The request index's fold, record by record: who owns an attempt, cancels, and the per-key
counts the global rate limit reads (services/gateway/request_index.py). No broker needed: the
fold is a pure function of the records in their partition order."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import ConsumerRecord
from google.protobuf.message import Message

from services.gateway.auth import Principal
from services.gateway.budgets import BudgetGuard
from services.gateway.request_index import NO_OWNER, RequestIndex, minute_of
from sluice.config import Settings
from sluice.topics import COMPLETIONS, CONTROL, REQUESTS, TOKENS, Codec, load_plan
from sluice.v1 import envelope_pb2, events_pb2

NOW_MS = int(time.time() * 1000)


def index(tmp_path: Path) -> RequestIndex:
    return RequestIndex("unused:9092", tmp_path / "requests.sqlite", Codec(load_plan(Settings().topics_file)))


def record(topic: str, offset: int, event: Message, ms: int = NOW_MS) -> ConsumerRecord[bytes, bytes]:
    value = event.SerializeToString()
    return ConsumerRecord(topic, 0, offset, ms, 0, b"r1", value, None, 2, len(value), [])


def envelope(attempt: int = 1, request_id: str = "r1", tenant: str = "acme") -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(request_id=request_id, tenant=tenant, attempt=attempt, schema_version=1)


def requested(attempt: int, partition: int | None, key_id: str = "k1") -> events_pb2.GenerationRequested:
    reply = envelope_pb2.ReplyTo(topic=TOKENS, partition=partition) if partition is not None else None
    return events_pb2.GenerationRequested(envelope=envelope(attempt), key_id=key_id, reply_to=reply)


def test_the_first_record_of_an_attempt_owns_it_and_a_later_attempt_takes_over(tmp_path: Path) -> None:
    fold = index(tmp_path)
    fold.apply(record(REQUESTS, 10, requested(1, partition=2)))
    fold.apply(record(REQUESTS, 11, requested(1, partition=1)))  # the same key at once, elsewhere
    known = fold.lookup("r1")
    assert known is not None and (known.attempt, known.owner, known.owner_offset) == (1, 2, 10)
    cancel = events_pb2.ControlEvent(envelope=envelope(1), cancel=events_pb2.CancelRequest(reason="gone"))
    fold.apply(record(CONTROL, 3, cancel))
    assert fold.lookup("r1").cancelled  # type: ignore[union-attr]
    fold.apply(record(REQUESTS, 12, requested(2, partition=1)))
    known = fold.lookup("r1")
    assert known is not None and (known.attempt, known.owner, known.owner_offset) == (2, 1, 12)
    assert not known.cancelled and not known.finished


def test_another_tenants_record_with_the_same_id_changes_nothing(tmp_path: Path) -> None:
    fold = index(tmp_path)
    fold.apply(record(REQUESTS, 1, requested(1, partition=0)))
    intruder = requested(2, partition=3)
    intruder.envelope.tenant = "other"
    fold.apply(record(REQUESTS, 2, intruder))
    known = fold.lookup("r1")
    assert known is not None and (known.tenant, known.attempt, known.owner) == ("acme", 1, 0)


def test_generate_calls_count_against_their_key_per_origin_and_minute(tmp_path: Path) -> None:
    fold = index(tmp_path)
    minute = minute_of(NOW_MS)
    for offset, (request_id, partition) in enumerate([("a", 1), ("b", 1), ("c", 2), ("d", None)]):
        event = requested(1, partition)
        event.envelope.request_id = request_id
        fold.apply(record(REQUESTS, offset, event))
    again = requested(1, 1)
    again.envelope.request_id = "a"
    fold.apply(record(REQUESTS, 9, again))  # a duplicate record is not another request
    assert fold.admitted("k1", minute) == {1: 2, 2: 1}  # "d" has no gateway reply partition
    assert fold.admitted("k1", minute + 1) == {} and NO_OWNER not in fold.admitted("k1", minute)


def test_tokens_of_a_finished_request_count_once_for_its_key(tmp_path: Path) -> None:
    fold = index(tmp_path)
    fold.apply(record(REQUESTS, 0, requested(1, partition=0)))
    done = events_pb2.CompletionFinished(
        envelope=envelope(1), usage=envelope_pb2.Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    )
    fold.apply(record(COMPLETIONS, 0, done))
    fold.apply(record(COMPLETIONS, 1, done))  # redelivered
    assert fold.tokens("k1", minute_of(NOW_MS)) == 12
    assert fold.lookup("r1").finished  # type: ignore[union-attr]


def test_a_keys_limit_counts_this_replicas_admissions_and_the_others_from_the_index(tmp_path: Path) -> None:
    fold = index(tmp_path)
    now = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    caller = Principal("acme", "k1", "user", frozenset(), requests_per_minute=3, tokens_per_minute=0)
    guard = BudgetGuard("unused:9092", index=fold, origin=1)
    guard.admit("acme", "k1", now)  # this replica, not yet in the index
    assert guard.check_key(caller, now) is None
    other = requested(1, partition=2)
    other.envelope.request_id = "elsewhere"
    fold.apply(record(REQUESTS, 0, other))
    assert guard.check_key(caller, now) is None  # 2 of 3
    mine = requested(1, partition=1)
    mine.envelope.request_id = "here"
    fold.apply(record(REQUESTS, 1, mine))  # this replica's own admission, now indexed: not twice
    assert guard.key_requests("k1", "acme", now) == 2
    guard.admit("acme", "k1", now)
    rejection = guard.check_key(caller, now)
    assert rejection is not None and rejection.message.startswith("rate limit: key k1 allows 3 requests")
