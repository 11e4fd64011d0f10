"""The index on both backends: a real SQLite file and a real PostgreSQL server (pgserver).

Filters, paging, tampering and completeness must mean the same on either.
"""

from __future__ import annotations

import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from services.audit import chain
from services.audit.chain_watch import ChainWatch
from services.audit.filters import InvalidArgument
from services.audit.service import CompletenessWatch, walk_index
from services.audit.store import AuditStore, QueryFilter
from sluice.v1 import events_pb2

T0 = 1_790_000_000_000  # ms


def stamp(ms: int) -> str:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t.ToJsonString()


def lifecycle(
    request_id: str, tenant: str, user: str, ms: int, *, charged: bool = True
) -> list[events_pb2.AuditRecord]:
    """The records a request leaves, as the writer makes them (user only on the first two)."""
    r = events_pb2.AuditRecord
    records = [
        r(
            request_id=request_id,
            tenant=tenant,
            stage="received",
            user=user,
            model="m1",
            event_time=stamp(ms),
        ),
        r(
            request_id=request_id,
            tenant=tenant,
            stage="redacted",
            user=user,
            event_time=stamp(ms + 1),
            details={"entities.EMAIL_ADDRESS": "2"},
        ),
        r(
            request_id=request_id,
            tenant=tenant,
            stage="assembled",
            model="m1",
            event_time=stamp(ms + 2),
            details={"template_name": "support", "template_version": "3"},
        ),
        r(
            request_id=request_id,
            tenant=tenant,
            stage="completed",
            model="m1",
            event_time=stamp(ms + 3),
            details={"finish_reason": "FINISH_REASON_STOP"},
        ),
    ]
    if charged:
        records.append(
            r(
                request_id=request_id,
                tenant=tenant,
                stage="charged",
                event_time=stamp(ms + 4),
                details={"cost_nanos": "1500"},
            )
        )
    return records


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server from the pgserver wheel (no Docker here)."""
    pgserver = pytest.importorskip(
        "pgserver", reason="the dev extra's pgserver ships the PostgreSQL binaries"
    )
    # Not under pytest's basetemp: as root, pgserver runs initdb as its own user, which must
    # traverse the parents, and another pytest session starting meanwhile resets
    # /tmp/pytest-of-<user> to 0700.
    with tempfile.TemporaryDirectory(prefix="sluice-pg-") as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        yield server
        server.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "index.sqlite"
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return str(server.get_uri(name))


@pytest.fixture
def store(location: Path | str) -> Iterator[AuditStore]:
    s = AuditStore(location)
    prev, seq = chain.GENESIS, 0
    batch = []
    for i in range(20):
        tenant = "acme" if i % 2 else "demo"
        for record in lifecycle(f"req{i}", tenant, f"user{i % 3}", T0 + i * 1000, charged=i != 7):
            seq += 1
            chain.seal(record, seq, prev)
            prev = record.hash
            batch.append((seq - 1, record))
    assert s.add_many(batch) == len(batch)
    assert s.add_many(batch[:5]) == 0  # re-read offsets are ignored
    yield s
    s.close()


def ids(rows: list[tuple[int, events_pb2.AuditRecord]]) -> list[tuple[str, str]]:
    return [(r.request_id, r.stage) for _, r in rows]


def test_a_user_filter_finds_every_stage_of_that_users_requests(store: AuditStore) -> None:
    rows, cursor = store.query(QueryFilter(tenant="demo", user="user1", page_size=100))
    # Even requests are demo's; user1 is i % 3 == 1: requests 4, 10, 16.
    assert {rid for rid, _ in ids(rows)} == {"req4", "req10", "req16"}
    assert len(rows) == 15 and cursor is None


def test_filters_combine_and_pages_follow_the_cursor(store: AuditStore) -> None:
    f = QueryFilter(tenant="acme", from_ms=T0 + 3000, to_ms=T0 + 9000, stage="charged", page_size=1)
    seen = []
    after = None
    while True:
        rows, after = store.query(QueryFilter(**{**f.__dict__, "after": after}))
        seen += ids(rows)
        if after is None:
            break
    # acme = odd requests; 3, 5, 7 in range; 7 was never charged.
    assert seen == [("req3", "charged"), ("req5", "charged")]


def test_entity_template_finish_and_cost_filters(store: AuditStore) -> None:
    assert len(store.query(QueryFilter(entity="EMAIL_ADDRESS", page_size=1000))[0]) == 20
    assert store.query(QueryFilter(entity="PHONE_NUMBER"))[0] == []
    templated = store.query(
        QueryFilter(template="support", template_version="3", stage="charged", page_size=1000)
    )
    assert len(templated[0]) == 19
    assert len(store.query(QueryFilter(finish_reason="stop", page_size=1000))[0]) == 20
    assert store.query(QueryFilter(min_cost_nanos=1501))[0] == []
    assert len(store.query(QueryFilter(min_cost_nanos=1500, max_cost_nanos=1500, page_size=1000))[0]) == 19


def test_completeness_lists_the_request_never_charged(store: AuditStore) -> None:
    checked, missing = store.completeness("", None, None)
    assert checked == 20
    assert [(m.request_id, m.missing) for m in missing] == [("req7", ["charged"])]
    assert store.completeness("demo", None, None)[1] == []


def test_an_edited_row_in_the_index_is_found_by_a_walk(store: AuditStore) -> None:
    assert _walk(store).valid
    record = store.by_seq(42)
    assert record is not None
    record.details["cost_nanos"] = "1"
    _tamper(store.path, 42, record.SerializeToString())
    walk = _walk(store)
    assert (walk.valid, walk.broken_seq, walk.broken_offset) == (False, 42, 41)


def _tamper(location: Path | str, seq: int, body: bytes) -> None:
    """Edit a row from outside, as someone with write access to the database could."""
    if isinstance(location, Path):
        with sqlite3.connect(location) as db:
            db.execute("UPDATE records SET body = ? WHERE seq = ?", (body, seq))
        return
    import psycopg

    with psycopg.connect(location, autocommit=True) as db:
        db.execute("UPDATE records SET body = %s WHERE seq = %s", (body, seq))


def test_the_writer_finds_the_user_of_a_request_from_its_earlier_records(store: AuditStore) -> None:
    assert store.user_of("req4") == "user1" and store.user_of("nope") == ""
    assert store.head() is not None and store.head().seq == 99  # type: ignore[union-attr]
    assert store.next_offset() == 99 and store.count() == 99


def test_clear_empties_the_index(store: AuditStore) -> None:
    store.clear()
    assert store.count() == 0 and store.next_offset() == 0 and store.head() is None


def _walk(store: AuditStore) -> chain.ChainWalk:
    walk = chain.ChainWalk()
    walk.start_after(None)
    for offset, record in store.walk():
        if not walk.feed(record, offset):
            break
    return walk


def test_a_range_walk_starts_after_its_predecessor_and_stops_at_to_seq(store: AuditStore) -> None:
    walk = walk_index(store.path, 10, 20)
    assert (walk.valid, walk.checked) == (True, 11)
    assert walk.prev_hash == store.by_seq(20).hash  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match=r"^from_seq: no record seq=9999 to start after"):
        walk_index(store.path, 10_000, 0)


def test_a_request_missing_a_stage_raises_one_alert_and_sets_the_gauge(store: AuditStore) -> None:
    watch = CompletenessWatch(store, interval_s=60, window_s=3600, grace_s=300)
    now = T0 + 20_000 + 300_000  # every request is past the grace period
    alerts = watch.check(now)
    assert [(a.envelope.request_id, a.envelope.tenant, list(a.missing)) for a in alerts] == [
        ("req7", "acme", ["charged"])
    ]
    assert alerts[0].first_event_time.ToMilliseconds() == T0 + 7000 and alerts[0].grace_s == 300
    assert "completed" in alerts[0].stages
    assert REGISTRY.get_sample_value("sluice_audit_incomplete_requests") == 1
    assert watch.check(now) == []  # alerted once; the gauge still counts it
    assert REGISTRY.get_sample_value("sluice_audit_incomplete_requests") == 1
    assert watch.check(T0 + 5_000 + 300_000) == []  # req7 is not yet past the grace period


def test_a_later_batch_in_a_new_process_still_carries_the_requests_user(location: Path | str) -> None:
    first, second = lifecycle("late", "demo", "erin", T0)[:2], lifecycle("late", "demo", "erin", T0)[2:]
    store = AuditStore(location)
    store.add_many([(0, first[0]), (1, first[1])])
    store.close()
    reopened = AuditStore(location)  # empty who-cache: the user must come from the index
    try:
        reopened.add_many([(2 + i, record) for i, record in enumerate(second)])
        rows, _ = reopened.query(QueryFilter(tenant="demo", user="erin", stage="charged"))
        assert [r.request_id for _, r in rows] == ["late"]
    finally:
        reopened.close()


def test_the_chain_watch_gauge_turns_to_zero_at_a_broken_link_and_stays(store: AuditStore) -> None:
    watch = ChainWatch(store.path, interval_s=60)
    assert watch.check() and REGISTRY.get_sample_value("sluice_audit_chain_valid") == 1
    record = store.by_seq(42)
    assert record is not None
    record.details["cost_nanos"] = "1"
    _tamper(store.path, 42, record.SerializeToString())
    assert watch.check()  # incremental: rows it already verified are not re-read
    fresh = ChainWatch(store.path, interval_s=60)
    assert not fresh.check() and REGISTRY.get_sample_value("sluice_audit_chain_valid") == 0
    assert not fresh.check()  # a broken chain stays broken
