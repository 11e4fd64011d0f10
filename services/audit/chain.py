"""The hash chain: each record's hash covers its content and its predecessor's hash.

Hashes are over canonical JSON (sorted keys, no spaces), so any language can
verify the chain without our protobuf version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import json_format

from sluice.v1 import events_pb2

GENESIS = "0" * 64
# Stage of the periodic records that restate the chain head (see ChainWalk).
CHECKPOINT = "checkpoint"


def record_hash(record: events_pb2.AuditRecord) -> str:
    body = json_format.MessageToDict(record, preserving_proto_field_name=True)
    body.pop("hash", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(record: events_pb2.AuditRecord, seq: int, prev_hash: str) -> events_pb2.AuditRecord:
    record.seq = seq
    record.prev_hash = prev_hash
    record.hash = record_hash(record)
    return record


def verify(
    records: Sequence[events_pb2.AuditRecord],
    predecessor: Callable[[int], events_pb2.AuditRecord | None],
) -> str | None:
    """None if every record recomputes and links to the record before it; else the first fault."""
    seen: set[int] = set()
    for record in records:
        if record.seq in seen:
            return f"record seq={record.seq}: appears twice (a forged or replayed copy)"
        seen.add(record.seq)
        if record_hash(record) != record.hash:
            return f"record seq={record.seq}: hash does not match its content"
        if record.seq == 1:
            expected = GENESIS
        else:
            before = predecessor(record.seq - 1)
            if before is None:
                return f"record seq={record.seq}: predecessor seq={record.seq - 1} is missing"
            expected = before.hash
        if record.prev_hash != expected:
            return f"record seq={record.seq}: prev_hash does not match seq={record.seq - 1}"
    return None


@dataclass
class ChainWalk:
    """Verifies records fed in chain order, remembering the first broken link.

    Feeding records one at a time lets the index and the topic be verified in
    constant memory, however long the chain.
    """

    expected_seq: int | None = None
    prev_hash: str | None = None
    checked: int = 0
    checkpoints: int = 0
    broken_seq: int = 0
    broken_offset: int = -1
    error: str = ""

    @property
    def valid(self) -> bool:
        return not self.error

    def start_after(self, record: events_pb2.AuditRecord | None) -> None:
        """Begin a range walk after `record` (None: at the genesis)."""
        self.expected_seq = 1 if record is None else record.seq + 1
        self.prev_hash = GENESIS if record is None else record.hash

    def feed(self, record: events_pb2.AuditRecord, offset: int) -> bool:
        """False once the chain is broken (the walk can stop)."""
        if self.error:
            return False
        self.checked += 1
        if self.expected_seq is None:
            self.expected_seq, self.prev_hash = record.seq, record.prev_hash
        fault = ""
        if record_hash(record) != record.hash:
            fault = "hash does not match its content"
        elif record.seq != self.expected_seq:
            fault = f"seq {record.seq} where seq {self.expected_seq} was expected"
        elif record.prev_hash != self.prev_hash:
            fault = f"prev_hash does not match the hash of seq {record.seq - 1}"
        if fault:
            self.broken_seq, self.broken_offset = record.seq, offset
            self.error = f"record seq={record.seq} at offset {offset}: {fault}"
            return False
        if record.stage == CHECKPOINT:
            if record.details.get("head_hash") != self.prev_hash:
                self.broken_seq, self.broken_offset = record.seq, offset
                self.error = f"checkpoint seq={record.seq} at offset {offset}: head_hash does not match"
                return False
            self.checkpoints += 1
        self.expected_seq, self.prev_hash = record.seq + 1, record.hash
        return True
