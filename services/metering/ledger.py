"""A local, queryable projection of sluice.usage.v1. The topic is the ledger; this is an index.

Keyed by (request_id, attempt), so replaying the topic can never double-count.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sluice.v1 import events_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
  request_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  tenant TEXT NOT NULL,
  model TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL,
  cost_nanos INTEGER NOT NULL,
  currency TEXT NOT NULL,
  price_version TEXT NOT NULL,
  charged_at TEXT NOT NULL,
  PRIMARY KEY (request_id, attempt)
);
"""


@dataclass(frozen=True)
class UsageRow:
    tenant: str
    model: str
    currency: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nanos: int


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.executescript(SCHEMA)

    def record(self, charge: events_pb2.UsageCharged) -> bool:
        """Store a charge; False if this (request_id, attempt) was already stored."""
        env = charge.envelope
        with self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO charges VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    env.request_id,
                    env.attempt,
                    env.tenant,
                    charge.model,
                    charge.usage.prompt_tokens,
                    charge.usage.completion_tokens,
                    charge.usage.cached_tokens,
                    charge.cost.nanos,
                    charge.cost.currency,
                    charge.cost.price_version,
                    env.event_time.ToJsonString(),
                ),
            )
        return cursor.rowcount == 1

    def totals(self, tenant: str = "") -> list[UsageRow]:
        query = (
            "SELECT tenant, model, currency, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
            " SUM(cached_tokens), SUM(cost_nanos) FROM charges"
            + (" WHERE tenant = ?" if tenant else "")
            + " GROUP BY tenant, model, currency ORDER BY tenant, model"
        )
        rows = self._db.execute(query, (tenant,) if tenant else ()).fetchall()
        return [UsageRow(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
