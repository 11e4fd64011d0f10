"""SQLite index of sluice.audit.v1 for fast trail queries. Rebuildable from the topic."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sluice.v1 import events_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  seq INTEGER PRIMARY KEY,
  request_id TEXT NOT NULL,
  stage TEXT NOT NULL,
  topic_offset INTEGER NOT NULL,
  body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_request ON records (request_id, seq);
"""


class AuditStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.executescript(SCHEMA)

    def add(self, record: events_pb2.AuditRecord, offset: int) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?)",
                (record.seq, record.request_id, record.stage, offset, record.SerializeToString()),
            )

    def next_offset(self) -> int:
        row = self._db.execute("SELECT MAX(topic_offset) FROM records").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def head(self) -> events_pb2.AuditRecord | None:
        row = self._db.execute("SELECT body FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else events_pb2.AuditRecord.FromString(row[0])

    def by_seq(self, seq: int) -> events_pb2.AuditRecord | None:
        row = self._db.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else events_pb2.AuditRecord.FromString(row[0])

    def trail(self, request_id: str) -> list[events_pb2.AuditRecord]:
        rows = self._db.execute(
            "SELECT body FROM records WHERE request_id = ? ORDER BY seq", (request_id,)
        ).fetchall()
        return [events_pb2.AuditRecord.FromString(row[0]) for row in rows]

    def close(self) -> None:
        self._db.close()
