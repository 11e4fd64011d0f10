from services.audit import chain
from sluice.v1 import events_pb2


def build_chain(n: int) -> list[events_pb2.AuditRecord]:
    records, prev = [], chain.GENESIS
    for i in range(1, n + 1):
        record = chain.seal(
            events_pb2.AuditRecord(request_id=f"r{i % 2}", stage="received", details={"k": str(i)}), i, prev
        )
        records.append(record)
        prev = record.hash
    return records


def lookup(records: list[events_pb2.AuditRecord]):  # type: ignore[no-untyped-def]
    by_seq = {r.seq: r for r in records}
    return by_seq.get


def test_a_sealed_chain_verifies() -> None:
    records = build_chain(5)
    assert records[0].prev_hash == chain.GENESIS
    assert chain.verify(records, lookup(records)) is None


def test_a_subset_verifies_against_its_predecessors() -> None:
    records = build_chain(6)
    trail = [r for r in records if r.request_id == "r1"]
    assert chain.verify(trail, lookup(records)) is None


def test_editing_a_record_is_detected() -> None:
    records = build_chain(4)
    records[2].details["k"] = "tampered"
    assert "seq=3: hash does not match" in (chain.verify(records, lookup(records)) or "")


def test_rehashing_an_edited_record_breaks_the_next_link() -> None:
    records = build_chain(4)
    records[1].details["k"] = "tampered"
    records[1].hash = chain.record_hash(records[1])
    assert "seq=3: prev_hash does not match" in (chain.verify(records, lookup(records)) or "")


def test_a_deleted_predecessor_is_detected() -> None:
    records = build_chain(4)
    kept = [r for r in records if r.seq != 2]
    assert "predecessor seq=2 is missing" in (chain.verify(kept, lookup(kept)) or "")


def walk(records: list[events_pb2.AuditRecord]) -> chain.ChainWalk:
    w = chain.ChainWalk()
    w.start_after(None)
    for offset, record in enumerate(records):
        if not w.feed(record, offset):
            break
    return w


def test_a_walk_over_an_intact_chain_is_valid_and_counts_checkpoints() -> None:
    records = build_chain(3)
    checkpoint = chain.seal(
        events_pb2.AuditRecord(stage=chain.CHECKPOINT, details={"head_hash": records[-1].hash}),
        4,
        records[-1].hash,
    )
    w = walk([*records, checkpoint])
    assert (w.valid, w.checked, w.checkpoints, w.prev_hash) == (True, 4, 1, checkpoint.hash)


def test_a_walk_names_the_first_broken_link_and_its_offset() -> None:
    records = build_chain(5)
    records[3].details["k"] = "tampered"
    records[4].details["k"] = "tampered too"
    w = walk(records)
    assert (w.valid, w.broken_seq, w.broken_offset) == (False, 4, 3)
    assert w.error == "record seq=4 at offset 3: hash does not match its content"


def test_a_walk_finds_a_forged_copy_appended_later() -> None:
    records = build_chain(3)
    forged = events_pb2.AuditRecord()
    forged.CopyFrom(records[1])
    forged.details["k"] = "rewritten"
    forged.hash = chain.record_hash(forged)  # a consistent-looking copy of seq 2
    w = walk([*records, forged])
    assert (w.broken_seq, w.broken_offset) == (2, 3)
    assert "seq 2 where seq 4 was expected" in w.error


def test_a_checkpoint_restating_a_wrong_head_is_caught() -> None:
    records = build_chain(2)
    bad = chain.seal(
        events_pb2.AuditRecord(stage=chain.CHECKPOINT, details={"head_hash": "f" * 64}), 3, records[-1].hash
    )
    assert "checkpoint seq=3 at offset 2: head_hash does not match" in walk([*records, bad]).error


def test_a_trail_holding_the_same_seq_twice_is_not_valid() -> None:
    records = build_chain(3)
    copy = events_pb2.AuditRecord()
    copy.CopyFrom(records[2])
    assert "seq=3: appears twice" in (chain.verify([*records, copy], lookup(records)) or "")
