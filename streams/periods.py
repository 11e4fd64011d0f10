"""UTC calendar periods for usage windows and budgets.

Calendar months are not fixed-size windows, so windows are keyed by their
calendar start instead of using faust's fixed-width tumbling windows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

Period = Literal["minute", "hour", "day", "month"]
PERIODS: tuple[Period, ...] = ("minute", "hour", "day", "month")


def window_start(period: Period, at: datetime) -> datetime:
    at = at.astimezone(UTC)
    if period == "minute":
        return at.replace(second=0, microsecond=0)
    if period == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    if period == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window_end(period: Period, start: datetime) -> datetime:
    """When the window starting at `start` resets."""
    if period == "minute":
        return start + timedelta(minutes=1)
    if period == "hour":
        return start + timedelta(hours=1)
    if period == "day":
        return start + timedelta(days=1)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
