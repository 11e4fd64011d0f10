"""Budget semantics: alert thresholds, hard blocks, reset times, rate limits."""

from __future__ import annotations

from datetime import UTC, datetime

from sluice.v1 import billing_pb2
from streams.budget_rules import Spend, crossings, state
from streams.periods import window_end, window_start

NOW = datetime(2026, 11, 29, 15, 30, 12, tzinfo=UTC)


def budget(**fields: object) -> billing_pb2.Budget:
    return billing_pb2.Budget(tenant="t", period=billing_pb2.BUDGET_PERIOD_DAY, currency="USD", **fields)  # type: ignore[arg-type]


def test_alerts_fire_once_when_80_and_100_percent_are_crossed() -> None:
    b = budget(limit_nanos=1000, mode=billing_pb2.BUDGET_MODE_SOFT)
    assert crossings(b, Spend(nanos=700), Spend(nanos=799)) == []
    assert crossings(b, Spend(nanos=700), Spend(nanos=800)) == [("cost", 80)]
    assert crossings(b, Spend(nanos=790), Spend(nanos=1200)) == [("cost", 80), ("cost", 100)]
    assert crossings(b, Spend(nanos=1200), Spend(nanos=1300)) == []


def test_a_hard_budget_blocks_at_its_limit_and_names_limit_and_reset() -> None:
    b = budget(limit_nanos=1_000_000, mode=billing_pb2.BUDGET_MODE_HARD)
    assert not state(b, Spend(nanos=999_999), NOW).blocked
    over = state(b, Spend(nanos=1_000_000), NOW)
    assert over.blocked
    assert "limit 0.001 USD" in over.reason and "resets at 2026-11-30T00:00:00Z" in over.reason


def test_a_soft_budget_never_blocks() -> None:
    b = budget(limit_tokens=10, mode=billing_pb2.BUDGET_MODE_SOFT)
    soft = state(b, Spend(tokens=50), NOW)
    assert not soft.blocked and "limit 10 tokens" in soft.reason


def test_calendar_periods_reset_at_the_next_boundary() -> None:
    assert window_end("minute", window_start("minute", NOW)) == datetime(2026, 11, 29, 15, 31, tzinfo=UTC)
    assert window_end("day", window_start("day", NOW)) == datetime(2026, 11, 30, tzinfo=UTC)
    assert window_end("month", window_start("month", NOW)) == datetime(2026, 12, 1, tzinfo=UTC)
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert window_end("month", window_start("month", december)) == datetime(2027, 1, 1, tzinfo=UTC)
