"""A request re-run after its worker died: the caller pays every attempt, and text starts over."""

from __future__ import annotations

from services.gateway.pseudonyms import Restoration
from services.gateway.service import total_cost
from services.redaction.streaming import PlaceholderRestorer
from sluice.v1 import envelope_pb2


def cost(nanos: int) -> envelope_pb2.Cost:
    return envelope_pb2.Cost(nanos=nanos, currency="USD", amount="x", price_version="v1")


def test_one_attempt_keeps_its_own_cost() -> None:
    only = cost(4200)
    assert total_cost([only]) == only
    assert total_cost([]) is None


def test_a_rerun_bills_the_sum_of_every_attempt_exactly() -> None:
    total = total_cost([cost(1_500), cost(2_700)])
    assert total is not None
    assert (total.nanos, total.currency, total.amount) == (4_200, "USD", "0.0000042")
    assert total.price_version == "v1"


def opened(originals: dict[str, str]) -> Restoration:
    """A restoration whose vault is open (as after `open`, without sealing one)."""
    restoration = Restoration(keyring=None, tenant="t", request_id="r")
    restoration._originals = originals
    restoration._restorer = PlaceholderRestorer(originals)
    return restoration


def test_restart_drops_text_held_back_from_the_dead_attempt() -> None:
    held = opened({"<PERSON_1>": "Jane Roe"})
    assert held.push("Hello <PERS") == "Hello "  # may be the start of a placeholder
    assert held.finish() == "<PERS"

    restarted = opened({"<PERSON_1>": "Jane Roe"})
    restarted.push("Hello <PERS")
    restarted.restart()
    assert restarted.finish() == ""
    assert restarted.push("Hi <PERSON_1>!") + restarted.finish() == "Hi Jane Roe!"
