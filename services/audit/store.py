"""The index of sluice.audit.v1 for compliance queries: SQLite, or PostgreSQL by DSN. Rebuildable.

Rows are keyed by topic offset, not by seq, so the index mirrors the topic
exactly, forged or duplicated records included: verification then finds them
instead of the index hiding them. Each row carries the request's who/what
(user, model, template) copied from the request's earlier records, so a filter
on the user finds every stage of that user's requests.

Both backends run the same SQL (written for SQLite, with `?` placeholders and
a quoted "user" column, which PostgreSQL reserves); only the schema types, the
placeholder style and the string aggregate differ, in `Dialect`.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.audit.records import NOT_REQUESTS
from sluice.v1 import events_pb2

if TYPE_CHECKING:
    import psycopg

    Connection = sqlite3.Connection | psycopg.Connection[tuple[Any, ...]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  topic_offset {int} PRIMARY KEY,
  seq {int} NOT NULL,
  request_id TEXT NOT NULL,
  tenant TEXT NOT NULL,
  stage TEXT NOT NULL,
  event_ms {int} NOT NULL,
  "user" TEXT NOT NULL,
  model TEXT NOT NULL,
  template TEXT NOT NULL,
  template_version TEXT NOT NULL,
  finish_reason TEXT NOT NULL,
  cost_nanos {int},
  body {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_request ON records (request_id, topic_offset);
CREATE INDEX IF NOT EXISTS records_by_seq ON records (seq);
CREATE INDEX IF NOT EXISTS records_by_tenant_time ON records (tenant, event_ms, topic_offset);
CREATE INDEX IF NOT EXISTS records_by_user_time ON records ("user", event_ms, topic_offset);
CREATE INDEX IF NOT EXISTS records_by_time ON records (event_ms, topic_offset);
CREATE TABLE IF NOT EXISTS entities (
  entity TEXT NOT NULL,
  topic_offset {int} NOT NULL,
  count {int} NOT NULL,
  PRIMARY KEY (entity, topic_offset)
){without_rowid};
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  first_ms {int} NOT NULL,
  "user" TEXT NOT NULL,
  model TEXT NOT NULL,
  template TEXT NOT NULL,
  template_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (first_ms);
"""


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends; the queries themselves are shared."""

    schema: str
    placeholder: str
    stages_csv: str  # aggregate of a request's distinct stages, comma-separated

    def sql(self, query: str) -> str:
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)


SQLITE = Dialect(
    SCHEMA.format(int="INTEGER", blob="BLOB", without_rowid=" WITHOUT ROWID"),
    "?",
    "group_concat(DISTINCT r.stage)",
)
POSTGRES = Dialect(
    SCHEMA.format(int="BIGINT", blob="BYTEA", without_rowid=""),
    "%s",
    "string_agg(DISTINCT r.stage, ',')",
)


# Column types of each table, in order, for PostgreSQL's `unnest` batch inserts.
PG_COLUMNS = {
    "records": (
        "bigint",
        "bigint",
        "text",
        "text",
        "text",
        "bigint",
        "text",
        "text",
        "text",
        "text",
        "text",
        "bigint",
        "bytea",
    ),
    "requests": ("text", "text", "bigint", "text", "text", "text", "text"),
    "entities": ("text", "bigint", "bigint"),
}


def is_dsn(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


FINISH_PREFIX = "FINISH_REASON_"
# Requests whose who/what the indexer keeps in memory (the rest are read back from SQLite).
WHO_CACHE = 100_000


def to_ms(rfc3339: str) -> int:
    if not rfc3339:
        return 0
    try:  # the C parser is ~10x faster than protobuf's; it rejects 9-digit fractions
        return int(datetime.fromisoformat(rfc3339).timestamp() * 1000)
    except ValueError:
        stamp = Timestamp()
        stamp.FromJsonString(rfc3339)
        return int(stamp.ToMilliseconds())


@dataclass(frozen=True)
class QueryFilter:
    """Every field is optional; `after` is the (event_ms, offset) cursor of the previous page."""

    tenant: str = ""
    from_ms: int | None = None
    to_ms: int | None = None
    user: str = ""
    model: str = ""
    template: str = ""
    template_version: str = ""
    entity: str = ""
    stage: str = ""
    finish_reason: str = ""
    min_cost_nanos: int | None = None
    max_cost_nanos: int | None = None
    request_id: str = ""
    page_size: int = 100
    after: tuple[int, int] | None = None


@dataclass(frozen=True)
class Incomplete:
    request_id: str
    tenant: str
    first_ms: int
    stages: list[str]
    missing: list[str]


Row = tuple[int, events_pb2.AuditRecord]


class AuditStore:
    """The index at `location`: a SQLite file path, or a PostgreSQL DSN (postgresql://...)."""

    def __init__(self, location: Path | str) -> None:
        self.location = location
        self._db: Connection
        if is_dsn(location):
            import psycopg  # only deployments that choose PostgreSQL need the driver

            self.dialect = POSTGRES
            self._db = psycopg.connect(str(location), autocommit=True)
            with self._transaction():
                for statement in self.dialect.schema.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dialect = SQLITE
            lite = sqlite3.connect(path)
            lite.execute("PRAGMA journal_mode=WAL")
            lite.execute("PRAGMA synchronous=NORMAL")
            lite.executescript(self.dialect.schema)
            self._db = lite
        self._who: OrderedDict[str, tuple[str, str, str, str]] = OrderedDict()

    @property
    def path(self) -> Path | str:
        """Where the index is; another AuditStore(path) opens its own connection to it."""
        return self.location

    def _transaction(self) -> AbstractContextManager[object]:
        if isinstance(self._db, sqlite3.Connection):
            return self._db
        return self._db.transaction()

    def _rows(self, query: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        return list(self._db.execute(self.dialect.sql(query), tuple(args)).fetchall())

    def _one(self, query: str, args: Sequence[object] = ()) -> tuple[object, ...] | None:
        row = self._db.execute(self.dialect.sql(query), tuple(args)).fetchone()
        return None if row is None else tuple(row)

    def _insert(self, table: str, rows: Sequence[Sequence[object]], on_conflict: str) -> int:
        """Insert a batch; returns how many rows it changed.

        SQLite: one executemany. PostgreSQL: one statement over `unnest` of one array
        per column, since a round trip per row caps the indexer near 700 records/s.
        """
        if not rows:
            return 0
        if isinstance(self._db, sqlite3.Connection):
            before = self._db.total_changes
            self._db.executemany(
                f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))}) {on_conflict}", rows
            )
            return self._db.total_changes - before
        types = PG_COLUMNS[table]
        arrays = ", ".join(f"%s::{kind}[]" for kind in types)
        with self._db.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} SELECT * FROM unnest({arrays}) {on_conflict}",
                [list(column) for column in zip(*rows, strict=True)],
            )
            return max(cursor.rowcount, 0)

    # -- writing (the indexer only) ------------------------------------------------

    def add(self, record: events_pb2.AuditRecord, offset: int) -> None:
        self.add_many([(offset, record)])

    def add_many(self, rows: Iterable[Row]) -> int:
        """Index a batch in one transaction; returns how many rows were new.

        Rows are prepared in Python and written with one executemany per table:
        per-row statements would cap the indexer near 4,000 records/s.
        """
        rows = list(rows)
        self._load_who({r.request_id for _, r in rows if r.request_id and r.request_id not in self._who})
        requests: list[tuple[object, ...]] = []
        records: list[tuple[object, ...]] = []
        entities: list[tuple[str, int, int]] = []
        for offset, record in rows:
            details = dict(record.details)
            event_ms = to_ms(record.event_time)
            who = (
                record.user,
                record.model or details.get("model", ""),
                details.get("template_name", ""),
                details.get("template_version", ""),
            )
            if record.request_id and record.stage not in NOT_REQUESTS:
                who = self._remember(record.request_id, who)
                requests.append((record.request_id, record.tenant, event_ms, *who))
            cost = details.get("cost_nanos", "")
            records.append(
                (
                    offset,
                    record.seq,
                    record.request_id,
                    record.tenant,
                    record.stage,
                    event_ms,
                    *who,
                    details.get("finish_reason", "").removeprefix(FINISH_PREFIX).lower(),
                    int(cost) if cost.lstrip("-").isdigit() else None,
                    record.SerializeToString(),
                )
            )
            entities.extend(
                (key.removeprefix("entities."), offset, int(n))
                for key, n in details.items()
                if key.startswith("entities.") and n.isdigit()
            )
        with self._transaction():
            added = self._insert("records", _first_per_key(records), "ON CONFLICT DO NOTHING")
            self._insert(
                "requests",
                _last_per_request(requests),
                "ON CONFLICT (request_id) DO UPDATE SET "
                '"user" = excluded."user", model = excluded.model, template = excluded.template, '
                "template_version = excluded.template_version",
            )
            self._insert("entities", _first_per_key(entities, 2), "ON CONFLICT DO NOTHING")
        return added

    def _load_who(self, request_ids: set[str]) -> None:
        """Read the who of a batch's requests not in memory in a few queries, not one per request."""
        wanted = sorted(request_ids)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for row in self._rows(
                'SELECT request_id, "user", model, template, template_version FROM requests '
                f"WHERE request_id IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                self._who[str(row[0])] = (str(row[1]), str(row[2]), str(row[3]), str(row[4]))

    def _remember(self, request_id: str, who: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
        """Merge what this record says about its request with what earlier records said."""
        known = self._who.get(request_id, ("", "", "", ""))
        merged = (known[0] or who[0], known[1] or who[1], known[2] or who[2], known[3] or who[3])
        self._who[request_id] = merged
        self._who.move_to_end(request_id)
        if len(self._who) > WHO_CACHE:
            self._who.popitem(last=False)
        return merged

    def clear(self) -> None:
        self._who.clear()
        with self._transaction():
            for table in ("records", "entities", "requests"):
                self._db.execute(f"DELETE FROM {table}")

    # -- reading ---------------------------------------------------------------------

    def next_offset(self) -> int:
        row = self._one("SELECT MAX(topic_offset) FROM records")
        return 0 if row is None or row[0] is None else int(str(row[0])) + 1

    def count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM records")
        return 0 if row is None else int(str(row[0]))

    def head(self) -> events_pb2.AuditRecord | None:
        """The last record in topic order: the writer appends after it."""
        row = self._one("SELECT body FROM records ORDER BY topic_offset DESC LIMIT 1")
        return None if row is None else _record(row[0])

    def by_seq(self, seq: int) -> events_pb2.AuditRecord | None:
        found = self.offset_of_seq(seq)
        return None if found is None else found[1]

    def offset_of_seq(self, seq: int) -> Row | None:
        row = self._one(
            "SELECT topic_offset, body FROM records WHERE seq = ? ORDER BY topic_offset LIMIT 1", (seq,)
        )
        return None if row is None else (int(str(row[0])), _record(row[1]))

    def user_of(self, request_id: str) -> str:
        """The end-user id an earlier record of the request named ("" if none did)."""
        row = self._one('SELECT "user" FROM requests WHERE request_id = ?', (request_id,))
        return "" if row is None else str(row[0])

    def trail(self, request_id: str) -> list[Row]:
        rows = self._rows(
            "SELECT topic_offset, body FROM records WHERE request_id = ? ORDER BY topic_offset", (request_id,)
        )
        return [(int(str(offset)), _record(body)) for offset, body in rows]

    def walk(self, from_offset: int = 0) -> Iterator[Row]:
        """Every record from `from_offset` in topic order, streamed (constant memory)."""
        query = self.dialect.sql(
            "SELECT topic_offset, body FROM records WHERE topic_offset >= ? ORDER BY topic_offset"
        )
        if isinstance(self._db, sqlite3.Connection):
            for offset, body in self._db.execute(query, (from_offset,)):
                yield int(offset), _record(body)
            return
        with self._db.transaction(), self._db.cursor(name="audit_walk") as cursor:  # server-side
            cursor.execute(query, (from_offset,))
            for offset, body in cursor:
                yield int(offset), _record(body)

    def query(self, f: QueryFilter) -> tuple[list[Row], tuple[int, int] | None]:
        """One page in (event time, offset) order, and the cursor of the next page if any."""
        where: list[str] = []
        args: list[object] = []
        for column, value in (
            ("tenant", f.tenant),
            ('"user"', f.user),
            ("model", f.model),
            ("template", f.template),
            ("template_version", f.template_version),
            ("stage", f.stage),
            ("finish_reason", f.finish_reason),
            ("request_id", f.request_id),
        ):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        for clause, bound in (
            ("event_ms >= ?", f.from_ms),
            ("event_ms < ?", f.to_ms),
            ("cost_nanos >= ?", f.min_cost_nanos),
            ("cost_nanos <= ?", f.max_cost_nanos),
        ):
            if bound is not None:
                where.append(clause)
                args.append(bound)
        if f.entity:
            where.append(
                "EXISTS (SELECT 1 FROM entities e"
                " WHERE e.entity = ? AND e.topic_offset = records.topic_offset)"
            )
            args.append(f.entity)
        if f.after is not None:
            where.append("(event_ms, topic_offset) > (?, ?)")
            args.extend(f.after)
        sql = "SELECT event_ms, topic_offset, body FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY event_ms, topic_offset LIMIT ?"
        rows = self._rows(sql, (*args, f.page_size + 1))
        page = rows[: f.page_size]
        more = len(rows) > f.page_size
        cursor = (int(str(page[-1][0])), int(str(page[-1][1]))) if more and page else None
        return [(int(str(offset)), _record(body)) for _, offset, body in page], cursor

    def completeness(
        self, tenant: str, from_ms: int | None, to_ms: int | None
    ) -> tuple[int, list[Incomplete]]:
        """Requests first seen in the range whose trail misses a stage it should have."""
        where: list[str] = ["1 = 1"]
        args: list[object] = []
        if tenant:
            where.append("q.tenant = ?")
            args.append(tenant)
        if from_ms is not None:
            where.append("q.first_ms >= ?")
            args.append(from_ms)
        if to_ms is not None:
            where.append("q.first_ms < ?")
            args.append(to_ms)
        rows = self._rows(
            f"SELECT q.request_id, q.tenant, q.first_ms, {self.dialect.stages_csv} "
            "FROM requests q JOIN records r ON r.request_id = q.request_id "
            f"WHERE {' AND '.join(where)} GROUP BY q.request_id, q.tenant, q.first_ms ORDER BY q.first_ms",
            args,
        )
        missing: list[Incomplete] = []
        for request_id, owner, first_ms, stages_csv in rows:
            stages = sorted(set(str(stages_csv).split(",")))
            gaps = _missing_stages(set(stages))
            if gaps:
                missing.append(Incomplete(str(request_id), str(owner), int(str(first_ms)), stages, gaps))
        return len(rows), missing

    def close(self) -> None:
        self._db.close()


def _record(body: object) -> events_pb2.AuditRecord:
    assert isinstance(body, bytes | memoryview), "records.body is BLOB (SQLite) or BYTEA (PostgreSQL)"
    return events_pb2.AuditRecord.FromString(bytes(body))


def _first_per_key(rows: list[tuple[Any, ...]], width: int = 1) -> list[tuple[Any, ...]]:
    """Rows with a primary key seen earlier in the batch dropped (one statement may not insert it twice)."""
    unique: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in rows:
        unique.setdefault(row[:width], row)
    return list(unique.values())


def _last_per_request(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """One upsert per request per batch: its first tenant and time, its last (most merged) who."""
    merged: dict[object, tuple[object, ...]] = {}
    for row in rows:
        first = merged.get(row[0])
        merged[row[0]] = row if first is None else (*first[:3], *row[3:])
    return list(merged.values())


def _missing_stages(stages: set[str]) -> list[str]:
    """A request must be completed once received (or dead-lettered), and charged once completed."""
    gaps = []
    if "received" in stages and "completed" not in stages and "dead_lettered" not in stages:
        gaps.append("completed")
    if "completed" in stages and "charged" not in stages:
        gaps.append("charged")
    return gaps
