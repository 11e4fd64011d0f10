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
