import re

import pytest

from sluice import envelope
from sluice.v1 import envelope_pb2


def test_new_envelope_carries_identity_time_trace_and_version() -> None:
    env = envelope.new_envelope(request_id="r1", tenant="demo", producer="gateway")
    assert (env.request_id, env.attempt, env.tenant, env.producer) == ("r1", 1, "demo", "gateway")
    assert env.event_time.seconds > 0
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", env.traceparent)
    assert env.schema_version == envelope.SCHEMA_VERSION
    assert len(env.event_id) == 32


def test_follow_keeps_request_attempt_tenant_and_trace_but_not_event_id() -> None:
    parent = envelope.new_envelope(request_id="r1", tenant="t", producer="gateway", attempt=3)
    child = envelope.follow(parent, "redaction")
    assert (child.request_id, child.attempt, child.tenant) == ("r1", 3, "t")
    assert child.traceparent == parent.traceparent
    assert child.event_id != parent.event_id
    assert child.producer == "redaction"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: setattr(e, "request_id", ""), "envelope.request_id"),
        (lambda e: setattr(e, "attempt", 0), "envelope.attempt"),
        (lambda e: setattr(e, "tenant", ""), "envelope.tenant"),
        (lambda e: setattr(e, "schema_version", 99), "envelope.schema_version"),
    ],
)
def test_validate_names_the_bad_field(mutate, field) -> None:  # type: ignore[no-untyped-def]
    env = envelope.new_envelope(request_id="r1", tenant="t", producer="p")
    mutate(env)
    with pytest.raises(ValueError, match=re.escape(field)):
        envelope.validate(env)


def test_request_ids_are_unique() -> None:
    assert len({envelope.new_request_id() for _ in range(1000)}) == 1000


def test_envelope_roundtrips_through_bytes() -> None:
    env = envelope.new_envelope(request_id="r1", tenant="t", producer="p")
    assert envelope_pb2.Envelope.FromString(env.SerializeToString()) == env


def test_event_ids_are_unique_hex_and_a_forked_child_draws_its_own() -> None:
    import os

    ids = {envelope.new_envelope(request_id="r", tenant="t", producer="p").event_id for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same counter state as the parent, so only a new prefix keeps ids apart
        os.write(write, envelope.new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child[:16] != envelope.new_event_id()[:16]
