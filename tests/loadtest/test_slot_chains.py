"""The worker-path overhead read off completions: slot chains are replayed as the worker ran them."""

from __future__ import annotations

import pytest

from loadtest.slot_chains import Generation, added_before_first_token
from sluice import envelope as envelopes
from sluice.v1 import envelope_pb2, events_pb2


def test_a_generation_is_read_off_its_completion() -> None:
    env = envelopes.new_envelope(request_id="r", tenant="t", producer="inference")
    env.event_time.FromNanoseconds(100 * 10**9)
    completion = events_pb2.CompletionFinished(
        envelope=env,
        time_to_first_token_ms=30,
        inter_token_ms=20.0,
        usage=envelope_pb2.Usage(completion_tokens=11),
    )
    g = Generation.of(completion, delivered=100.045)
    assert (g.taken, g.first_token, g.ended) == pytest.approx((100.0, 100.030, 100.230))


def test_each_request_carries_the_gaps_of_its_slot_chain_and_its_own_delivery() -> None:
    # Two slots. a and b start at once; c takes the slot a frees (ends first), d the one b frees.
    gens = {
        "a": Generation(taken=0.002, first_token=0.030, ended=1.000, delivered=0.040),
        "b": Generation(taken=0.003, first_token=0.031, ended=1.500, delivered=0.036),
        "c": Generation(taken=1.010, first_token=1.040, ended=2.000, delivered=1.045),
        "d": Generation(taken=1.503, first_token=1.530, ended=2.600, delivered=1.532),
        "e": Generation(taken=2.004, first_token=2.030, ended=3.000, delivered=2.031),
    }
    chains = added_before_first_token(gens, sent=0.0, slots=2)
    added = chains.added
    assert added["a"] == pytest.approx(0.002 + 0.010)
    assert added["b"] == pytest.approx(0.003 + 0.005)
    assert added["c"] == pytest.approx(0.002 + 0.010 + 0.005)  # a's start, a -> c, c's delivery
    assert added["d"] == pytest.approx(0.003 + 0.003 + 0.002)
    assert added["e"] == pytest.approx(0.002 + 0.010 + 0.004 + 0.001)  # chain a -> c -> e
    assert chains.handoffs == pytest.approx([0.010, 0.003, 0.004])
    assert chains.deliveries == pytest.approx([0.010, 0.005, 0.005, 0.002, 0.001])


def test_the_engine_time_itself_adds_nothing() -> None:
    slow = {"a": Generation(0.0, 5.0, 60.0, 5.0), "b": Generation(60.0, 65.0, 99.0, 65.0)}
    assert added_before_first_token(slow, sent=0.0, slots=1).added == {"a": 0.0, "b": 0.0}
