"""Time, passed in so that tests can move it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Tells the current time as seconds since the epoch (UTC)."""

    def now(self) -> float: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def to_datetime(timestamp: float) -> datetime:
    """Seconds since the epoch to an aware UTC datetime (what asyncpg stores)."""
    return datetime.fromtimestamp(timestamp, tz=UTC)
