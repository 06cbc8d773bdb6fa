"""Readings of the database's clock (the time every decision uses; README, "Clocks")."""

from __future__ import annotations

from collections.abc import Callable

from service.clock import ClockReading
from service.store.base import StoreBase

_CLOCK_SQL = "SELECT extract(epoch FROM pg_catalog.clock_timestamp())::float8"


class PostgresClock(StoreBase):
    """The database's clock."""

    async def clock_readings(
        self, count: int, *, monotonic: Callable[[], float], wall: Callable[[], float]
    ) -> list[ClockReading]:
        """`count` readings of the database's clock, one after another on one connection
        (the first pays for the statement's preparation; its round trip shows it)."""
        readings = []
        async with self._connection() as conn:
            for _ in range(count):
                wall_before, sent = wall(), monotonic()
                # clock_timestamp(), not now(): now() is the transaction's start.
                database = await conn.fetchval(_CLOCK_SQL, timeout=self._timeout)
                received, wall_after = monotonic(), wall()
                readings.append(
                    ClockReading(
                        sent=sent,
                        received=received,
                        database=float(database),
                        wall=(wall_before + wall_after) / 2,
                    )
                )
        return readings
