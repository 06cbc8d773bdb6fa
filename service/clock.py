"""Time, passed in so that tests can move it.

Every decision stored in or compared with the database (lifetimes, rotation grace,
revocation windows, the key schedule) reads one `Clock`. A server runs on a
`DatabaseClock`: PostgreSQL's clock, read at start and every so often, carried forward
between readings by this process's monotonic clock. So replicas whose own wall clocks
disagree still agree on the time, within a few milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from service.failures import EXIT_CONFIGURATION, StartupError

log = logging.getLogger(__name__)


class Clock(Protocol):
    """Tells the current time as seconds since the epoch (UTC)."""

    def now(self) -> float: ...


class SystemClock:
    """This host's wall clock (only where no database is at hand: see `DatabaseClock`)."""

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


@dataclass(frozen=True, slots=True)
class ClockReading:
    """One look at the database's clock, bracketed by this process's clocks."""

    sent: float
    """Local monotonic time just before the query was sent."""
    received: float
    """Local monotonic time just after its answer arrived."""
    database: float
    """The database's clock (epoch seconds), read somewhere in between."""
    wall: float
    """Local wall clock (epoch seconds) half-way between sending and receiving."""

    @property
    def round_trip(self) -> float:
        return self.received - self.sent


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """What one measurement found."""

    monotonic_to_database: float
    """Add to local monotonic time to get the database's time."""
    wall_skew: float
    """Local wall clock minus the database's clock (positive: this host is ahead)."""
    round_trip: float
    """Round trip of the reading used; the offset is good to about half of it."""


def estimate_offset(readings: Sequence[ClockReading]) -> ClockOffset:
    """The offset from the reading with the shortest round trip (the one least disturbed
    by queueing), assuming the database read its clock half-way through the round trip."""
    if not readings:
        raise ValueError("no clock readings")
    best = min(readings, key=lambda r: r.round_trip)
    midpoint = (best.sent + best.received) / 2
    return ClockOffset(
        monotonic_to_database=best.database - midpoint,
        wall_skew=best.wall - best.database,
        round_trip=best.round_trip,
    )


class ClockNotMeasured(RuntimeError):
    """`DatabaseClock.now()` before the first successful measurement."""


class ClockSkewTooLarge(StartupError):
    """This host's wall clock is further from the database's than AUTH_CLOCK_SKEW_MAX: the
    host's configuration (its time synchronisation), exit 2."""

    exit_code = EXIT_CONFIGURATION

    def __init__(self, skew: float, limit: float) -> None:
        ahead = "ahead of" if skew > 0 else "behind"
        super().__init__(
            f"this host's clock is {abs(skew):.1f}s {ahead} the database's, more than "
            f"AUTH_CLOCK_SKEW_MAX={limit:g}s: fix the time synchronisation (NTP) of this host "
            "or of the database server"
        )
        self.skew = skew
        self.limit = limit


class DatabaseClock:
    """The database's time, as seen from this process: local monotonic time plus an
    offset measured against the database's clock (`measure`, at start and then
    periodically). Where a re-measurement fails, the last offset stays in use (monotonic
    time keeps going) and `seconds_since_measured` grows.

    `wall` is only compared with the database (`wall_skew`), never used for the time:
    tests pass a skewed one to play a host whose clock is off.
    """

    def __init__(
        self,
        take_readings: Callable[[], Awaitable[Sequence[ClockReading]]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._take_readings = take_readings
        self._monotonic = monotonic
        self._offset: ClockOffset | None = None
        self._measured_at: float | None = None  # local monotonic

    def now(self) -> float:
        if self._offset is None:
            raise ClockNotMeasured("the database clock has not been measured yet")
        return self._monotonic() + self._offset.monotonic_to_database

    async def measure(self) -> ClockOffset:
        """Read the database's clock and adopt the new offset (errors propagate and
        leave the previous offset in place)."""
        offset = estimate_offset(await self._take_readings())
        self._offset = offset
        self._measured_at = self._monotonic()
        return offset

    @property
    def offset(self) -> ClockOffset | None:
        """The offset in use (None before the first measurement)."""
        return self._offset

    @property
    def wall_skew(self) -> float | None:
        """Local wall clock minus the database's, at the last measurement."""
        return None if self._offset is None else self._offset.wall_skew

    def seconds_since_measured(self) -> float | None:
        """How old the offset in use is (None: never measured)."""
        if self._measured_at is None:
            return None
        return self._monotonic() - self._measured_at


SkewVerdict = Literal["ok", "warn", "refuse"]


def judge_skew(skew: float, *, warn: float, limit: float) -> SkewVerdict:
    """What a wall-clock skew calls for: nothing, a warning, or not serving (limit 0: never)."""
    if limit > 0 and abs(skew) > limit:
        return "refuse"
    if abs(skew) > warn:
        return "warn"
    return "ok"


def describe_skew(skew: float) -> str:
    return f"{abs(skew):.3f}s {'ahead of' if skew > 0 else 'behind'}"


async def keep_measuring(
    clock: DatabaseClock,
    *,
    interval: float,
    warn: float,
    limit: float,
    on_serving: Callable[[bool], Awaitable[None]],
) -> None:
    """Re-measure `clock` every `interval` seconds until cancelled. Past `limit`, tell
    `on_serving(False)` (and `True` once back within it); log each change of verdict
    (a warning at start-up was logged by `start_database_clock`). A failed measurement
    keeps the last offset and is logged once per run of failures."""
    offset = clock.offset
    verdict: SkewVerdict = "ok"
    if offset is not None and judge_skew(offset.wall_skew, warn=warn, limit=limit) == "warn":
        verdict = "warn"  # already said at start-up; "refuse" is acted on below
    failing = False
    while True:
        if offset is not None:
            new = judge_skew(offset.wall_skew, warn=warn, limit=limit)
            if new != verdict:
                await _tell_skew(offset.wall_skew, new, verdict, warn, limit, on_serving)
                verdict = new
        await asyncio.sleep(interval)
        try:
            offset = await clock.measure()
        except Exception as exc:  # the database is away: monotonic time carries on
            if not failing:
                log.warning(
                    "cannot read the database's clock (%s); keeping the last offset",
                    type(exc).__name__,
                )
            failing = True
            offset = None
            continue
        if failing:
            log.info("reading the database's clock again")
            failing = False


async def _tell_skew(
    skew: float,
    new: SkewVerdict,
    old: SkewVerdict,
    warn: float,
    limit: float,
    on_serving: Callable[[bool], Awaitable[None]],
) -> None:
    where = describe_skew(skew)
    if new == "refuse":
        log.error(
            "this host's clock is %s the database's, more than AUTH_CLOCK_SKEW_MAX=%gs: "
            "reporting NOT_SERVING until it is back within it",
            where,
            limit,
        )
        await on_serving(False)
        return
    if old == "refuse":
        await on_serving(True)
    if new == "warn":
        log.warning(
            "this host's clock is %s the database's (AUTH_CLOCK_SKEW_WARN=%gs); "
            "the service uses the database's time",
            where,
            warn,
        )
    else:
        log.info("this host's clock is back within %gs of the database's", warn)
