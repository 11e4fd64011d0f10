"""Who to bill a completion to beyond the tenant: the API key and the template version.

Completions carry neither, so metering remembers them per request_id from the
request (key id) and the assembled prompt (template). Only ids are kept, never
text. Stored in SQLite before the offsets commit, so a restart loses nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from aiokafka import ConsumerRecord
from google.protobuf.message import Message

from sluice.kafka import Output
from sluice.v1 import events_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS attribution (
  request_id TEXT PRIMARY KEY,
  key_id TEXT NOT NULL DEFAULT '',
  template TEXT NOT NULL DEFAULT ''
);
"""


class Attribution:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A rebuildable index of the topic: no fsync per entry (WAL stays consistent).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def lookup(self, request_id: str) -> tuple[str, str]:
        row = self._db.execute(
            "SELECT key_id, template FROM attribution WHERE request_id = ?", (request_id,)
        ).fetchone()
        return (row[0], row[1]) if row else ("", "")

    def note(self, request_id: str, *, key_id: str | None = None, template: str | None = None) -> None:
        """Remember ids in the open write; `flush` commits them (once per poll, before its offsets)."""
        self._db.execute("INSERT OR IGNORE INTO attribution (request_id) VALUES (?)", (request_id,))
        if key_id:
            self._db.execute("UPDATE attribution SET key_id = ? WHERE request_id = ?", (key_id, request_id))
        if template:
            self._db.execute(
                "UPDATE attribution SET template = ? WHERE request_id = ?", (template, request_id)
            )

    def flush(self) -> None:
        self._db.commit()

    async def handle(self, event: Message, record: ConsumerRecord[bytes, bytes]) -> Sequence[Output]:
        if isinstance(event, events_pb2.GenerationRequested) and event.key_id:
            self.note(event.envelope.request_id, key_id=event.key_id)
        elif isinstance(event, events_pb2.PromptAssembled):
            used = event.template_used
            if used.name:
                self.note(event.envelope.request_id, template=f"{used.name}@{used.version}")
        return ()

    def close(self) -> None:
        self.flush()
        self._db.close()
