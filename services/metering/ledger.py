"""A local, queryable projection of sluice.usage.v1. The topic is the ledger; this is an index.

Each entry is keyed by (request_id, attempt, kind, price_version): replaying the
topic can never double-count, and a re-pricing correction is a separate row next
to the charge it corrects, never an edit of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sluice.v1 import billing_pb2, events_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  request_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  price_version TEXT NOT NULL,
  tenant TEXT NOT NULL,
  key_id TEXT NOT NULL,
  template TEXT NOT NULL,
  model TEXT NOT NULL,
  finish_reason INTEGER NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL,
  engine_busy_ms INTEGER NOT NULL,
  cost_nanos INTEGER NOT NULL,
  currency TEXT NOT NULL,
  fallback_price INTEGER NOT NULL,
  corrects_version TEXT NOT NULL,
  completed_at TEXT NOT NULL,
  charged_at TEXT NOT NULL,
  PRIMARY KEY (request_id, attempt, kind, price_version)
);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (tenant, completed_at);
"""

COLUMNS = (
    "request_id, attempt, kind, price_version, tenant, key_id, template, model, finish_reason,"
    " prompt_tokens, completion_tokens, cached_tokens, engine_busy_ms, cost_nanos, currency,"
    " fallback_price, corrects_version, completed_at, charged_at"
)

INSERT = f"INSERT OR IGNORE INTO entries ({COLUMNS}) VALUES ({','.join('?' * 19)})"

# GetUsage groupings: the SQL expression each one groups by.
GROUPS = {
    "model": "model",
    "key": "key_id",
    "template": "template",
    "day": "substr(completed_at, 1, 10)",
}


@dataclass(frozen=True)
class UsageRow:
    tenant: str
    group: str
    currency: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nanos: int
    corrections: int
    fallback_priced: int


def completed_at(charge: events_pb2.UsageCharged) -> str:
    """UTC ISO time of the completion (falls back to the charge time for old entries)."""
    stamp = charge.completed_at if charge.HasField("completed_at") else charge.envelope.event_time
    return stamp.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A rebuildable index of the topic: no fsync per entry (WAL stays consistent).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def record(self, charge: events_pb2.UsageCharged) -> bool:
        """Store an entry in the open write (see `flush`); False if it was already stored."""
        env = charge.envelope
        kind = charge.kind or billing_pb2.CHARGE_KIND_COMPLETION
        cursor = self._db.execute(
            INSERT,
            (
                env.request_id,
                env.attempt,
                kind,
                charge.cost.price_version,
                env.tenant,
                charge.key_id,
                charge.template,
                charge.model,
                charge.finish_reason,
                charge.usage.prompt_tokens,
                charge.usage.completion_tokens,
                charge.usage.cached_tokens,
                charge.engine_busy_ms,
                charge.cost.nanos,
                charge.cost.currency,
                int(charge.fallback_price),
                charge.corrects_version,
                completed_at(charge),
                env.event_time.ToJsonString(),
            ),
        )
        return cursor.rowcount == 1

    def flush(self) -> None:
        """Commit the entries recorded since the last flush, in one SQLite transaction.

        The ledger view calls it once per poll, before the poll's offsets commit (a commit
        per row cost more than everything else metering does per charge); a crash before
        it re-delivers the poll, and the primary key makes the replay harmless.
        """
        self._db.commit()

    def totals(
        self,
        tenant: str = "",
        group: str = "model",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[UsageRow]:
        """Per tenant and group: requests and tokens of charges, cost net of corrections."""
        where, params = _filters(tenant, start, end)
        completion = billing_pb2.CHARGE_KIND_COMPLETION
        query = (
            f"SELECT tenant, {GROUPS[group]} AS grp, currency,"
            f" SUM(kind = {completion}),"
            f" SUM(CASE WHEN kind = {completion} THEN prompt_tokens ELSE 0 END),"
            f" SUM(CASE WHEN kind = {completion} THEN completion_tokens ELSE 0 END),"
            f" SUM(CASE WHEN kind = {completion} THEN cached_tokens ELSE 0 END),"
            f" SUM(cost_nanos), SUM(kind != {completion}), SUM(fallback_price)"
            f" FROM entries {where} GROUP BY tenant, grp, currency ORDER BY tenant, grp"
        )
        return [UsageRow(*row) for row in self._db.execute(query, params).fetchall()]

    def entries(
        self, tenant: str = "", start: datetime | None = None, end: datetime | None = None
    ) -> Iterator[dict[str, object]]:
        """Every entry, oldest first: what finance exports."""
        where, params = _filters(tenant, start, end)
        cursor = self._db.execute(
            f"SELECT {COLUMNS} FROM entries {where} ORDER BY completed_at, request_id, attempt, kind",
            params,
        )
        names = [c[0] for c in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))

    def close(self) -> None:
        self.flush()
        self._db.close()


def _filters(tenant: str, start: datetime | None, end: datetime | None) -> tuple[str, tuple[str, ...]]:
    clauses: list[str] = []
    params: list[str] = []
    if tenant:
        clauses.append("tenant = ?")
        params.append(tenant)
    if start is not None:
        clauses.append("completed_at >= ?")
        params.append(iso(start))
    if end is not None:
        clauses.append("completed_at < ?")
        params.append(iso(end))
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)
