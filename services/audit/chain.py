"""The hash chain: each record's hash covers its content and its predecessor's hash.

Hashes are over canonical JSON (sorted keys, no spaces), so any language can
verify the chain without our protobuf version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from google.protobuf import json_format

from sluice.v1 import events_pb2

GENESIS = "0" * 64


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
    for record in records:
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
